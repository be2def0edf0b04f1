"""TensorRT's parser and builder run in a child process: a crash there (a segfault) is one
line naming the component and the signal, with lint's and --engine's exit codes, never the
end of graphopt. The crashes are made deterministic by handlers defined here, which the child
imports (they are pickled by reference)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.backends.tensorrt import build, isolated
from graphopt.cli import main
from graphopt_tests.backends.trt_models import relu_file

_parses = 0  # in the child: how many parses its handler has seen


def _segfault(*_args) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _crash_on_second_parse(trt, model_bytes: bytes, path: str | None):
    global _parses
    _parses += 1
    if _parses > 1:
        _segfault()
    return isolated.summarize(trt, model_bytes, path)


def _crash_building(phase, *_args) -> None:
    phase(isolated.BUILDER)
    _segfault()


@pytest.fixture
def fresh_children():
    """The parser child is started anew with the handler a test sets, and ended after."""
    isolated.shutdown()
    yield
    isolated.shutdown()


def _plugin_ops(path: Path, repeats: int) -> Path:
    """Relu chains each feeding a NonZero and a RoiAlign (plugins TensorRT-RTX lacks): the
    parser rejects all of them, one parse per cut."""
    nodes, outputs, previous = [], [], "x"
    for i in range(repeats):
        nodes += [
            helper.make_node("Relu", [previous], [f"r{i}"]),
            helper.make_node("NonZero", [f"r{i}"], [f"nz{i}"]),
            helper.make_node(
                "RoiAlign", [f"r{i}", "rois", "bi"], [f"y{i}"], output_height=2, output_width=2
            ),
        ]
        outputs += [
            helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"nz{i}", TensorProto.INT64, None),
        ]
        previous = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "plugins",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("rois", TensorProto.FLOAT, [3, 4]),
            helper.make_tensor_value_info("bi", TensorProto.INT64, [3]),
        ],
        outputs,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_parsing_past_several_rejections_does_not_crash(trt, tmp_path: Path, capsys) -> None:
    """The parse-on loop once kept each parse's network alive during the next parse, which
    segfaulted TensorRT-RTX's parser on the second plugin op (torchvision's Faster R-CNN)."""
    assert main(["lint", str(_plugin_ops(tmp_path / "p.onnx", 2))]) == 1
    out = capsys.readouterr().out
    assert out.count("error: ") == 4
    assert "rejected by TensorRT-RTX" in out and "parser: 4 error(s)" in out


def test_a_parser_crash_is_one_line_with_the_tables_verdict(
    trt, fresh_children, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(isolated, "PARSE_HANDLER", _segfault)
    model = _plugin_ops(tmp_path / "p.onnx", 1)
    assert main(["lint", str(model)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == (
        "error: graph: TensorRT's parser crashed (SIGSEGV) parsing the model: TensorRT "
        "cannot load it (the static rule table's findings follow)"
    )
    # The table's rejections (its wording, not the parser's) and its verdict.
    assert sum("needs a TensorRT plugin" in line for line in lines) == 2
    assert lines[-1].endswith(
        "rejected by static rule table (TensorRT-RTX "
        f"{trt.version} (tensorrt_rtx) parser crashed (SIGSEGV)): 3 error(s), 0 warning(s)"
    )
    assert "Traceback" not in captured.out + captured.err
    # A model the table accepts is still not accepted: TensorRT cannot load it.
    assert main(["lint", "--json", str(relu_file(tmp_path / "r.onnx"))]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checker"] == "static rule table" and report["errors"] == 1
    assert report["findings"][0]["rule"] == "parser-crash"
    # The crash ended that child only: the next lint starts another.
    monkeypatch.setattr(isolated, "PARSE_HANDLER", isolated.summarize)
    isolated.shutdown()
    assert main(["lint", str(relu_file(tmp_path / "r.onnx"))]) == 0


def test_a_crash_on_a_cut_copy_keeps_the_parsers_findings(
    trt, fresh_children, tmp_path: Path, monkeypatch, capsys
) -> None:
    """After a rejected node was cut out, the parser parses a copy with stand-in inputs: a
    crash there is no verdict on the model (a warning), and what it rejected before stays."""
    monkeypatch.setattr(isolated, "PARSE_HANDLER", _crash_on_second_parse)
    assert main(["lint", str(_plugin_ops(tmp_path / "p.onnx", 1))]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("error: ") and "NonZero" in lines[0]
    crash = [line for line in lines if "crashed" in line]
    assert crash == [
        "warning: graph: unverified, parsed only after node 1 (NonZero) was cut out (its "
        "outputs stood in as network inputs): TensorRT's parser crashed (SIGSEGV); the "
        "nodes after it were not parsed"
    ]
    assert "rejected by TensorRT-RTX" in lines[-1]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("component", ["parser", "builder"])
def test_an_engine_build_crash_is_one_line_exit_1(
    trt, tmp_path: Path, monkeypatch, capsys, component: str
) -> None:
    monkeypatch.setattr(build, "_build", _segfault if component == "parser" else _crash_building)
    source = relu_file(tmp_path / "r.onnx")
    output, plan = tmp_path / "o.onnx", tmp_path / "r.plan"
    args = ["optimize", str(source), "-o", str(output), "--target", "tensorrt"]
    assert main([*args, "--engine", str(plan), "--shapes", "x:min=1x4,opt=2x4,max=8x4"]) == 1
    captured = capsys.readouterr()
    assert f"TensorRT's {component} crashed (SIGSEGV)" in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert output.exists() and not plan.exists()  # the ONNX is written, as on a rejection


def test_a_script_without_a_main_guard_can_lint(trt, tmp_path: Path) -> None:
    """The child is ``python -m``, not multiprocessing's spawn, which would run a caller's
    unguarded script again in the child."""
    script = tmp_path / "lint_it.py"
    script.write_text(
        "import sys\nfrom graphopt.cli import main\nsys.exit(main(['lint', sys.argv[1]]))\n"
    )
    model = relu_file(tmp_path / "r.onnx")
    done = subprocess.run(
        [sys.executable, str(script), str(model)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "accepted by TensorRT-RTX" in done.stdout and not done.stderr
