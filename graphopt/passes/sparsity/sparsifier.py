"""Sparsify a model's weights in place and record what it did (the ``sparsify`` pass's work).

Layers are found and selected (:mod:`.layers`), given a share each (the pattern's, or
:mod:`.allocation`'s), and sparsified by the criterion:

* magnitude: the pattern's mask on ``|W|``; no data.
* wanda: on ``|W_ij|·‖X_j‖`` with ``X`` the layer's calibration input.
* reconstruction: SparseGPT (:mod:`.reconstruct`) on the layer's calibration Hessian.

Data criteria go layer input by layer input in graph order (layers reading one input, such
as q/k/v, together), each input observed on the model as the earlier stages left it, with
the incremental observer GPTQ uses: each Hessian sees the error of the layers already
sparsified, and later layers correct what earlier ones lost. Weights are replaced by new
dense-with-zeros tensors; nothing else in the graph changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.calibration.fidelity import fidelity_sets
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.sparsity import allocation, statistics
from graphopt.passes.sparsity.layers import (
    Layer,
    find_layers,
    replace_weight,
    select,
)
from graphopt.passes.sparsity.masks import pattern_mask, scores
from graphopt.passes.sparsity.reconstruct import sparsegpt
from graphopt.passes.sparsity.record import LayerSparsity, SparsityRecord
from graphopt.passes.sparsity.settings import Pattern
from graphopt.refusals import refuse_unchanged
from graphopt.registry import PassContext


@dataclass(frozen=True)
class SparsifySettings:
    pattern: Pattern
    criterion: str = "magnitude"
    allocation: str = "uniform"
    layers: tuple[str, ...] = ("all",)
    keep_last: bool = True
    holdout: float = 0.25
    compensation: int = 0  # EoRA rank (0: none); needs calibration data


def sparsify_model(
    model: ir.Model,
    settings: SparsifySettings,
    calib: CalibrationSet | None,
    context: PassContext,
) -> SparsityRecord:
    """Sparsify ``model``'s selected layers in place; the record says what and how well."""
    started = time.perf_counter()
    record = SparsityRecord(str(settings.pattern), settings.criterion, settings.allocation)
    found, refused = find_layers(model.graph)
    chosen, left = select(found, settings.layers, settings.keep_last)
    record.skipped.extend(refused + left)
    layers = []
    for layer in chosen:
        why = _misfit(layer, settings.pattern)
        if why:
            record.skipped.append((layer.name, why))
        else:
            layers.append(layer)
    if not layers:
        # Before any data is read: the model would come back as it was given.
        refuse_unchanged(model, f"sparsify {settings.pattern}", "sparsify", record.skipped)
    fit, held = calib, None
    if calib is not None and settings.holdout > 0:  # split() holds one sample out even at 0
        fit, held = calib.split(settings.holdout)
    sets, record.fidelity_source = fidelity_sets(model, fit, held, context, "sparsify")
    original = model.clone() if sets and layers else None
    shares = _shares(model, layers, settings, fit, record)
    data = settings.criterion != "magnitude" and fit is not None
    record.error_kind = "output" if data else "weight"
    # EoRA's inputs per layer: (layer, W, sparse W, Hessian); magnitude's Hessians up front.
    changed: list | None = [] if settings.compensation and fit is not None else None
    grams = _grams(model, layers, fit) if changed is not None and not data else {}
    if data:
        _sequential(model, layers, shares, settings, fit, record, changed)
    else:
        for layer, share in zip(layers, shares, strict=True):
            pattern = settings.pattern.with_ratio(share)
            _sparsify_layer(model.graph, layer, pattern, "magnitude", None, record, changed)
    if not found:
        record.notes.append("no MatMul/Gemm/Conv with a constant weight")
    if original is not None:
        from graphopt.passes.quantization.record import measure_fidelity

        reference = context.fidelity_reference(original)  # the run's original, if moved
        record.fidelity = measure_fidelity(reference, model, sets, optimized_too=False)
        record.fidelity_source = context.fidelity_source(record.fidelity_source)
    if changed is not None:
        from graphopt.passes.compensation.sparsified import compensate_sparsified

        before = record.fidelity or None
        record.compensation = compensate_sparsified(
            model, original, changed, grams, settings.compensation, sets, context, before
        )
        record.compensation.fidelity_source = record.fidelity_source
        if record.compensation.fidelity_after:
            record.fidelity = record.compensation.fidelity_after
    record.seconds = time.perf_counter() - started
    return record


def _grams(
    model: ir.Model, layers: list[Layer], fit: CalibrationSet | None
) -> dict[int, np.ndarray]:
    """Input Hessians of ``layers`` (by ``id(layer.node)``) on the dense model, for EoRA after
    a data-free criterion (the data criteria gather their own, layer by layer)."""
    from graphopt.passes.calibration.activations import observe

    if fit is None or not layers:
        return {}
    names = sorted({layer.node.inputs[0].name for layer in layers})
    stats = statistics.gather(observe(model, names, fit), layers, want_gram=True)
    return {key: entry.hessian for key, entry in stats.items() if entry.hessian is not None}


