"""The command line: help, pass listing, options, exit codes, deterministic output."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.cli import build_parser, main
from graphopt.errors import UserInputError
from graphopt.input_dims import parse_input_shapes
from graphopt.recipe import parse_size
from graphopt.registry import GraphPass, all_passes
from graphopt_tests.helpers import AddToSubPass, SilentAddToSubPass, op_types, register_for_test

F = TensorProto.FLOAT


def model_file(folder: Path, name: str = "m.onnx") -> Path:
    """y = Relu(x·w + b) + Identity(x·0 + 1), symbolic batch: dead ends for the pipeline."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Identity", ["r"], ["y"]),
            helper.make_node("Neg", ["x"], ["unused"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 4])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / name
    onnx.save_model(proto, path)
    return path


def run(args: list[str], capsys, monkeypatch=None) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch) -> None:
    # rich wraps tables to the terminal width; keep names whole in captured output.
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.parametrize("command", [[], ["optimize"], ["inspect"], ["passes"]])
def test_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: graphopt")
    if command == ["optimize"]:
        for flag in (
            "--passes",
            "--skip",
            "--input-shape",
            "--fold-limit",
            "--no-verify",
            "--in-place",
            "--external-data",
            "--recipe",
        ):
            assert flag in out


def test_help_through_console_script() -> None:
    exe = Path(sys.executable).parent / "graphopt"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "optimize" in proc.stdout and "inspect" in proc.stdout


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    code, out, _ = run([], capsys)
    assert code == 2 and "usage" in out


def test_unknown_option_is_a_usage_error(capsys) -> None:
    code, _, err = run(["optimize", "x.onnx", "--frobnicate"], capsys)
    assert code == 2 and "unrecognized arguments" in err


def test_passes_lists_registered_passes(capsys) -> None:
    code, out, _ = run(["passes"], capsys)
    assert code == 0
    for name, cls in all_passes().items():
        assert name in out
        assert cls.description()[:30] in out


