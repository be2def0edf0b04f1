"""EoRA after ``quantize`` (int8 QDQ, int4-weight): the rounded layers as
:class:`~.eora.ChangedLayer` entries.

The mode keeps the float model right before rounding (``QuantRecord.float_model``: after
SmoothQuant or AWQ rescaled inputs and weights, so its ``W`` and the inputs it is observed on
are the ones the rounded weights approximate). ``W'`` is read back from the quantized graph,
node by node name: the ``DequantizeLinear`` feeding a MatMul/Gemm (per tensor, per channel or
blockwise, as ONNX defines it; a Conv's too, its path a Conv pair, :mod:`.conv`) or a
``MatMulNBits``' packed blocks. The path reads the layer's float input (before its Q/DQ) and is
added to the layer's output; it stays float32. A ``MatMulNBits`` layer rounded by GPTQ is
first rounded again by GPTQ with its path in view (:mod:`.joint`), and its packed blocks are
rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.editing import attribute, constant_array
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.compensation import joint
from graphopt.passes.compensation.conv import ConvGeometry, canonical, geometry
from graphopt.passes.compensation.eora import PREFIX, ChangedLayer, compensate, remove_paths
from graphopt.passes.quantization.record import QuantRecord
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext

MS_DOMAIN = "com.microsoft"


def prepare(model: ir.Model, settings: QuantSettings) -> ir.Model:
    """Before the mode runs: name every node (layers are matched across the rounding by
    name) and keep the float original fidelity is measured against."""
    from graphopt.editing import name_nodes

    name_nodes(model.graph)
    return model.clone()


def compensate_quantized(
    model: ir.Model,
    original: ir.Model,
    record: QuantRecord,
    calib: CalibrationSet,
    settings: QuantSettings,
    context: PassContext,
) -> None:
    """Add EoRA paths to the layers ``record``'s mode rounded; the result goes on ``record``
    (its fidelity becomes the model's with the paths, the one without kept beside)."""
    from graphopt.passes.calibration.activations import observe
    from graphopt.passes.calibration.fidelity import FIDELITY_SAMPLES
    from graphopt.passes.quantization.record import measure_fidelity
    from graphopt.passes.sparsity import statistics
    from graphopt.passes.sparsity.layers import find_layers

    reference, record.float_model = record.float_model, None
    if reference is None:
        record.notes.append("--compensation: this mode keeps no float reference; no paths")
        return
    fit, held = calib.split(settings.holdout)
    sets = {"calibration": fit.first(FIDELITY_SAMPLES)}
    if held is not None:
        sets["held-out"] = held
    nodes = {node.name: node for node in model.graph if node.name}
    values = {v.name: v for v in model.graph.inputs}
    values.update({o.name: o for node in model.graph for o in node.outputs if o.name})
    found, _ = find_layers(reference.graph)
    candidates, skipped, rounded = [], [], {}
    shapes: dict[int, ConvGeometry | None] = {}
    for layer in found:
        if (layer.node.name or "").startswith(PREFIX):
            continue
        if layer.op == "Conv":
            shapes[id(layer.node)], why = geometry(layer.node, layer.shape)
            if why:
                skipped.append((layer.name, why))
                continue
        node = nodes.get(layer.node.name or "")
        x = values.get(layer.node.inputs[0].name)
        approx, why = (None, "not found after quantization") if node is None else dequantized(node)
        if approx is not None and x is None:
            approx, why = None, "its float input is gone after quantization"
        if approx is None:
            if why:
                skipped.append((layer.name, why))
            continue
        candidates.append((layer, node, x))
        rounded[id(layer.node)] = approx
    layers, requantize = [], []
    # How the mode rounded each layer ("gptq, block 32, symmetric"): joint EoRA re-rounds
    # the same way.
    methods = {entry.node: entry.reason.split(",")[0] for entry in record.layers}
    if candidates:
        names = sorted({layer.node.inputs[0].name for layer, _, _ in candidates})
        stats = statistics.gather(
            observe(reference, names, fit), [c[0] for c in candidates], want_gram=True
        )
        for layer, node, x in candidates:
            entry = stats.get(id(layer.node))
            w = layer.canonical().astype(np.float64)
            if layer.op == "Gemm":
                w *= float(attribute(layer.node, "alpha", 1.0))
            approx = rounded[id(layer.node)]
            if entry is None or entry.gram is None:
                skipped.append((layer.name, "no input Gram (input too wide)"))
            elif approx.shape != w.shape:
                skipped.append((layer.name, f"rounded weight {approx.shape} != {w.shape}"))
            else:
                gram = np.asarray(entry.gram, np.float64) / max(entry.rows, 1)
                conv = shapes.get(id(layer.node))
                changed = ChangedLayer(layer.name, x, node.outputs[0], w, w - approx, gram, conv)
                if layer.op == "MatMul" and node.op_type == "MatMulNBits":
                    requantize.append((changed, node, methods.get(node.name or "", "")))
                layers.append(changed)

    # Reported like the mode's own fidelity: against the run's original, if a lossy pass
    # before quantize moved it.
    fidelity_reference = context.fidelity_reference(original)

    def measure(m: ir.Model) -> dict:
        return measure_fidelity(fidelity_reference, m, sets)

    before = measure(model)  # the rounded model as the mode left it (before joint EoRA)
    # What joint EoRA may swap and the paths inserted: undone when the paths do not help.
    swapped = [(node, list(node.inputs)) for _, node, _ in requantize]
    inserted: list[list[ir.Node]] = []
    refined = 0
    if joint.ENABLED and requantize:
        refined = sum(_requantized(model, *entry, settings) for entry in requantize)
    for layer in layers:
        layer.delta = np.asarray(layer.delta, np.float32)
    result = compensate(
        model,
        layers,
        settings.compensation,
        "quantize",
        measure,
        dict(context.input_shapes),
        before,
        shapes_of=original,
        inserted=inserted,
    )
    if refined:
        result.notes.append(joint.note(refined, len(layers), "GPTQ, MatMulNBits"))
    worse = _no_better(result.fidelity_before, result.fidelity_after)
    if inserted and worse:
        # As pruning's EoRA drops a path that does not lower its validation error: the
        # paths cost FLOPs (60-76% more on small CNNs) for nothing.
        remove_paths(model.graph, inserted)
        _restore_inputs(model.graph, swapped)
        result.dropped = worse
    result.skipped[:0] = skipped
    # The samples measured here: the first FIDELITY_SAMPLES of the fitting ones, not all.
    measured_on = (
        f"{sets['calibration'].count} calibration samples"
        + ("" if held is None else f" and {held.count} held-out samples")
        + f" of {calib.source}"
    )
    result.fidelity_source = context.fidelity_source(measured_on)
    result.notes.append(
        "paths in float32 beside the rounded layers; layer inputs observed on "
        f"{fit.count} calibration samples of the float model before rounding"
    )
    record.compensation = result
    if result.fidelity_after and not result.dropped:
        # The record's source is led by what the reference includes in quantize's rewrite.
        record.fidelity = result.fidelity_after
        # Its title names the samples these rows were measured on (quantize adds what the
        # reference includes), not the mode's own, larger set.
        record.fidelity_source = measured_on


def _no_better(before: dict, after: dict) -> str:
    """Why the paths do not help ("" when they do): on held-out samples (else calibration
    ones), the float outputs' mean absolute error summed is not lower, or the worst
    relative error rose."""
    label = "held-out" if "held-out" in after else "calibration"
    if label not in after or label not in before:
        return ""
    without = [f for f in before[label] if f.equal_share is None]
    with_ = [f for f in after[label] if f.equal_share is None]
    if not without or not with_:
        return ""
    mean_before, mean_after = sum(f.mean_abs for f in without), sum(f.mean_abs for f in with_)
    worst_before, worst_after = max(f.max_rel for f in without), max(f.max_rel for f in with_)
    if mean_after < mean_before and worst_after <= worst_before:
        return ""
    return (
        f"{label} error not reduced: mean abs {mean_before:.3g} -> {mean_after:.3g}, max rel "
        f"{worst_before:.3g} -> {worst_after:.3g}"
    )


def _restore_inputs(graph: ir.Graph, swapped: list[tuple[ir.Node, list]]) -> None:
    """Each node's inputs as they were before joint EoRA re-rounded it."""
    for node, inputs in swapped:
        for index, old in enumerate(inputs):
            current = node.inputs[index]
            if current is old:
                continue
            node.replace_input_with(index, old)
            if old is not None and old.name and old.name not in graph.initializers:
                graph.register_initializer(old)
            if current is not None and not current.uses() and current.name in graph.initializers:
                del graph.initializers[current.name]


def _requantized(
    model: ir.Model, layer: ChangedLayer, node: ir.Node, method: str, settings: QuantSettings
) -> bool:
    """Round ``layer`` again with its path in view (:mod:`.joint`) by GPTQ when the mode's
    ``method`` was GPTQ, and rewrite ``node``'s blocks; whether it was (``layer.delta``
    follows)."""
    from graphopt.passes.quantization.gptq import gptq
    from graphopt.passes.quantization.int4 import matmul_nbits_arrays

    # GPTQ only: after RTN, re-rounding lowered the layers' calibration error but not the
    # model's (MiniLM int4 RTN, rank 32: 72.5% of the gap closed plain, 60.5% joint).
    if method != "gptq":
        return False
    block, asymmetric = settings.block_size, settings.int4_asymmetric
    signed = settings.target == "ort"  # as the mode rounded for MatMulNBits
    scales = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if scales is None or (len(node.inputs) > 3 and node.inputs[3] is not None) != asymmetric:
        return False

    def rounder(target: np.ndarray):
        weight = np.ascontiguousarray(target.T, np.float32)  # [K, N], blocks along K
        qw = gptq(weight, layer.gram, block, asymmetric, signed=signed)
        return qw.dequantize().T, qw

    w = layer.weight
    best = joint.refine(w, w - layer.delta, layer.gram, settings.compensation, rounder, "weight")
    if best is None:
        return False
    packed, new_scales, zeros = matmul_nbits_arrays(best.extra, scales.dtype.type)
    for index, array in ((1, packed), (2, new_scales), (3, zeros)):
        if array is not None:
            _swap_input(model.graph, node, index, array)
    layer.pass_delta = np.asarray(layer.delta, np.float32)
    layer.delta = w - best.approx
    return True


def _swap_input(graph: ir.Graph, node: ir.Node, index: int, array) -> None:
    """``node``'s constant input ``index`` replaced by ``array`` (named after it, not with
    the paths' prefix: it is the layer's own); the old one dropped if nothing else reads it."""
    from graphopt.editing import add_initializer

    old = node.inputs[index]
    base = f"{(old.name if old is not None else None) or node.name or 'layer'}_joint"
    node.replace_input_with(index, add_initializer(graph, base, array))
    if old is not None and not old.uses() and old.name in graph.initializers:
        del graph.initializers[old.name]


def dequantized(node: ir.Node) -> tuple[np.ndarray | None, str]:
    """The weight ``node`` computes with, as canonical ``W'[N, K]`` float64 (Gemm: alpha
    included; Conv: (ky, kx, channel) order), or (None, why not; "" for a layer left in float)."""
    if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
        return _matmul_nbits(node)
    if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
        return None, f"became {node.op_type} (not read back)"
    weight = node.inputs[1]
    dq = weight.producer() if weight is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None, ""  # kept in float: nothing to compensate
    stored = _dequantize(dq)
    if stored is None:
        return None, "its DequantizeLinear inputs are not constant"
    if node.op_type == "Conv":
        return canonical(stored), ""
    if node.op_type == "Gemm":
        alpha = float(attribute(node, "alpha", 1.0))
        return (stored if attribute(node, "transB", 0) else stored.T) * alpha, ""
    return stored.T, ""


def _dequantize(node: ir.Node) -> np.ndarray | None:
    """A constant ``DequantizeLinear``'s output (float64): per tensor, per axis or blocked."""
    q = constant_array(node.inputs[0])
    scale = constant_array(node.inputs[1])
    zero = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if q is None or scale is None:
        return None
    q = q.astype(np.float64)
    scale = scale.astype(np.float64)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float64)
    axis = int(attribute(node, "axis", 1)) % max(q.ndim, 1)
    block = int(attribute(node, "block_size", 0))
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    elif scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _matmul_nbits(node: ir.Node) -> tuple[np.ndarray | None, str]:
    """``MatMulNBits``' weight ``[N, K]``: packed codes, block scales, zero points (8 when
    absent); low nibble first, as the contrib op defines it."""
    k, n = int(attribute(node, "K", 0)), int(attribute(node, "N", 0))
    bits, block = int(attribute(node, "bits", 4)), int(attribute(node, "block_size", 0))
    packed = constant_array(node.inputs[1])
    scales = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if bits != 4 or packed is None or scales is None or not block:
        return None, "MatMulNBits not read back (not 4-bit, or inputs not constant)"
    blocks = packed.shape[1]
    codes = np.empty((n, blocks, block), np.float64)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    zeros = np.full((n, blocks), 8.0)
    packed_zeros = constant_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if packed_zeros is not None:
        if packed_zeros.dtype != np.uint8:
            return None, "MatMulNBits with float zero points not read back"
        pairs = packed_zeros.reshape(n, -1)
        both = np.stack([pairs & 0x0F, pairs >> 4], axis=-1).reshape(n, -1)
        zeros = both[:, :blocks].astype(np.float64)
    scale = scales.astype(np.float64).reshape(n, blocks)
    w = (codes - zeros[..., None]) * scale[..., None]
    return w.reshape(n, blocks * block)[:, :k], ""