def _misfit(layer: Layer, pattern: Pattern) -> str:
    """Why ``pattern`` does not fit ``layer`` ("" when it does)."""
    if layer.op == "Conv" and layer.shape[1] % pattern.k_multiple:
        # Groups must not straddle kernel positions: M consecutive channels at one tap.
        return f"input channels per group {layer.shape[1]} is not a multiple of " + str(
            pattern.k_multiple
        )
    if layer.canonical_k % pattern.k_multiple:
        return f"reduction size {layer.canonical_k} is not a multiple of {pattern.k_multiple}"
    if layer.outputs % pattern.n_multiple:
        return f"{layer.outputs} outputs is not a multiple of {pattern.n_multiple}"
    return ""


def _shares(
    model: ir.Model,
    layers: list[Layer],
    settings: SparsifySettings,
    fit: CalibrationSet | None,
    record: SparsityRecord,
) -> list[float]:
    pattern = settings.pattern
    if settings.allocation != "global" or not layers:
        return [pattern.ratio] * len(layers)
    if pattern.is_nm:
        record.notes.append("allocation global: an N:M pattern has one share; uniform used")
        return [pattern.ratio] * len(layers)
    hessians: dict[int, np.ndarray | None] = {}
    energies: dict[int, np.ndarray | None] = {}
    if settings.criterion != "magnitude" and fit is not None:
        from graphopt.passes.calibration.activations import observe

        names = sorted({layer.node.inputs[0].name for layer in layers})
        stats = statistics.gather(observe(model, names, fit), layers, want_gram=True)
        for layer in layers:
            entry = stats.get(id(layer.node))
            hessians[id(layer.node)] = None if entry is None else entry.hessian
            energies[id(layer.node)] = None if entry is None else entry.energy
    weights = [layer.canonical() for layer in layers]

    def measure(i: int, share: float) -> float:
        key = id(layers[i].node)
        criterion = "magnitude" if settings.criterion == "magnitude" else "wanda"
        w = weights[i]
        mask = pattern_mask(scores(w, criterion, energies.get(key)), pattern.with_ratio(share))
        approx = np.where(mask, w, 0.0)
        hessian = hessians.get(key)
        if hessian is None:
            return statistics.relative_weight_error(w, approx)
        return statistics.relative_output_error(w, approx, hessian)

    curves = allocation.error_curves(len(layers), measure)
    shares = allocation.allocate(curves, [layer.params for layer in layers], pattern.ratio)
    proxy = " (Wanda-mask errors as the proxy)" * (settings.criterion == "reconstruction")
    record.notes.append(
        f"allocation global: per-layer shares {min(shares):.2f}..{max(shares):.2f} for a "
        f"parameter-weighted mean of {pattern.ratio:g}, by measured layer error{proxy}"
    )
    return shares


def _sequential(
    model: ir.Model,
    layers: list[Layer],
    shares: list[float],
    settings: SparsifySettings,
    fit: CalibrationSet,
    record: SparsityRecord,
    changed: list | None = None,
) -> None:
    """Data criteria, one layer input at a time (see the module docstring)."""
    from graphopt.passes.pruning.incremental import IncrementalObserver

    share_of = {id(layer.node): share for layer, share in zip(layers, shares, strict=True)}
    stages: dict[int, list[Layer]] = {}
    for layer in layers:
        stages.setdefault(id(layer.node.inputs[0]), []).append(layer)
    observer = IncrementalObserver(model, list(fit.batches()), fit.source)
    reconstruct = settings.criterion == "reconstruction"
    fallbacks = 0
    for group in stages.values():
        name = group[0].node.inputs[0].name
        # Hessians for wanda too: the report's per-layer output errors are read from them.
        stats = statistics.gather(observer.advance([name]), group, want_gram=True)
        for layer in group:
            entry = stats.get(id(layer.node))
            pattern = settings.pattern.with_ratio(share_of[id(layer.node)])
            method = settings.criterion
            if entry is None or (reconstruct and entry.gram is None):
                fallbacks += 1
                method = "wanda" if entry is not None else "magnitude"
            _sparsify_layer(model.graph, layer, pattern, method, entry, record, changed)
        del stats  # this stage's Hessians: gone before the next stage's are gathered
    record.notes.append(
        f"{settings.criterion}: layer inputs observed on {fit.count} calibration samples, "
        "layer by layer through the layers already sparsified"
    )
    if fallbacks:
        record.notes.append(
            f"{fallbacks} layer(s) without calibration statistics for {settings.criterion} "
            "(grouped or non-2-D Conv, or inputs wider than "
            f"{statistics.MAX_HESSIAN_FEATURES}): wanda or magnitude instead"
        )


def _sparsify_layer(
    graph: ir.Graph,
    layer: Layer,
    pattern: Pattern,
    method: str,
    entry: statistics.InputStats | None,
    record: SparsityRecord,
    changed: list | None = None,
) -> None:
    w = layer.canonical()
    hessian = entry.hessian if entry is not None else None
    if method == "reconstruction" and hessian is not None:
        approx = sparsegpt(w, hessian, pattern)
    else:
        energy = entry.energy if entry is not None else None
        approx = np.where(pattern_mask(scores(w, method, energy), pattern), w, np.float32(0.0))
    if hessian is not None:
        error = statistics.relative_output_error(w, approx, hessian)
    elif entry is None:
        error = statistics.relative_weight_error(w, approx)
    else:
        error = None
    replace_weight(graph, layer, approx.astype(np.float32))
    if changed is not None:
        changed.append((layer, w, approx, hessian))
    zeros = float(np.mean(layer.stored(approx) == 0))
    record.layers.append(
        LayerSparsity(layer.name, layer.op, layer.kind, layer.params, zeros, error, method)
    )
