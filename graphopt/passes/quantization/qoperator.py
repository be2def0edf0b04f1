"""The QOperator form (ONNX Runtime only): QDQ groups rewritten as integer operators.

Each DQ→op→(Relu/Clip)→Q group of the QDQ form becomes one operator on int8 tensors:
QLinearConv (bias requantized to int32 with ``x_scale · w_scale``), QLinearMatMul,
QLinearAdd and QLinearGlobalAveragePool (``com.microsoft``); data-movement ops (MaxPool,
Reshape, Concat, ...) whose inputs and outputs share one scale run directly on the int8
tensors. A Relu/Clip epilogue is dropped when the output's quantized range already clamps
as it does (a zero point at the bottom of the range for Relu). Groups that match none of
these keep their Q/DQ (ORT still fuses them when it loads the model); Gemm is one of them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.editing import NameTable, attribute, constant_array, register_array
from graphopt.passes.quantization.placement import DATA_MOVEMENT
from graphopt.passes.quantization.qdq import Emitted
from graphopt.passes.quantization.record import TypeChange

MS_DOMAIN = "com.microsoft"


def to_qoperator(model: ir.Model, emitted: Emitted) -> int:
    """Rewrite ``model``'s QDQ groups in place; returns how many operators were converted.
    Activations that became int8 tensors are added to ``emitted.type_changes``."""
    graph = model.graph
    names = NameTable(graph)
    converted = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("Conv", "MatMul", "Add", "GlobalAveragePool"):
            done = _convert_compute(graph, names, node, emitted)
        elif node.op_type in DATA_MOVEMENT:
            done = _convert_data_movement(graph, names, node, emitted)
        else:
            done = False
        converted += done
    if any(n.domain == MS_DOMAIN for n in graph):
        model.opset_imports[MS_DOMAIN] = 1
    _remove_dead_qdq(graph)
    return converted


def _activation_dq(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.inputs[0].const_value is not None:
        return None
    return node


def _weight_dq(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
        return None
    return node


def _output_q(node: ir.Node) -> tuple[ir.Node, ir.Node | None] | None:
    """The Q that quantizes the node's output (through a droppable Relu/Clip), if the output
    goes nowhere else."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    user = uses[0].node
    epilogue = None
    if user.op_type in ("Relu", "Clip"):
        epilogue, out = user, user.outputs[0]
        uses = out.uses()
        if len(uses) != 1 or out.is_graph_output():
            return None
        user = uses[0].node
    if user.op_type != "QuantizeLinear":
        return None
    if epilogue is not None and not _clamps_like(epilogue, user):
        zero = constant_array(user.inputs[2])
        if epilogue.op_type != "Relu" or zero.dtype != np.int8 or int(zero) != 0:
            return None
        # Zero point 0: an int8 Relu (max(q, 0)) after the integer op is exact.
    return user, epilogue


def _clamps_like(epilogue: ir.Node, q: ir.Node) -> bool:
    """Whether Q's saturation alone does what the Relu/Clip does (then it can go)."""
    scale = float(constant_array(q.inputs[1]))
    zero = constant_array(q.inputs[2])
    qmin, qmax = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
    low, high = (qmin - int(zero)) * scale, (qmax - int(zero)) * scale
    if epilogue.op_type == "Relu":
        return low >= 0.0
    bounds = [constant_array(v) if v is not None else None for v in list(epilogue.inputs)[1:3]]
    clip_low = float(bounds[0]) if len(bounds) > 0 and bounds[0] is not None else -np.inf
    clip_high = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else np.inf
    return clip_low <= low and high <= clip_high


def _convert_compute(graph: ir.Graph, names: NameTable, node: ir.Node, emitted: Emitted) -> bool:
    found = _output_q(node)
    if found is None:
        return False
    q, epilogue = found
    op = node.op_type
    inputs = list(node.inputs)
    a = _activation_dq(inputs[0])
    if a is None:
        return False
    y_scale, y_zero = q.inputs[1], q.inputs[2]
    attributes = list(node.attributes.values())
    if op == "Conv":
        w = _weight_dq(inputs[1])
        if w is None:
            return False
        new_inputs = [*a.inputs[:3], *w.inputs[:3], y_scale, y_zero]
        if len(inputs) > 2 and inputs[2] is not None:
            bias = constant_array(inputs[2])
            if bias is None:
                return False
            scale = float(constant_array(a.inputs[1])) * constant_array(w.inputs[1])
            b32 = np.rint(bias.astype(np.float64) / scale).astype(np.int32)
            new_inputs.append(register_array(graph, names.take(f"{inputs[2].name}_int32"), b32))
        domain, new_op = "", "QLinearConv"
    elif op == "MatMul":
        b = _weight_dq(inputs[1]) or _activation_dq(inputs[1])
        if b is None:
            return False
        new_inputs = [*a.inputs[:3], *b.inputs[:3], y_scale, y_zero]
        domain, new_op = "", "QLinearMatMul"
    elif op == "Add":
        b = _activation_dq(inputs[1])
        if b is None:
            return False
        new_inputs = [*a.inputs[:3], *b.inputs[:3], y_scale, y_zero]
        domain, new_op = MS_DOMAIN, "QLinearAdd"
    else:  # GlobalAveragePool
        new_inputs = [*a.inputs[:3], y_scale, y_zero]
        attributes = [ir.AttrInt64("channels_last", 0)]
        domain, new_op = MS_DOMAIN, "QLinearGlobalAveragePool"
    if op == "Conv" and attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return False
    _replace(graph, names, node, q, epilogue, domain, new_op, new_inputs, attributes, emitted)
    return True


