"""``--quantize int4-weight``: weight-only INT4 for MatMul/Gemm weights and embedding tables.

Each constant 2-D weight ``[K, N]`` is rounded to int4 in blocks of ``--block-size`` rows
along K (:mod:`~graphopt.passes.quantization.gptq`: round-to-nearest with a clipping search,
GPTQ error feedback from the layer input's Hessian, or AWQ's activation-aware scaling from
:mod:`~graphopt.passes.quantization.awq`). Activations stay in float.

Emission follows the target. ``--target ort`` gets ONNX Runtime's fused kernels:
``com.microsoft.MatMulNBits`` (packed uint8 ``[N, blocks, block/2]``, low nibble first,
scales ``[N * blocks]``, zero points packed alike or the default 8) and, for embedding
tables, ``com.microsoft.GatherBlockQuantized`` (uint8 packed along the row, 4 bits).
Every other target gets the portable form: a blockwise ``DequantizeLinear`` (opset 21:
``block_size`` attribute, int4/uint4 initializers) in front of the unchanged MatMul/Gemm/
Gather, which TensorRT and ORT both read (ORT fuses DQ→MatMul into MatMulNBits itself).
For ORT a block's scale may be negative (its largest magnitude then lands on code -8 whatever
its sign, as ORT's own quantizer does); the portable form keeps scales positive.

Only the weights change, one at a time: each is read when it is quantized (an external
tensor straight from its memory map) and its float copy leaves the graph right after, as does
each Hessian after its last layer, so a model with external data is not held in memory whole
on top of its quantized form. GPTQ streams too (:func:`_quantize_sequential`): it observes
one layer input at a time through the layers already quantized, so one Hessian is alive at a
time. (AWQ still observes every layer input in one ORT run of the float model.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import (
    NameTable,
    attribute,
    insert_before,
    opset_version,
    remove_node,
    replace_value,
    unique_name,
)
from graphopt.errors import UserInputError
from graphopt.passes.calibration.fidelity import FIDELITY_SAMPLES
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.gptq import (
    InputStatistics,
    Int4Weight,
    accumulate_statistics,
    gptq,
    input_statistics,
    rtn,
)
from graphopt.passes.quantization.placement import overridable, overridable_reason
from graphopt.passes.quantization.record import (
    LayerPrecision,
    QuantRecord,
    TypeChange,
    measure_fidelity,
    weight_bytes,
)
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.registry import PassContext

MS_DOMAIN = "com.microsoft"
PORTABLE_OPSET = 21  # DequantizeLinear with block_size and int4/uint4 inputs
INT4_IR_VERSION = 10  # int4/uint4 tensors
FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}
# Hessians (K×K float64) are gathered for inputs up to this width; wider ones fall back to
# RTN weighted by the per-channel activation energy.
MAX_HESSIAN_CHANNELS = 8192


@dataclass
class Site:
    """One weight to quantize: its consumer, the weight value, and how the consumer reads it."""

    node: ir.Node
    weight: ir.Value
    tensor: ir.TensorProtocol  # the weight's data (an initializer's or a Constant's)
    kind: str  # "matmul", "gemm" or "gather"
    transposed: bool = False  # Gemm transB=1: the weight is stored [N, K]

    @property
    def activation(self) -> ir.Value | None:
        return None if self.kind == "gather" else self.node.inputs[0]


def quantize_int4(
    model: ir.Model, settings: QuantSettings, calib: CalibrationSet | None, context: PassContext
) -> QuantRecord:
    """Quantize ``model``'s MatMul/Gemm weights (and embeddings, if asked) to int4, in place."""
    ort = settings.target == "ort"
    method = settings.int4_method
    if method in ("gptq", "awq") and calib is None:
        raise UserInputError(
            f"quantize int4-weight: --int4-method {method} needs calibration data: pass "
            "--calib FILE.npz, or --int4-method rtn"
        )
    if not ort and opset_version(model) < PORTABLE_OPSET:
        raise UserInputError(
            f"quantize int4-weight: the portable form (blockwise DequantizeLinear) needs opset "
            f">= {PORTABLE_OPSET}, the model has {opset_version(model)}: pass --opset "
            f"{PORTABLE_OPSET}"
            # TensorRT takes only the blockwise DequantizeLinear form: no other target to offer.
            + ("" if settings.target == "tensorrt" else ", or --target ort (MatMulNBits)")
        )
    record = QuantRecord(mode="int4-weight")
    record.weight_bytes_before = weight_bytes(model)
    fit, held = (None, None) if calib is None else calib.split(settings.holdout)
    sites, skipped = find_sites(model, settings, ort)
    record.layers.extend(skipped)
    if not sites:
        # Before generating inputs or measuring anything: the model would come back as given.
        raise UserInputError(record.unchanged_refusal())
    fidelity_sets, record.fidelity_source = _fidelity_sets(model, calib, fit, held, context)
    original = model.clone() if fidelity_sets else None
    record.type_changes.extend(
        TypeChange(
            s.weight.name or "",
            s.tensor.dtype.name.lower(),
            _stored_as(s, settings, ort),
        )
        for s in sites
    )
    stats = None
    if method == "awq" and sites:
        names = [s.activation.name for s in sites if s.kind != "gather"]
        stats = input_statistics(model, names, fit, MAX_HESSIAN_CHANNELS)
    if method == "awq":
        from graphopt.passes.quantization.awq import apply_awq

        scaled = apply_awq(model, sites, stats, settings)
    else:
        scaled = {}
    if settings.compensation:  # EoRA's reference: W before rounding, after AWQ's scaling
        record.float_model = model.clone()

    if ort:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    elif model.ir_version < INT4_IR_VERSION:
        model.ir_version = INT4_IR_VERSION
    fallbacks = []
    if method == "gptq" and sites:
        layers, fallbacks = _quantize_sequential(model, sites, settings, fit)
        record.layers.extend(layers)
    else:
        record.layers.extend(_quantize_sites(model.graph, sites, settings, stats, scaled))
    record.weight_bytes_after = weight_bytes(model)
    if method in ("gptq", "awq") and sites:
        unseen = ", not the held-out ones" if held is not None else ""
        order = ", layer by layer through the layers already quantized" * (method == "gptq")
        record.notes.append(
            f"{method}: layer inputs observed on {fit.count} calibration samples{unseen}{order}"
        )
    if method == "awq" and stats is not None:
        fallbacks = stats.fallbacks
    if method == "gptq" and fallbacks:
        record.notes.append(
            f"{len(fallbacks)} layer input(s) wider than {MAX_HESSIAN_CHANNELS} "
            "channels: activation-weighted RTN instead of GPTQ"
        )
    if sites and settings.target == "tensorrt":
        _float16_activations(model, settings, record)
    if original is not None and sites:
        reference = context.fidelity_reference(original)  # the run's original, if moved
        record.fidelity = measure_fidelity(reference, model, fidelity_sets)
    return record


