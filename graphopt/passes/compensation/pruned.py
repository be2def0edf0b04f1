"""EoRA after ``prune``: a rank-r path from a pruned block's input to its output layer.

Pruning's own ``lsq`` refit is the full-rank least-squares fit of each consumer layer on the
inputs it kept, so a path reading those same inputs adds nothing. What it cannot recover is
the removed units' contribution: for ``y = W_down·act(W_up·x)`` with hidden units removed
(an MLP's, or an attention block's heads), the lost part depends on ``x``, the block's input,
which the pruned graph still computes. A rank-r linear path from ``x`` to ``y`` absorbs the
best linear part of what is left, ``R = Y_original − Y_pruned`` (both after the layer's bias;
the pruned one after lsq): reduced-rank regression of ``R`` on ``X``. With
``H = XᵀX/rows`` and ``C = RᵀX/rows`` the ridge solution is ``M* = C·(H + λI)⁻¹``, and the
best rank-r ``M`` is the truncated SVD of ``M*`` in the eigenspace of ``H + λI``
(``‖R − X·Mᵀ‖² + λ‖M‖² = const + ‖(M − M*)·(H + λI)^½‖²``): :func:`~.eora.eora_factors` on
``(M*, H + λI)``, so the path is the one EoRA inserts (``y + (x·Aᵀ)·Bᵀ``). ``λ`` is picked per
path on a validation slice of the fitting samples (:data:`RIDGES`), and a path that lowers
the error there at none of them is left out: the linear part of what lsq left can be small,
and ``N·K`` numbers fitted to a few thousand rows then mostly fit noise.

Pairs are found by comparing the graphs: a MatMul/Gemm whose weight lost input channels is a
consumer; walking back from its data input (not into shape arithmetic) to the MatMul/Gemm
layers that feed it, those must all read one value ``x``, the path's input. Paths are fitted
in graph order, each on the pruned model with the earlier paths in place, so a later path
fits what is left after them; the original model's outputs are observed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from rich.console import Console

from graphopt.editing import NameTable, constant_array, single_user
from graphopt.passes.calibration.activations import channel_rows, observe, sequence_mask
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.compensation.eora import (
    DAMP,
    ChangedLayer,
    eora_factors,
    insert_path,
    rows_and_flops,
)
from graphopt.passes.compensation.record import CompensationRecord, LayerCompensation
from graphopt.registry import PassContext

LAYERS = ("MatMul", "Gemm")
# Nodes walked back from a consumer before giving up on finding its block's input.
MAX_WALK = 96
# Values feeding shape arithmetic, not data: a walk back never follows them.
SHAPE_OPS = ("Shape", "Size", "ConstantOfShape", "NonZero")
# Share of the fitting samples that validate each path (pruning's lsq holds out the same).
VALIDATION = 0.2
# Ridge strengths tried per path, × the inputs' mean energy (the first: eora's damping).
RIDGES = (DAMP, 0.1, 1.0)
# Details key of the record (the prune record itself is pruning's).
DETAILS_KEY = "prune-eora"


@dataclass
class PrunedPair:
    """A consumer that lost input channels, the value its block reads, and its output."""

    name: str
    x: ir.Value  # the block's input in the pruned model
    y: ir.Value  # the consumer's output (after its bias Add) in the pruned model
    y_original: str  # the same output's name in the original model


@dataclass
class PrunedCompensation:
    """The report section of EoRA after pruning (the prune record is pruning's own)."""

    record: CompensationRecord
    summary: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.record.to_json()

    def render(self, console: Console) -> bool:
        console.print("prune: EoRA paths after pruning", markup=False)
        return self.record.render(console)


def find_pairs(original: ir.Model, pruned: ir.Model) -> tuple[list[PrunedPair], list]:
    """The consumers of ``pruned`` that lost input channels, with their block input, in graph
    order; and (name, why) for those that get no path."""
    widths = {}
    for node in original.graph:
        weight = _weight(node)
        if weight is not None:
            widths[node.outputs[0].name] = _inputs_of(node, weight)
    pairs, skipped = [], []
    convs = _conv_names(original)
    for node in pruned.graph:
        name = node.outputs[0].name if node.outputs else ""
        if node.op_type == "Conv" and name in convs:
            w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is not None and _conv_lost(original, name, w):
                skipped.append((node.name or name, "a Conv (paths after pruning are MatMul/Gemm)"))
            continue
        weight = _weight(node)
        if weight is None or name not in widths or _inputs_of(node, weight) >= widths[name]:
            continue
        label = node.name or name
        x, why = _block_input(node)
        if x is None:
            skipped.append((label, why))
            continue
        y = _after_bias(node)
        y_original = _after_bias(_by_output(original, name))
        pairs.append(PrunedPair(label, x, y, y_original.name or ""))
    return pairs, skipped


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type not in LAYERS or len(node.inputs) < 2:
        return None
    w = constant_array(node.inputs[1])
    return w if w is not None and w.ndim == 2 else None


def _inputs_of(node: ir.Node, weight: np.ndarray) -> int:
    """K of ``y = x·Wᵀ``: a MatMul's weight rows, a Gemm's rows or (transB) columns."""
    trans_b = node.op_type == "Gemm" and node.attributes.get("transB") is not None
    trans_b = trans_b and bool(node.attributes["transB"].value)
    return int(weight.shape[1] if trans_b else weight.shape[0])


def _conv_names(model: ir.Model) -> set[str]:
    return {n.outputs[0].name for n in model.graph if n.op_type == "Conv" and n.outputs}


def _conv_lost(original: ir.Model, name: str, weight: np.ndarray) -> bool:
    w = constant_array(_by_output(original, name).inputs[1])
    return w is not None and w.ndim == weight.ndim and w.shape[1] > weight.shape[1]


def _by_output(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.outputs and n.outputs[0].name == name)


def _after_bias(node: ir.Node) -> ir.Value:
    """The layer's output after an ``Add`` of a constant (its bias), where it has one."""
    out = node.outputs[0]
    add = single_user(out)
    if add is not None and add.op_type == "Add" and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if constant_array(other) is not None:
            return add.outputs[0]
    return out


def _block_input(consumer: ir.Node) -> tuple[ir.Value | None, str]:
    """The one value the MatMul/Gemm layers feeding ``consumer`` read, or (None, why)."""
    found: dict[int, ir.Value] = {}
    stack, seen = [consumer.inputs[0]], set()
    while stack:
        value = stack.pop()
        node = value.producer() if value is not None else None
        if node is None or id(node) in seen or node.op_type in SHAPE_OPS:
            continue  # a graph input (a mask), a constant, shape arithmetic
        seen.add(id(node))
        if len(seen) > MAX_WALK:
            return None, f"no producer layer within {MAX_WALK} nodes"
        if node.graph is None or node.graph is not consumer.graph:
            return None, "its input comes from a subgraph"
        if _weight(node) is not None:
            found[id(node.inputs[0])] = node.inputs[0]
            continue
        # Only data inputs: a Reshape's shape, a Slice's bounds are not what the block reads.
        data = node.inputs[:1] if node.op_type in ("Reshape", "Expand", "Slice", "Tile") else []
        for item in data or node.inputs:
            if item is not None and constant_array(item) is None and _floating(item):
                stack.append(item)
    if not found:
        return None, "no MatMul/Gemm producer before it"
    if len(found) > 1:
        return None, f"its producers read {len(found)} different inputs"
    return next(iter(found.values())), ""


def _floating(value: ir.Value) -> bool:
    return value.dtype in (None, ir.DataType.FLOAT)


def add_paths(
    original: ir.Model,
    pruned: ir.Model,
    calib: CalibrationSet,
    rank: int,
    holdout: float,
    context: PassContext,
) -> None:
    """``--prune ... --compensation eora:R``: the paths, their record and one summary note
    (saying why when no path went in)."""
    from graphopt.passes.calibration.fidelity import summary

    if pruned is original:
        context.note(f"prune: eora:{rank}: nothing was pruned, no path added")
        return
    record = compensate_pruned(original, pruned, calib, rank, holdout, context)
    line = f"prune: {record.headline()}"
    if not record.layers:
        why = "; ".join(f"{n}: {w}" for n, w in record.skipped[:3]) or "; ".join(record.notes)
        line = f"prune: eora:{rank}: no path added ({why})"
    elif "held-out" in record.fidelity_after:
        before, after = record.fidelity_before["held-out"], record.fidelity_after["held-out"]
        line += f"; held-out: {summary(before)} -> {summary(after)}"
    context.details[DETAILS_KEY] = PrunedCompensation(record, line)
    context.note(line)


def compensate_pruned(
    original: ir.Model,
    pruned: ir.Model,
    calib: CalibrationSet,
    rank: int,
    holdout: float,
    context: PassContext,
) -> CompensationRecord:
    """Add a rank-``rank`` path per pruned pair of ``pruned`` (in place), fitted on the same
    samples pruning fitted on; fidelity against ``original`` before and after, on those and
    pruning's held-out samples."""
    from graphopt.passes.calibration.fidelity import fidelity_sets
    from graphopt.passes.quantization.record import measure_fidelity

    fit, held = calib.split(holdout)
    record = CompensationRecord(owner="prune", rank=rank)
    pairs, record.skipped = find_pairs(original, pruned)
    sets, record.fidelity_source = fidelity_sets(original, fit, held, context, "prune")

    # Reported against the run's original when a lossy pass before prune changed it.
    reference = context.fidelity_reference(original)
    record.fidelity_source = context.fidelity_source(record.fidelity_source)

    def measure(m: ir.Model) -> dict:
        return measure_fidelity(reference, m, sets, optimized_too=False)

    if not pairs:
        record.notes.append("no pruned MatMul/Gemm pair whose block input is still computed")
        return record
    record.fidelity_before = measure(pruned)
    shapes = calib.sample_shapes()
    layers = [ChangedLayer(p.name, p.x, p.y, np.zeros(0), np.zeros(0), np.zeros(0)) for p in pairs]
    rows = rows_and_flops(pruned, layers, shapes)[0]
    # The share is of the original's FLOPs, as pruning's reduction is: the two add up.
    record.flops_before = rows_and_flops(original, [], shapes)[1]
    counted = {id(p): rows.get(p.x.name or "") for p in pairs}
    # A validation slice (disjoint from the held-out one) picks each path's ridge, or no path
    # (see the module docstring).
    fit_part, validation = fit.split(VALIDATION)
    if validation is None:
        fit_part = fit
    wanted = [p.y_original for p in pairs]
    targets = _original_outputs(original, wanted, fit_part)
    checks = _original_outputs(original, wanted, validation) if validation else {}
    names = NameTable(pruned.graph)
    for pair, layer in zip(pairs, layers, strict=True):
        fitted = _fit(pruned, pair, rank, (fit_part, targets), (validation, checks))
        if isinstance(fitted, str):
            record.skipped.append((pair.name, fitted))
            continue
        a, b, entry = fitted
        why = insert_path(pruned.graph, layer, a, b, names)
        if why:
            record.skipped.append((pair.name, why))
            continue
        record.layers.append(entry)
        if counted[id(pair)] is not None:
            record.flops_added += entry.flops_per_row * counted[id(pair)]
    if record.layers:
        record.fidelity_after = measure(pruned)
    return record


def _original_outputs(
    original: ir.Model, names: list[str], fit: CalibrationSet
) -> dict[str, list[np.ndarray]]:
    """Per output name, its rows (padding dropped) per fitting batch, float32."""
    wanted = sorted(set(names))
    out: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for feeds, values in observe(original, wanted, fit):
        mask = sequence_mask(feeds)
        for name in wanted:
            out[name].append(_rows(values[name], mask))
    return out


def _rows(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return channel_rows(np.asarray(array), np.asarray(array).ndim - 1, mask).astype(np.float32)


@dataclass
class _Moments:
    """Sums over rows of a pair: ``XᵀX``, ``RᵀX``, ``‖R‖²`` and ``‖Y_original‖²``."""

    gram: np.ndarray
    cross: np.ndarray
    residual: float = 0.0
    total: float = 0.0
    count: int = 0

    def __add__(self, other: _Moments) -> _Moments:
        return _Moments(
            self.gram + other.gram,
            self.cross + other.cross,
            self.residual + other.residual,
            self.total + other.total,
            self.count + other.count,
        )

    def error(self, m: np.ndarray | None) -> float:
        """``‖R − X·Mᵀ‖² / ‖Y_original‖²`` on these rows (``M`` None: no path)."""
        left = self.residual
        if m is not None:
            left += float(np.sum((m @ self.gram) * m)) - 2 * float(np.sum(self.cross * m))
        return max(left, 0.0) / max(self.total, np.finfo(np.float64).tiny)

    def factors(self, ridge: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)``: the rank-``rank`` minimizer of ``‖R − X·Mᵀ‖² + λ‖M‖²`` (module
        docstring), ``λ`` = ``ridge`` × the inputs' mean energy."""
        gram, cross = self.gram / self.count, self.cross / self.count
        k = gram.shape[0]
        damped = gram + np.eye(k) * ridge * max(float(np.mean(np.diag(gram))), 1e-30)
        best = np.linalg.solve(damped, cross.T).T  # M* = C·(H + λI)⁻¹ (symmetric H)
        return eora_factors(best, damped, rank)


def _moments(
    pruned: ir.Model, pair: PrunedPair, data: tuple[CalibrationSet, dict]
) -> _Moments | str:
    """The pair's moments on the current ``pruned`` over ``data`` (samples, original
    outputs per batch), or why there are none."""
    samples, targets = data
    x_name, y_name = pair.x.name or "", pair.y.name or ""
    moments = None
    for i, (feeds, values) in enumerate(observe(pruned, [x_name, y_name], samples)):
        mask = sequence_mask(feeds)
        x = _rows(values[x_name], mask).astype(np.float64)
        y = _rows(values[y_name], mask)
        want = targets[pair.y_original][i].astype(np.float64)
        if x.shape[0] != y.shape[0] or y.shape != want.shape:
            return "its input and output rows do not line up (different leading shapes)"
        r = want - y
        if moments is None:
            moments = _Moments(
                np.zeros((x.shape[1], x.shape[1])), np.zeros((r.shape[1], x.shape[1]))
            )
        elif x.shape[1] != moments.gram.shape[0]:
            return "its input's last dim is not static"
        moments.gram += x.T @ x
        moments.cross += r.T @ x
        moments.residual += float(np.sum(r * r))
        moments.total += float(np.sum(want * want))
        moments.count += x.shape[0]
    return moments if moments is not None and moments.count else "no calibration rows"


def _fit(
    pruned: ir.Model,
    pair: PrunedPair,
    rank: int,
    fitting: tuple[CalibrationSet, dict],
    validation: tuple[CalibrationSet | None, dict],
) -> tuple[np.ndarray, np.ndarray, LayerCompensation] | str:
    """``(A, B, entry)`` of the pair's path on the current ``pruned``, or why none: fitted at
    each of ``RIDGES`` on ``fitting``, the one with the lowest error on ``validation`` refitted
    on both."""
    moments = _moments(pruned, pair, fitting)
    if isinstance(moments, str):
        return moments
    ridge = RIDGES[0]
    if validation[0] is not None:
        check = _moments(pruned, pair, (validation[0], validation[1]))
        if isinstance(check, str):
            return check
        errors = [check.error(np.matmul(*moments.factors(s, rank)[::-1])) for s in RIDGES]
        if min(errors) >= check.error(None):
            return f"no path lowered its error on the {validation[0].count} validation samples"
        ridge = RIDGES[int(np.argmin(errors))]
        moments = moments + check
    a, b = moments.factors(ridge, rank)
    n, k, used = b.shape[0], a.shape[1], a.shape[0]
    return (
        a,
        b,
        LayerCompensation(
            pair.name,
            n,
            k,
            used,
            moments.error(None),
            moments.error(b @ a),
            used * (n + k),
            2 * used * (n + k) + n,
        ),
    )
