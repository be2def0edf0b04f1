"""Dims the ORT fusion rules may call equal: proven, never guessed.

onnxscript's shape checks compare dims with ``==``, under which onnx-ir's unknown dim
(``SymbolicDim(None)``) equals every other unknown dim. Two dims nobody knows are not the
same dim: a residual Add of ``[?, 4, 8]`` and ``[?, 4, 8]`` may broadcast a batch of 1, and a
fused op that assumes equal shapes then computes something else. Here a dim equals another
only when both are the same static int or the same *named* symbol.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

Dim = int | ir.SymbolicDim


def same_dim(a: Dim | None, b: Dim | None) -> bool:
    """``a`` and ``b`` are provably the same size (an unknown dim equals nothing)."""
    if a is None or b is None:
        return False
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.value is not None and a.value == b.value


def dims(value: ir.Value | None) -> tuple[Dim, ...] | None:
    """The dims of ``value`` when its rank is known, else None."""
    if value is None or value.shape is None:
        return None
    return tuple(value.shape.dims)


def same_shape(a: ir.Value | None, b: ir.Value | None) -> bool:
    """Both shapes known, of one rank, every dim provably equal."""
    left, right = dims(a), dims(b)
    if left is None or right is None or len(left) != len(right):
        return False
    return all(same_dim(x, y) for x, y in zip(left, right, strict=True))


def one_or(dim: Dim, other: Dim | None) -> bool:
    """``dim`` is a static 1 (broadcasts) or provably ``other``."""
    return (isinstance(dim, int) and dim == 1) or same_dim(dim, other)


def matches(value: ir.Value | None, expected: Sequence[Dim | None]) -> bool:
    """``value`` has exactly ``len(expected)`` dims, each provably equal to its expected one."""
    found = dims(value)
    if found is None or len(found) != len(expected):
        return False
    return all(same_dim(x, y) for x, y in zip(found, expected, strict=True))
