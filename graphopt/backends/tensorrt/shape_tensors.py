"""Shape-tensor inputs: the op inputs TensorRT imports as shape tensors. One computed from a
float network input is refused; an int network input that reaches one becomes a shape tensor,
whose values an engine build's optimization profile needs."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from graphopt.backends.tensorrt.findings import WARNING, Finding
from graphopt.backends.tensorrt.node_labels import Prepared
from graphopt.backends.tensorrt.onnx_nodes import all_nodes, input_at
from graphopt.backends.tensorrt.rule_context import FLOAT_INPUT, RuleContext

# Inputs TensorRT imports as shape tensors, by op: (from opset, indices). A shape tensor
# computed from a float network input's values is rejected (its shape analysis needs
# int32/int64 inputs); one from an int network input makes that input a shape input.
_SHAPE_SLOTS: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = {
    "Loop": ((1, (0,)),),
    "Upsample": ((9, (1,)),),
    "Reshape": ((5, (1,)),),
    "Expand": ((1, (1,)),),
    "ConstantOfShape": ((1, (0,)),),
    "Tile": ((6, (1,)),),
    "Pad": ((18, (1, 3)), (11, (1,))),
    "Slice": ((10, (1, 2, 3, 4)),),
    "Resize": ((11, (2, 3)), (10, (1,))),
    "Range": ((11, (0, 1, 2)),),
    "OneHot": ((9, (1,)),),
    "TopK": ((10, (1,)),),
    "Split": ((13, (1,)),),
    "CumSum": ((11, (1,)),),
}


def _shape_slots(node: onnx.NodeProto, opset: int) -> tuple[int, ...]:
    for since, indices in _SHAPE_SLOTS.get(node.op_type, ()):
        if opset >= since:
            return indices
    return ()


def shape_inputs_rule(node: onnx.NodeProto, context: RuleContext) -> Iterator[str]:
    """A shape tensor computed from a float network input: TensorRT requires network inputs
    that reach shape computations to be int32/int64 (its shape analysis rejects the rest)."""
    for index in _shape_slots(node, context.opset):
        name = input_at(node, index)
        if name and context.flow.of(name) & FLOAT_INPUT:
            yield (
                f"input {index} of {node.op_type} is a shape computed from a float network "
                "input: TensorRT needs shape inputs to be int32/int64 network inputs or "
                "constants"
            )


def shape_tensor_findings(
    graph: onnx.GraphProto, context: RuleContext, prepared: Prepared
) -> Iterator[Finding]:
    """Int network inputs that reach a shape input: TensorRT makes them shape tensors, whose
    values (not only dims) an engine build needs in its optimization profile."""
    seen: dict[str, str] = {}
    for node in all_nodes(graph):
        for index in _shape_slots(node, context.opset):
            name = input_at(node, index)
            if not name or context.flow.of(name) & FLOAT_INPUT:
                continue
            for source in sorted(context.flow.int_inputs.get(name, ())):
                ref = prepared.ref(node.name)
                seen.setdefault(source, ref.label if ref else node.op_type)
    for source, where in seen.items():
        yield Finding(
            WARNING,
            "",
            "",
            shape_tensor_warning(source, f" (it reaches {where})"),
            "shape-tensor-input",
        )


def shape_tensor_warning(name: str, detail: str = "") -> str:
    """The warning for a network input TensorRT imports as a shape tensor."""
    return (
        f"input {name!r} is a shape tensor in TensorRT's network{detail}: an engine build "
        "needs min/opt/max values for it in the optimization profile, not only dims"
    )
