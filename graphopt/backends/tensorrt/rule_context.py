"""What the per-op rules read besides the node: inferred types and shapes, constant values,
and for every value what it is computed from (weights, network inputs, dynamic dims, loop
iterations) and which int network inputs reach it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.backends.tensorrt.onnx_nodes import (
    all_graphs,
    attribute,
    attribute_graphs,
    is_float_type,
    type_id,
    type_name,
)

# Ops whose output depends on their input's shape only, not its values.
_SHAPE_READERS = ("Shape", "Size")
# Ops the parser keeps as weights when their input is weights (a constant chain it reads).
_WEIGHT_PASSING = ("Identity", "Cast", "CastLike")


# What a value is computed from (bit flags; none set: a constant TensorRT can fold).
WEIGHTS = 1  # an initializer or Constant, through Identity/Cast only: the parser's weights
FLOAT_INPUT = 2  # the values of a float network input
INT_INPUT = 4  # the values of an int (or bool) network input
DYNAMIC = 8  # a dynamic dim (the Shape of a tensor whose shape is not static)
LOOP = 16  # a Loop/Scan body's per-iteration values
RUNTIME = FLOAT_INPUT | INT_INPUT | DYNAMIC | LOOP


class ValueFlow:
    """For every value of the model (all graphs: names are unique), what it is computed
    from, and which int network inputs reach it."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        types: dict[str, str],
        shapes: dict[str, tuple[int | None, ...]],
    ) -> None:
        self.types, self.shapes = types, shapes
        self.flags: dict[str, int] = {}
        self.int_inputs: dict[str, frozenset[str]] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        initializers = {t.name for t in graph.initializer}
        for value in graph.input:
            if value.name in initializers:
                continue
            if is_float_type(types.get(value.name, "")):
                self.flags[value.name] = FLOAT_INPUT
            else:
                self.flags[value.name] = INT_INPUT
                self.int_inputs[value.name] = frozenset((value.name,))
        self._graph(graph)

    def _graph(self, graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            self.flags.setdefault(tensor.name, WEIGHTS)
        for node in graph.node:
            self._node(node)

    def _node(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name:
                self.consumers.setdefault(name, []).append(node)
        bodies = [b for a in node.attribute for b in attribute_graphs(a)]
        per_iteration = node.op_type in ("Loop", "Scan")
        for body in bodies:
            for value in body.input:  # iteration number, condition, carried and scanned
                self.flags[value.name] = LOOP if per_iteration else 0
            self._graph(body)
        inputs = [n for n in node.input if n]
        inputs += [v.name for body in bodies for v in body.output]
        flags = 0
        origins: frozenset[str] = frozenset()
        for name in inputs:
            flags |= self.flags.get(name, 0)
            origins |= self.int_inputs.get(name, frozenset())
        if node.op_type == "Constant":
            flags = WEIGHTS
        elif node.op_type in _SHAPE_READERS:
            dims = self.shapes.get(node.input[0]) if node.input else None
            flags = 0 if dims is not None and None not in dims else DYNAMIC
            origins = frozenset()
        elif node.op_type in _WEIGHT_PASSING:
            flags = self.flags.get(node.input[0], 0) if node.input else 0
        else:
            flags &= ~WEIGHTS
        if per_iteration:
            flags |= LOOP
        for output in node.output:
            if output:
                self.flags[output] = flags
                self.producers[output] = node
                if origins:
                    self.int_inputs[output] = origins

    def of(self, name: str) -> int:
        return self.flags.get(name, 0)

    def is_weights(self, name: str) -> bool:
        return bool(self.of(name) & WEIGHTS)


@dataclass(frozen=True)
class RuleContext:
    """What the node rules read besides the node: constants, the opset, inferred types."""

    constants: dict
    opset: int
    types: dict[str, str]  # value name -> element type name
    shapes: dict[str, tuple[int | None, ...]]  # value name -> dims (None: not static)
    inputs: frozenset[str]  # the main graph's (runtime) input names
    flow: ValueFlow

    def weights(self, name: str) -> np.ndarray | None:
        """The numbers of a weights value (an initializer or Constant, through the
        Identity/Cast chain the parser folds), or None when it is computed."""
        chain: list[onnx.NodeProto] = []
        while name not in self.constants:
            node = self.flow.producers.get(name)
            if node is None or node.op_type not in _WEIGHT_PASSING or not node.input:
                return None
            chain.append(node)
            name = node.input[0]
        try:
            value = np.asarray(self.constants.get(name))
            for node in reversed(chain):
                if node.op_type == "Cast":
                    value = value.astype(
                        onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to", 1))
                    )
                elif node.op_type == "CastLike" and len(node.input) > 1:
                    target = self.types.get(node.input[1], "")
                    value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(type_id(target)))
        except Exception:  # a type numpy cannot hold (strings, float8 without ml_dtypes)
            return None
        return value


def value_types(
    model: onnx.ModelProto,
) -> tuple[dict[str, str], dict[str, tuple[int | None, ...]]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference fails on some valid models: only declared types then
        inferred = model
    types: dict[str, str] = {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    # Subgraphs' values too (inference types them in place): their rules read them.
    for graph in all_graphs(inferred.graph):
        for t in graph.initializer:
            types[t.name] = type_name(t.data_type)
            shapes[t.name] = tuple(t.dims)
        for value in (*graph.input, *graph.output, *graph.value_info):
            tensor = value.type.tensor_type
            if tensor.elem_type:
                types[value.name] = type_name(tensor.elem_type)
            if tensor.HasField("shape"):
                shapes[value.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
                )
    return types, shapes


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values by name, in every graph (names are unique)."""
    values: dict = {}
    for inner in all_graphs(graph):
        values.update((t.name, t) for t in inner.initializer)
        for node in inner.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        values[node.output[0]] = attr.t
                    elif attr.name.startswith("value_"):
                        values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr))
    return _Arrays(values)


class _Arrays(dict):
    """Name -> array, converted on first read (most rules only ask whether a name is here)."""

    def get(self, key, default=None):  # type: ignore[override]
        tensor = super().get(key)
        if tensor is None:
            return default
        return numpy_helper.to_array(tensor) if isinstance(tensor, onnx.TensorProto) else tensor