def test_default_output_name_and_report(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    code, out, _ = run(["optimize", str(path)], capsys)
    assert code == 0
    written = tmp_path / "m.opt.onnx"
    assert written.is_file() and f"wrote {written}" in out
    assert "verification passed" in out
    assert "nodes 5 ->" in out
    onnx.checker.check_model(str(written))


def test_passes_and_skip(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    out_path = tmp_path / "o.onnx"
    code, out, _ = run(
        ["optimize", str(path), "-o", str(out_path), "--passes", "dead-code"], capsys
    )
    assert code == 0
    assert sorted(op_types(io.load(out_path).model)) == ["Add", "Identity", "MatMul", "Relu"]
    code, out, _ = run(["optimize", str(path), "-o", str(out_path), "--skip", "dead-code"], capsys)
    assert code == 0
    assert "dead-code" not in out


@pytest.mark.parametrize("flag", ["--passes", "--skip"])
@pytest.mark.parametrize("value", ["no-such-pass", "dead-code,nope", ",,"])
def test_unknown_pass_name_is_exit_2(tmp_path: Path, capsys, flag: str, value: str) -> None:
    path = model_file(tmp_path)
    code, _, err = run(["optimize", str(path), flag, value], capsys)
    assert code == 2
    assert "unknown pass" in err or "comma-separated" in err
    assert not (tmp_path / "m.opt.onnx").exists()


def test_parse_input_shapes() -> None:
    assert parse_input_shapes(["x:1x3x224x224", "ids:2X16", "scalar:"]) == {
        "x": (1, 3, 224, 224),
        "ids": (2, 16),
        "scalar": (),
    }
    # Names may contain colons: the dims follow the last one.
    assert parse_input_shapes(["a:b:3x4"]) == {"a:b": (3, 4)}
    assert parse_input_shapes(None) == {}
    for bad in ("x", ":1x2", "x:1xa", "x:-1x2", "x:1x", "x:1.5"):
        with pytest.raises(UserInputError):
            parse_input_shapes([bad])


def test_input_shape_option(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    code, _, _ = run(["optimize", str(path), "--input-shape", "x:3x4"], capsys)
    assert code == 0
    for bad, message in (
        ("x:3xq", "integers"),
        ("nope:1x4", "unknown input"),
        ("x4", "expected NAME"),
    ):
        code, _, err = run(["optimize", str(path), "--input-shape", bad], capsys)
        assert code == 2 and message in err, err


def test_parse_size() -> None:
    assert parse_size("1MB") == 1 << 20
    assert parse_size("512KB") == 512 << 10
    assert parse_size("512kib") == 512 << 10
    assert parse_size("2g") == 2 << 30
    assert parse_size("1000") == 1000
    assert parse_size("1.5MB") == int(1.5 * (1 << 20))
    assert parse_size(" None ") is None
    assert parse_size(None) is None
    assert parse_size(7) == 7
    for bad in ("bad", "-1", "1TB", "MB", ""):
        with pytest.raises(UserInputError):
            parse_size(bad)
    with pytest.raises(UserInputError):
        parse_size(-5)


@pytest.mark.parametrize(("value", "expected"), [("1MB", 1 << 20), ("none", None), ("0", 0)])
def test_fold_limit_reaches_passes(
    tmp_path: Path, capsys, monkeypatch, value: str, expected: int | None
) -> None:
    seen: list[int | None] = []

    class Spy(GraphPass):
        """Test only: records the fold limit it was given."""

        name = "test-spy"

        def rewrite(self, model) -> int:
            seen.append(self.context.fold_limit_bytes)
            return 0

    register_for_test(monkeypatch, Spy)
    path = model_file(tmp_path)
    code, _, _ = run(["optimize", str(path), "--passes", "test-spy", "--fold-limit", value], capsys)
    assert code == 0 and seen and all(limit == expected for limit in seen)


def test_bad_fold_limit(tmp_path: Path, capsys) -> None:
    code, _, err = run(["optimize", str(model_file(tmp_path)), "--fold-limit", "bad"], capsys)
    assert code == 2 and "size 'bad'" in err


def test_no_verify(tmp_path: Path, capsys) -> None:
    code, out, _ = run(["optimize", str(model_file(tmp_path)), "--no-verify"], capsys)
    assert code == 0
    assert "not verified: --no-verify" in out
    assert "verification passed" not in out


def test_breaking_exact_pass_is_rolled_back_and_run_exits_0(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    register_for_test(monkeypatch, AddToSubPass)
    path = model_file(tmp_path)
    code, out, _ = run(["optimize", str(path)], capsys)
    assert code == 0
    assert "rolled back: test-add-to-sub" in out
    assert "verification passed" in out
    # The written model has no Sub (the Add survives or is fused into a Gemm) and lost what
    # the other passes removed.
    ops = op_types(io.load(tmp_path / "m.opt.onnx").model)
    assert "Sub" not in ops and "Neg" not in ops and ("Add" in ops or "Gemm" in ops)


def test_verification_failure_is_exit_1_and_writes_nothing(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    # A pass that breaks outputs without reporting hits cannot be rolled back.
    register_for_test(monkeypatch, SilentAddToSubPass)
    path = model_file(tmp_path)
    code, _, err = run(["optimize", str(path), "--passes", "test-silent-add-to-sub"], capsys)
    assert code == 1
    assert "verification failed" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.opt.onnx").exists()


def test_keyboard_interrupt_is_130(tmp_path: Path, capsys, monkeypatch) -> None:
    import graphopt.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graphopt.api, "optimize", interrupted)
    code, _, err = run(["optimize", str(model_file(tmp_path))], capsys)
    assert code == 130 and "interrupted" in err


def test_internal_error_is_exit_3_without_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    import graphopt.api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(graphopt.api, "optimize", bug)
    monkeypatch.delenv("GRAPHOPT_DEBUG", raising=False)
    code, _, err = run(["optimize", str(model_file(tmp_path))], capsys)
    assert code == 3 and "internal error: ZeroDivisionError: oops" in err


def test_output_is_deterministic(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    outputs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outputs:
        code, _, _ = run(["optimize", str(path), "-o", str(out)], capsys)
        assert code == 0
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_parser_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["optimize", "m.onnx", "--input-shape", "x:1", "--input-shape", "y:2"])
    assert args.input_shape == ["x:1", "y:2"]


# ---- verification is never skipped silently ----------------------------------------------


def test_exit_codes_are_documented_in_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "4 written but not verified" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    assert "--custom-ops" in capsys.readouterr().out


def _save(folder: Path, name: str, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / name
    onnx.save_model(proto, path)
    return path


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("x:1x4x1", "input 'x' has rank 2 ([batch, 4]), not 3"),
        ("x:2x5", "axis 1 of input 'x' is fixed at 4 by the model ([batch, 4])"),
        (
            "x:0x4",
            "a zero-sized dim gives empty tensors, on which any rewrite compares equal; "
            "use dims of at least 1",
        ),
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_bad_input_shape_is_exit_2_and_writes_nothing(
    tmp_path: Path, capsys, shape: str, message: str, verify: bool
) -> None:
    # Before: ORT refused the shape, the run ended "not verified" and exit 0 (or, for the
    # zero-sized dim, "verification passed" on empty tensors).
    argv = ["optimize", str(model_file(tmp_path)), "--input-shape", shape]
    code, _, err = run([*argv] if verify else [*argv, "--no-verify"], capsys)
    assert code == 2, err
    assert err.strip() == f"graphopt: error: --input-shape {shape}: {message}"
    assert not (tmp_path / "m.opt.onnx").exists()


@pytest.mark.parametrize("command", [["inspect"], ["analyze"], ["analyze", "--raw"]])
def test_inspect_and_analyze_refuse_a_shape_the_model_cannot_take(
    tmp_path: Path, capsys, command: list[str]
) -> None:
    # Before: inspect and analyze --raw reported FLOPs at x 2x5, a shape ORT refuses.
    argv = [*command, str(model_file(tmp_path)), "--input-shape", "x:2x5"]
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert err.strip().endswith("axis 1 of input 'x' is fixed at 4 by the model ([batch, 4])")
    code, _, err = run([*command, str(model_file(tmp_path)), "--input-shape", "x:2x4"], capsys)
    assert code == 0, err


def test_model_that_rejects_generated_inputs_is_written_but_exit_4(tmp_path: Path, capsys) -> None:
    # x[batch, n] reshaped to 1x3x4: the default n = 16 cannot be; n = 12 can.
    path = _save(
        tmp_path,
        "m.onnx",
        [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["batch", "n"])],
        [helper.make_tensor_value_info("y", F, [1, 3, 4])],
        [onnx.numpy_helper.from_array(np.array([1, 3, 4], np.int64), "s")],
    )
    code, out, err = run(["optimize", str(path)], capsys)
    assert code == 4
    assert (tmp_path / "m.opt.onnx").is_file() and "wrote" in out
    assert "verification passed" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: written but not verified:")
    # The input, the shape it had, the fix, and ORT's reason whole (it sits past 300
    # characters, behind a source location).
    assert "x 1x16" in err and "--input-shape" in err
    assert "Input shape:{1,16}, requested shape:{1,3,4}" in err
    code, out, _ = run(["optimize", str(path), "--input-shape", "x:1x12"], capsys)
    assert code == 0 and "verification passed" in out
    assert run(["optimize", str(path), "--no-verify"], capsys)[0] == 0


def test_empty_outputs_are_not_verification_passed(tmp_path: Path, capsys) -> None:
    path = _save(
        tmp_path,
        "m.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", F, [0, 4])],
        [helper.make_tensor_value_info("y", F, [0, 4])],
    )
    code, out, err = run(["optimize", str(path)], capsys)
    assert code == 4, out
    assert "verification passed" not in out
    assert "written but not verified" in err and "empty" in err
    assert (tmp_path / "m.opt.onnx").is_file()


def test_interrupt_while_importing_onnxruntime_is_130(tmp_path: Path, capsys, monkeypatch) -> None:
    from graphopt_tests.test_verify import _InterruptedImport

    path = model_file(tmp_path)
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(), *sys.meta_path])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = run(["optimize", str(path)], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    # Before: the interrupt became an ImportError, verification was skipped, exit 0.
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "m.opt.onnx").exists()


