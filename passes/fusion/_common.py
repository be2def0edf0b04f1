"""What the fusion passes share: walking every graph, new folded weights, dtype checks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphopt import editing

# Folding rescales weights; only float tensors fold exactly (integer Conv/MatMul would need
# requantization, and bfloat16/float8 have no safe numpy arithmetic here).
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, then every If/Loop/Scan body (model functions are not visited)."""
    yield model.graph
    yield from model.graph.subgraphs()


def default_opset(model: ir.Model) -> int:
    """The default-domain opset of the model (subgraphs share the main graph's imports)."""
    return model.graph.opset_imports.get("", model.graph.opset_imports.get("ai.onnx", 0))


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def is_float_array(array: np.ndarray | None) -> bool:
    return array is not None and array.dtype in (np.float16, np.float32, np.float64)


class WeightMaker:
    """Adds folded weights as new initializers, named uniquely across the whole model.

    Folding always creates new tensors instead of editing the old ones in place, so a weight
    shared with another node stays intact; the old one goes once nobody reads it.
    """

    def __init__(self, model: ir.Model) -> None:
        self.taken: set[str] = set()
        for graph in all_graphs(model):
            self.taken.update(graph.initializers)
            self.taken.update(v.name for v in graph.inputs if v.name)
            for node in graph:
                self.taken.update(o.name for o in node.outputs if o.name)

    def add(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        name, index = base, 1
        while name in self.taken:
            name = f"{base}_{index}"
            index += 1
        self.taken.add(name)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.Tensor(array, name=name),
        )
        graph.register_initializer(value)
        return value


def drop_if_unused(value: ir.Value | None) -> None:
    """Remove an initializer or Constant node that nothing reads any more."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer() and value.graph is not None and value.name is not None:
        value.graph.initializers.pop(value.name, None)
        return
    producer = value.producer()
    if producer is not None and editing.is_op(producer, "Constant"):
        editing.remove_if_dead(producer)


def conv_weights(
    conv: ir.Node, max_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A Conv's constant float weight and bias (None when absent); None when not constant."""
    if len(conv.inputs) < 2:
        return None
    weight = editing.constant_array(conv.inputs[1], max_bytes)
    if not is_float_array(weight) or weight.ndim < 3:
        return None
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    if bias_value is None:
        return weight, None
    bias = editing.constant_array(bias_value, max_bytes)
    if bias is None or bias.dtype != weight.dtype or bias.shape != (weight.shape[0],):
        return None
    return weight, bias


def set_conv_weights(
    conv: ir.Node, maker: WeightMaker, weight: np.ndarray, bias: np.ndarray
) -> None:
    """Point ``conv`` at new weight and bias initializers; drop the old ones if unused."""
    graph = editing.owning_graph(conv)
    old_weight = conv.inputs[1]
    old_bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    base = old_weight.name or "conv"
    conv.replace_input_with(1, maker.add(graph, f"{base}_fused", weight))
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, maker.add(graph, f"{base}_fused_bias", bias))
    drop_if_unused(old_weight)
    drop_if_unused(old_bias)


def channel_axis_shape(rank: int, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-output-channel vector over a weight of ``rank`` dims."""
    return (channels,) + (1,) * (rank - 1)
