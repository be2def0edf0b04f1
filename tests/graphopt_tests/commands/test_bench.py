"""``graphopt bench``: batch sizes, shared inputs, ratios, JSON, the .ort format, bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.backends.ort_bench import BenchRequest, _feeds, _open, shapes_at
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _model(batch: str | int = "batch", width: int = 16):
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        [tensor_info("x", F, [batch, width])],
        [tensor_info("y", F, [batch, 8])],
        {"w": rng.standard_normal((width, 8)).astype(np.float32)},
    )


def _file(folder: Path, name: str = "m.onnx", **kwargs) -> Path:
    path = folder / name
    io.save(_model(**kwargs), path)
    return path


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_per_batch_with_ratio_to_the_first(tmp_path: Path, capsys) -> None:
    a, b = str(_file(tmp_path)), str(_file(tmp_path, "b.onnx"))
    code, out, _ = _run(["bench", a, b, "--batch", "1", "4", "--runs", "5", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["session"]["threads"] == 1 and data["session"]["providers"] == [
        "CPUExecutionProvider"
    ]
    assert [x["batch"] for x in data["batches"]] == [1, 4]
    assert "x 4x16" in data["batches"][1]["shapes"]
    for batch in data["batches"]:
        first, second = batch["models"]
        assert first["ratio_to_first"] is None
        ratio = second["ratio_to_first"]
        assert 0 < ratio["p10"] <= ratio["median"] <= ratio["p90"]
        latency = first["latency_ms"]
        assert 0 < latency["p10"] <= latency["median"] <= latency["p90"]
        # Items per second at the median latency.
        expected = batch["batch"] / (latency["median"] / 1e3)
        assert first["throughput_per_s"] == pytest.approx(expected)


def test_table_names_models_and_says_what_the_ratio_is(tmp_path: Path, capsys) -> None:
    a = str(_file(tmp_path))
    code, out, _ = _run(["bench", a, a, "--runs", "3", "--threads", "1"], capsys)
    assert code == 0
    assert "ref" in out and "x (" in out and "time(#1) / time(model)" in out
    assert "3 warm-up + 3 interleaved rounds" in out and "seed 0" in out


def test_models_with_the_same_inputs_get_the_same_arrays(tmp_path: Path) -> None:
    a, b = _file(tmp_path), _file(tmp_path, "b.onnx")
    other = _file(tmp_path, "c.onnx", width=12)
    request = BenchRequest(models=[str(a), str(b), str(other)])
    opened = [_open(p, request.config) for p in request.models]
    feeds = _feeds(opened, request, 3)
    assert feeds[0] is feeds[1]
    assert feeds[2]["x"].shape == (3, 12)


def test_batch_binds_the_symbolic_batch_only(tmp_path: Path) -> None:
    model = _model()
    assert shapes_at(model, {}, None) == {"x": (1, 16)}
    assert shapes_at(model, {"x": (8, 16)}, 8) == {"x": (8, 16)}
    # Another batch in --input-shape than --batch's is refused (it was overridden silently).
    with pytest.raises(UserInputError, match="--batch 8: --input-shape sets the batch dim"):
        shapes_at(model, {"x": (2, 16)}, 8)
    fixed = _model(batch=4)
    assert shapes_at(fixed, {}, 4) == {"x": (4, 16)}


def test_batch_on_a_fixed_batch_model_is_bad_input(tmp_path: Path, capsys) -> None:
    path = str(_file(tmp_path, batch=4))
    code, _, err = _run(["bench", path, "--batch", "2", "--runs", "1"], capsys)
    assert code == 2
    assert "no symbolic batch dim" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runs", "0"], "--runs"),
        (["--batch", "0"], "--batch"),
        (["--threads", "-1"], "--threads"),
        (["--provider", "nope"], "is not a provider"),
        (["--input-shape", "x:1xq"], "dims must be integers"),
        # An empty provider name silently meant the CPU.
        (["--provider", ","], "an empty provider name"),
        (["--provider", ""], "an empty provider name"),
    ],
)
def test_bad_options_exit_2_in_one_line(tmp_path: Path, capsys, extra, message) -> None:
    code, _, err = _run(["bench", str(_file(tmp_path)), *extra], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1


def test_unreadable_model_exits_2(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage\xff" * 10)
    for path in (junk, tmp_path / "absent.onnx"):
        code, _, err = _run(["bench", str(path), "--runs", "1"], capsys)
        assert code == 2 and str(path) in err and "Traceback" not in err


def test_ort_format_file_is_timed_on_inputs_from_its_session(tmp_path: Path, capsys) -> None:
    from graphopt.backends.ort import save_optimized

    source = _file(tmp_path)
    ort_file = save_optimized(source, tmp_path / "m.ort")
    args = ["bench", str(source), str(ort_file), "--batch", "2", "--runs", "2", "--json"]
    code, out, _ = _run(args, capsys)
    assert code == 0
    rows = json.loads(out)["batches"][0]["models"]
    assert rows[1]["path"] == str(ort_file) and rows[1]["ratio_to_first"]["median"] > 0


def test_help_lists_the_options(capsys) -> None:
    for command, flags in (
        ("bench", ("--batch", "--threads", "--runs", "--provider", "--input-shape", "--json")),
        ("compare", ("--inputs", "--rtol", "--cos-min", "--histogram", "--provider")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), (command, out)


def test_progress_bar_on_a_terminal_counts_every_round(tmp_path: Path) -> None:
    import argparse
    import io as stdio

    from rich.console import Console

    from graphopt.commands import bench

    path = str(_file(tmp_path))
    screen = stdio.StringIO()
    err = Console(file=screen, force_terminal=True, width=100)
    out = Console(file=stdio.StringIO(), width=200)
    args = argparse.Namespace(
        models=[path, path],
        batch=[1, 2],
        threads=1,
        runs=bench.PROGRESS_MIN_RUNS,
        warmup=0,
        provider=None,
        opt_level="all",
        custom_ops=None,
        input_shape=None,
        seed=0,
        json=False,
    )
    assert bench.run(args, out, err) == 0
    rounds = 2 * bench.PROGRESS_MIN_RUNS
    assert "timing rounds" in screen.getvalue() and f"{rounds}/{rounds}" in screen.getvalue()
    assert "batch 2" in out.file.getvalue()


def _items_per_run(out: str) -> float:
    """Throughput × median latency of the first model: the items bench counted per run."""
    row = json.loads(out)["batches"][0]["models"][0]
    return row["throughput_per_s"] * row["latency_ms"]["median"] / 1e3


def test_fixed_batch_counts_the_generated_batch(tmp_path: Path, capsys) -> None:
    """Only a symbolic batch dim counted: a model fixed at batch 4 showed 1 item per run."""
    path = str(_file(tmp_path, batch=4))
    code, out, err = _run(["bench", path, "--runs", "2", "--json"], capsys)
    assert code == 0, err
    assert _items_per_run(out) == pytest.approx(4)
    code, out, err = _run(["bench", path, "--runs", "2", "--batch", "4", "--json"], capsys)
    assert code == 0, err
    assert _items_per_run(out) == pytest.approx(4)


def test_empty_batch_has_no_throughput(tmp_path: Path, capsys) -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, [0, 3])],
        [tensor_info("y", F, [0, 3])],
    )
    path = tmp_path / "empty.onnx"
    io.save(model, path)
    code, out, err = _run(["bench", str(path), "--runs", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["batches"][0]["models"][0]["throughput_per_s"] is None
    code, out, _ = _run(["bench", str(path), "--runs", "2"], capsys)
    assert code == 0 and re.search(r"│\s+-\s+│", out)  # the items/s cell


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("q:2x16", "--input-shape names unknown input(s): q"),
        ("x:0x16", "a zero-sized dim gives empty tensors"),
        ("x:2x8", "axis 1 of input 'x' is fixed at 16"),
        ("x:2x16x1", "has rank 2"),
    ],
)
def test_input_shape_is_checked_as_elsewhere(tmp_path: Path, capsys, spec, message) -> None:
    """An unknown name was ignored (exit 0), a zero dim timed empty tensors (0.0 items/s)."""
    path = str(_file(tmp_path))
    code, _, err = _run(["bench", path, "--input-shape", spec, "--runs", "1"], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(["bench", path, "--input-shape", "x:2x16", "--runs", "1"], capsys)
    assert code == 0, err


def test_input_shape_may_name_an_input_of_any_model(tmp_path: Path, capsys) -> None:
    other = make_model(
        [helper.make_node("Relu", ["z"], ["y"])],
        [tensor_info("z", F, ["batch", 16])],
        [tensor_info("y", F, ["batch", 16])],
    )
    second = tmp_path / "z.onnx"
    io.save(other, second)
    args = ["bench", str(_file(tmp_path)), str(second), "--input-shape", "z:2x16", "--runs", "1"]
    code, _, err = _run(args, capsys)
    assert code == 0, err


def test_optional_input_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from onnx import TensorProto as T

    element = helper.make_tensor_type_proto(F, [2, 3])
    graph = helper.make_graph(
        [helper.make_node("OptionalHasElement", ["o"], ["y"])],
        "g",
        [helper.make_value_info("o", helper.make_optional_type_proto(element))],
        [tensor_info("y", T.BOOL, [])],
    )
    path = tmp_path / "o.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    )
    code, _, err = _run(["bench", str(path), "--runs", "1"], capsys)
    assert code == 2 and "input 'o' is an optional, not a tensor" in err
    assert "--no-verify" not in err and len(err.strip().splitlines()) == 1


# --- .ort files with graphopt's ops, per-row batches, output dtypes, conflicts -------------


def _sparse_ort(folder: Path, in_subgraph: bool = False) -> Path:
    """An .ort file with a graphopt:SparseMatMul node (in an If branch when asked); needs
    graphopt's kernel library to be written."""
    from graphopt.backends.ort import save_optimized
    from graphopt.backends.ort_custom_ops import resolve_custom_op_library
    from graphopt_tests.backends.test_own_kernels import sparse_model

    if resolve_custom_op_library(None) is None:
        pytest.skip("graphopt's kernel library is not built")
    source = folder / "sparse.onnx"
    source.write_bytes(sparse_model(in_subgraph).SerializeToString())
    return save_optimized(source, folder / "sparse.ort")


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_ort_file_with_graphopt_ops_registers_its_library(
    tmp_path: Path, capsys, in_subgraph: bool
) -> None:
    """No model was passed for an .ort file, so graphopt's library was never registered:
    "graphopt:SparseMatMul(1) is not a registered function/op"."""
    ort_file = _sparse_ort(tmp_path, in_subgraph)
    code, out, err = _run(["bench", str(ort_file), "--runs", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["batches"][0]["models"][0]["path"] == str(ort_file)


def test_ort_file_with_graphopt_ops_says_the_library_is_not_built(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphopt.backends import ort_custom_ops

    ort_file = _sparse_ort(tmp_path)
    monkeypatch.setattr(ort_custom_ops, "resolve_custom_op_library", lambda path: None)
    code, _, err = _run(["bench", str(ort_file), "--runs", "1"], capsys)
    assert code == 2 and f"{ort_file}: the model uses ops of domain 'graphopt'" in err
    assert "library is not built" in err and "python -m graphopt.kernels build" in err
    assert len(err.strip().splitlines()) == 1


def test_ort_file_without_graphopt_ops_registers_nothing(tmp_path: Path) -> None:
    from graphopt.backends.ort import save_optimized
    from graphopt.backends.ort_bench import _own_domain_stand_in

    plain = save_optimized(_file(tmp_path), tmp_path / "m.ort")
    assert _own_domain_stand_in(plain) is None
    junk = tmp_path / "junk.ort"
    junk.write_bytes(b"not a flatbuffer")
    assert _own_domain_stand_in(junk) is None  # ORT's own error names the problem


def test_folder_named_ort_is_a_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "dir.ort"
    folder.mkdir()
    code, _, err = _run(["bench", str(folder), "--runs", "1"], capsys)
    assert code == 2 and f"{folder}: is a folder" in err


def test_each_row_counts_its_own_batch(tmp_path: Path, capsys) -> None:
    """The first model's batch counted for every row: a model fixed at batch 4 next to one
    at batch 1 showed a quarter of its throughput, and its ratio compared unequal work."""
    one, four = (
        str(_file(tmp_path, "one.onnx", batch=1)),
        str(_file(tmp_path, "four.onnx", batch=4)),
    )
    code, out, err = _run(["bench", one, four, "--runs", "5", "--json"], capsys)
    assert code == 0, err
    batch = json.loads(out)["batches"][0]
    first, second = batch["models"]
    assert [first["items_per_run"], second["items_per_run"]] == [1, 4]
    for row in (first, second):
        items = row["throughput_per_s"] * row["latency_ms"]["median"] / 1e3
        assert items == pytest.approx(row["items_per_run"])
    assert first["ratio_basis"] is None and second["ratio_basis"] == "per item"
    per_item = (first["latency_ms"]["median"] / 1) / (second["latency_ms"]["median"] / 4)
    assert per_item / 2 < second["ratio_to_first"]["median"] < per_item * 2
    assert batch["shapes"] == "#1 x 1x16; #2 x 4x16"
    code, out, _ = _run(["bench", one, four, "--runs", "2"], capsys)
    assert code == 0 and "#1 x 1x16; #2 x 4x16" in out and "per item" in out
    code, out, _ = _run(["bench", one, one, "--runs", "2", "--json"], capsys)
    assert json.loads(out)["batches"][0]["models"][1]["ratio_basis"] == "per run"


def test_batch_and_input_shape_must_agree(tmp_path: Path, capsys) -> None:
    """--batch 2 --input-shape x:3x16 timed 2x16 without a word."""
    path = str(_file(tmp_path))
    args = ["bench", path, "--batch", "2", "--input-shape", "x:3x16", "--runs", "1"]
    code, _, err = _run(args, capsys)
    assert code == 2 and "--batch 2: --input-shape sets the batch dim 'batch' to 3" in err
    assert len(err.strip().splitlines()) == 1
    args = ["bench", path, "--batch", "3", "--input-shape", "x:3x16", "--runs", "1", "--json"]
    code, out, err = _run(args, capsys)
    assert code == 0, err
    assert "x 3x16" in json.loads(out)["batches"][0]["shapes"]


def test_bfloat16_outputs_are_timed(tmp_path: Path, capsys) -> None:
    """Only ML-dtype inputs took the OrtValue path: "No corresponding Numpy type for Tensor
    Type. bfloat16; bind shapes with --input-shape"."""
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
        [tensor_info("x", F, ["batch", 8])],
        [tensor_info("y", TensorProto.BFLOAT16, ["batch", 8])],
    )
    path = tmp_path / "bf16.onnx"
    io.save(model, path)
    code, out, err = _run(["bench", str(path), "--runs", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["batches"][0]["models"][0]["latency_ms"]["median"] > 0


def test_zipmap_model_is_timed(tmp_path: Path, capsys) -> None:
    """Map outputs: "cannot read model: NotImplementedError: Map types are not supported"."""
    from graphopt_tests.commands.test_compare import zipmap_model

    code, _, err = _run(["bench", zipmap_model(tmp_path), "--runs", "2"], capsys)
    assert code == 0, err


def test_int4_input_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=F)],
        [tensor_info("x", TensorProto.INT4, ["batch", 8])],
        [tensor_info("y", F, ["batch", 8])],
        opset=21,
        ir_version=10,
    )
    path = tmp_path / "i4.onnx"
    io.save(model, path)
    code, _, err = _run(["bench", str(path), "--runs", "1"], capsys)
    assert code == 2 and "input 'x' is int4" in err and "--input-shape" not in err


def test_json_safe_writes_non_finite_numbers_as_text() -> None:
    from graphopt.backends.ort_bench import json_safe

    data = json_safe({"a": [math.inf, -math.inf, 1.5], "b": {"c": math.nan}, "d": None})
    assert json.dumps(data, allow_nan=False) == (
        '{"a": ["inf", "-inf", 1.5], "b": {"c": "nan"}, "d": null}'
    )


def test_shape_hint_only_for_shape_errors() -> None:
    """A type ORT's Python API could not read was answered "bind shapes with --input-shape"."""
    from graphopt.backends.ort_bench import _shape_hint

    assert _shape_hint(RuntimeError("No corresponding Numpy type for Tensor Type. bfloat16")) == ""
    assert "--input-shape" in _shape_hint(RuntimeError("Got invalid dimensions for input: x"))
