"""EoRA after ``sparsify``: the layers it zeroed, as :class:`~.eora.ChangedLayer` entries.

The sparsifier hands over, per layer, the dense and sparse canonical weights and the input
Hessian it used (data criteria: observed through the layers already sparsified; magnitude:
gathered on the dense model). ``ΔW = W − W_sparse``; the path reads the layer's input and is
added to its output (a Gemm's or Conv's, bias included: the bias is unchanged). A 2-D Conv's
path is a Conv pair (:mod:`.conv`) fitted on the Gram of its input patches; grouped and
depthwise Convs get none.

Under an N:M pattern the layer is first sparsified again with its path in view
(:mod:`.joint`), by the criterion that made it, told apart by what it left: magnitude (no
Hessian handed over), wanda (the kept weights are the dense ones) or SparseGPT (re-solved).
Other patterns (unstructured ratios, tiles) keep the pass's weights: the share a layer got is
not handed over.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.editing import attribute
from graphopt.passes.compensation import joint
from graphopt.passes.compensation.conv import geometry
from graphopt.passes.compensation.eora import ChangedLayer, compensate
from graphopt.passes.compensation.record import CompensationRecord
from graphopt.registry import PassContext

# N:M patterns tried when reading a sparse weight's pattern back (smallest group first).
NM_GROUPS = (4, 8, 16, 2)


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
    measure = None
    if original is not None and sets:
        from graphopt.passes.quantization.record import measure_fidelity

        # Like sparsify's own fidelity: against the run's original, if an earlier lossy
        # pass moved it (``original`` stays the shapes' model: the layers are its).
        reference = context.fidelity_reference(original)

        def measure(m: ir.Model) -> dict:
            return measure_fidelity(reference, m, sets, optimized_too=False)

    if before is None and measure is not None:
        before = measure(model)  # the pass's result, before joint EoRA re-sparsifies
    layers: list[ChangedLayer] = []
    skipped: list[tuple[str, str]] = []
    refined, how = 0, set()
    for layer, w, approx, hessian in changed:
        gram = hessian if hessian is not None else grams.get(id(layer.node))
        conv, why = geometry(layer.node, layer.shape) if layer.op == "Conv" else (None, "")
        if why:
            skipped.append((layer.name, why))
            continue
        if gram is None:
            skipped.append((layer.name, "no input Gram (input too wide or not observed)"))
            continue
        alpha = float(attribute(layer.node, "alpha", 1.0)) if layer.op == "Gemm" else 1.0
        w64 = np.asarray(w, np.float64) * alpha
        left = None
        if joint.ENABLED and alpha == 1.0:
            better, criterion = _resparsified(w, approx, hessian, gram, rank)
            if better is not None:
                from graphopt.passes.sparsity.layers import replace_weight

                left = (w64 - np.asarray(approx, np.float64)).astype(np.float32)
                approx = better.approx.astype(np.float32)
                replace_weight(model.graph, layer, approx)
                refined += 1
                how.add(criterion)
        delta = (w64 - np.asarray(approx, np.float64) * alpha).astype(np.float32)
        x, y = layer.node.inputs[0], layer.node.outputs[0]
        changed_layer = ChangedLayer(layer.name, x, y, w64, delta, np.asarray(gram), conv, left)
        layers.append(changed_layer)
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
    if refined:
        record.notes.append(joint.note(refined, len(layers), ", ".join(sorted(how))))
    return record


def _resparsified(
    w: np.ndarray,
    approx: np.ndarray,
    hessian: np.ndarray | None,
    gram: np.ndarray,
    rank: int,
) -> tuple[joint.Refined | None, str]:
    """``w`` sparsified again with its path in view (see the module docstring), or None."""
    from graphopt.passes.sparsity.masks import pattern_mask, scores
    from graphopt.passes.sparsity.reconstruct import sparsegpt

    pattern = nm_pattern(approx)
    if pattern is None:
        return None, ""
    kept = approx != 0
    if hessian is None or np.array_equal(approx[kept], np.asarray(w)[kept]):
        criterion = "magnitude" if hessian is None else "wanda"
        energy = None if hessian is None else np.diag(hessian).astype(np.float64)

        def rounder(target: np.ndarray) -> tuple[np.ndarray, None]:
            mask = pattern_mask(scores(target.astype(np.float32), criterion, energy), pattern)
            return np.where(mask, target, 0.0), None

        init = "residual"
    else:
        criterion, init = "SparseGPT", "residual"

        def rounder(target: np.ndarray) -> tuple[np.ndarray, None]:
            return sparsegpt(target.astype(np.float32), hessian, pattern), None

    return joint.refine(w, approx, gram, rank, rounder, init), criterion


def nm_pattern(approx: np.ndarray):
    """The N:M pattern ``approx`` [N, K] (canonical) follows, or None: the smallest group M
    with at most N nonzeros in every M consecutive K elements and N/M its overall density."""
    from graphopt.passes.sparsity.settings import Pattern

    n, k = approx.shape
    density = float(np.count_nonzero(approx)) / max(approx.size, 1)
    for group in NM_GROUPS:
        if k % group:
            continue
        most = int(np.count_nonzero(approx.reshape(n, k // group, group), axis=2).max())
        if 0 < most < group and abs(density - most / group) < 0.02:
            return Pattern.parse(f"{most}:{group}")
    return None
