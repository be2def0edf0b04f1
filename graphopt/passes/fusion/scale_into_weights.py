"""Constant scales around MatMul / Gemm / Conv folded into their constant weights.

Input side, x * s (or x / s) read only by the layer:
* MatMul(x * s, W) = MatMul(x, s[:, None] * W) for a scalar or per-K s ([K], [1.., K]).
* Gemm(x * s, B) the same over A's columns (transA=0; transA=1 takes scalars only),
  scaling B's rows (its columns under transB=1).
* Conv(x * s, W) = Conv(x, W') for a scalar or per-input-channel s ([C, 1..], [1, C, 1..]):
  input channel ``g * (C / group) + j`` is column ``j`` of group ``g``'s output rows, so W is
  viewed as [group, C_out / group, C / group, k...]. Zero padding stays zero after scaling.
Output side, layer(x) / d with d constant:
* MatMul: scalar or per-N d scales W's columns; Gemm: B's columns and C (beta folded);
  Conv: per-output-channel d scales W and the bias.
Division becomes multiplication by 1 / d (one extra rounding, within float tolerance); a
zero divisor, a constant that would enlarge the rank, non-float or non-constant weights, and
a scaled value read by anyone else are refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage, register


@register
class FoldScaleIntoWeightsPass(GraphPass):
    """Fold constant Mul/Div before MatMul/Gemm/Conv, or Div after, into the weights.

    Refuses per-row or spatial scales, zero divisors, shared values, non-constant weights.
    """

    name = "fold-scale-into-weights"
    ops = frozenset(("Mul", "Div"))
    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True

    def rewrite(self, model: ir.Model) -> int:
        # A per-channel scale must not broadcast x up (x of 1 channel times s of C): that
        # needs x's channel dim, so fill in missing shapes first (only when a candidate lacks
        # them: inference serializes the whole model).
        if any(_needs_shape(node) for graph in _common.all_graphs(model) for node in graph):
            editing.fill_missing_shapes(model)
        self.maker = _common.WeightMaker(model)
        hits = 0
        for graph in _common.all_graphs(model):
            for node in list(graph):
                if node.graph is not graph or not editing.is_op(node, ("Mul", "Div")):
                    continue
                if self._input_side(node) or self._output_side(node):
                    hits += 1
        return hits

    # -- x * s feeding a layer ------------------------------------------------------------

    def _input_side(self, mul: ir.Node) -> bool:
        if len(mul.inputs) != 2:
            return False
        layer = editing.single_user(mul.outputs[0])
        if layer is None or layer.graph is not mul.graph or layer.inputs[0] is not mul.outputs[0]:
            return False
        x, s_value = mul.inputs
        scale = editing.constant_array(s_value)
        if scale is None and mul.op_type == "Mul":
            s_value, x = x, s_value
            scale = editing.constant_array(s_value)
        if scale is None or editing.is_constant(x) or not _common.is_float(x):
            return False
        if _is_erf_gelu_body(x):
            # GELU's 0.5 stays: without it ORT's GeluFusion (ORT_ENABLE_ALL) no longer sees
            # x * (1 + erf(x / √2)) * 0.5, and one Mul saved costs a fused Gelu kernel.
            return False
        factors = _factors(scale, mul.op_type)
        if factors is None or len(layer.inputs) < 2:
            return False
        weight = editing.constant_array(layer.inputs[1])
        if weight is None or weight.dtype != scale.dtype or not _common.is_float_array(weight):
            return False
        new_weight = None
        if editing.is_op(layer, "MatMul") and weight.ndim == 2:
            vector = _along_last(factors, weight.shape[0], _common.value_rank(x))
            if vector is not None:
                new_weight = weight * vector[:, None]
        elif editing.is_op(layer, "Gemm") and weight.ndim == 2:
            trans_b = editing.attribute(layer, "transB", 0)
            k = weight.shape[1] if trans_b else weight.shape[0]
            if editing.attribute(layer, "transA", 0):
                vector = factors.reshape(()) * np.ones(k) if factors.size == 1 else None
            else:
                vector = _along_last(factors, k, 2)
            if vector is not None:
                new_weight = weight * (vector[None, :] if trans_b else vector[:, None])
        elif editing.is_op(layer, "Conv") and weight.ndim >= 3:
            new_weight = _conv_input_scaled(layer, weight, factors)
        if new_weight is None:
            return False
        if factors.size > 1 and not _dim_is(x, new_weight.shape, layer):
            return False
        self._set_weight(layer, new_weight.astype(weight.dtype))
        layer.replace_input_with(0, x)
        editing.remove_node(mul)
        _common.drop_if_unused(s_value)
        return True

    # -- layer(x) / d ---------------------------------------------------------------------

    def _output_side(self, div: ir.Node) -> bool:
        if not editing.is_op(div, "Div") or len(div.inputs) != 2 or div.inputs[0] is None:
            return False
        layer = div.inputs[0].producer()
        if layer is None or layer.graph is not div.graph or len(layer.inputs) < 2:
            return False
        if editing.single_user(layer.outputs[0]) is not div or len(layer.outputs) != 1:
            return False
        d_value = div.inputs[1]
        divisor = editing.constant_array(d_value)
        weight = editing.constant_array(layer.inputs[1])
        if divisor is None or weight is None or not _common.is_float_array(weight):
            return False
        if divisor.dtype != weight.dtype:
            return False
        factors = _factors(divisor, "Div")
        if factors is None:
            return False
        bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
        bias = None if bias_value is None else editing.constant_array(bias_value)
        if bias_value is not None and (bias is None or bias.dtype != weight.dtype):
            return False
        if editing.is_op(layer, "MatMul") and weight.ndim == 2:
            n = weight.shape[1]
            vector = _along_last(factors, n, _common.value_rank(layer.inputs[0]))
            if vector is None:
                return False
            self._set_weight(layer, (weight * vector[None, :]).astype(weight.dtype))
        elif editing.is_op(layer, "Gemm") and weight.ndim == 2:
            trans_b = editing.attribute(layer, "transB", 0)
            vector = _along_last(factors, weight.shape[0] if trans_b else weight.shape[1], 2)
            if vector is None or (bias is not None and bias.ndim > 2):
                return False
            scaled = weight * (vector[:, None] if trans_b else vector[None, :])
            self._set_weight(layer, scaled.astype(weight.dtype))
            if bias is not None:
                beta = float(editing.attribute(layer, "beta", 1.0))
                self._set_bias(layer, (bias * beta * vector).astype(weight.dtype))
                layer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        elif editing.is_op(layer, "Conv") and weight.ndim >= 3:
            vector = _per_output_channel(factors, weight.ndim, weight.shape[0])
            if vector is None or (bias is not None and bias.shape != (weight.shape[0],)):
                return False
            shape = _common.channel_axis_shape(weight.ndim, weight.shape[0])
            self._set_weight(layer, (weight * vector.reshape(shape)).astype(weight.dtype))
            if bias is not None:
                self._set_bias(layer, (bias * vector).astype(weight.dtype))
        else:
            return False
        editing.replace_value(div.outputs[0], layer.outputs[0])  # no output: single_user
        editing.remove_node(div)
        _common.drop_if_unused(d_value)
        return True

    def _set_weight(self, layer: ir.Node, array: np.ndarray) -> None:
        old = layer.inputs[1]
        graph = editing.owning_graph(layer)
        layer.replace_input_with(1, self.maker.add(graph, f"{old.name or 'w'}_scaled", array))
        _common.drop_if_unused(old)

    def _set_bias(self, layer: ir.Node, array: np.ndarray) -> None:
        old = layer.inputs[2]
        graph = editing.owning_graph(layer)
        layer.replace_input_with(2, self.maker.add(graph, f"{old.name or 'b'}_scaled", array))
        _common.drop_if_unused(old)


def _needs_shape(node: ir.Node) -> bool:
    """A Mul/Div by a constant feeding a weight layer, whose other input has no shape."""
    if not editing.is_op(node, ("Mul", "Div")) or len(node.inputs) != 2:
        return False
    layer = editing.single_user(node.outputs[0])
    if layer is None or not editing.is_op(layer, ("MatMul", "Gemm", "Conv")):
        return False
    return any(v is not None and v.shape is None for v in node.inputs)


def _dim_is(x: ir.Value, weight_shape: tuple[int, ...], layer: ir.Node) -> bool:
    """x's scaled axis (last for MatMul/Gemm, 1 for Conv) is statically the weight's size."""
    if x.shape is None:
        return False
    dims = list(x.shape.dims)
    if editing.is_op(layer, "Conv"):
        group = int(editing.attribute(layer, "group", 1))
        return len(dims) > 1 and dims[1] == weight_shape[1] * group
    if editing.is_op(layer, "Gemm") and editing.attribute(layer, "transB", 0):
        return bool(dims) and dims[-1] == weight_shape[1]
    return bool(dims) and dims[-1] == weight_shape[0]


def _factors(constant: np.ndarray, op_type: str) -> np.ndarray | None:
    """The multiplier as float64 (1 / d for Div), or None for a zero divisor or non-float."""
    if not _common.is_float_array(constant):
        return None
    values = constant.astype(np.float64)
    if op_type == "Div":
        if not np.all(values != 0):
            return None
        return 1.0 / values
    return values


def _along_last(factors: np.ndarray, size: int, rank: int | None) -> np.ndarray | None:
    """``factors`` as a [size] vector when it only varies along the last axis of a tensor of
    ``rank`` dims without enlarging it (unknown rank allows rank <= 1 constants only)."""
    limit = 1 if rank is None else rank
    if factors.ndim > limit or any(d != 1 for d in factors.shape[:-1]):
        return None
    if factors.ndim and factors.shape[-1] not in (1, size):
        return None
    return np.broadcast_to(factors.reshape(-1), (size,)).copy()


def _per_output_channel(factors: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``factors`` as a [channels] vector when it broadcasts along axis 1 of a rank-``rank``
    tensor only (scalar, [C, 1..], [1, C, 1..])."""
    if factors.ndim > rank:
        return None
    shape = (1,) * (rank - factors.ndim) + factors.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(factors.reshape(-1), (channels,)).copy()


def _conv_input_scaled(conv: ir.Node, weight: np.ndarray, factors: np.ndarray) -> np.ndarray | None:
    group = int(editing.attribute(conv, "group", 1))
    cout, cin_g = weight.shape[0], weight.shape[1]
    if group < 1 or cout % group:
        return None
    vector = _per_output_channel(factors, weight.ndim, cin_g * group)
    if vector is None:
        return None
    kernel = weight.shape[2:]
    grouped = weight.astype(np.float64).reshape(group, cout // group, cin_g, *kernel)
    grouped = grouped * vector.reshape(group, 1, cin_g, *(1,) * len(kernel))
    return grouped.reshape(weight.shape)


def _is_erf_gelu_body(value: ir.Value) -> bool:
    """``value`` is x * (1 + erf(...)): an exact GELU still waiting for its 0.5."""
    node = value.producer()
    if node is None or not editing.is_op(node, "Mul"):
        return False
    for operand in node.inputs:
        add = operand.producer() if operand is not None else None
        if add is None or not editing.is_op(add, "Add"):
            continue
        if any(
            v is not None and v.producer() is not None and editing.is_op(v.producer(), "Erf")
            for v in add.inputs
        ):
            return True
    return False