def _float16_activations(model: ir.Model, settings: QuantSettings, record: QuantRecord) -> None:
    """--target tensorrt: the rest of the graph in float16 (fp16's rules), because TensorRT's
    int4 weight-only GEMMs take float16 activations. A declared precision change."""
    import dataclasses

    from graphopt.passes.quantization.float_plan import plan_conversion
    from graphopt.passes.quantization.float_rewrite import apply_plan
    from graphopt.passes.quantization.float_types import fill_types

    fp16 = dataclasses.replace(settings, mode="fp16")
    plan = plan_conversion(model, fp16, ir.DataType.FLOAT16, {}, fill_types(model))
    changes = apply_plan(model, plan, ir.DataType.FLOAT16)
    record.type_changes.extend(changes)
    record.notes.append(
        f"--target tensorrt: activations float16 ({len(changes)} tensors float32 -> float16; "
        "TensorRT's int4 weight-only kernels take float16 activations); graph inputs and "
        "outputs stay float32"
    )


def _quantize_sites(
    graph: ir.Graph,
    sites: list[Site],
    settings: QuantSettings,
    stats: InputStatistics | None,
    scaled: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[LayerPrecision]:
    """Round and emit each weight in turn, dropping its float copy right after."""
    ort = settings.target == "ort"
    side = "asymmetric" if settings.int4_asymmetric else "symmetric"
    readers = Counter(site.activation.name for site in sites if site.kind != "gather")
    layers = []
    for site in sites:
        key = None if site.kind == "gather" else site.activation.name  # before emission
        method, qw = _round(site, settings.int4_method, settings, stats, scaled, signed=ort)
        _emit(graph, site, qw, ort)
        _drop_if_unused(graph, site.weight)
        if stats is not None and key is not None:
            # A Hessian is K×K: let it go once the last layer reading that input is done.
            readers[key] -= 1
            if not readers[key]:
                stats.hessians.pop(key, None)
        name = site.node.name or site.weight.name or ""
        reason = f"{method}, block {settings.block_size}, {side}"
        layers.append(LayerPrecision(name, site.node.op_type, "int4", reason))
    return layers


def _quantize_sequential(
    model: ir.Model, sites: list[Site], settings: QuantSettings, calib: CalibrationSet
) -> tuple[list[LayerPrecision], list[str]]:
    """GPTQ one layer input at a time (the paper's sequential order), streaming.

    Sites that read the same input (q/k/v, gate/up) form one stage. A stage observes its input
    on the model as the earlier stages left it, so each Hessian sees the error of the layers
    already quantized, and the staged observer runs only the nodes between the last stage's
    frontier and this input, fed from the frontier values it kept: one pass over the model,
    with only that stretch's (already quantized) weights in the ORT session. Alive at a time:
    one stage's Hessian and one float weight, not every Hessian and a whole float model.
    Stages go in graph order of their first site; a site upstream of an input belongs to an
    earlier stage (it precedes that input's readers), so nothing the observer has run is ever
    rewritten (the observer's contract).
    """
    from graphopt.passes.pruning.incremental import IncrementalObserver

    stages: dict[int, list[Site]] = {}
    for site in sites:
        key = id(site) if site.kind == "gather" else id(site.activation)
        stages.setdefault(key, []).append(site)
    observer = IncrementalObserver(model, list(calib.batches()), calib.source)
    layers: list[LayerPrecision] = []
    fallbacks: list[str] = []
    for group in stages.values():
        stats = None
        if group[0].kind != "gather":
            # Read now: an earlier stage's emission may have renamed this input.
            name = group[0].activation.name
            stats = accumulate_statistics(observer.advance([name]), [name], MAX_HESSIAN_CHANNELS)
            fallbacks.extend(stats.fallbacks)
        layers.extend(_quantize_sites(model.graph, group, settings, stats, {}))
        del stats  # this stage's Hessian: gone before the next one is gathered
    return layers, fallbacks


def _stored_as(site: Site, settings: QuantSettings, ort: bool) -> str:
    """What the weight's element type becomes (the report's type-change line)."""
    if ort:
        op = "GatherBlockQuantized" if site.kind == "gather" else "MatMulNBits"
        return f"uint8 (int4 x2, {op})"
    return "uint4" if settings.int4_asymmetric else "int4"


def _fidelity_sets(
    model: ir.Model,
    calib: CalibrationSet | None,
    fit: CalibrationSet | None,
    held: CalibrationSet | None,
    context: PassContext,
) -> tuple[dict[str, CalibrationSet], str]:
    """Where fidelity is measured: the first fitted samples and the held-out ones (as the
    other modes report both: how well the fit went, and whether it carries over), else
    generated inputs."""
    if calib is not None and calib.source != "random":
        if held is None:
            return {"calibration": calib}, f"{calib.count} samples of {calib.source} (no hold-out)"
        # No more rows than held out: a decoder's logits for 64 samples (both models'
        # outputs at once) raised the streamed run's peak past 1.5x its weights.
        shown = (fit or calib).first(min(FIDELITY_SAMPLES, held.count))
        return {"calibration": shown, "held-out": held}, (
            f"{shown.count} calibration and {held.count} held-out samples of {calib.source}"
        )
    given = "no --calib file" if calib is None else "--calib random"
    if calib is None:
        from graphopt.passes.calibration.samples import random_calibration

        try:
            calib = random_calibration(model, dict(context.input_shapes), owner="quantize")
        except UserInputError as exc:
            context.note(f"quantize int4-weight: fidelity not measured: {exc}")
            return {}, ""
    return {"generated": calib}, f"{calib.count} generated inputs ({given})"


def find_sites(
    model: ir.Model, settings: QuantSettings, ort: bool
) -> tuple[list[Site], list[LayerPrecision]]:
    """The weights to quantize, in graph order, and the candidates kept in float (why)."""
    sites: list[Site] = []
    kept: list[LayerPrecision] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        site, reason = _site(node, settings, ort)
        if site is not None:
            sites.append(site)
        elif reason:
            kept.append(LayerPrecision(node.name or "", node.op_type, "float", reason))
    return sites, kept


def _site(node: ir.Node, settings: QuantSettings, ort: bool) -> tuple[Site | None, str]:
    """The node's quantizable weight, or (None, why not) — why is "" for nodes of no interest."""
    if node.op_type == "MatMul":
        kind, index = "matmul", 1
    elif node.op_type == "Gemm":
        kind, index = "gemm", 1
    elif node.op_type == "Gather" and settings.quantize_embeddings:
        kind, index = "gather", 0
    else:
        return None, ""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None, ""
    weight = node.inputs[index]
    if kind == "gather" and not _constant_input(weight):
        return None, ""  # a Gather of activations or shapes: no table to quantize
    if overridable(weight):
        return None, overridable_reason(weight.name)
    tensor = ir.convenience.get_const_tensor(weight)
    if tensor is None:
        return None, "no constant weight (its second input is computed)"
    if len(tensor.shape) != 2:
        return None, f"weight of rank {len(tensor.shape)} (int4 blocks need a 2-D weight)"
    if kind != "gather" and _constant_input(node.inputs[0]):
        return None, "first input is a constant too (constant folding's, not a layer)"
    if settings.excluded(node):
        return None, "--exclude"
    if tensor.dtype not in FLOAT_TYPES:
        return None, f"weight is {tensor.dtype.name.lower()}"
    if len(weight.uses()) != 1 or weight.is_graph_output():
        return None, "weight shared with other nodes"
    if kind in ("matmul", "gemm") and settings.target == "tensorrt" and len(tensor.shape) == 2:
        # TensorRT's parser takes a blockwise DequantizeLinear only in whole blocks along K
        # (measured: PP-OCR cls's K=200 and RegNet's K=440 at block 32 are rejected).
        trans = kind == "gemm" and attribute(node, "transB", 0)
        k = int(tensor.shape[1] if trans else tensor.shape[0])
        if k % settings.block_size:
            return None, f"K {k} not a multiple of block {settings.block_size} (TensorRT)"
    if kind == "gemm":
        if attribute(node, "transA", 0):
            return None, "Gemm transA=1"
        return Site(node, weight, tensor, kind, bool(attribute(node, "transB", 0))), ""
    if kind == "gather":
        dim = tensor.shape[1]
        if attribute(node, "axis", 0) != 0:
            return None, "Gather axis != 0"
        if ort and dim % settings.block_size:
            return None, f"row width {dim} not a multiple of block {settings.block_size}"
    return Site(node, weight, tensor, kind), ""


def _constant_input(value: ir.Value | None) -> bool:
    return value is not None and not value.is_graph_input() and value.const_value is not None


def weight_matrix(site: Site) -> np.ndarray:
    """The site's weight as float32 ``[K, N]`` (K: the axis the blocks run along)."""
    # float32 weights are read in place (an external tensor's memory map): no second copy.
    array = np.asarray(site.tensor.numpy(), dtype=np.float32)
    if site.kind == "gather":
        return array.T  # a [vocab, dim] table: blocks run along dim
    return array.T if site.transposed else array


def _round(
    site: Site,
    method: str,
    settings: QuantSettings,
    stats: InputStatistics | None,
    scaled: dict[str, tuple[np.ndarray, np.ndarray]],
    signed: bool,
) -> tuple[str, Int4Weight]:
    """The site's weight rounded by ``method`` (RTN where the method has nothing to go by).

    ``signed``: negative block scales allowed (ONNX Runtime's kernels take them; the portable
    form keeps scales positive for consumers such as TensorRT that require it).
    """
    block, asym = settings.block_size, settings.int4_asymmetric
    if site.weight.name in scaled:
        w, energy = scaled[site.weight.name]
        return "awq", rtn(w, block, asym, energy, signed)
    w = weight_matrix(site)
    if site.kind == "gather" or stats is None:
        return "rtn", rtn(w, block, asym, signed=signed)
    key = site.activation.name
    hessian = stats.hessians.get(key)
    if method == "gptq" and hessian is not None:
        return "gptq", gptq(w, hessian, block, asym, signed=signed)
    # AWQ found plain scaling best (alpha 0), or the input is too wide for a Hessian.
    label = "awq (alpha 0)" if method == "awq" else "rtn (activation-weighted)"
    return label, rtn(w, block, asym, stats.energy.get(key), signed)


# --- emission -------------------------------------------------------------------------------


def _emit(graph: ir.Graph, site: Site, qw: Int4Weight, ort: bool) -> None:
    """Replace the site's float weight by ``qw`` in the target's form."""
    dtype = FLOAT_TYPES[site.tensor.dtype]
    if ort and site.kind == "gather":
        _emit_gather_block_quantized(graph, site, qw, dtype)
    elif ort:
        _emit_matmul_nbits(graph, site, qw, dtype)
    else:
        _emit_dequantize(graph, site, qw, dtype)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes in [0, 15] along the last axis (even length), two per byte, low first."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_arrays(
    qw: Int4Weight, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B [N, blocks, block/2] uint8, scales [N*blocks], packed zero points [N*ceil(blocks/2)]
    or None) as MatMulNBits reads them."""
    k, n = qw.q.shape
    blocks, block = qw.n_blocks, qw.block
    # Stored codes are unsigned: symmetric codes shift by the default zero point 8.
    unsigned = qw.q.astype(np.int16) + (0 if qw.zero_points is not None else 8)
    padded = np.zeros((blocks * block, n), dtype=np.uint8)
    padded[:k] = unsigned.astype(np.uint8)
    if qw.zero_points is None and k < blocks * block:
        padded[k:] = 8  # padding dequantizes to exactly 0
    packed = pack_nibbles(padded.T.reshape(n, blocks, block))
    scales = np.ascontiguousarray(qw.scales.T).reshape(-1).astype(dtype)
    zeros = None
    if qw.zero_points is not None:
        zp = qw.zero_points.T  # [N, blocks]
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), dtype=np.uint8)], axis=1)
        zeros = pack_nibbles(zp).reshape(-1)
    return packed, scales, zeros


def _initializer(graph: ir.Graph, base: str, array: np.ndarray | ir.Tensor) -> ir.Value:
    name = unique_name(graph, base)
    tensor = array if isinstance(array, ir.Tensor) else ir.Tensor(array, name=name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _replace_node(old: ir.Node, new_nodes: list[ir.Node], output: ir.Value) -> None:
    """Put ``new_nodes`` where ``old`` was, ``output`` taking over old's output."""
    insert_before(old, new_nodes)
    if old.outputs[0].type is not None and output.type is None:
        output.type = old.outputs[0].type
    if old.outputs[0].shape is not None and output.shape is None:
        output.shape = old.outputs[0].shape
    replace_value(old.outputs[0], output)
    remove_node(old)