def test_not_verified_message_is_one_line_whatever_the_input_names(tmp_path: Path, capsys):
    # The reason names the inputs; a name with a line break must not split the error line.
    name = "a\nb\u2028c"
    path = _save(
        tmp_path,
        "m.onnx",
        [helper.make_node("Reshape", [name, "s"], ["y"])],
        [helper.make_tensor_value_info(name, F, ["n"])],
        [helper.make_tensor_value_info("y", F, [3, 4])],
        [onnx.numpy_helper.from_array(np.array([3, 4], np.int64), "s")],
    )
    code, _, err = run(["optimize", str(path)], capsys)
    assert code == 4
    assert len(err.splitlines()) == 1 and "written but not verified" in err
    assert "a\\nb\\u2028c" in err


# ---- honest reports ---------------------------------------------------------------------


def _ffn_file(folder: Path, kind: str) -> Path:
    """The pruning tests' FFN (x [batch, 4, 16] → 64 hidden → 16) whose outputs are finite
    ("plain"), -inf where a Relu is off ("log": Log(Relu(y))), all zero or all one."""
    from graphopt_tests.passes.pruning.graphs import mlp

    proto = ir.to_proto(mlp())
    inits = {t.name: t for t in proto.graph.initializer}
    if kind in ("zero", "constant"):
        w2 = onnx.numpy_helper.to_array(inits["w2"])
        inits["w2"].CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(w2), "w2"))
        b2 = np.zeros(16, np.float32) if kind == "zero" else np.ones(16, np.float32)
        inits["b2"].CopyFrom(onnx.numpy_helper.from_array(b2, "b2"))
    if kind == "log":
        proto.graph.output[0].name = "y0"
        proto.graph.node[-1].output[0] = "y0"
        proto.graph.node.extend(
            [helper.make_node("Relu", ["y0"], ["r"]), helper.make_node("Log", ["r"], ["y"])]
        )
        proto.graph.output[0].name = "y"
    path = folder / f"{kind}.onnx"
    onnx.save_model(proto, path)
    return path


