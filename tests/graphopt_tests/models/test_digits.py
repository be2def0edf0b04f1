"""The digits CNN: deterministic splits and training, ≥ 95% test accuracy, faithful export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from graphopt.calibration import load_npz
from graphopt.models import digits
from graphopt_tests.helpers import import_or_skip

import_or_skip("sklearn", reason="digits data ships with scikit-learn (graphopt[torch])")


def test_splits_are_disjoint_and_cover_the_data():
    parts = {s: digits.split_indices(s) for s in digits.SPLITS}
    assert {s: len(p) for s, p in parts.items()} == {"train": 1181, "calib": 256, "test": 360}
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == len(union) == 1797
    # Deterministic: recomputed splits are identical.
    for split, index in parts.items():
        assert np.array_equal(digits.split_indices(split), index)


def test_data_shapes_and_ranges():
    x, y = digits.data("test")
    assert x.dtype == np.float32 and x.shape == (360, 1, 16, 16)
    assert y.dtype == np.int64 and y.shape == (360,)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    with pytest.raises(ValueError, match="unknown split"):
        digits.data("validation")


def test_calib_npz_is_keyed_by_the_input_name(tmp_path):
    path = digits.write_calib_npz(tmp_path / "calib.npz", n=64)
    arrays = load_npz(path)
    assert list(arrays) == [digits.INPUT_NAME]
    assert np.array_equal(arrays[digits.INPUT_NAME], digits.data("calib")[0][:64])


@pytest.mark.torch
def test_training_reaches_95_percent():
    import_or_skip("torch", reason="training needs torch (graphopt[torch])")
    module = digits.build_torch_model()  # trained once per process (a few seconds)
    assert digits.torch_accuracy(module, "test") >= 0.95


@pytest.mark.slow
@pytest.mark.torch
def test_training_is_deterministic():
    torch = import_or_skip("torch", reason="training needs torch (graphopt[torch])")
    first = digits.build_torch_model()
    digits._trained_state.cache_clear()  # train again from scratch
    second = digits.build_torch_model()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.torch
def test_catalog_model_matches_the_torch_module():
    torch = import_or_skip("torch", reason="export needs torch (graphopt[torch])")
    import graphopt.models as gm

    path = gm.get("digits")
    info = gm.read_sidecar(path)
    assert info["test_accuracy"] >= 0.95
    assert info["opset"] == 18
    x, y = digits.data("test")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {digits.INPUT_NAME: x})[0]  # the whole split: dynamic batch
    assert digits.accuracy(logits, y) >= 0.95
    with torch.no_grad():
        expected = digits.build_torch_model()(torch.from_numpy(x)).numpy()
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def _bench():
    """bench/prune_vs_torch_pruning.py as a module (bench/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "graphopt_bench_prune_vs_tp"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[3] / "bench" / "prune_vs_torch_pruning.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.slow
@pytest.mark.torch
def test_torch_pruning_side_reaches_the_flops_target(tmp_path):
    """The bench's Torch-Pruning half: MACs -50% by TP's counter, ONNX FLOPs agree, runs."""
    import_or_skip("torch_pruning", reason="the side-by-side needs torch-pruning (dev)")
    import graphopt.models as gm

    bench = _bench()
    path, note = bench.tp_digits(tmp_path, None)
    assert "conv channels" in note
    ratio = bench.flops(path, "digits") / bench.flops(gm.get("digits"), "digits")
    assert abs(ratio - 0.5) < 0.03, ratio
    x, y = digits.data("test")
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {digits.INPUT_NAME: x}
    )[0]
    # Pruned without fine-tuning: worse than the original, far better than chance.
    assert 0.3 < digits.accuracy(logits, y) < 1.0
