"""SmoothQuant: move activation outliers into the weights before INT8 quantization.

A few input channels of a transformer's MatMuls carry values far larger than the rest (after
LayerNorm mostly); one per-tensor activation scale then spends its 256 levels on them and the
other channels lose their resolution. With ``X' = X / s`` and ``W' = diag(s) W``,
``X' W' = X W`` exactly, and ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (max over calibration
positions, and over the outputs of every layer reading X) evens the channels' ranges out:
α = 1 moves all of the range into the weights, 0 none (Xiao et al., 2022).

``1 / s`` goes where it costs nothing if it can: into a LayerNormalization's scale and bias
when the layers are its only readers. Otherwise (the normalized value also feeds a residual
add, as in BERT) a ``Mul`` by ``1 / s`` is inserted in front of the layers. The migration is
exact in float (up to rounding): it changes what quantization loses, not what the model
computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.calibration.activations import channel_rows, observe, sequence_mask
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.dynamic import Linear, find_linears
from graphopt.passes.quantization.settings import QuantSettings

DEFAULT_ALPHA = 0.5
# Factors beyond this range come from channels that are (nearly) zero on the calibration
# data: migrating them only amplifies noise.
S_MIN, S_MAX = 1e-2, 1e2
# Producers whose readers get SmoothQuant by default (the outlier channels are there).
LAYER_NORMS = (
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)
# Those of them that can take 1/s into their scale (input 1) and bias (input 2).
ABSORBING = ("LayerNormalization", "RMSNormalization")


@dataclass
class Smoothing:
    """What the migration did: per group (the input it smoothed), where ``1/s`` went."""

    groups: list[tuple[str, str, int]] = field(default_factory=list)  # (input, where, layers)
    skipped: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        absorbed = sum(1 for _, where, _ in self.groups if where != "Mul")
        inserted = len(self.groups) - absorbed
        layers = sum(n for *_, n in self.groups)
        return (
            f"SmoothQuant: {len(self.groups)} inputs of {layers} layers smoothed "
            f"({absorbed} into their normalization scale, {inserted} by an inserted Mul)"
        )


def layer_norm_fed(linear: Linear) -> bool:
    """Whether the layer's input comes straight from a LayerNormalization or RMS norm (where
    transformers have their outlier channels, and SmoothQuant is on by default)."""
    producer = linear.input.producer()
    return producer is not None and producer.op_type in LAYER_NORMS


def groups_of(linears: list[Linear]) -> list[list[Linear]]:
    """Layers grouped by the activation they read (Q, K and V share one scale ``s``)."""
    groups: dict[int, list[Linear]] = {}
    for linear in linears:
        groups.setdefault(id(linear.input), []).append(linear)
    return list(groups.values())


def smooth(
    model: ir.Model,
    calib: CalibrationSet,
    alpha: float,
    select: Callable[[Linear], bool] = lambda linear: True,
) -> Smoothing:
    """Migrate ``alpha`` of the activation range of every selected layer's input into its
    weights (in place). A group is smoothed only when every layer reading its input is
    selected: the others would see the scaled input with unscaled weights."""
    linears, _ = find_linears(model)
    result = Smoothing()
    chosen = [group for group in groups_of(linears) if all(map(select, group))]
    if not chosen:
        return result
    names = [group[0].input.name for group in chosen]
    peaks = _input_peaks(model, names, calib)
    for group in chosen:
        x = group[0].input
        x_peak = peaks.get(x.name)
        w_peak = np.max([np.abs(lin.weight).max(axis=1) for lin in group], axis=0)
        if x_peak is None or x_peak.shape != w_peak.shape:
            # No unpadded position observed, or the last axis is not the layer's input one.
            result.skipped.append(f"{x.name}: no per-channel range observed")
            continue
        s = factors(x_peak, w_peak, alpha)
        where = _absorb(model, x, group, 1.0 / s)
        for linear in group:
            _scale_weight_rows(model, linear, s)
        result.groups.append((x.name or "", where, len(group)))
    return result


def factors(x_peak: np.ndarray, w_peak: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)``, 1 where a channel is zero, clipped."""
    x_peak = x_peak.astype(np.float64)
    w_peak = w_peak.astype(np.float64)
    valid = (x_peak > 0) & (w_peak > 0)
    safe_x = np.where(valid, x_peak, 1.0)
    safe_w = np.where(valid, w_peak, 1.0)
    s = np.where(valid, safe_x**alpha / safe_w ** (1.0 - alpha), 1.0)
    return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def _input_peaks(model: ir.Model, names: list[str], calib: CalibrationSet) -> dict[str, np.ndarray]:
    """max |x_j| per last-axis channel of each named value, padding positions left out."""
    peaks: dict[str, np.ndarray] = {}
    for feeds, values in observe(model, names, calib):
        mask = sequence_mask(feeds)
        for name in names:
            array = values[name]
            rows = channel_rows(array, array.ndim - 1, mask)
            if rows.size == 0:
                continue
            peak = np.abs(rows).max(axis=0)
            peaks[name] = peak if name not in peaks else np.maximum(peaks[name], peak)
    return peaks