def _calib_file(folder: Path) -> Path:
    from graphopt_tests.passes.pruning.graphs import correlated

    path = folder / "calib.npz"
    np.savez(path, x=correlated(np.random.default_rng(0), (32, 4, 16)))
    return path


PRUNE_WITH_DATA = ["--prune", "flops=0.3", "--criterion", "fluctuation", "--compensation", "bias"]


@pytest.mark.parametrize("kind", ["log", "zero", "constant"])
def test_no_numpy_warnings_on_non_finite_zero_or_constant_outputs(
    tmp_path: Path, capsys, kind: str
) -> None:
    import warnings

    path, calib = _ffn_file(tmp_path, kind), _calib_file(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(
            ["optimize", str(path), *PRUNE_WITH_DATA, "--calib", str(calib)], capsys
        )
    assert code == 0 and err == ""
    # Before: fidelity.py's "invalid value encountered in subtract/divide" on -inf - -inf.
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert " nan " not in out


def test_stderr_is_clean_when_pruning_a_model_with_infinite_outputs(tmp_path: Path) -> None:
    # The real terminal: numpy prints its warnings to stderr in a plain run.
    import graphopt

    path, calib = _ffn_file(tmp_path, "log"), _calib_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "graphopt", "optimize", str(path), *PRUNE_WITH_DATA,
         "--calib", str(calib)],
        capture_output=True, text=True, cwd=Path(graphopt.__file__).parents[1], timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_verbose_lists_every_pass_also_after_the_command(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    code, out, _ = run(["optimize", str(path), "-o", str(tmp_path / "o.onnx")], capsys)
    # A portable run on a 5-node model: no rows for another target's or idle passes.
    assert code == 0 and "ort-gelu" not in out and "cse " not in out
    assert "more passes:" in out and "skipped" in out and "--verbose" in out
    code, out, _ = run(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--verbose"], capsys)
    assert code == 0 and "ort-gelu" in out and "more passes:" not in out


# ---- flags that do what they say, or an error ---------------------------------------------


def test_passes_without_the_asked_lossy_pass_is_exit_2(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    # Before: exit 0, and --prune silently dropped.
    code, _, err = run(
        ["optimize", str(path), "--passes", "dead-code", "--prune", "flops=0.3"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "prune asked for next to an explicit pass list" in err
    assert not (tmp_path / "m.opt.onnx").exists()


def test_passes_naming_prune_run_it_there_with_the_prune_flags(tmp_path: Path, capsys) -> None:
    path = _ffn_file(tmp_path, "plain")
    out_path = tmp_path / "o.onnx"
    code, out, err = run(
        ["optimize", str(path), "-o", str(out_path), "--passes", "dead-code,prune,dead-code",
         "--prune", "flops=0.3", "--round-to", "1", "--no-verify"],
        capsys,
    )  # fmt: skip
    # Before: the list's bare `prune` had no target ("give exactly one target"), exit 2.
    assert code == 0, err
    text = " ".join(out.split())
    assert "pruning flops=0.3: 19 units from 1/1 groups" in text
    # --no-verify reaches a listed prune too (its zero-invariance check).
    assert "zero-invariance check skipped (--no-verify)" in text


def test_skip_takes_passes_out_of_an_explicit_list_and_notes_the_rest(
    tmp_path: Path, capsys
) -> None:
    path = model_file(tmp_path)
    out_path = tmp_path / "o.onnx"
    code, out, _ = run(
        ["optimize", str(path), "-o", str(out_path), "--passes", "dead-code,identity",
         "--skip", "identity,cse"],
        capsys,
    )  # fmt: skip
    assert code == 0
    # Before: --skip was ignored next to --passes, and identity removed the Identity node.
    assert "Identity" in op_types(io.load(out_path).model)
    assert "note: skip cse: not in the explicit pass list, so skipping changed nothing" in out


def test_skip_of_another_targets_pass_is_noted(tmp_path: Path, capsys) -> None:
    """--skip ort-gelu in a portable run changed nothing and said nothing."""
    path = model_file(tmp_path)
    args = ["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--skip", "ort-gelu"]
    code, out, _ = run(args, capsys)
    assert code == 0
    assert "skip ort-gelu: not a pass of --target portable, so skipping changed nothing" in out
    code, out, _ = run([*args, "--target", "ort"], capsys)
    assert code == 0 and "skip ort-gelu" not in out


def test_skip_of_a_lossy_pass(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    # Asked for and skipped: before, it pruned anyway (skip only applied to exact passes).
    code, _, err = run(["optimize", str(path), "--skip", "prune", "--prune", "flops=0.3"], capsys)
    assert code == 2 and "prune is both asked for" in err
    code, out, _ = run(["optimize", str(path), "--skip", "prune"], capsys)
    assert code == 0 and "skip prune: lossy passes run only when asked for" in out


def test_options_without_effect_are_noted(tmp_path: Path, capsys) -> None:
    path = model_file(tmp_path)
    out_path = str(tmp_path / "o.onnx")
    code, out, _ = run(
        ["optimize", str(path), "-o", out_path, "--no-verify", "--tolerance", "1e-3",
         "--seed", "3"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert "note: --tolerance and --seed had no effect: verification was off" in out
    code, out, _ = run(
        ["optimize", str(path), "-o", out_path, "--passes", "dead-code,ort-gelu",
         "--fold-limit", "2MB"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert "note: --fold-limit had no effect: constant-folding is not in this run's passes" in out
    assert "note: ort-gelu did nothing: not a pass of --target portable" in out
    # The same flags where they act: no note.
    code, out, _ = run(
        ["optimize", str(path), "-o", out_path, "--tolerance", "1e-3", "--fold-limit", "2MB"],
        capsys,
    )
    assert code == 0 and "had no effect" not in out


class _OutOfMemoryPass(GraphPass):
    """Test only: runs out of memory (Python's MemoryError, or ORT's words for it)."""

    name = "test-oom"
    message = ""

    def rewrite(self, model) -> int:
        if self.message:
            raise RuntimeError(self.message)
        raise MemoryError


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        ("", ""),
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bfc_arena.cc:376 Failed to allocate "
            "memory for requested buffer of size 8589934592",
            " (ONNX Runtime: Failed to allocate memory for requested buffer of size 8589934592)",
        ),
    ],
)
def test_out_of_memory_in_a_pass_is_exit_3_not_a_rollback(
    tmp_path: Path, capsys, monkeypatch, message: str, detail: str
) -> None:
    monkeypatch.setattr(_OutOfMemoryPass, "message", message)
    register_for_test(monkeypatch, _OutOfMemoryPass)
    path = model_file(tmp_path)
    code, _, err = run(["optimize", str(path), "--passes", "dead-code,test-oom"], capsys)
    # Before: taken for a crashing pass, rolled back, and exit 0.
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert err.strip() == (
        f"graphopt: error: out of memory while running test-oom (round 1){detail}; "
        "try --no-verify / a smaller --input-shape"
    )
    assert not (tmp_path / "m.opt.onnx").exists()


def test_ort_allocation_failure_on_the_original_is_exit_3_not_4(tmp_path: Path, capsys) -> None:
    # The output needs 2^52 bytes: ORT's arena refuses at once (no memory is touched).
    path = _save(
        tmp_path,
        "huge.onnx",
        [helper.make_node("Expand", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", F, [1])],
        [helper.make_tensor_value_info("y", F, None)],
        [onnx.numpy_helper.from_array(np.array([2**20, 2**20, 2**10], np.int64), "s")],
    )
    code, _, err = run(["optimize", str(path)], capsys)
    # Before: "written but not verified: ONNX Runtime cannot run the original model", exit 4.
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "out of memory while running the original model in ONNX Runtime" in err
    assert "Failed to allocate memory" in err and "try --no-verify" in err
    assert not (tmp_path / "huge.opt.onnx").exists()


def test_memory_error_while_loading_is_exit_3_not_bad_input(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import graphopt.io

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(graphopt.io, "load", exhausted)
    code, _, err = run(["optimize", str(model_file(tmp_path))], capsys)
    # Before: "graphopt: error: out of memory" with exit 2 (bad input).
    assert code == 3
    assert err.strip() == (
        "graphopt: error: out of memory while loading the model; "
        "try --no-verify / a smaller --input-shape"
    )


def _relu_file(folder: Path) -> Path:
    return _save(
        folder,
        "relu.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["batch", 8])],
        [helper.make_tensor_value_info("y", F, ["batch", 8])],
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sparsity", "2:4"], "--sparsity: nothing to do"),
        (["--factorize", "rank=8"], "--factorize: nothing to do"),
        (["--decompose", "ratio=0.3"], "--decompose: nothing to do"),
        # Pruning and quantization wrote a copy of the input, exit 0 ("0 layers quantized").
        (["--prune", "flops=0.5"], "--prune: nothing to do"),
        (["--quantize", "int8", "--calib", "random"], "--quantize int8: nothing to do"),
        (["--quantize", "int8-dynamic"], "--quantize int8-dynamic: nothing to do"),
        (["--quantize", "int4-weight", "--target", "ort"], "--quantize int4-weight: nothing"),
        (["--quantize", "fp8", "--opset", "19"], "--quantize fp8: nothing to do"),
    ],
)
def test_a_lossy_pass_with_nothing_to_rewrite_is_refused(
    tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    # Before: skipped like an idle exact pass, exit 0, the report silent about it.
    code, _, err = run(["optimize", str(_relu_file(tmp_path)), *flags], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "relu.opt.onnx").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sparsity-layers", ",,"], "layers ',,': expected all, ffn, attention"),
        (["--factorize", "rank=1e308"], "rank=K needs a positive integer"),
    ],
)
def test_lossy_option_mistakes_are_one_line(
    tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    path = model_file(tmp_path)
    lossy = [] if flags[0].startswith("--factorize") else ["--sparsity", "2:4"]
    code, _, err = run(["optimize", str(path), *lossy, *flags], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0, err


def test_input_shapes_must_agree_on_named_dims_and_not_repeat(tmp_path: Path, capsys) -> None:
    path = _save(
        tmp_path,
        "two.onnx",
        [helper.make_node("Mul", ["ids", "mask"], ["y"])],
        [
            helper.make_tensor_value_info("ids", F, ["batch", "sequence"]),
            helper.make_tensor_value_info("mask", F, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("y", F, ["batch", "sequence"])],
    )
    # Before: ORT refused the pair, and the run ended "not verified" (exit 4), written.
    code, _, err = run(
        ["optimize", str(path), "--input-shape", "ids:1x16", "--input-shape", "mask:1x8"], capsys
    )
    assert code == 2 and "dim 'sequence' is 8 here but 16 for input 'ids'" in err, err
    # Before: the last of two bindings of one input won without a word.
    code, _, err = run(
        ["optimize", str(path), "--input-shape", "ids:1x16", "--input-shape", "ids:1x8"], capsys
    )
    assert code == 2 and "--input-shape ids: given twice, with different dims" in err, err
    assert not (tmp_path / "two.opt.onnx").exists()
    argv = ["optimize", str(path), "--input-shape", "ids:1x16", "--input-shape", "mask:1x16"]
    assert run(argv, capsys)[0] == 0
    # "?" is paddle2onnx's "unknown", not a name two dims share (PP-OCR's cls: [?, 3, ?, ?]).
    anonymous = _save(
        tmp_path,
        "anon.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", F, ["?", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", F, ["?", 3, "?", "?"])],
    )
    assert run(["optimize", str(anonymous), "--input-shape", "x:1x3x48x192"], capsys)[0] == 0


def test_an_empty_skip_skips_nothing(tmp_path: Path, capsys) -> None:
    """Scripts pass --skip "$SKIP" with an empty variable: that skips nothing (an empty
    --passes stays an error: it would run nothing)."""
    path = model_file(tmp_path)
    code, _, err = run(["optimize", str(path), "--skip", ""], capsys)
    assert code == 0, err


@pytest.mark.parametrize("calib", ["", "  "])
def test_an_empty_calib_path_is_refused(tmp_path: Path, capsys, calib: str) -> None:
    """``--calib ''`` (an unset shell variable) ran as "no calibration data"; refused now,
    as ``--recipe ''`` is."""
    out = tmp_path / "o.onnx"
    code, _, err = run(
        ["optimize", str(model_file(tmp_path)), "-o", str(out), "--prune", "flops=0.3",
         "--calib", calib],
        capsys,
    )  # fmt: skip
    assert code == 2 and not out.exists()
    assert "(--calib): empty path" in err and len(err.strip().splitlines()) == 1


def test_sparse_kernels_threads_past_the_cpus_are_refused(tmp_path: Path, capsys) -> None:
    """100000 spawned ~10,000 threads and 16 GB before anything said no."""
    out = tmp_path / "o.onnx"
    code, _, err = run(
        ["optimize", str(model_file(tmp_path)), "-o", str(out), "--target", "ort",
         "--sparse-kernels", "--sparse-kernels-threads", "100000"],
        capsys,
    )  # fmt: skip
    assert code == 2 and not out.exists()
    assert "--sparse-kernels-threads): expected a number in [1, " in err