def _emit_matmul_nbits(graph: ir.Graph, site: Site, qw: Int4Weight, dtype: type) -> None:
    node = site.node
    base = site.weight.name or node.name or "weight"
    packed, scales, zeros = matmul_nbits_arrays(qw, dtype)
    if site.kind == "gemm":
        # Gemm's alpha scales the product: folded into the block scales (exact).
        scales = (scales * dtype(float(attribute(node, "alpha", 1.0)))).astype(dtype)
    k, n = qw.q.shape
    bias = _gemm_bias(node, graph, base, dtype, n) if site.kind == "gemm" else None
    fused_bias = isinstance(bias, ir.Value) and bias.shape is not None and bias.shape.dims == (n,)
    inputs: list[ir.Value | None] = [
        node.inputs[0],
        _initializer(graph, f"{base}_Q4", packed),
        _initializer(graph, f"{base}_scales", scales),
        None if zeros is None else _initializer(graph, f"{base}_zero_points", zeros),
    ]
    if fused_bias:
        inputs += [None, bias]  # g_idx (deprecated), bias
    while inputs[-1] is None:
        inputs.pop()
    attributes = [
        ir.AttrInt64("K", k),
        ir.AttrInt64("N", n),
        ir.AttrInt64("bits", 4),
        ir.AttrInt64("block_size", qw.block),
    ]
    out = ir.Value(name=unique_name(graph, f"{node.outputs[0].name}_q4"))
    nodes = [ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attributes, outputs=[out], name=node.name)]
    result = out
    if bias is not None and not fused_bias:
        result = ir.Value(name=unique_name(graph, f"{node.outputs[0].name}_biased"))
        nodes.append(ir.Node("", "Add", [out, bias], outputs=[result]))
    _replace_node(node, nodes, result)


