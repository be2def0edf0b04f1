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
    # A producer already out of its graph was dropped through another input that named the
    # same value (two Slices sharing one axes Constant).
    if producer is not None and producer.graph is not None and editing.is_op(producer, "Constant"):
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


def bn_scale_shift(
    bn: ir.Node, channels: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray] | None:
    """An inference BatchNormalization as float64 (scale, shift) per channel, or None.

    None for training mode, legacy ``spatial=0``, used training outputs, non-constant params
    or params not of shape [channels] and ``dtype``, and var + eps <= 0.
    """
    if len(bn.inputs) != 5 or editing.attribute(bn, "training_mode", 0):
        return None
    if not editing.attribute(bn, "spatial", 1):
        return None
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return None
    params = [editing.constant_array(v) for v in bn.inputs[1:]]
    if any(p is None or p.shape != (channels,) or p.dtype != dtype for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    eps = float(editing.attribute(bn, "epsilon", 1e-5))
    if not np.all(var + eps > 0):
        return None
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def pad_spec(pad: ir.Node, rank: int, opset: int) -> tuple[list[int], float] | None:
    """A constant-mode Pad's [begin..., end...] amounts over ``rank`` axes and its fill value.

    None for other modes, or when the amounts, axes or fill value are not known constants.
    """
    if editing.attribute(pad, "mode", "constant") != "constant":
        return None
    if opset < 11:
        pads = editing.attribute(pad, "pads", None)
        if pads is None or len(pads) != 2 * rank:
            return None
        return [int(p) for p in pads], float(editing.attribute(pad, "value", 0.0))
    inputs = list(pad.inputs) + [None] * (4 - len(pad.inputs))
    pads = editing.const_ints(inputs[1])
    if pads is None:
        return None
    fill = 0.0
    if inputs[2] is not None:
        array = editing.constant_array(inputs[2])
        if array is None or array.size != 1 or array.dtype.kind not in "fiu":
            return None
        fill = float(array.reshape(()).item())
    if inputs[3] is None:
        return (pads, fill) if len(pads) == 2 * rank else None
    axes = editing.const_ints(inputs[3])
    if axes is None or len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    seen: set[int] = set()
    for i, axis in enumerate(axes):
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank or axis in seen:
            return None
        seen.add(axis)
        full[axis] = pads[i]
        full[axis + rank] = pads[i + len(axes)]
    return full, fill


def value_rank(value: ir.Value | None) -> int | None:
    """The value's rank when known (from its shape or constant data)."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    tensor = None if value.is_graph_input() else ir.convenience.get_const_tensor(value)
    return len(tensor.shape) if tensor is not None else None


def fold_into_each(model: ir.Model, op_type: str, fuse_next) -> int:
    """Call ``fuse_next(node, maker)`` on every ``op_type`` node until it returns False.

    Folding a chain (Conv → Mul → Add) one successor at a time; returns the folds made.
    """
    maker = WeightMaker(model)
    hits = 0
    for graph in all_graphs(model):
        for node in list(graph):
            if editing.is_op(node, op_type):
                while fuse_next(node, maker):
                    hits += 1
    return hits


def affine_successor(producer: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The only reader of ``producer``'s output when it is a Mul/Add in the same graph, with
    its other operand; None otherwise (also for ``x * x``)."""
    product = producer.outputs[0]
    user = editing.single_user(product)
    if user is None or not editing.is_op(user, ("Mul", "Add")) or len(user.inputs) != 2:
        return None
    if user.graph is not producer.graph:
        return None
    other = user.inputs[1] if user.inputs[0] is product else user.inputs[0]
    if other is product:
        return None
    return user, other


def fold_pad_into_readers(model: ir.Model, reader_ops: tuple[str, ...], fuse) -> int:
    """Offer every Pad to each ``reader_ops`` node reading it as data (``fuse(pad, reader,
    opset)`` folds or refuses); a Pad goes once nobody else reads it. Returns the folds."""
    opset = default_opset(model)
    hits = 0
    for graph in all_graphs(model):
        for pad in list(graph):
            if not editing.is_op(pad, "Pad") or pad.outputs[0].is_graph_output():
                continue
            for use in list(pad.outputs[0].uses()):
                reader = use.node
                foldable = use.idx == 0 and editing.is_op(reader, reader_ops)
                if foldable and reader.graph is graph and fuse(pad, reader, opset):
                    hits += 1
            editing.remove_if_dead(pad)
    return hits
