"""Respell the nodes a fusion emitted in the forms the model's opset defines.

onnxscript's ORT rules (and graphopt's own) write their replacement nodes in the newest
forms: ``Shape(x, start=, end=)`` (an opset-15 attribute), axes as an input of
Squeeze/Unsqueeze (opset 13) and of the Reduce ops (ReduceSum 13, the others 18), Split's
``split`` input (13). In an opset-13 model (tf2onnx's default) ORT refused the result
("Unrecognized attribute: start for operator Shape") and the fusion never applied. Each such
node is rewritten into the same computation at the model's opset; a node that cannot be,
or still has an attribute or input its op lacks at that opset, makes :func:`legalize`
refuse the result.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion._common import default_opset

SHAPE_SLICE_OPSET = 15  # Shape's start/end attributes
AXES_INPUT_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum axes, Split's split: inputs from here
REDUCE_AXES_INPUT_OPSET = 18  # the other Reduce ops' axes input
SPLIT_NUM_OUTPUTS_OPSET = 18
INT64_MAX = np.iinfo(np.int64).max

_REDUCE_OPS = frozenset(
    (
        *("ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2"),
        *("ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"),
    )
)


def legalize(model: ir.Model) -> bool:
    """Respell the main graph's default-domain nodes for the model's opset; False when some
    node still is not valid there (the fusion's result must then be dropped)."""
    opset = default_opset(model)
    graph = model.graph
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if not _respell(graph, node, opset):
            return False
    return all(_valid(node, opset) for node in graph if node.domain in ("", "ai.onnx"))


def _respell(graph: ir.Graph, node: ir.Node, opset: int) -> bool:
    """Rewrite ``node`` when it uses a form newer than ``opset``; False if it cannot be."""
    op = node.op_type
    if op == "Shape" and opset < SHAPE_SLICE_OPSET and _has_any(node, "start", "end"):
        return _shape_as_slice(graph, node)
    if op in ("Squeeze", "Unsqueeze") and opset < AXES_INPUT_OPSET:
        return _axes_as_attribute(graph, node, 1, "axes")
    if op == "ReduceSum" and opset < AXES_INPUT_OPSET:
        return _axes_as_attribute(graph, node, 1, "axes")
    if op in _REDUCE_OPS and opset < REDUCE_AXES_INPUT_OPSET:
        return _axes_as_attribute(graph, node, 1, "axes")
    if op == "Split":
        if opset < SPLIT_NUM_OUTPUTS_OPSET and "num_outputs" in node.attributes:
            return False  # an uneven last chunk has no older spelling worth the risk
        if opset < AXES_INPUT_OPSET:
            return _axes_as_attribute(graph, node, 1, "split")
    return True


def _has_any(node: ir.Node, *names: str) -> bool:
    return any(name in node.attributes for name in names)


def _shape_as_slice(graph: ir.Graph, node: ir.Node) -> bool:
    """Shape(x, start, end) → Slice(Shape(x), [start], [end], [0]): Slice clamps negative and
    out-of-range bounds exactly as Shape-15 does."""
    start = editing.attribute(node, "start", 0)
    end = editing.attribute(node, "end", INT64_MAX)
    bounds = [np.array([b], np.int64) for b in (start, end, 0)]
    constants = [editing.add_initializer(graph, f"{node.name}_slice", b) for b in bounds]
    shape = ir.node("Shape", [node.inputs[0]], name=f"{node.name}_full")
    sliced = ir.node("Slice", [shape.outputs[0], *constants], name=f"{node.name}_slice")
    shape.outputs[0].dtype = sliced.outputs[0].dtype = ir.DataType.INT64
    return _replace(graph, node, [shape, sliced], sliced.outputs)


def _axes_as_attribute(graph: ir.Graph, node: ir.Node, index: int, name: str) -> bool:
    """Move the constant input ``index`` to the attribute ``name`` (absent input: nothing)."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return True
    values = editing.const_ints(node.inputs[index])
    if values is None:
        return False  # run-time axes have no attribute spelling
    attributes = {key: attr.value for key, attr in node.attributes.items()}
    attributes[name] = values
    inputs = [*node.inputs[:index], *node.inputs[index + 1 :]]
    new = ir.node(node.op_type, inputs, attributes, num_outputs=len(node.outputs), name=node.name)
    return _replace(graph, node, [new], new.outputs)


def _replace(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node], outputs: list[ir.Value]) -> bool:
    editing.insert_before(node, nodes)
    for old, new in zip(node.outputs, outputs, strict=True):
        new.shape, new.type = old.shape, old.type
        if not editing.replace_value(old, new):
            return False
    graph.remove(node, safe=True)
    for old, new in zip(node.outputs, outputs, strict=True):
        if new.name is None or not new.is_graph_output():
            new.name = old.name  # the old node is gone: its names are free again
    return True


def _valid(node: ir.Node, opset: int) -> bool:
    """An op ONNX defines at ``opset`` has only the attributes and inputs it knows there."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        # ORT's own default-domain ops (SimplifiedLayerNormalization; LayerNormalization
        # below 17): ORT, when the run verifies the result, is their judge.
        return True
    if not set(node.attributes).issubset(schema.attributes):
        return False
    return len(node.inputs) <= schema.max_input
