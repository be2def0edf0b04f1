"""EoRA after ``sparsify``: the layers it zeroed, as :class:`~.eora.ChangedLayer` entries.

The sparsifier hands over, per layer, the dense and sparse canonical weights and the input
Hessian it used (data criteria: observed through the layers already sparsified; magnitude:
gathered on the dense model). ``ΔW = W − W_sparse``; the path reads the layer's input and is
added to its output (a Gemm's, bias included: the bias is unchanged).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.editing import attribute
from graphopt.passes.compensation.eora import ChangedLayer, compensate
from graphopt.passes.compensation.record import CompensationRecord
from graphopt.registry import PassContext


def compensate_sparsified(
    model: ir.Model,
    original: ir.Model | None,
    changed: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray | None]],
    grams: dict[int, np.ndarray],
    rank: int,
    sets: dict,
    context: PassContext,
    before: dict | None = None,
) -> CompensationRecord:
    """Add EoRA paths for the sparsified layers ``changed`` ((layer, W, sparse W, Hessian))."""
    layers: list[ChangedLayer] = []
    skipped: list[tuple[str, str]] = []
    for layer, w, approx, hessian in changed:
        gram = hessian if hessian is not None else grams.get(id(layer.node))
        if layer.op == "Conv":
            skipped.append((layer.name, "Conv: the path would need a Conv pair (not built)"))
        elif gram is None:
            skipped.append((layer.name, "no input Gram (input too wide or not observed)"))
        else:
            alpha = float(attribute(layer.node, "alpha", 1.0)) if layer.op == "Gemm" else 1.0
            w64 = np.asarray(w, np.float64) * alpha
            delta = (w64 - np.asarray(approx, np.float64) * alpha).astype(np.float32)
            layers.append(
                ChangedLayer(
                    layer.name,
                    layer.node.inputs[0],
                    layer.node.outputs[0],
                    w64,
                    delta,
                    np.asarray(gram, np.float64),
                )
            )
    measure = None
    if original is not None and sets:
        from graphopt.passes.quantization.record import measure_fidelity

        def measure(m: ir.Model) -> dict:
            return measure_fidelity(original, m, sets, optimized_too=False)

    record = compensate(
        model,
        layers,
        rank,
        "sparsify",
        measure,
        dict(context.input_shapes),
        before,
        original,
    )
    record.skipped[:0] = skipped
    return record
