"""``graphopt compare``: measures, tolerance, inputs, exit codes; exact rewrites pass it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    assert error_histogram(np.arange(3), np.arange(3)) is None  # not a float output


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
