"""Default verification tolerances, and what decides them.

Per graph output, the default is set by the lowest-precision float type that can affect it
(:func:`output_tolerances`, :func:`live_dtypes`): DEFAULT_TOLERANCE for float32, 8 ulps for
float16 and bfloat16 (DTYPE_TOLERANCES). :func:`rounds_at_run_time` says whether a model
rounds values it computes to integers (quantized activations), for which the verifier
measures what ONNX Runtime's own optimizations move each output by
(:meth:`graphopt.verify.Verifier._ort_floors`).
"""

from __future__ import annotations

import contextlib

import onnx_ir as ir

# float32 (and float64): the long-standing default, room for float32 sums reassociated over
# large reductions.
DEFAULT_TOLERANCE = 1e-4
# Lower-precision models default to 8 ulps of their type at the output's largest magnitude:
# 8 * 2**-10 ~ 7.8e-3 for float16, 8 * 2**-7 ~ 6.3e-2 for bfloat16. ORT's CPU kernels
# accumulate in float32, so what an exact rewrite changes is rounding to the storage type
# (folding BatchNormalization into a float16 Conv rounds the folded weights and the output
# once, where the original rounded the Conv output and then the BatchNormalization output).
# Measured with graphopt's measure (ORT 1.32 CPU): one Conv+BN fold <= 0.94 ulps over 60
# random float16 models (median 0.5); chains of 8 / 16 / 32 folded Conv+BN+Relu blocks
# <= 1.6 / 2.9 / 6.0 ulps; light_resnet50 converted to float16 (53 folds and the other
# fusions) 1.37 ulps; the differential fuzzer found a single float16 fold at 4.5 ulps (an
# output of magnitude ~1e-3), so 4 ulps would roll back exact folds and 32-block chains.
# 1e-4 rolled back every one of these exact fusions. bfloat16, which
# ORT's CPU provider hardly runs, is the same in ulps: an emulation with float32
# accumulation gives <= 1 ulp per fold for both types. Other types: DEFAULT_TOLERANCE.
DTYPE_TOLERANCES = {
    ir.DataType.FLOAT16: 8 * 2.0**-10,
    ir.DataType.BFLOAT16: 8 * 2.0**-7,
}
# Ops that round a value computed at run time to integers: a model with one is discontinuous
# (see graphopt.verify.Verifier._ort_floors). QLinear* ops requantize their outputs.
RUN_TIME_ROUNDING = frozenset(("QuantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"))


def default_tolerance(model: ir.Model) -> float:
    """The default tolerance for the lowest-precision float type ``model`` computes its
    outputs in: the largest of :func:`output_tolerances` (DEFAULT_TOLERANCE without outputs).
    """
    return max(output_tolerances(model), default=DEFAULT_TOLERANCE)


def output_tolerances(model: ir.Model) -> list[float]:
    """Per graph output, the default tolerance for the lowest-precision float type that can
    affect it (:func:`live_dtypes`): a float16 model with float32 outputs still computes in
    float16, while a float16 value nothing reads (an unused Cast to bfloat16, an unused
    float16 graph input) or another output's float16 branch loosens nothing: a 5% change of
    a float32 output used to pass next to a dead Cast to bfloat16."""
    return [
        max((DTYPE_TOLERANCES.get(t, DEFAULT_TOLERANCE) for t in types), default=DEFAULT_TOLERANCE)
        for types in live_dtypes(model)
    ]


def tolerance_reason(model: ir.Model, output_index: int) -> str:
    """``bfloat16 in its computation``: why an output's default tolerance is what it is."""
    types = live_dtypes(model)[output_index]
    lowest = max(
        (t for t in types if t in DTYPE_TOLERANCES), key=DTYPE_TOLERANCES.get, default=None
    )
    return f"{lowest.name.lower()} in its computation" if lowest is not None else ""


def live_dtypes(model: ir.Model) -> list[set[ir.DataType]]:
    """Per graph output, the types of the values it is computed from, and the targets of the
    Casts on the way: graph inputs, initializers and node inputs and outputs with a known
    type, back from the output through producers; a node with subgraphs counts with
    everything in them (and the outer values they read)."""
    result = []
    for output in model.graph.outputs:
        found: set[ir.DataType] = set()
        seen_nodes: set[int] = set()
        stack: list[ir.Value | None] = [output]
        seen_values: set[int] = set()
        while stack:
            value = stack.pop()
            if value is None or id(value) in seen_values:
                continue
            seen_values.add(id(value))
            if value.dtype is not None:
                found.add(value.dtype)
            node = value.producer()
            if node is None or id(node) in seen_nodes:
                continue
            nodes = [node]
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    nodes.extend(ir.traversal.RecursiveGraphIterator(attr.value))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for graph in attr.value:
                        nodes.extend(ir.traversal.RecursiveGraphIterator(graph))
            for inner in nodes:
                seen_nodes.add(id(inner))
                to = inner.attributes.get("to") if inner.op_type == "Cast" else None
                if to is not None and isinstance(to.value, int):
                    with contextlib.suppress(ValueError):  # not a type (a hostile model)
                        found.add(ir.DataType(to.value))
                found.update(v.dtype for v in inner.outputs if v is not None and v.dtype)
                stack.extend(inner.inputs)
        result.append(found)
    return result


def rounds_at_run_time(model: ir.Model) -> bool:
    """Whether ``model`` rounds values it computes to integers at run time: a QuantizeLinear
    or DynamicQuantizeLinear (or DynamicQuantizeMatMul, or a QLinear op's requantized output)
    of a value that is not a constant, subgraphs included."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        if node.op_type not in RUN_TIME_ROUNDING and not node.op_type.startswith("QLinear"):
            continue
        value = node.inputs[0] if node.inputs else None
        if value is not None and not _constant(value):
            return True
    return False


def _constant(value: ir.Value) -> bool:
    """An initializer (not one a graph input can override) or a Constant node's output."""
    if value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
    )
