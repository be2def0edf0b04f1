"""Cross-layer equalization and bias absorption before static INT8 (Nagel et al., 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").

A depthwise convolution's output channels often have weight ranges orders of magnitude
apart; per-channel weight scales cope with that, but the activation between it and the next
convolution gets *one* scale, so the small channels lose all their resolution. For a pair
``Conv1 → f → Conv2`` with ``f`` positively homogeneous per channel (``f(x / s) = f(x) / s``
for ``s > 0``: Relu, MaxPool, or nothing), dividing Conv1's output channel ``i`` (weight and
bias) by ``s_i`` and multiplying Conv2's input channel ``i`` by ``s_i`` computes the same
function. ``s_i = sqrt(r1_i / r2_i)`` (``r1``: Conv1's output channel weight range, ``r2``:
Conv2's input channel one) makes both ranges ``sqrt(r1_i · r2_i)``; a chain of pairs is
swept until the factors settle.

Relu6 (``Clip(0, 6)``) is *not* homogeneous with per-channel factors: the bound would have
to become ``6 / s_i`` per channel, which a Clip cannot express, so pairs through a Clip (all
of MobileNetV2's depthwise→pointwise pairs) are skipped and counted in the note. Replacing
Relu6 by Relu (as the paper does) would change the model.

Bias absorption: equalization can blow a channel's bias up (``b_i / s_i`` with small
``s_i``), which widens the activation range. Where a Relu follows Conv1 and a channel's
pre-activation stays above ``c_i > 0``, ``relu(x) = relu(x - c_i) + c_i``, so ``c_i`` moves
out of Conv1's bias into Conv2's (``b2 += W2 · c``). The Batch-norm statistics the paper
uses (``β - 3γ``) are folded away before quantization runs, so ``c_i`` comes from the
calibration data: ``max(0, min(observed minimum, mean - 3σ))``. This is exact on the
calibration samples and on any input whose pre-activation stays above the margin, not
provably on all inputs; it is applied only when Conv2 has no padding (a padded border reads
zeros, not ``c``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.calibration.activations import observe
from graphopt.passes.calibration.samples import CalibrationSet

# Per-channel positively homogeneous ops that may sit between the two convolutions (and
# commute with subtracting a per-channel constant, for bias absorption: MaxPool does).
HOMOGENEOUS = frozenset({"Relu", "MaxPool"})
MAX_SWEEPS = 100
# A sweep whose factors all lie within exp(±TOLERANCE) of 1 ends the iteration.
TOLERANCE = 1e-4
# Standard deviations below the mean that a channel's pre-activation may reach.
SIGMAS = 3.0


@dataclass
class Pair:
    """``first → between → second``: Conv1's output channel i is Conv2's input channel i."""

    first: ir.Node
    between: list[ir.Node]
    second: ir.Node


@dataclass
class Equalized:
    """What :func:`equalize_model` did."""

    pairs: list[Pair] = field(default_factory=list)
    depthwise_pairs: int = 0
    sweeps: int = 0
    absorbed: int = 0  # pairs whose bias moved on
    skipped: Counter = field(default_factory=Counter)  # reason -> pairs

    @property
    def note(self) -> str:
        if not self.pairs:
            text = "cross-layer equalization: no Conv→(Relu/MaxPool)→Conv pair to equalize"
        else:
            text = (
                f"cross-layer equalization: {len(self.pairs)} Conv pairs "
                f"({self.depthwise_pairs} from a depthwise Conv) in {self.sweeps} sweeps; "
                f"bias absorption on {self.absorbed}"
            )
        if self.skipped:
            text += "; skipped " + ", ".join(
                f"{n} {why}" for why, n in sorted(self.skipped.items())
            )
        return text


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group and more than one group."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    weight = editing.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    group = editing.attribute(node, "group", 1)
    return weight is not None and weight.ndim >= 3 and group > 1 and weight.shape[1] == 1


def has_depthwise(model: ir.Model) -> bool:
    """Whether the model has a depthwise convolution (equalization's default is on then)."""
    return any(is_depthwise(node) for node in model.graph)


def equalize(model: ir.Model, settings, calib: CalibrationSet | None) -> str:
    """The static INT8 hook: equalize ``model`` in place and return the record's note."""
    del settings  # nothing to choose: the factors follow from the weights
    return equalize_model(model, calib).note


def equalize_model(model: ir.Model, calib: CalibrationSet | None = None) -> Equalized:
    """Equalize every Conv pair of ``model`` in place; absorb biases when ``calib`` is given."""
    result = Equalized()
    result.pairs = find_pairs(model, result.skipped)
    if not result.pairs:
        return result
    result.depthwise_pairs = sum(1 for pair in result.pairs if is_depthwise(pair.first))
    weights: dict[int, np.ndarray] = {}
    biases: dict[int, np.ndarray | None] = {}
    for pair in result.pairs:
        for conv in (pair.first, pair.second):
            if id(conv) not in weights:
                weights[id(conv)] = editing.constant_array(conv.inputs[1]).astype(np.float64)
                bias = editing.constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else None
                biases[id(conv)] = None if bias is None else bias.astype(np.float64)
    # Each pair's cumulative factor: Conv1's output channels end up divided by it.
    total = {id(pair.first): np.ones(weights[id(pair.first)].shape[0]) for pair in result.pairs}
    for sweep in range(1, MAX_SWEEPS + 1):
        worst = 0.0
        for pair in result.pairs:
            s = _factors(weights[id(pair.first)], weights[id(pair.second)], pair.second)
            _scale_outputs(weights, biases, pair.first, 1.0 / s)
            _scale_inputs(weights, pair.second, s)
            total[id(pair.first)] *= s
            worst = max(worst, float(np.abs(np.log(s)).max()))
        result.sweeps = sweep
        if worst < TOLERANCE:
            break
    if calib is not None:
        result.absorbed = _absorb_biases(model, result.pairs, weights, biases, total, calib)
    else:
        result.skipped["bias absorptions (no calibration data)"] += len(result.pairs)
    written: set[int] = set()
    for conv in (c for pair in result.pairs for c in (pair.first, pair.second)):
        if id(conv) not in written:  # graph order: the new names are deterministic
            written.add(id(conv))
            _write(model.graph, conv, weights[id(conv)], biases[id(conv)])
    return result


def find_pairs(model: ir.Model, skipped: Counter | None = None) -> list[Pair]:
    """The Conv pairs that can be equalized exactly, in graph order (``skipped`` counts the
    Conv→Clip→Conv ones that cannot)."""
    skipped = Counter() if skipped is None else skipped
    pairs: list[Pair] = []
    for node in model.graph:
        if not _weighted_conv(node):
            continue
        between: list[ir.Node] = []
        current = node.outputs[0]
        while True:
            uses = current.uses()
            if len(uses) != 1 or current.is_graph_output():
                break
            user, index = uses[0].node, uses[0].idx
            if user.domain not in ("", "ai.onnx"):
                break
            if user.op_type == "Conv" and index == 0 and _weighted_conv(user):
                if _matches(node, user):
                    pairs.append(Pair(node, between, user))
                break
            if user.op_type == "Clip":
                skipped["pairs through a Clip (Relu6: one bound, not one per channel)"] += 1
                break
            if user.op_type not in HOMOGENEOUS or index != 0:
                break
            if user.op_type == "MaxPool" and len(user.outputs) > 1 and user.outputs[1].uses():
                break  # its indices output would expose the positions, not the values
            between.append(user)
            current = user.outputs[0]
    return pairs


def _weighted_conv(node: ir.Node) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = editing.constant_array(node.inputs[1])
    if weight is None or weight.dtype != np.float32 or weight.ndim < 3:
        return False
    return (
        len(node.inputs) < 3
        or node.inputs[2] is None
        or (editing.constant_array(node.inputs[2]) is not None)
    )


def _matches(first: ir.Node, second: ir.Node) -> bool:
    """Conv1's output channels are exactly Conv2's input channels."""
    out_channels = editing.constant_array(first.inputs[1]).shape[0]
    w2 = editing.constant_array(second.inputs[1])
    return w2.shape[1] * editing.attribute(second, "group", 1) == out_channels


def _grouped(weight: np.ndarray, conv: ir.Node) -> np.ndarray:
    """Conv2's weight as [groups, outputs per group, inputs per group, kernel]."""
    group = editing.attribute(conv, "group", 1)
    return weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)


