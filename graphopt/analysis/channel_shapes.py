"""What the channel rules know about shapes: symbolic dims, learned sizes, shape tensors.

onnx shape inference often leaves dims unknown in exported graphs (a batch or sequence dim
computed through Shape/Slice). Rules work on partial shapes: :class:`Context` reports symbolic
dims by name and remembers sizes that couplings taught; :func:`reshape_groups` matches the
axes of a reshape whose leading or single unknown dims can be solved.

Shape tensors built at run time are followed entry by entry in
:mod:`graphopt.analysis.shape_entries`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx
import onnx_ir as ir

from graphopt.editing import const_ints


class Context:
    """What rules may ask about the (shape-inferred) model: shapes, small constants, opsets.

    Rules that learn a shape onnx inference lost (Reshape targets) record it in ``known``.
    """

    def __init__(
        self, opsets: Mapping[str, int] | None = None, *, past_inference: bool = False
    ) -> None:
        self.known: dict[int, tuple[int, ...]] = {}
        # (id(value), axis) → size learned through an identity coupling.
        self.sizes: dict[tuple[int, int], int] = {}
        # The model's opset imports: attribute defaults and meanings changed across opsets
        # (Softmax's axis, Split's sizes, Slice's bounds...), so a rule must know which
        # version of its op the node is.
        self.opsets: dict[str, int] = dict(opsets or {})
        # Work out shapes onnx inference left out (_past_inference): for the analysis, which
        # gives the model's opsets; callers that fold what they read keep onnx's shapes only.
        self.past_inference = past_inference and bool(self.opsets)
        # Values whose shape _past_inference could not work out (asked once).
        self._failed: set[int] = set()
        self.dtypes: dict[int, int] = {}  # element types worked out with those shapes

    def opset(self, node: ir.Node) -> int:
        """The opset version of ``node``'s domain in the model ("" and "ai.onnx" are one).

        A model that imports no version for the domain is read as the newest onnx knows.
        """
        if node.domain in ("", "ai.onnx"):
            version = self.opsets.get("", self.opsets.get("ai.onnx"))
        else:
            version = self.opsets.get(node.domain)
        return version if version else onnx.defs.onnx_opset_version()

    def shape(self, value: ir.Value | None) -> tuple[int | str, ...] | None:
        """Dims as ints, symbolic dims as their names ('?' when anonymous); None if no rank."""
        if value is None:
            return None
        if id(value) in self.known:
            return self.known[id(value)]
        shape = value.shape
        if shape is None and value.const_value is not None:
            shape = value.const_value.shape
        if shape is None:
            return self._past_inference(value) if self.past_inference else None
        dims: list[int | str] = []
        for d in shape:
            if isinstance(d, int) and d >= 0:
                dims.append(int(d))
            else:
                name = getattr(d, "value", None)
                dims.append(str(name) if name else "?")
        for axis, d in enumerate(dims):
            if not isinstance(d, int) and (id(value), axis) in self.sizes:
                dims[axis] = self.sizes[(id(value), axis)]
        return tuple(dims)

    def ints(self, value: ir.Value | None) -> list[int] | None:
        return const_ints(value)

    def stopped_at(self, value: ir.Value) -> ir.Node | None:
        """The node where shapes stop being known on the way to ``value``: the first one
        upstream whose inputs have shapes and whose output has none."""
        node, seen = value.producer(), set()
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            unknown = [v for v in node.inputs if v is not None and self.shape(v) is None]
            if not unknown:
                return node
            node = unknown[0].producer()
        return node

    def _past_inference(self, value: ir.Value) -> tuple[int | str, ...] | None:
        """The shape of a value onnx inference left without one, worked out node by node
        from the nearest known shapes upstream; None where a node has no rule.

        onnx inference stops for the whole rest of the graph at one node it cannot infer
        (GroupNormalization, a function op since opset 18, whose body it does not expand),
        though every later node has a rule of its own.
        """
        # Post-order walk (no recursion: the unknown part may be the rest of a deep graph).
        stack, expanded = [(value, False)], set()
        while stack:
            current, ready = stack.pop()
            if id(current) in self.known or id(current) in self._failed:
                continue
            if ready:  # every unknown input was worked out (or failed) before this
                shape = _infer_output(self, current)
                if shape is None:
                    self._failed.add(id(current))
                else:
                    self.known[id(current)] = shape
                continue
            if id(current) in expanded or len(expanded) > _MAX_WALK:
                continue
            expanded.add(id(current))
            stack.append((current, True))
            node = current.producer()
            if node is not None:
                stack += [(v, False) for v in node.inputs if v is not None and _unshaped(v, self)]
        return self.known.get(id(value))


# Ops whose output 0 has input 0's shape (and element type): onnx skips some of them.
SAME_SHAPE = frozenset(
    {
        *("BatchNormalization", "InstanceNormalization", "GroupNormalization"),
        *("LayerNormalization", "RMSNormalization", "Softmax", "LogSoftmax", "Relu"),
        *("Sigmoid", "Tanh", "Erf", "Gelu", "Identity", "Cast"),
    }
)
# Most unknown values _past_inference walks up through for one question.
_MAX_WALK = 10_000


def _unshaped(value: ir.Value, ctx: Context) -> bool:
    return (
        value.shape is None
        and value.const_value is None
        and id(value) not in ctx.known
        and not value.is_graph_input()
    )


def _infer_output(ctx: Context, value: ir.Value) -> tuple[int | str, ...] | None:
    """``value``'s shape from its producer's rule on the shapes ``ctx`` knows, or None."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    if node.op_type in SAME_SHAPE and value is node.outputs[0]:
        x = node.inputs[0]
        dtype = _dtype(ctx, x) if x is not None and node.op_type != "Cast" else None
        if dtype is not None:
            ctx.dtypes[id(value)] = dtype
        return ctx.shape(x) if x is not None else None
    try:
        schema = onnx.defs.get_schema(node.op_type, ctx.opset(node), "")
        if not schema.has_type_and_shape_inference_function:
            return None
        types, data = {}, {}
        for v in node.inputs:
            if v is None:
                continue
            shape, dtype = ctx.shape(v), _dtype(ctx, v)
            if shape is None or dtype is None:
                return None
            dims = [d if isinstance(d, int) else (None if d == "?" else d) for d in shape]
            types[v.name] = onnx.helper.make_tensor_type_proto(dtype, dims)
            if v.const_value is not None and v.const_value.size <= _CONSTANT_DATA:
                data[v.name] = ir.serde.serialize_tensor(v.const_value)
        proto = ir.serde.serialize_node(node)
        out = onnx.shape_inference.infer_node_outputs(schema, proto, types, data)
    except Exception:  # onnx raises many kinds; no shape is the answer
        return None
    found = out.get(value.name)
    if found is None or not found.tensor_type.HasField("shape"):
        return None
    ctx.dtypes[id(value)] = found.tensor_type.elem_type
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in found.tensor_type.shape.dim
    )


