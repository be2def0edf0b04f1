"""How much each layer's own output error moves the *model's* outputs: the allocation's scale.

A layer's relative output error (its whitened spectrum's tail) says how well its factors
reproduce its own outputs, not what that costs downstream: on MiniLM the first FFN's down
projection reaches 0.6% error at rank 16 of 384, yet at that rank it moves the sentence
embeddings more than any other layer at 60% of its rank (softmax, LayerNorm and the
residual stream weigh layers very differently). So each layer is also probed once: its
weight replaced by its rank-``r`` approximation (``r`` half its break-even rank), the model
run on a few calibration samples, and the relative change of the model's outputs divided by
the layer's own error at that rank gives its sensitivity; the allocation then weighs the
layer's error curve by it (the curve's shape from the spectrum, its scale measured).

One ONNX Runtime session serves every probe: the probed weights become graph inputs that
keep their initializers (ORT lets a feed override such an initializer).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.passes.calibration.samples import CalibrationSet

# Samples the probes run on (the first ones of the fitting set).
PROBE_SAMPLES = 16


def sensitivities(
    model: ir.Model,
    weights: list[ir.Value],
    approximations: list[Callable[[], np.ndarray | None]],
    local_errors: list[float],
    calib: CalibrationSet,
) -> list[float | None]:
    """Per layer: (relative change of the model's outputs with the layer's weight replaced
    by ``approximations[i]()``, in the stored layout) / ``local_errors[i]``; None where the
    weight is not an initializer or the probe could not run."""
    from graphopt.ortrun import run_session
    from graphopt.sessions import make_session

    clone = model.clone()
    by_name = dict(clone.graph.initializers)
    probed = []
    for weight in weights:
        value = by_name.get(weight.name or "")
        if value is not None and value not in clone.graph.inputs:
            clone.graph.inputs.append(value)
            probed.append(weight.name)
        else:
            probed.append(None)
    samples = list(calib.first(PROBE_SAMPLES).batches())
    session = make_session(clone, optimize=True)
    names = [o.name for o in session.get_outputs()]
    reference = [run_session(session, names, feeds) for feeds in samples]
    result: list[float | None] = []
    for name, approx, local in zip(probed, approximations, local_errors, strict=True):
        array = approx() if name is not None else None
        if array is None or local <= 0:
            result.append(None)
            continue
        moved = total = 0.0
        for feeds, want in zip(samples, reference, strict=True):
            got = run_session(session, names, {**feeds, name: array})
            for a, b in zip(want, got, strict=True):
                if np.issubdtype(a.dtype, np.floating):
                    moved += float(np.sum((a.astype(np.float64) - b) ** 2))
                    total += float(np.sum(a.astype(np.float64) ** 2))
        result.append(moved / total / local if total > 0 else None)
    return result
