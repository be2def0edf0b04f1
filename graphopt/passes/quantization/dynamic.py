"""``--quantize int8-dynamic``: MatMul/Gemm with constant weights in INT8, activations
quantized at run time.

Weights become int8, symmetric, one scale per output column (ORT's own ``quantize_dynamic``
uses one scale per tensor: on MiniLM that alone costs 0.03 of embedding cosine). Each
activation that feeds quantized layers is quantized once per run by ``DynamicQuantizeLinear``
(u8, its range measured on the tensor itself), shared by every layer reading it (Q, K, V).

Two lowerings:

* portable (standard ONNX only): ``DynamicQuantizeLinear`` → ``MatMulInteger`` (u8 × s8) →
  ``Cast`` → ``Mul`` by ``a_scale * w_scale`` (a Gemm's bias is added after, in float).
* ``--target ort``: ``DynamicQuantizeLinear`` → com.microsoft ``MatMulIntegerToFloat`` with
  the bias of a MatMul + Add folded in; a fused com.microsoft ``Attention`` (a model given
  already fused) becomes ``QAttention`` with its packed Q/K/V weights quantized per column.
  u8 × s8 is MLAS's fast integer GEMM on x86 (VNNI). Measured on MiniLM (ORT 1.32, 1 thread,
  seq 128, Zen 4): ``MatMulIntegerToFloat`` with the quantization shared by Q/K/V, the
  portable form (which ORT fuses into the same kernels) and com.microsoft
  ``DynamicQuantizeMatMul`` (one quantization per layer) are within the timing noise of
  each other (2.5-2.8× over fp32); the fused op is kept for ``--target ort`` because it
  needs no fusion by the runtime and carries the bias.

Before lowering, SmoothQuant (:mod:`.smoothquant`) may migrate activation outliers into
the weights, and a mixed-precision search (:mod:`.mixed_precision`) may keep the most
sensitive layers in float. Layers that ``--exclude`` names stay float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.opset import raise_in_place
from graphopt.passes.quantization.placement import (
    overridable,
    overridable_reason,
    weight_refusal,
)
from graphopt.passes.quantization.record import (
    LayerPrecision,
    QuantRecord,
    TypeChange,
    measure_fidelity,
    own_max_rel,
    weight_bytes,
)

if TYPE_CHECKING:
    from graphopt.passes.calibration.samples import CalibrationSet
    from graphopt.passes.quantization.settings import QuantSettings
    from graphopt.registry import PassContext

MS_DOMAIN = "com.microsoft"
LINEAR_OPS = ("MatMul", "Gemm")
QMAX = 127  # symmetric int8 weights: [-127, 127], so -w quantizes to -q
MIN_OPSET = 11  # DynamicQuantizeLinear
SENSITIVITY_SAMPLES = 32


@dataclass
class Linear:
    """A layer int8-dynamic can quantize: ``x @ weight (+ bias)``."""

    node: ir.Node
    weight: np.ndarray  # [K, N] float32: rows are input channels, columns outputs
    # What the layer adds: Attention's [N] bias, or Gemm's C: a constant vector, or any C
    # broadcasting into [M, N] (a residual ``x + r @ W`` fused into one Gemm) that the
    # lowering adds after the integer product, in float.
    bias: ir.Value | None = None
    bias_add: ir.Node | None = None  # MatMul + Add: the Add whose constant is the bias

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    def current_bias(self) -> ir.Value | None:
        """The bias as the graph has it now: a Gemm's activation C (the residual sum before
        it) is replaced when the layer making it is lowered, after this one was found."""
        if self.node.op_type == "Gemm":
            return self.node.inputs[2] if len(self.node.inputs) > 2 else None
        return self.bias


def name_nodes(model: ir.Model) -> None:
    """Give every unnamed node a stable name: layers are chosen by name (``--exclude``,
    mixed precision), and the record must name them."""
    taken = {node.name for node in model.graph if node.name}
    for index, node in enumerate(model.graph):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def find_linears(model: ir.Model) -> tuple[list[Linear], list[LayerPrecision]]:
    """The quantizable layers of the main graph, and the MatMul/Gemm that are not, with why."""
    linears: list[Linear] = []
    refused: list[LayerPrecision] = []
    for node in model.graph:
        if node.op_type == "Attention" and node.domain == MS_DOMAIN:
            found, why = _attention(node)
        elif editing.is_op(node, LINEAR_OPS):
            found, why = _linear(node)
        else:
            continue
        if found is None:
            refused.append(LayerPrecision(node.name or "", node.op_type, "float", why))
        else:
            linears.append(found)
    return linears, refused


def _is_float32(value: ir.Value | None) -> bool:
    """Float32, or of unknown type (the ops require it to match the float32 weight)."""
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


def _linear(node: ir.Node) -> tuple[Linear | None, str]:
    x = node.inputs[0]
    given = node.inputs[1] if len(node.inputs) > 1 else None
    if overridable(given):
        assert given is not None
        return None, overridable_reason(given.name)
    weight = editing.constant_array(given) if given is not None else None
    if weight is None or weight.ndim != 2:
        return None, weight_refusal(node) or "weight is not a constant matrix"
    if weight.dtype != np.float32 or not _is_float32(x):
        return None, f"not float32 ({weight.dtype})"
    if node.op_type == "MatMul":
        return Linear(node, weight, *_following_bias(node, weight.shape[1])), ""
    if editing.attribute(node, "transA", 0):
        return None, "Gemm with transA=1"
    alpha = float(editing.attribute(node, "alpha", 1.0))
    beta = float(editing.attribute(node, "beta", 1.0))
    matrix = (weight.T if editing.attribute(node, "transB", 0) else weight) * np.float32(alpha)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        # Any C is added after the product in float (Gemm broadcasts it into [M, N] as Add
        # does): a residual fused into the Gemm (C an activation) used to keep the layer in
        # float ("Gemm bias is not a constant vector"), half the layers of a residual MLP.
        if beta != 1.0:
            return None, "Gemm with beta != 1"
        if not _is_float32(bias):
            return None, "Gemm C is not float32"
        if bias is x:
            # Gemm(x, W, x): SmoothQuant would scale x for the product by scaling what makes
            # x, and C reads that x too. Rare enough to leave in float.
            return None, "Gemm adds its own input A as C"
    return Linear(node, np.ascontiguousarray(matrix, dtype=np.float32), bias), ""


def _is_vector(array: np.ndarray | None, columns: int) -> bool:
    """A constant C that is one value per output column (or one for all): [N], [1, N], [1]."""
    return array is not None and array.size in (1, columns) and array.shape[:-1] in ((), (1,))


def _following_bias(node: ir.Node, columns: int) -> tuple[ir.Value | None, ir.Node | None]:
    """MatMul + Add(constant [N]): the bias ORT's fused op can add (portable keeps the Add)."""
    add = editing.single_user(node.outputs[0])
    if add is None or not editing.is_op(add, "Add") or node.outputs[0].is_graph_output():
        return None, None
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    array = editing.constant_array(other, max_bytes=1 << 20)
    if array is None or array.shape != (columns,) or array.dtype != np.float32:
        return None, None
    return other, add