# Constant inputs up to this many elements are handed to onnx's rule (Reshape targets).
_CONSTANT_DATA = 1 << 12


def _dtype(ctx: Context, value: ir.Value) -> int | None:
    if value.dtype is not None:
        return value.dtype.value
    return ctx.dtypes.get(id(value))


def reshape_groups(
    a: tuple[int | str, ...], b: tuple[int | str, ...]
) -> tuple[list[tuple[list[int], list[int]]], list[int | str], list[int | str]] | None:
    """Contiguous axis groups with equal products [(axes of a, axes of b)], and both shapes
    with one unknown dim solved where the products allow; None when they do not match.

    Leading dims unknown on either side (batch) pair up one to one; every other dim must be
    a known integer once solved.
    """
    a, b = list(a), list(b)
    for known, other in (
        (a, b),
        (b, a),
    ):  # one unknown dim, solved from the element count
        unknown = [p for p, d in enumerate(other) if not isinstance(d, int)]
        rest = math.prod(d for d in other if isinstance(d, int))
        if len(unknown) == 1 and all(isinstance(d, int) for d in known) and rest:
            if math.prod(known) % rest:
                return None
            other[unknown[0]] = math.prod(known) // rest
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b) and not (isinstance(a[i], int) and isinstance(b[j], int)):
        groups.append(([i], [j]))  # leading unknown dims (batch) pair one to one
        i, j = i + 1, j + 1
    for known, other in ((a, b), (b, a)):
        start_k, start_o = (i, j) if known is a else (j, i)
        unknown = [p for p in range(start_o, len(other)) if not isinstance(other[p], int)]
        rest = [d for d in known[start_k:] if isinstance(d, int)]
        if len(unknown) == 1 and len(rest) == len(known) - start_k:
            rest_other = math.prod(d for d in other[start_o:] if isinstance(d, int))
            if rest_other and math.prod(rest) % rest_other == 0:
                other[unknown[0]] = math.prod(rest) // rest_other
    if not all(isinstance(d, int) for d in (*a[i:], *b[j:])):
        return None
    while i < len(a) and j < len(b):
        ia, jb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                ia.append(i)
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                jb.append(j)
                j += 1
            else:
                return None
        groups.append((ia, jb))
    if math.prod(a[i:]) != 1 or math.prod(b[j:]) != 1 or not groups:
        return None
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups, a, b