def _input_ranges(weight: np.ndarray, conv: ir.Node) -> np.ndarray:
    return np.abs(_grouped(weight, conv)).max(axis=(1, 3)).reshape(-1)


def _factors(w1: np.ndarray, w2: np.ndarray, second: ir.Node) -> np.ndarray:
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    r2 = _input_ranges(w2, second)
    valid = (r1 > 0) & (r2 > 0)
    # A channel with an all-zero side contributes nothing either way: leave it alone.
    return np.where(valid, np.sqrt(np.where(valid, r1, 1.0) / np.where(valid, r2, 1.0)), 1.0)


def _scale_outputs(weights, biases, conv: ir.Node, factor: np.ndarray) -> None:
    shape = (-1,) + (1,) * (weights[id(conv)].ndim - 1)
    weights[id(conv)] = weights[id(conv)] * factor.reshape(shape)
    if biases[id(conv)] is not None:
        biases[id(conv)] = biases[id(conv)] * factor


def _scale_inputs(weights, conv: ir.Node, factor: np.ndarray) -> None:
    weight = weights[id(conv)]
    grouped = _grouped(weight, conv)
    per = factor.reshape(grouped.shape[0], 1, grouped.shape[2], 1)
    weights[id(conv)] = (grouped * per).reshape(weight.shape)


