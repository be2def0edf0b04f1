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

    def __init__(self, opsets: Mapping[str, int] | None = None) -> None:
        self.known: dict[int, tuple[int, ...]] = {}
        # (id(value), axis) → size learned through an identity coupling.
        self.sizes: dict[tuple[int, int], int] = {}
        # The model's opset imports: attribute defaults and meanings changed across opsets
        # (Softmax's axis, Split's sizes, Slice's bounds...), so a rule must know which
        # version of its op the node is.
        self.opsets: dict[str, int] = dict(opsets or {})

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
            return None
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