def _replace(
    graph: ir.Graph,
    names: NameTable,
    node: ir.Node,
    q: ir.Node,
    epilogue: ir.Node | None,
    domain: str,
    op: str,
    inputs: list[ir.Value],
    attributes: list,
    emitted: Emitted,
) -> None:
    old = q.outputs[0]
    out = ir.Value(name=names.take(f"{node.outputs[0].name}_int8"), shape=old.shape, type=old.type)
    new = ir.Node(domain, op, inputs, attributes=attributes, outputs=[out], name=node.name)
    graph.insert_before(node, new)
    if epilogue is not None and not _clamps_like(epilogue, q):
        raw, out = out, ir.Value(name=names.take(f"{epilogue.outputs[0].name}_int8"), type=old.type)
        out.shape = old.shape
        graph.insert_before(node, ir.Node("", "Relu", [raw], outputs=[out], name=epilogue.name))
    old.replace_all_uses_with(out)
    source = (epilogue or node).outputs[0]
    emitted.type_changes.append(TypeChange(source.name, "float", _type_name(old)))
    _detach(graph, [n for n in (q, epilogue, node) if n is not None])


def _convert_data_movement(
    graph: ir.Graph, names: NameTable, node: ir.Node, emitted: Emitted
) -> bool:
    """An op on int8 inputs and outputs of one shared scale runs on the int8 tensors."""
    data = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.const_value is None]
    dqs = [_activation_dq(v) for _, v in data]
    if not data or any(dq is None for dq in dqs):
        return False
    qs = []
    for out in node.outputs:
        uses = out.uses()
        if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "QuantizeLinear":
            return False
        qs.append(uses[0].node)
    scales = {_key(n) for n in (*dqs, *qs)}
    if len(scales) != 1:
        return False
    inputs = list(node.inputs)
    for (index, _), dq in zip(data, dqs, strict=True):
        inputs[index] = dq.inputs[0]
    if node.op_type == "Concat":
        # Concat's inputs share one type: a float constant among the int8 ones must be int8
        # too (left float it made a model ORT rejects). Quantized with the shared scale, as
        # the QDQ form's Q after the Concat rounds it (calibration saw it in that range).
        for index, value in enumerate(node.inputs):
            if value is not None and value.const_value is not None:
                stored = _quantized_constant(graph, names, value, qs[0])
                if stored is None:
                    return False
                inputs[index] = stored
                emitted.type_changes.append(TypeChange(value.name, "float", _type_name(stored)))
    outputs = [
        ir.Value(
            name=names.take(f"{out.name}_int8"), shape=q.outputs[0].shape, type=q.outputs[0].type
        )
        for out, q in zip(node.outputs, qs, strict=True)
    ]
    new = ir.Node(
        node.domain,
        node.op_type,
        inputs,
        attributes=list(node.attributes.values()),
        outputs=outputs,
        name=node.name,
    )
    graph.insert_before(node, new)
    for out, q, value in zip(node.outputs, qs, outputs, strict=True):
        q.outputs[0].replace_all_uses_with(value)
        emitted.type_changes.append(TypeChange(out.name, "float", _type_name(value)))
    _detach(graph, [*qs, node])
    return True


def _quantized_constant(
    graph: ir.Graph, names: NameTable, value: ir.Value, q: ir.Node
) -> ir.Value | None:
    """``value`` (a float constant) as ``q`` quantizes it: round half to even, saturated."""
    array = constant_array(value)
    if array is None or array.dtype != np.float32:
        return None
    scale = float(constant_array(q.inputs[1]))
    zero = constant_array(q.inputs[2])
    info = np.iinfo(zero.dtype)
    codes = np.rint(array / np.float32(scale)) + int(zero)
    stored = np.clip(codes, info.min, info.max).astype(zero.dtype)
    return register_array(graph, names.take(f"{value.name}_quantized"), stored)


def _detach(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove ``nodes`` and release their inputs (so the producers' uses drop)."""
    for node in nodes:
        for index in range(len(node.inputs)):
            node.replace_input_with(index, None)
    graph.remove(nodes, safe=False)


def _key(node: ir.Node) -> tuple:
    scale, zero = constant_array(node.inputs[1]), constant_array(node.inputs[2])
    return (float(scale), int(zero), str(zero.dtype))


def _type_name(value: ir.Value) -> str:
    return "uint8" if value.dtype == ir.DataType.UINT8 else "int8"


def _remove_dead_qdq(graph: ir.Graph) -> None:
    """Q/DQ nodes nothing reads any more (walk backwards: a DQ frees its Q)."""
    for node in reversed(list(graph)):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
            _detach(graph, [node])