def _absorb(model: ir.Model, x: ir.Value, group: list[Linear], inverse: np.ndarray) -> str:
    """Scale ``x`` by ``inverse`` for the group's layers: in the LayerNormalization that makes
    it when only they read it, else by a Mul in front of them. Returns where it went."""
    graph = model.graph
    members = {id(linear.node) for linear in group}
    readers = [use.node for use in x.uses()]
    only_layers = all(id(r) in members for r in readers) and not x.is_graph_output()
    producer = x.producer()
    if only_layers and producer is not None and _scalable_norm(producer, inverse.size):
        scale = editing.constant_array(producer.inputs[1])
        base = producer.name or "layer_norm"
        producer.replace_input_with(1, _add(graph, f"{base}_smoothed_scale", scale * inverse))
        bias = producer.inputs[2] if len(producer.inputs) > 2 else None
        if bias is not None:
            shifted = editing.constant_array(bias) * inverse
            producer.replace_input_with(2, _add(graph, f"{base}_smoothed_bias", shifted))
        return producer.op_type
    factor = _add(graph, f"{x.name}_smooth_factor", inverse.astype(np.float32))
    scaled = ir.Value(name=editing.unique_name(graph, f"{x.name}_smoothed"))
    scaled.type, scaled.shape = x.type, x.shape
    name = editing.NameTable(graph).take(f"{x.name}_smooth")  # node names must be unique too
    mul = ir.Node("", "Mul", [x, factor], outputs=[scaled], name=name)
    first = min((linear.node for linear in group), key=lambda n: _position(graph, n))
    graph.insert_before(first, mul)
    for linear in group:
        linear.node.replace_input_with(0, scaled)
    return "Mul"


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for index, other in enumerate(graph):
        if other is node:
            return index
    return -1


def _scalable_norm(node: ir.Node, channels: int) -> bool:
    """A LayerNormalization (or RMS norm) with a constant [C] scale (and bias): whatever axes
    it normalizes over, ``y / s = norm * (scale / s) + bias / s`` channel by channel."""
    if not editing.is_op(node, ABSORBING):
        return False
    for value in node.inputs[1:3]:
        if value is None:
            continue
        array = editing.constant_array(value)
        if array is None or array.shape != (channels,):
            return False
    return True


def _scale_weight_rows(model: ir.Model, linear: Linear, s: np.ndarray) -> None:
    """W' = diag(s) W, written as a new initializer (a shared weight stays intact)."""
    node = linear.node
    raw = editing.constant_array(node.inputs[1])
    if node.op_type == "Gemm" and editing.attribute(node, "transB", 0):
        scaled = raw * s[None, :]  # B is [N, K]: its columns are the input channels
    else:
        scaled = raw * s[:, None]
    base = f"{node.inputs[1].name or node.name}_smoothed"
    node.replace_input_with(1, _add(model.graph, base, scaled.astype(raw.dtype)))
    linear.weight = linear.weight * s[:, None]


def _add(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    return editing.add_initializer(graph, base, np.ascontiguousarray(array, dtype=np.float32))


def apply_settings(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet | None, notes: list[str]
) -> None:
    """SmoothQuant as the run's settings ask (``settings.smoothquant``: -1 unset, 0 off, else
    alpha), for int8-dynamic and static int8 alike; what it did or skipped goes to ``notes``.

    Unset means alpha :data:`DEFAULT_ALPHA` on the MatMuls a normalization feeds only: their
    inputs carry the outlier channels that one per-tensor activation scale handles worst
    (measured on MiniLM: smoothing the Gelu-fed ones too lost accuracy)."""
    alpha = settings.smoothquant
    if alpha == 0:
        return
    if calib is None:
        if alpha > 0 or any(map(layer_norm_fed, find_linears(model)[0])):
            notes.append("SmoothQuant skipped: it needs calibration data (--calib FILE.npz)")
        return
    chosen = DEFAULT_ALPHA if alpha < 0 else alpha
    select = layer_norm_fed if alpha < 0 else (lambda linear: True)
    done = smooth(model, calib, chosen, lambda lin: select(lin) and not settings.excluded(lin.node))
    if done.groups:
        notes.append(f"{done.note}, alpha {chosen:g}")
    notes.extend(f"SmoothQuant skipped {why}" for why in done.skipped)
