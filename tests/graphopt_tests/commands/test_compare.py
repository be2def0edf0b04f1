"""``graphopt compare``: measures, tolerance, inputs, exit codes; exact rewrites pass it."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.backends.ort_compare import error_histogram, histogram_labels
from graphopt.cli import main
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _model(w: np.ndarray | None = None, out: str = "y"):
    """Classifier-like: y[batch, 6] = x[batch, 8] @ w + b, a symbolic batch."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 6)).astype(np.float32) if w is None else w
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], [out]),
        ],
        [tensor_info("x", F, ["batch", 8])],
        [tensor_info(out, F, ["batch", weights.shape[1]])],
        {"w": weights, "b": np.linspace(-1, 1, weights.shape[1]).astype(np.float32)},
    )


def _file(folder: Path, name: str, model=None) -> Path:
    path = folder / name
    io.save(model if model is not None else _model(), path)
    return path


def _perturbed(folder: Path, scale: float = 0.5) -> Path:
    w = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    w[3, 2] += scale  # one weight moved
    return _file(folder, "perturbed.onnx", _model(w))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_same_model_passes_at_two_shapes_with_the_seed_printed(tmp_path: Path, capsys) -> None:
    a, b = _file(tmp_path, "a.onnx"), _file(tmp_path, "b.onnx")
    code, out, err = _run(["compare", str(a), str(b), "--seed", "7"], capsys)
    assert code == 0, err
    assert "generated (seed 7)" in out
    assert "shape 1: batch=1: x 1x8" in out and "shape 2: batch=2: x 2x8" in out
    assert "PASS" in out and "FAIL" not in out


def test_one_perturbed_weight_fails_with_the_output_named(tmp_path: Path, capsys) -> None:
    a, b = _file(tmp_path, "a.onnx"), _perturbed(tmp_path)
    code, out, err = _run(["compare", str(a), str(b), "--json"], capsys)
    assert code == 1
    assert "output 'y'" in err and "--rtol 0.0001" in err
    data = json.loads(out)
    assert not data["ok"] and data["rtol"] == pytest.approx(1e-4)
    row = data["outputs"][0]
    assert row["name"] == "y" and not row["ok"]
    assert row["max_rel"] > 1e-3 and 0 < row["cosine"] < 1
    # Only column 2 moved: the argmax agrees where that column did not overtake another.
    assert 0 <= row["argmax_agreement"] <= 1


def test_rtol_and_cos_min_decide(tmp_path: Path, capsys) -> None:
    a, b = str(_file(tmp_path, "a.onnx")), str(_perturbed(tmp_path, 1e-3))
    assert _run(["compare", a, b, "--rtol", "0.5"], capsys)[0] == 0
    code, _, err = _run(["compare", a, b, "--rtol", "0.5", "--cos-min", "1"], capsys)
    assert code == 1 and "--cos-min" in err


def test_mismatched_outputs_fail_with_a_clear_line(tmp_path: Path, capsys) -> None:
    a = str(_file(tmp_path, "a.onnx"))
    renamed = str(_file(tmp_path, "renamed.onnx", _model(out="logits")))
    code, _, err = _run(["compare", a, renamed], capsys)
    assert code == 1 and "outputs differ: A has y; B has logits" in err
    wider = np.ones((8, 7), dtype=np.float32)
    reshaped = str(_file(tmp_path, "wider.onnx", _model(wider)))
    code, _, err = _run(["compare", a, reshaped], capsys)
    assert code == 1 and "shape/dtype (1, 6) float32 in A, B has (1, 7) float32" in err
    assert len(err.strip().splitlines()) == 1


def test_unreadable_files_exit_2(tmp_path: Path, capsys) -> None:
    a = str(_file(tmp_path, "a.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot onnx" * 20)
    for args in ([a, str(junk)], [str(tmp_path / "absent.onnx"), a]):
        code, _, err = _run(["compare", *args], capsys)
        assert code == 2 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_inputs_file_is_used_and_checked(tmp_path: Path, capsys) -> None:
    a, b = str(_file(tmp_path, "a.onnx")), str(_perturbed(tmp_path))
    good = tmp_path / "in.npz"
    x = np.zeros((3, 8), dtype=np.float32)
    x[:, 0] = 1.0  # row 3 of w (the perturbed one) is multiplied by 0: no difference
    np.savez(good, x=x)
    code, out, err = _run(["compare", a, b, "--inputs", str(good)], capsys)
    assert code == 0, err
    assert f"inputs: {good}" in out and "batch=3: x 3x8" in out and "shape 2" not in out
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, ids=np.zeros((1, 8), dtype=np.int64))
    for path in (pickled, wrong, tmp_path / "absent.npz"):
        code, _, err = _run(["compare", a, b, "--inputs", str(path)], capsys)
        assert code == 2 and str(path) in err and "Traceback" not in err