def _gemm_bias(node: ir.Node, graph: ir.Graph, base: str, dtype: type, n: int):
    """Gemm's ``beta * C`` as a value to add, or None: a constant [N] becomes MatMulNBits'
    bias input, anything else an Add after it."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = node.inputs[2]
    beta = float(attribute(node, "beta", 1.0))
    const = None if c.is_graph_input() else ir.convenience.get_const_tensor(c)
    if const is not None:
        array = (const.numpy().astype(np.float32) * beta).astype(dtype)
        if array.size == n and array.ndim <= 2:
            array = array.reshape(n)
        return _initializer(graph, f"{base}_bias", array)
    if beta == 1.0:
        return c
    factor = _initializer(graph, f"{base}_beta", np.array(beta, dtype=dtype))
    scaled = ir.Value(name=unique_name(graph, f"{base}_beta_c"))
    insert_before(node, [ir.Node("", "Mul", [c, factor], outputs=[scaled])])
    return scaled


def _emit_gather_block_quantized(graph: ir.Graph, site: Site, qw: Int4Weight, dtype: type) -> None:
    node = site.node
    base = site.weight.name or node.name or "embedding"
    # qw is [dim, vocab] (blocks along dim); the table is stored [vocab, dim].
    unsigned = qw.q.T.astype(np.int16) + (0 if qw.zero_points is not None else 8)
    inputs = [
        _initializer(graph, f"{base}_Q4", pack_nibbles(unsigned)),
        node.inputs[1],
        _initializer(graph, f"{base}_scales", np.ascontiguousarray(qw.scales.T).astype(dtype)),
    ]
    if qw.zero_points is not None:
        inputs.append(_initializer(graph, f"{base}_zero_points", pack_nibbles(qw.zero_points.T)))
    attributes = [
        ir.AttrInt64("bits", 4),
        ir.AttrInt64("block_size", qw.block),
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
    ]
    out = ir.Value(name=unique_name(graph, f"{node.outputs[0].name}_q4"))
    gather = ir.Node(
        MS_DOMAIN, "GatherBlockQuantized", inputs, attributes, outputs=[out], name=node.name
    )
    _replace_node(node, [gather], out)


def _emit_dequantize(graph: ir.Graph, site: Site, qw: Int4Weight, dtype: type) -> None:
    """Blockwise DequantizeLinear (opset 21) of the weight in its stored layout, read by the
    unchanged consumer."""
    import ml_dtypes

    node = site.node
    base = site.weight.name or node.name or "weight"
    codes, scales = qw.q, qw.scales
    zeros = qw.zero_points
    axis = 0
    if site.kind == "gather" or site.transposed:
        # Stored [N, K] ([vocab, dim]): the blocks run along axis 1.
        codes, scales = codes.T, scales.T
        zeros = None if zeros is None else zeros.T
        axis = 1
    int4 = ml_dtypes.uint4 if zeros is not None else ml_dtypes.int4
    inputs = [
        _initializer(graph, f"{base}_q4", ir.Tensor(np.ascontiguousarray(codes).astype(int4))),
        _initializer(graph, f"{base}_scale", np.ascontiguousarray(scales).astype(dtype)),
    ]
    if zeros is not None:
        zp = ir.Tensor(np.ascontiguousarray(zeros).astype(ml_dtypes.uint4))
        inputs.append(_initializer(graph, f"{base}_zero_point", zp))
    out = ir.Value(
        name=unique_name(graph, f"{base}_dequantized"),
        shape=ir.Shape(site.tensor.shape),
        type=ir.TensorType(site.tensor.dtype),
    )
    dq = ir.Node(
        "",
        "DequantizeLinear",
        inputs,
        [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", qw.block)],
        outputs=[out],
        name=NameTable(graph).take(f"{base}_DequantizeLinear"),  # unique among node names too
    )
    insert_before(node, [dq])
    index = 0 if site.kind == "gather" else 1
    node.replace_input_with(index, out)


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Take a float weight nothing reads any more out of the graph, and let go of its data
    (an external tensor's memory map), so that weights are not all held at once."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        del graph.initializers[value.name]
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
