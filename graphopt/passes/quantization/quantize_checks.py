"""What the ``quantize`` pass checks of the model, before and after its mode runs.

Refused before any work: a model the mode would hand back unchanged (nothing float to
quantize, already quantized, or computing in another float type), an ``--exclude`` name
pattern that matches no node, and the forms TensorRT's parser rejects (``--target
tensorrt``). Refused after: new float tensors that came out NaN or infinite. Noted: the
weighted nodes left in float inside subgraphs. Like :mod:`.quantize`, light to import: the
numerics load inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from graphopt.analysis.stats import node_bodies
from graphopt.errors import UserInputError
from graphopt.passes.quantization.settings import QuantSettings
from graphopt.refusals import refuse_nothing_to_do

if TYPE_CHECKING:
    from graphopt.analysis.origins import OriginalNodes
    from graphopt.passes.calibration.samples import CalibrationSet


# The nodes whose weights the modes quantize; their input type tells what the model computes in.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_REDUCED_FLOATS = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
FLOAT32 = ir.DataType.FLOAT
_FLOAT_NAMES = {**_REDUCED_FLOATS, FLOAT32: "float32", ir.DataType.DOUBLE: "float64"}
# With the analysis's integer-weight ops (QLinear* included), what marks a model as quantized
# for static int8, whose ranges and scales would stack on the ones it has.
_ACTIVATION_QUANTIZERS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})


def check_exclude(
    model: ir.Model, settings: QuantSettings, original: OriginalNodes | None = None
) -> list[str]:
    """Refuse an ``--exclude`` name pattern that matches no node (a typo would quantize the
    very layer the user meant to keep float); note an op type the model does not have (a
    recipe's ``Softmax`` on a CNN is no mistake). Op types and names are those of the model
    the user gave (``original``, recorded before the exact passes fused and renamed nodes),
    else of the main graph now; unnamed nodes are matched as ``OpType_index``, their
    position in that model, the name the quantization record gives them."""
    import fnmatch
    import re

    if not settings.exclude:
        return []
    if original is not None:
        op_types, names = original.op_types, original.names
    else:
        op_types = {node.op_type for node in model.graph}
        names = {node.name or f"{node.op_type}_{i}" for i, node in enumerate(model.graph)}
    notes = []
    for pattern in settings.exclude:
        if pattern in op_types or any(fnmatch.fnmatchcase(n, pattern) for n in names):
            continue
        if re.fullmatch(r"[A-Z][A-Za-z0-9]*", pattern):  # an op type's form (no "_", no glob)
            notes.append(f"--exclude {pattern}: the model has no {pattern} node")
            continue
        raise UserInputError(
            f"quantize: --exclude {pattern!r} matches no node: not an op type of the model nor "
            "the name of one of its nodes (an unnamed node is OpType_index, its position "
            "among the model's nodes counted from 0; the quantization report's line "
            "'layers (names as --exclude takes them)' lists them)"
        )
    return notes


def weighted_in_subgraphs(model: ir.Model) -> int:
    return sum(
        1
        for graph in model.graph.subgraphs()
        for node in graph
        if node.op_type in _WEIGHTED_OPS and node.domain == ""
    )


def quiet_float_errors():
    import numpy as np

    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def stored_tensors(model: ir.Model) -> dict[str, int]:
    """The main graph's initializers by name, as object ids (what quantizing replaced)."""
    return {
        name: id(value.const_value)
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
    }


def refuse_non_finite(
    model: ir.Model, before: dict[str, int], calib: CalibrationSet | None
) -> None:
    """Refuse a result whose new float tensors (scales, corrected biases, smoothing factors)
    hold NaN or infinities. Finite calibration data can still overflow float32 inside the
    model (values near 1e38 squared in a statistic, an activation past the float range), and
    quantization statistics of infinite activations are NaN: the model would compute NaN
    everywhere. Only tensors the mode created are read, so a streamed model's weights are not
    loaded again."""
    import numpy as np

    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or before.get(name) == id(tensor):
            continue
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        if not np.isfinite(tensor.numpy().astype(np.float32)).all():
            source = f" ({calib.source})" if calib is not None else ""
            raise UserInputError(
                f"quantize: the calibration data{source} drive the model past the float range: "
                f"{name!r} came out NaN or infinite; check the data's scale and normalization"
            )


def _mode_ops(mode: str, embeddings: bool) -> frozenset[str]:
    """The op types ``mode`` rewrites; empty for fp16/bf16, which lower every float op."""
    from graphopt.passes.quantization.dynamic import LINEAR_OPS
    from graphopt.passes.quantization.fp8 import TARGET_OPS
    from graphopt.passes.quantization.placement import COMPUTE

    if mode in ("int8", "fp8"):
        return frozenset(COMPUTE if mode == "int8" else TARGET_OPS)
    if mode == "int8-dynamic":
        return frozenset((*LINEAR_OPS, "Attention"))  # com.microsoft's becomes QAttention
    if mode == "int4-weight":
        return frozenset((*LINEAR_OPS, *(("Gather",) if embeddings else ())))
    return frozenset()


def refuse_nothing_to_quantize(model: ir.Model, mode: str, embeddings: bool = False) -> None:
    """Refuse, before any work, a model the mode would hand back unchanged: one that computes
    in float16/bfloat16 only (the modes start from float32; int4-weight is the exception,
    MatMulNBits takes float16 activations), or one already quantized whose every
    Conv/Gemm/MatMul reads a quantized weight; int8 refuses any quantized op in the main
    graph, the one it quantizes."""
    from graphopt.analysis.excluded import is_quantized_op
    from graphopt.passes.quantization.placement import is_weight

    graphs = (model.graph, *model.graph.subgraphs())
    weighted = [
        node
        for graph in graphs
        for node in graph
        if node.op_type in _WEIGHTED_OPS and node.domain == "" and node.inputs[0] is not None
    ]
    quantized = sorted({n.op_type for g in graphs for n in g if is_quantized_op(n)})
    # The weight is the first or second input (a bias, third, may stay float after Q/DQ).
    if quantized and not any(is_weight(v) for n in weighted for v in n.inputs[:2]):
        raise UserInputError(
            f"quantize {mode}: the model is already quantized ({', '.join(quantized)}; no "
            "Conv/Gemm/MatMul with a float weight is left); quantize the float original instead"
        )
    if mode == "int8":
        found = sorted(
            {
                n.op_type
                for n in model.graph
                if is_quantized_op(n) or n.op_type in _ACTIVATION_QUANTIZERS
            }
        )
        if found:
            raise UserInputError(
                f"quantize int8: the model is already quantized (it has {', '.join(found)}); "
                "quantize the float original instead"
            )
    present = {n.op_type for g in graphs for n in g}
    refuse_nothing_to_do(f"--quantize {mode}", _mode_ops(mode, embeddings), present)
    refuse_layers_only_in_subgraphs(model, mode, embeddings)
    types = [node.inputs[0].dtype for node in weighted]
    if not weighted and mode in ("fp16", "bf16"):
        # No Conv/Gemm/MatMul: the float computation of any op is what these modes lower.
        types = [
            v.dtype
            for g in graphs
            for n in g
            for v in (*n.inputs, *n.outputs)
            if v is not None and v.dtype is not None and v.dtype.is_floating_point()
        ]
    takes = (ir.DataType.FLOAT, ir.DataType.FLOAT16) if mode == "int4-weight" else (FLOAT32,)
    # An unknown type (no shape inference reached it) may be float32: no refusal on a guess.
    # Integer MatMuls (index arithmetic) say nothing about what the model computes in.
    floats = [t for t in types if t is None or t.is_floating_point()]
    other = [t for t in floats if t not in (*takes, None)]
    if (
        other
        and len(other) == len(floats)
        and (mode == "int4-weight" or other[0] not in _REDUCED_FLOATS)
    ):
        # float64 (or, for int4-weight, bfloat16): no mode converts from it, and the modes
        # would find nothing in float32 and hand the model back unchanged.
        name = _FLOAT_NAMES.get(other[0], other[0].name.lower())
        accepted = " or ".join(_FLOAT_NAMES[t] for t in takes)
        what = "Conv/Gemm/MatMul node(s)" if weighted else "float tensor(s)"
        count = sum(1 for t in other if t == other[0])
        raise UserInputError(
            f"quantize {mode}: the model computes in {name} ({count} {what} in {name}, none "
            f"in {accepted}); --quantize {mode} starts from a {accepted} model: convert it "
            "first"
        )
    if mode == "int4-weight":
        return
    reduced = [t for t in types if t in _REDUCED_FLOATS]
    # An unknown type (no shape inference reached it) may be float32: no refusal on a guess.
    if reduced and not any(t in (ir.DataType.FLOAT, None) for t in types):
        name = _REDUCED_FLOATS[reduced[0]]
        raise UserInputError(
            f"quantize {mode}: the model already computes in {name} ({len(reduced)} "
            f"Conv/Gemm/MatMul nodes, none in float32); --quantize {mode} starts from a "
            "float32 model: give the float32 export"
        )
    if reduced and mode in ("fp16", "bf16"):
        # Converted before, with some layers kept float32 (bf16 Conv before opset 22, fp16's
        # overflow guard): ranges and fidelity are measured against the float32 original.
        raise UserInputError(
            f"quantize {mode}: the model already computes partly in "
            f"{_REDUCED_FLOATS[reduced[0]]} ({len(reduced)} of {len(types)} Conv/Gemm/MatMul "
            f"nodes); --quantize {mode} starts from a float32 model: give the float32 export"
        )


# Layers a mode's rewrite stands on: the weighted ops it rewrites (com.microsoft's Attention
# for int8-dynamic, embedding Gathers for int4-weight with --quantize-embeddings).
_LAYER_OPS = frozenset((*_WEIGHTED_OPS, "Attention", "Gather"))


def refuse_layers_only_in_subgraphs(model: ir.Model, mode: str, embeddings: bool = False) -> None:
    """Refuse a model whose every layer the mode rewrites sits inside If/Loop/Scan bodies.

    The integer modes rewrite the main graph only (fp16/bf16 leave bodies float32 too).
    optimum's merged decoder keeps its whole network in the two branches of
    ``If(use_cache_branch)``: the mode found nothing and the refusal read "no layer it
    rewrites", as if the model had no MatMul. Say where the layers are, and what to give.
    """
    ops = _mode_ops(mode, embeddings) & _LAYER_OPS
    if not ops or any(node.op_type in ops for node in model.graph):
        return
    inside = [node for graph in model.graph.subgraphs() for node in graph if node.op_type in ops]
    if not inside:
        return
    kinds = ", ".join(sorted({node.op_type for node in inside}))
    holders = sorted({n.op_type for n in model.graph if node_bodies(n)})
    raise UserInputError(
        f"quantize {mode}: nothing to quantize in the main graph: all {len(inside)} {kinds} "
        f"node(s) it rewrites are inside {'/'.join(holders) or 'subgraph'} bodies, which "
        f"--quantize {mode} does not quantize (it rewrites the main graph only); give the "
        "model without the control flow (for an optimum merged decoder, the separate "
        "decoder_model.onnx / decoder_with_past_model.onnx)"
    )


def check_tensorrt_form(
    mode: str, quant_format: str | None, activation_type: str | None, int4_asymmetric: bool
) -> None:
    """Refuse, before any work, the forms TensorRT's parser rejects: ORT's integer operators
    (QOperator's QLinearConv/QLinearMatMul, int8-dynamic's DynamicQuantizeLinear/MatMulInteger),
    asymmetric u8 activations and asymmetric uint4 weights (TensorRT takes zero points of 0
    only, and no UINT4 initializer at all)."""
    if mode == "int8-dynamic":
        raise UserInputError(
            "quantize int8-dynamic --target tensorrt: TensorRT has no dynamic int8 form "
            "(DynamicQuantizeLinear/MatMulInteger are ONNX Runtime's); use --quantize int8 "
            "(static Q/DQ) with --calib, or --target ort"
        )
    if quant_format == "qoperator":
        raise UserInputError(
            "quantize --quant-format qoperator --target tensorrt: QLinearConv/QLinearMatMul "
            "are ONNX Runtime's operators, TensorRT's parser takes Q/DQ: use --quant-format qdq"
        )
    if activation_type == "u8" and mode == "int8":
        raise UserInputError(
            "quantize --activation-type u8 --target tensorrt: TensorRT takes symmetric int8 "
            "(zero point 0) only: use --activation-type s8 (the default for this target)"
        )
    if int4_asymmetric and mode == "int4-weight":
        raise UserInputError(
            "quantize --int4-asymmetric true --target tensorrt: TensorRT's parser takes "
            "symmetric int4 weights (INT4, zero point 0) only, not uint4 with zero points: "
            "leave --int4-asymmetric out (symmetric is the default), or use --target ort"
        )