def test_histogram_counts_every_element(tmp_path: Path, capsys) -> None:
    a, b = str(_file(tmp_path, "a.onnx")), str(_perturbed(tmp_path))
    code, out, _ = _run(["compare", a, b, "--histogram", "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["histogram_buckets"] == histogram_labels()
    for row in data["outputs"]:
        assert sum(row["histogram"]) == int(np.prod(row["shape"]))
        assert row["histogram"][0] == np.prod(row["shape"]) - row["shape"][0]  # column 2 moved
    code, out, _ = _run(["compare", a, b, "--histogram"], capsys)
    assert "errors of 'y' (shape 1)" in out and "exact" in out


def test_error_histogram_buckets_by_decade() -> None:
    ref = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    got = ref + np.array([0.0, 5e-6, 5e-3, 2.0], dtype=np.float32)
    counts = error_histogram(ref, got)
    labels = histogram_labels()
    assert counts is not None and len(counts) == len(labels) and sum(counts) == 4
    filled = {labels[i] for i, c in enumerate(counts) if c}
    assert filled == {"exact", "1e-06-1e-05", "1e-03-1e-02", ">= 1e+00"}
    # Integer outputs have real errors now (see test_integer_outputs_*); strings have none.
    one_off = np.array([0, 1, 3])  # off by 1 at a largest magnitude of 2: bucket 1e-1..1
    assert error_histogram(np.arange(3), one_off) == [2, *[0] * 9, 1, 0]
    assert error_histogram(np.array(["a"]), np.array(["b"])) is None


def _optimize_and_compare(name: str, tmp_path: Path, capsys, extra: list[str] = ()) -> None:
    import graphopt.models as models

    missing = models.missing_requirements(name)
    if missing:
        pytest.skip(f"{name} needs {missing}")
    original = models.get(name)
    out = tmp_path / f"{name}.opt.onnx"
    code, _, err = _run(["optimize", str(original), "-o", str(out), *extra], capsys)
    assert code == 0, err
    code, stdout, err = _run(["compare", str(original), str(out)], capsys)
    assert code == 0, err
    assert "PASS" in stdout


def test_demo_with_one_weight_perturbed_fails(tmp_path: Path, capsys) -> None:
    """One element of the largest weight moved by 1% of that weight's largest magnitude."""
    import graphopt.models as models

    original = models.get("demo")
    model = io.load(original).model
    weight = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
    array = weight.const_value.numpy().copy()
    array.flat[array.size // 3] += 0.01 * np.abs(array).max()
    weight.const_value = ir.tensor(array, name=weight.name)
    perturbed = _file(tmp_path, "demo_perturbed.onnx", model)
    code, _, err = _run(["compare", str(original), str(perturbed)], capsys)
    assert code == 1 and "output 'logits'" in err


def test_optimize_output_of_demo_passes(tmp_path: Path, capsys) -> None:
    _optimize_and_compare("demo", tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra"),
    [("resnet18", []), ("bert_tiny", []), ("bert_tiny", ["--target", "ort"])],
)
def test_optimize_output_of_catalog_models_passes(
    name: str, extra: list[str], tmp_path: Path, capsys
) -> None:
    _optimize_and_compare(name, tmp_path, capsys, extra)


# --- structured outputs, integer outputs, small fixes ---------------------------------

I64 = TensorProto.INT64


def _proto_file(folder: Path, name: str, nodes, inputs, outputs, opset: int = 18) -> str:
    """A model from onnx.helper pieces (sequence/optional outputs need their own types)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return str(path)


def _sequence_model(folder: Path, name: str, items: int = 2) -> str:
    """Output s: a sequence of x [2, 3] and ReduceSum(x) (a scalar), then more x."""
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["r"], keepdims=0),
        helper.make_node("SequenceConstruct", ["x", "r", *["x"] * (items - 2)], ["s"]),
    ]
    out = helper.make_value_info(
        "s", helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, None))
    )
    return _proto_file(folder, name, nodes, [tensor_info("x", F, [2, 3])], [out])


def test_sequence_outputs_are_compared_element_by_element(tmp_path: Path, capsys) -> None:
    """A ragged sequence crashed in np.asarray (exit 3), and --histogram on '.shape'."""
    a = _sequence_model(tmp_path, "a.onnx")
    code, out, err = _run(["compare", a, a, "--histogram", "--json"], capsys)
    assert code == 0, err
    (row,) = json.loads(out)["outputs"]
    assert row["kind"] == "sequence" and row["shape"] is None
    assert row["dims"] == "sequence of 2: 2x3, scalar"
    assert row["max_abs"] == 0 and row["ok"] and sum(row["histogram"]) == 7
    code, out, _ = _run(["compare", a, a, "--histogram"], capsys)
    assert code == 0 and "sequence of 2: 2x3, scalar" in out and "errors of 's'" in out
    longer = _sequence_model(tmp_path, "b.onnx", items=3)
    code, _, err = _run(["compare", a, longer], capsys)
    assert code == 1 and "output 's': sequence of 2 in A, 3 in B" in err


def test_optional_output_presence_must_match(tmp_path: Path, capsys) -> None:
    element = helper.make_tensor_type_proto(F, [2, 3])
    out = helper.make_value_info("o", helper.make_optional_type_proto(element))
    inputs = [tensor_info("x", F, [2, 3])]
    present = _proto_file(
        tmp_path, "p.onnx", [helper.make_node("Optional", ["x"], ["o"])], inputs, [out]
    )
    empty = helper.make_node("Optional", [], ["o"], type=element)
    relu = helper.make_node("Relu", ["x"], ["unused"])
    absent = _proto_file(tmp_path, "a.onnx", [relu, empty], inputs, [out])
    code, _, err = _run(["compare", present, present], capsys)
    assert code == 0, err
    code, out, err = _run(["compare", absent, absent, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["outputs"][0]["dims"] == "optional: absent"
    code, _, err = _run(["compare", present, absent], capsys)
    assert code == 1 and "output 'o': optional present in A, absent in B" in err


def test_map_outputs_need_the_same_keys() -> None:
    from graphopt.backends.ort_compare import measure_output

    same = measure_output(0, "m", [{1: 0.5, 2: 0.25}], [{1: 0.5, 2: 0.25}], 0.0, 1e-4, None)
    assert same.ok and same.kind == "sequence" and same.layout == "sequence of 1: map of 2"
    moved = measure_output(0, "m", {1: 0.5, 2: 0.25}, {1: 0.5, 2: 0.5}, 0.0, 1e-4, None)
    assert not moved.ok and moved.max_abs == 0.25
    keys = measure_output(0, "m", {1: 0.5, 2: 0.25}, {1: 0.5, 3: 0.25}, 0.0, 1e-4, None)
    assert not keys.ok and keys.problem == "map keys differ: A has 1, 2; B has 1, 3"


def _scaled_int_model(folder: Path, name: str, add: int) -> str:
    """y = x · 1000 (+ add), int64."""
    model = make_model(
        [
            helper.make_node("Mul", ["x", "k"], ["m"]),
            helper.make_node("Add", ["m", "c"], ["y"]),
        ],
        [tensor_info("x", I64, [2, 3])],
        [tensor_info("y", I64, [2, 3])],
        {"k": np.array(1000, np.int64), "c": np.array(add, np.int64)},
    )
    return str(_file(folder, name, model))


def test_integer_outputs_show_real_errors_and_must_match_exactly(tmp_path: Path, capsys) -> None:
    """The measures were verification's 0/1 flag ("max abs 1, rel err 1, cosine 0"), and
    --rtol 1 turned an integer mismatch into PASS."""
    a, b = _scaled_int_model(tmp_path, "a.onnx", 0), _scaled_int_model(tmp_path, "b.onnx", 50)
    for rtol in ("1", "inf"):
        code, out, err = _run(["compare", a, b, "--rtol", rtol, "--json"], capsys)
        assert code == 1
        assert "output 'y': int64 values differ in 6 of 6 elements" in err
        assert "must match exactly" in err
        row = json.loads(out)["outputs"][0]
        assert row["max_abs"] == 50
        x = _generated_x(a)
        assert row["max_rel"] == pytest.approx(50 / (1000 * np.abs(x).max()))
        assert 0.99 < row["cosine"] < 1
    code, _, err = _run(["compare", a, a], capsys)
    assert code == 0, err


def _generated_x(path: str) -> np.ndarray:
    """The generated x compare feeds (seed 0)."""
    from graphopt.inputs import make_inputs

    return make_inputs(io.load(path).model, seed=0)["x"]


def test_bool_outputs_must_match_exactly() -> None:
    from graphopt.backends.ort_compare import measure_output

    ref = np.array([True, False, True, True])
    row = measure_output(0, "b", ref, ~ref, 0.0, math.inf, None)
    assert not row.ok and row.problem.startswith("bool values differ in 4 of 4 elements")
    assert row.max_abs == 1 and row.cosine == 0


def test_model_without_inputs_says_so(tmp_path: Path, capsys) -> None:
    const = helper.make_node(
        "Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.ones(2, np.float32))
    )
    model = _proto_file(
        tmp_path,
        "c.onnx",
        [const, helper.make_node("Relu", ["c"], ["y"])],
        [],
        [tensor_info("y", F, [2])],
    )
    code, out, err = _run(["compare", model, model], capsys)
    assert code == 0, err
    assert "shape 1: no inputs" in out and "shape 1: \n" not in out
    assert "the model has no inputs" in out


def test_inputs_differ_lists_are_separated_by_a_semicolon(tmp_path: Path, capsys) -> None:
    two = make_model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [tensor_info("x", F, [2]), tensor_info("z", F, [2])],
        [tensor_info("y", F, [2])],
    )
    one = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, [2])],
        [tensor_info("y", F, [2])],
    )
    a, b = str(_file(tmp_path, "two.onnx", two)), str(_file(tmp_path, "one.onnx", one))
    code, _, err = _run(["compare", a, b], capsys)
    assert code == 1 and "inputs differ: A has x (FLOAT), z (FLOAT); B has x (FLOAT)" in err


def test_seed_with_inputs_file_is_bad_input(tmp_path: Path, capsys) -> None:
    a = str(_file(tmp_path, "a.onnx"))
    data = tmp_path / "in.npz"
    np.savez(data, x=np.zeros((1, 8), np.float32))
    code, _, err = _run(["compare", a, a, "--inputs", str(data), "--seed", "3"], capsys)
    assert code == 2 and "--seed 3: only generated inputs are seeded" in err
    code, _, err = _run(["compare", a, a, "--inputs", str(data)], capsys)
    assert code == 0, err


def test_optional_input_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    element = helper.make_tensor_type_proto(F, [2, 3])
    o = helper.make_value_info("o", helper.make_optional_type_proto(element))
    has = helper.make_node("OptionalHasElement", ["o"], ["y"])
    path = _proto_file(tmp_path, "o.onnx", [has], [o], [tensor_info("y", TensorProto.BOOL, [])])
    code, _, err = _run(["compare", path, path], capsys)
    assert code == 2 and "input 'o' is an optional, not a tensor" in err
    assert "--no-verify" not in err and len(err.strip().splitlines()) == 1


# --- map outputs, empty and all-NaN outputs, strict JSON, warnings, wording --------------


def zipmap_model(folder: Path, name: str = "zm.onnx", k: float = 1.0) -> str:
    """z = ZipMap(x · k) (ai.onnx.ml): a seq(map(int64, float)) output, as skl2onnx writes
    classifiers' probabilities."""
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["p"]),
        helper.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    zipped = helper.make_sequence_type_proto(
        helper.make_map_type_proto(I64, helper.make_tensor_type_proto(F, []))
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor_info("x", F, ["N", 3])],
        [helper.make_value_info("z", zipped)],
        [onnx.numpy_helper.from_array(np.array(k, np.float32), "k")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return str(path)


def test_zipmap_outputs_are_compared_element_by_element(tmp_path: Path, capsys) -> None:
    """onnx-ir cannot hold a map type: "cannot read model: NotImplementedError: Map types
    are not supported yet", naming no file."""
    a = zipmap_model(tmp_path)
    code, out, err = _run(["compare", a, a, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["outputs"]
    assert rows[0]["kind"] == "sequence" and rows[0]["dims"] == "sequence of 1: map of 3"
    b = zipmap_model(tmp_path, "b.onnx", k=2.0)
    code, _, err = _run(["compare", a, b], capsys)
    assert code == 1 and "output 'z'" in err


def test_unreadable_model_error_names_the_file(tmp_path: Path, capsys) -> None:
    """A map input is still beyond onnx-ir: the one-line error says which of A and B."""
    maps = helper.make_map_type_proto(I64, helper.make_tensor_type_proto(F, []))
    path = _proto_file(
        tmp_path,
        "mapin.onnx",
        [helper.make_node("Identity", ["m"], ["y"])],
        [helper.make_value_info("m", maps)],
        [helper.make_value_info("y", maps)],
    )
    a = str(_file(tmp_path, "a.onnx"))
    code, _, err = _run(["compare", a, path], capsys)
    assert code == 2 and f"{path}: cannot read model" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _slice_model(folder: Path, name: str, end: int) -> str:
    """y = x[:, :end]: empty at end 0."""
    ints = {k: np.array([v], np.int64) for k, v in (("s", 0), ("e", end), ("a", 1))}
    model = make_model(
        [helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])],
        [tensor_info("x", F, ["N", 8])],
        [tensor_info("y", F, ["N", None])],
        ints,
    )
    return str(_file(folder, name, model))


def test_empty_in_a_but_not_in_b_is_a_difference(tmp_path: Path, capsys) -> None:
    """B went unrun: "nothing to compare" (exit 2) instead of the shapes that differ."""
    empty, two = _slice_model(tmp_path, "e.onnx", 0), _slice_model(tmp_path, "t.onnx", 2)
    code, _, err = _run(["compare", empty, two], capsys)
    assert code == 1
    assert "output 'y': shape/dtype (1, 0) float32 in A, B has (1, 2) float32" in err
    code, _, err = _run(["compare", empty, empty], capsys)  # empty in both: still refused
    assert code == 2 and "nothing to compare" in err


def test_an_output_empty_at_every_shape_is_not_shown_as_compared(tmp_path: Path, capsys) -> None:
    """Beside an output that is compared, an empty one read "cosine 1.000000 ok": a measure of
    nothing. It shows "-" and "empty", and the note names it (the JSON's cosine is null)."""
    ints = {k: np.array([v], np.int64) for k, v in (("s", 0), ("e", 0), ("a", 1))}
    model = make_model(
        [
            helper.make_node("Slice", ["x", "s", "e", "a"], ["y"]),
            helper.make_node("Relu", ["x"], ["z"]),
        ],
        [tensor_info("x", F, ["N", 8])],
        [tensor_info("y", F, ["N", None]), tensor_info("z", F, ["N", 8])],
        ints,
    )
    a, b = str(_file(tmp_path, "a.onnx", model)), str(_file(tmp_path, "b.onnx", model))
    code, out, err = _run(["compare", a, b], capsys)
    assert code == 0, err
    assert "'y' not compared: empty at every shape" in out
    rows = [line for line in out.splitlines() if " y " in line]
    assert rows and all("empty" in row and "1.000000" not in row for row in rows)
    code, out, _ = _run(["compare", a, b, "--json"], capsys)
    outputs = json.loads(out)["outputs"]
    assert {(o["name"], o["empty"], o["cosine"] is None) for o in outputs} == {
        ("y", True, True),
        ("z", False, False),
    }


def test_all_nan_output_compares_nothing_and_fails(tmp_path: Path, capsys) -> None:
    """NaN in A and B counts as equal, so all-NaN inputs made any two models PASS."""
    a, b = str(_file(tmp_path, "a.onnx")), str(_perturbed(tmp_path))
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((2, 8), np.nan, np.float32))
    for other in (a, b):
        code, out, err = _run(["compare", a, other, "--inputs", str(nan)], capsys)
        assert code == 1 and "PASS" not in out
        assert "every value is NaN in A and B (12 elements), so nothing was compared" in err


def _scaled_double_model(folder: Path) -> str:
    """y = x · 1e200 in float64: |y| near 1e200, whose squares overflow."""
    model = make_model(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        [tensor_info("x", TensorProto.DOUBLE, ["N", 8])],
        [tensor_info("y", TensorProto.DOUBLE, ["N", 8])],
        {"k": np.array(1e200, np.float64)},
    )
    return str(_file(folder, "big.onnx", model))


def _strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict(tmp_path: Path, capsys) -> None:
    """--rtol inf printed Infinity, which JSON parsers refuse."""
    a = str(_file(tmp_path, "a.onnx"))
    code, out, err = _run(["compare", a, a, "--rtol", "inf", "--json"], capsys)
    assert code == 0, err
    assert _strict_json(out)["rtol"] == "inf"
    code, out, _ = _run(["compare", a, str(_perturbed(tmp_path)), "--histogram", "--json"], capsys)
    assert code == 1 and _strict_json(out)["outputs"][0]["max_abs"] > 0


def test_cosine_survives_huge_values(tmp_path: Path, capsys) -> None:
    """float64 values near 1e200 gave cosine NaN (the dot product overflowed, with numpy's
    warnings on stderr), so a model compared with itself failed --cos-min."""
    big = _scaled_double_model(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warnings
        code, out, err = _run(["compare", big, big, "--cos-min", "0.99", "--json"], capsys)
    assert code == 0, err
    assert all(row["cosine"] == pytest.approx(1.0) for row in _strict_json(out)["outputs"])


def test_histogram_of_infinite_values_warns_nothing() -> None:
    """inf - inf in the histogram: "RuntimeWarning: invalid value encountered in subtract"."""
    ref = np.array([np.inf, -np.inf, 1.0, 2.0])
    got = np.array([np.inf, 5.0, 1.0, 2.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        counts = error_histogram(ref, got)
    assert counts is not None and counts[0] == 2 and counts[-1] == 1 and sum(counts) == 4


def test_int4_input_is_refused_without_optimize_flags(tmp_path: Path, capsys) -> None:
    """The advice was optimize's --verify-inputs FILE.npz; no file can feed int4 anyway."""
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=F)],
        [tensor_info("x", TensorProto.INT4, ["N", 8])],
        [tensor_info("y", F, ["N", 8])],
        opset=21,
        ir_version=10,
    )
    path = str(_file(tmp_path, "i4.onnx", model))
    code, _, err = _run(["compare", path, path], capsys)
    assert code == 2 and "input 'x' is int4" in err and "cannot feed int4" in err
    assert "--verify-inputs" not in err and len(err.strip().splitlines()) == 1


def test_failing_model_advice_names_compares_flag(tmp_path: Path, capsys) -> None:
    """A model ORT rejects at every generated size is told of --inputs, not --verify-inputs."""
    model = make_model(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        [tensor_info("x", F, ["N", 8])],
        [tensor_info("y", F, [3, 5])],
        {"s": np.array([3, 5], np.int64)},
    )
    path = str(_file(tmp_path, "reshape.onnx", model))
    code, _, err = _run(["compare", path, path], capsys)
    assert code == 2 and "ONNX Runtime cannot run it" in err
    assert "--inputs FILE.npz" in err and "--verify-inputs" not in err


def test_integer_outputs_of_all_zero_a_have_a_plain_relative_error() -> None:
    """The float floor (1e-6) made an all-zero integer A against a 1 "rel err 1e+06"."""
    from graphopt.backends.ort_compare import measure_output

    zeros = np.zeros(4, np.int64)
    row = measure_output(0, "i", zeros, np.array([0, 1, 0, 0]), 0.0, 1e-4, None)
    assert not row.ok and row.max_abs == 1 and row.max_rel == 1


def test_empty_provider_name_is_refused(tmp_path: Path, capsys) -> None:
    a = str(_file(tmp_path, "a.onnx"))
    for spec in (",", "", "cpu,"):
        code, _, err = _run(["compare", a, a, "--provider", spec], capsys)
        assert code == 2 and "an empty provider name" in err


def test_outputs_of_unseeded_random_ops_are_left_out(tmp_path: Path, capsys) -> None:
    """compare A A failed on an output of Dropout(training) without a seed: it differs
    between two runs of A itself. Left out with a note; the other outputs still compared."""
    from graphopt_tests.test_verify import _random_model

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    io.save(_random_model(2.0), a)
    io.save(_random_model(2.0), b)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "not compared: the original's outputs ('y') differ between two runs" in out
    assert "│ y " not in out  # no row for it
    io.save(_random_model(2.1), b)
    assert main(["compare", str(a), str(b)]) == 1
    assert "output 'z'" in capsys.readouterr().err