def _absorb_biases(model, pairs, weights, biases, total, calib: CalibrationSet) -> int:
    """Move each Relu-followed channel's sure minimum into the next Conv's bias."""
    eligible = [
        pair
        for pair in pairs
        if pair.between
        and pair.between[0].op_type == "Relu"
        and not any(editing.attribute(pair.second, "pads", None) or [])
        and editing.attribute(pair.second, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
    ]
    if not eligible:
        return 0
    names = sorted({pair.first.outputs[0].name for pair in eligible})
    low = _channel_lows(model, names, calib)
    absorbed = 0
    for pair in eligible:
        found = low.get(pair.first.outputs[0].name)
        if found is None:
            continue
        # Observed on the original model: the equalized pre-activation is divided by total.
        c = np.maximum(found / total[id(pair.first)], 0.0)
        if not np.any(c > 0):
            continue
        channels = weights[id(pair.first)].shape[0]
        first_bias = biases[id(pair.first)]
        biases[id(pair.first)] = (np.zeros(channels) if first_bias is None else first_bias) - c
        grouped = _grouped(weights[id(pair.second)], pair.second)
        shift = np.einsum("gock,gc->go", grouped, c.reshape(grouped.shape[0], grouped.shape[2]))
        second_bias = biases[id(pair.second)]
        outputs = weights[id(pair.second)].shape[0]
        base = np.zeros(outputs) if second_bias is None else second_bias
        biases[id(pair.second)] = base + shift.reshape(outputs)
        absorbed += 1
    return absorbed


def _channel_lows(model: ir.Model, names: list[str], calib: CalibrationSet) -> dict:
    """Per channel (axis 1) of each named value: min(observed minimum, mean - 3σ)."""
    lows: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: Counter = Counter()
    for _, values in observe(model, names, calib):
        for name in names:
            array = values[name].astype(np.float64)
            rows = np.moveaxis(array, 1, -1).reshape(-1, array.shape[1])
            low = rows.min(axis=0)
            lows[name] = low if name not in lows else np.minimum(lows[name], low)
            sums[name] = sums.get(name, 0.0) + rows.sum(axis=0)
            squares[name] = squares.get(name, 0.0) + (rows**2).sum(axis=0)
            counts[name] += rows.shape[0]
    result = {}
    for name, low in lows.items():
        mean = sums[name] / counts[name]
        sigma = np.sqrt(np.maximum(squares[name] / counts[name] - mean**2, 0.0))
        result[name] = np.minimum(low, mean - SIGMAS * sigma)
    return result


def _write(graph: ir.Graph, conv: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """New initializers (a weight shared with another node stays as it was)."""
    base = conv.name or "conv"
    old = [conv.inputs[1]]
    conv.replace_input_with(1, _add(graph, f"{base}_equalized_weight", weight))
    if bias is not None:
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        old.append(conv.inputs[2])
        conv.replace_input_with(2, _add(graph, f"{base}_equalized_bias", bias))
    for value in old:
        # The replaced initializer, unless something else still reads it (a shared weight).
        unused = value is not None and not value.uses() and not value.is_graph_output()
        if unused and graph.initializers.get(value.name) is value and not value.is_graph_input():
            del graph.initializers[value.name]


def _add(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    return editing.add_initializer(graph, base, np.ascontiguousarray(array, dtype=np.float32))


__all__ = ["Equalized", "Pair", "equalize", "equalize_model", "find_pairs", "has_depthwise"]