def _attention(node: ir.Node) -> tuple[Linear | None, str]:
    """A fused com.microsoft Attention whose packed Q/K/V projection QAttention can take."""
    weight = editing.constant_array(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None, "Attention weights are not a constant float32 matrix"
    if bias is None or editing.constant_array(bias) is None:
        return None, "Attention without a constant bias (QAttention needs one)"
    # QAttention has no past_sequence_length, attention_bias, rotary or unequal Q/K/V sizes.
    if any(v is not None for v in node.inputs[4:]):
        return None, "Attention with past/attention_bias inputs (QAttention takes neither)"
    sizes = editing.attribute(node, "qkv_hidden_sizes")
    if sizes is not None and len(set(sizes)) != 1:
        return None, "Attention with unequal Q/K/V sizes"
    if editing.attribute(node, "do_rotary", 0):
        return None, "Attention with rotary embedding"
    if not _is_float32(node.inputs[0]):
        return None, "Attention input is not float32"
    return Linear(node, weight, bias), ""


def quantize_weight(weight: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per output column (or one for the tensor, repeated):
    (q [K, N] int8, scale [N] float32)."""
    peak = np.abs(weight).max(axis=0).astype(np.float32)
    if not per_channel:
        peak = np.full_like(peak, peak.max(initial=0.0))
    scale = np.where(peak > 0, peak / QMAX, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def rounded_codes(
    model: ir.Model, calib: CalibrationSet, per_channel: bool, notes: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GPTQ-rounded int8 weights (``--int8-weights gptq``) of the MatMul/Gemm layers, by node
    name, as :func:`quantize_weight` returns them (q [K, N], scale [N]); the note says what
    they gained over round-to-nearest on the calibration data."""
    from graphopt.passes.quantization.int8_rounding import round_weights

    axes: dict[str, tuple[int, int]] = {}
    for linear in find_linears(model)[0]:
        node = linear.node
        # Gemm's alpha is folded into the [K, N] matrix the lowering quantizes: not the
        # stored weight GPTQ rounds, so such layers keep round-to-nearest.
        if node.op_type in LINEAR_OPS and float(editing.attribute(node, "alpha", 1.0)) == 1.0:
            transposed = node.op_type == "Gemm" and editing.attribute(node, "transB", 0)
            axes[linear.name] = (1, 0 if transposed else 1)
    rounded = round_weights(model, axes, calib, per_channel)
    notes.append(rounded.note())
    codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in model.graph:
        if node.name not in axes:
            continue
        axis = axes[node.name][1] if per_channel else None
        weight = rounded.weights.get((node.inputs[1].name or "", axis))
        if weight is None:
            continue
        values = weight.values.T if axes[node.name][1] == 0 else weight.values
        columns = values.shape[1]
        scale = np.broadcast_to(weight.scale, (columns,)).astype(np.float32)
        codes[node.name] = (np.ascontiguousarray(values, dtype=np.int8), scale)
    return codes


class Lowering:
    """Rewrites layers of one graph into their int8-dynamic form."""

    def __init__(
        self,
        model: ir.Model,
        ort: bool,
        per_channel: bool = True,
        codes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.ort = ort
        self.per_channel = per_channel
        # Int8 weights rounded beforehand (GPTQ), by node name; the rest round to nearest.
        self.codes = codes or {}
        self.maker = editing.NameTable(model.graph)
        # One DynamicQuantizeLinear per activation, shared by every layer reading it.
        self.quantized_inputs: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.changes: list[TypeChange] = []

    def quantize(self, linear: Linear) -> str:
        """Rewrite one layer; returns how (for the record)."""
        node = linear.node
        q, scale = self.codes.get(linear.name) or quantize_weight(linear.weight, self.per_channel)
        base = linear.name or node.op_type
        q_value = self._initializer(f"{base}_weight_q", q)
        scale_value = self._initializer(f"{base}_weight_scale", scale)
        self.changes.append(TypeChange(node.inputs[1].name or base, "float", "int8"))
        xq, xs, xzp = self._dynamic_input(linear)
        if node.op_type == "Attention":
            return self._qattention(linear, xq, xs, xzp, q_value, scale_value)
        if self.ort:
            return self._integer_to_float(linear, xq, xs, xzp, q_value, scale_value)
        return self._standard(linear, xq, xs, xzp, q_value, scale_value)

    @property
    def _weights(self) -> str:
        return "int8 per-channel" if self.per_channel else "int8 per-tensor"

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        return self.maker.add_initializer(self.graph, base, array)

    def _dynamic_input(self, linear: Linear) -> tuple[ir.Value, ir.Value, ir.Value]:
        x = linear.input
        if id(x) not in self.quantized_inputs:
            base = x.name or "x"
            outputs = [
                ir.Value(name=self.maker.take(f"{base}_quantized")),
                ir.Value(name=self.maker.take(f"{base}_scale")),
                ir.Value(name=self.maker.take(f"{base}_zero_point")),
            ]
            node = ir.Node(
                "", "DynamicQuantizeLinear", [x], outputs=outputs, name=f"{base}_QuantizeLinear"
            )
            # Right after the producer (or first in the graph): every reader comes later.
            producer = x.producer()
            if producer is not None and producer.graph is self.graph:
                self.graph.insert_after(producer, node)
            else:
                self.graph.insert_before(self.graph[0], node)
            self.quantized_inputs[id(x)] = tuple(outputs)
            self.changes.append(TypeChange(x.name or base, "float", "uint8"))
        return self.quantized_inputs[id(x)]

    def _standard(self, linear, xq, xs, xzp, q_value, scale_value) -> str:
        """DynamicQuantizeLinear → MatMulInteger → Cast → Mul (ORT fuses this pattern too)."""
        node, base = linear.node, linear.name
        acc = ir.Value(name=self.maker.take(f"{base}_int32"))
        floats = ir.Value(name=self.maker.take(f"{base}_int32_float"))
        scales = ir.Value(name=self.maker.take(f"{base}_scales"))
        out = ir.Value(name=self.maker.take(f"{base}_dequantized"))
        nodes = [
            ir.Node("", "MatMulInteger", [xq, q_value, xzp], outputs=[acc], name=f"{base}_int"),
            ir.Node(
                "",
                "Cast",
                [acc],
                attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                outputs=[floats],
                name=f"{base}_cast",
            ),
            ir.Node("", "Mul", [xs, scale_value], outputs=[scales], name=f"{base}_scale_mul"),
            ir.Node("", "Mul", [floats, scales], outputs=[out], name=f"{base}_dequantize"),
        ]
        bias = linear.current_bias()
        if bias is not None and node.op_type == "Gemm":
            biased = ir.Value(name=self.maker.take(f"{base}_biased"))
            nodes.append(ir.Node("", "Add", [out, bias], outputs=[biased], name=f"{base}_bias"))
            out = biased
        self._replace(node, nodes, node.outputs[0], out)
        return f"{self._weights} weights, u8 dynamic activations (MatMulInteger)"

    def _integer_to_float(self, linear, xq, xs, xzp, q_value, scale_value) -> str:
        node, base = linear.node, linear.name
        out = ir.Value(name=self.maker.take(f"{base}_dequantized"))
        replaced = node.outputs[0]
        bias = linear.current_bias()
        columns = linear.weight.shape[1]
        array = editing.constant_array(bias) if bias is not None else None
        after = None  # a C the fused op cannot take as its [N] bias, added after it
        if bias is not None and not _is_vector(array, columns):
            after, bias = bias, None
        elif array is not None and array.shape != (columns,):
            # Gemm's C may be a scalar or [1, N]; the fused op's bias is a [N] vector.
            vector = np.broadcast_to(array.reshape(-1), (columns,)).astype(np.float32)
            bias = self._initializer(f"{base}_bias", vector)
        if linear.bias_add is not None:
            replaced = linear.bias_add.outputs[0]
        product = out if after is None else ir.Value(name=self.maker.take(f"{base}_product"))
        nodes = [
            ir.Node(
                MS_DOMAIN,
                "MatMulIntegerToFloat",
                [xq, q_value, xs, scale_value, xzp, None, bias],
                outputs=[product],
                name=f"{base}_int",
            )
        ]
        if after is not None:
            nodes.append(ir.Node("", "Add", [product, after], outputs=[out], name=f"{base}_c"))
        self._replace(node, nodes, replaced, out, also=linear.bias_add)
        return f"{self._weights} weights, u8 dynamic activations (MatMulIntegerToFloat)"

    def _qattention(self, linear, xq, xs, xzp, q_value, scale_value) -> str:
        node, base = linear.node, linear.name
        out = ir.Value(name=self.maker.take(f"{base}_out"))
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        attributes = [a for k, a in sorted(node.attributes.items()) if k != "qkv_hidden_sizes"]
        fused = ir.Node(
            MS_DOMAIN,
            "QAttention",
            [xq, q_value, linear.bias, xs, scale_value, mask, xzp],
            attributes=attributes,
            outputs=[out],
            name=f"{base}_int",
        )
        self._replace(node, [fused], node.outputs[0], out)
        return f"{self._weights} Q/K/V weights, u8 dynamic activations (QAttention)"

    def _replace(
        self,
        node: ir.Node,
        nodes: list[ir.Node],
        old: ir.Value,
        new: ir.Value,
        also: ir.Node | None = None,
    ) -> None:
        self.graph.insert_before(node, nodes)
        new.type, new.shape = old.type, old.shape
        if not editing.replace_value(old, new):
            raise RuntimeError(f"int8-dynamic: cannot replace the output of {node.name!r}")
        if also is not None:
            self.graph.remove(also, safe=True)
        self.graph.remove(node, safe=True)

    def finish(self) -> None:
        """Drop the float weights (and biases) nothing reads any more: initializers and
        Constant nodes (the weight bytes of the record are counted right after)."""
        for node in list(self.graph):
            if editing.is_op(node, "Constant"):
                editing.remove_if_dead(node)
        for name in sorted(self.graph.initializers):
            value = self.graph.initializers[name]
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                del self.graph.initializers[name]


def lower(
    model: ir.Model,
    keep_float: frozenset[str],
    ort: bool,
    excluded: Callable[[ir.Node], bool],
    per_channel: bool = True,
    codes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[LayerPrecision], list[TypeChange]]:
    """Quantize every layer of ``model`` (in place) except those named in ``keep_float`` and
    those ``excluded`` (``--exclude``); the layers' precisions and the type changes.
    ``codes``: int8 weights rounded beforehand, by node name (:func:`rounded_codes`)."""
    names = {node.name: node for node in model.graph if node.name}
    index = {id(node): i for i, node in enumerate(model.graph)}
    linears, layers = find_linears(model)
    lowering = Lowering(model, ort, per_channel, codes)
    for linear in linears:
        node = linear.node
        if excluded(node):
            layers.append(LayerPrecision(linear.name, node.op_type, "float", "--exclude"))
        elif linear.name in keep_float:
            layers.append(
                LayerPrecision(linear.name, node.op_type, "float", "mixed precision: sensitive")
            )
        elif node.op_type == "Attention" and not ort:
            layers.append(LayerPrecision(linear.name, node.op_type, "float", "not portable"))
        else:
            how = lowering.quantize(linear)
            layers.append(LayerPrecision(linear.name, node.op_type, "int8", how))
    lowering.finish()
    if ort and any(layer.precision == "int8" for layer in layers):
        model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
    # The record lists layers in graph order (found and refused ones were collected apart).
    position = {name: index[id(node)] for name, node in names.items()}
    layers.sort(key=lambda layer: (position.get(layer.node, 0), layer.node))
    return layers, lowering.changes


def quantize_dynamic(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet | None, context: PassContext
) -> QuantRecord:
    """The ``int8-dynamic`` mode (see the module docstring); rewrites ``model`` in place."""
    from graphopt.passes.quantization import smoothquant

    record = QuantRecord(mode=settings.mode)
    note = raise_in_place(model, MIN_OPSET, f"DynamicQuantizeLinear needs opset {MIN_OPSET}")
    if note:
        record.notes.append(note)
    if settings.activation_type == "s8" and "activation_type" not in settings.defaulted:
        record.notes.append(
            "--activation-type s8 ignored: DynamicQuantizeLinear quantizes activations to u8 "
            "only (the weights are s8)"
        )
    if settings.autotune:
        record.notes.append(
            "--autotune: int8-dynamic has one ORT form (its alternatives measured within the "
            "timing noise of it on MiniLM); nothing to time"
        )
    name_nodes(model)
    original = model.clone()
    record.weight_bytes_before = weight_bytes(model)
    ort = settings.target == "ort"
    fit, held = calib.split(settings.holdout) if calib is not None else (None, None)

    smoothquant.apply_settings(model, settings, fit, record.notes)
    codes = None
    if settings.int8_weights == "gptq" and fit is not None:
        # Rounded once, after SmoothQuant moved its scales into the weights.
        codes = rounded_codes(model, fit, settings.per_channel, record.notes)

    keep: frozenset[str] = frozenset()
    if settings.mixed_precision:
        keep = _mixed_precision(model, original, settings, fit, held, context, record, codes)

    layers, changes = lower(model, keep, ort, settings.excluded, settings.per_channel, codes)
    record.layers, record.type_changes = layers, changes
    record.weight_bytes_after = weight_bytes(model)
    _fidelity(original, model, calib, fit, held, context, record)
    return record


def _mixed_precision(
    smoothed: ir.Model,
    original: ir.Model,
    settings: QuantSettings,
    fit: CalibrationSet | None,
    held: CalibrationSet | None,
    context: PassContext,
    record: QuantRecord,
    codes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> frozenset[str]:
    """Which layers stay float so the --min-cosine/--max-error target holds on held-out
    samples (sensitivities on the fit samples)."""
    from graphopt.passes.quantization import mixed_precision as mp

    if fit is None:
        generated = _generated(original, context)
        fit, held = generated.split(settings.holdout)
        record.notes.append(
            "mixed precision: no --calib: layer sensitivities and the target are measured on "
            "generated inputs"
        )
    ort = settings.target == "ort"

    def build(kept: frozenset[str]) -> ir.Model:
        candidate = smoothed.clone()
        lower(candidate, kept, ort, settings.excluded, settings.per_channel, codes)
        return candidate

    candidates = [
        linear.name
        for linear in find_linears(smoothed)[0]
        if not settings.excluded(linear.node) and (ort or linear.node.op_type != "Attention")
    ]
    target = mp.Target.from_settings(settings)
    # Sensitivities only rank layers: a few dozen samples do, at a fraction of the cost.
    # The target is measured against the run's original when an earlier lossy pass changed
    # the model (the user's target is end to end); speed-ups against the model given.
    reference = context.fidelity_reference(original)
    evaluate = mp.fidelity_evaluator(reference, fit.first(SENSITIVITY_SAMPLES))
    # Judged on held-out and calibration samples, the worst (and refused when the held-out
    # samples cannot resolve an agreement target): mp.target_check.
    check = mp.target_check(reference, fit, held, target, fit_evaluator=evaluate)
    speed = mp.speed_meter(original, _one_sample(held or fit))
    kept, curve = mp.search(build, candidates, evaluate, target, check=check.evaluate, speed=speed)
    record.curve = curve
    mp.conclude(
        record,
        target,
        kept,
        candidates,
        check,
        chained=reference is not original,
        extra=" (the curve's speed-ups: ORT, 1 thread, one sample, before the target's "
        "fusions run)",
    )
    return kept


def _one_sample(samples: CalibrationSet) -> dict[str, np.ndarray]:
    """The first sample's feeds (timing one sample keeps each curve point short)."""
    from graphopt.passes.calibration.samples import CalibrationSet

    single = CalibrationSet(samples.arrays, samples.source, 1, False, dict(samples.axes))
    return next(iter(single.batches(trim=False)))


def _generated(model: ir.Model, context: PassContext) -> CalibrationSet:
    from graphopt.passes.calibration.samples import random_calibration

    return random_calibration(model, dict(context.input_shapes), owner="quantize")


def _fidelity(
    original: ir.Model,
    quantized: ir.Model,
    calib: CalibrationSet | None,
    fit: CalibrationSet | None,
    held: CalibrationSet | None,
    context: PassContext,
    record: QuantRecord,
) -> None:
    reference = context.fidelity_reference(original)  # the run's original, if moved
    if calib is None:
        generated = _generated(original, context)
        record.fidelity = measure_fidelity(reference, quantized, {"generated": generated})
        record.own_max_rel = own_max_rel(context, original, quantized, {"generated": generated})
        record.fidelity_source = f"{generated.count} generated inputs (no --calib: not real data)"
        return
    sets = {"calibration": fit}
    if held is not None:
        sets["held-out"] = held
    record.fidelity = measure_fidelity(reference, quantized, sets)
    record.own_max_rel = own_max_rel(context, original, quantized, sets)
    where = f"{held.count} held-out and " if held is not None else ""
    record.fidelity_source = f"{where}{fit.count} calibration samples of {calib.source}"
