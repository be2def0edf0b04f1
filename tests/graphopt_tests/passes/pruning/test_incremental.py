"""Stage-by-stage observation (compensation's activations) equals running the prefix."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.calibration.activations import observe
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.pruning.incremental import IncrementalObserver
from graphopt_tests.passes.pruning.graphs import branches, cnn, correlated


def _calib(rng, shape) -> CalibrationSet:
    return CalibrationSet({"x": correlated(rng, shape)}, "test", batch=4)


def test_each_stage_sees_what_the_prefix_computes():
    model = cnn()
    calib = _calib(np.random.default_rng(0), (12, 3, 8, 8))
    observer = IncrementalObserver(model, list(calib.batches()), "test")
    for names in (["r1"], ["r2", "r1"], ["r3"], ["gap"]):
        stepped = [values for _, values in observer.advance(names)]
        whole = [values for _, values in observe(model, names, calib)]
        assert len(stepped) == len(whole) == 3
        for a, b in zip(stepped, whole, strict=True):
            for name in names:
                np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
    # Only values a node not run yet still reads are kept.
    assert all(len(kept) <= 2 for kept in observer.store)


def test_edits_downstream_of_what_ran_are_seen():
    """Compensation rewrites a layer after its input was observed: the next stage runs it
    with the new weights."""
    model = branches()
    calib = _calib(np.random.default_rng(1), (8, 3, 8, 8))
    observer = IncrementalObserver(model, list(calib.batches()), "test")
    conv = next(n for n in model.graph if n.op_type == "Conv" and n.inputs[0].name != "x")
    list(observer.advance([conv.inputs[0].name]))
    weight = conv.inputs[1]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 0.0)
    out = conv.outputs[0].name
    stepped = [values[out] for _, values in observer.advance([out])]
    assert all(not np.any(v - v.flat[0]) for v in stepped)  # zero weights: the bias only


def test_volatile_layers_run_again_after_their_refit():
    """A layer observed before its refit (stages merged past MAX_STAGES put a layer and one
    it feeds together) must not leave its old output in the store."""
    model = branches()
    calib = _calib(np.random.default_rng(2), (8, 3, 8, 8))
    observer = IncrementalObserver(model, list(calib.batches()), "test")
    conv = next(n for n in model.graph if n.op_type == "Conv" and n.inputs[0].name != "x")
    list(observer.advance(["sum"], {id(conv)}))
    weight = conv.inputs[1]
    weight.const_value = ir.tensor(weight.const_value.numpy() * -2.0)
    stepped = [values["gap"] for _, values in observer.advance(["gap"])]
    whole = [values["gap"] for _, values in observe(model, ["gap"], calib)]
    for a, b in zip(stepped, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
