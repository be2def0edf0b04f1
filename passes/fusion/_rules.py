"""What the pattern fusions share: a pass running onnxscript rewrite rules, gated by opset.

Each pattern fusion (LayerNorm, Gelu, RMSNorm, activations) is a set of onnxscript
``RewriteRule`` groups, each needing a minimum default-domain opset for the op it creates.
A group whose op the model's opset lacks is not applied: it is tried on a throwaway clone
instead, so that the report can say how many matches ``--opset N`` would fuse.

The rules' own check functions read constants through the helpers here, which are strict on
purpose: a constant matches only when it is a float scalar of the input's dtype, whose shape
cannot broadcast the result up, and whose value is within ``RTOL`` of the expected number.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.registry import GraphPass, Stage

# Exported constants are float32 roundings of the exact numbers (e.g. sqrt(2) ≈ 1.4142135):
# relative error ≤ 6e-8. 1e-6 accepts those and refuses anything that is really different.
RTOL = 1e-6


@dataclass(frozen=True)
class RuleGroup:
    """Rules creating ``op`` (which needs default-domain opset ``min_opset``)."""

    op: str
    min_opset: int
    make_rules: Callable[[], Sequence[pattern.RewriteRule]]
    commute: bool = True


class RuleFusionPass(GraphPass):
    """Base of the onnxscript-rule fusions; subclasses list their groups in ``groups``."""

    stage = Stage.FUSION
    exact = True
    handles_subgraphs = True
    # Op types whose presence makes the pass worth running (cheap pre-filter).
    trigger_ops: ClassVar[tuple[str, ...]] = ()
    # Op types that must all be present (every pattern of the pass contains them).
    required_ops: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def groups(self) -> list[RuleGroup]:
        """The rule groups, in the order they run."""

    def rewrite(self, model: ir.Model) -> int:
        present = {n.op_type for n in editing.all_nodes(model) if editing.is_op(n, n.op_type)}
        # Matching every rule at every node is the expensive part: skip models that lack an
        # op every pattern of this pass needs.
        if self.trigger_ops and not present.intersection(self.trigger_ops):
            return 0
        if not present.issuperset(self.required_ops):
            return 0
        infer_shapes(model)
        opset = _common.default_opset(model)
        hits = 0
        scratch: ir.Model | None = None
        missed: dict[tuple[str, int], int] = {}
        # Groups run in order, each over the whole model: a group with the larger pattern
        # goes first, as onnxscript tries rules node by node and the smaller pattern's root
        # comes first in the graph.
        for group in self.groups():
            rules = pattern.RewriteRuleSet(list(group.make_rules()), commute=group.commute)
            if opset >= group.min_opset:
                from graphopt.ortrun import has_kernel  # onnxruntime only when needed

                if not has_kernel(group.op, opset):
                    self.context.note(
                        f"{self.name}: ONNX Runtime has no {group.op} kernel at opset {opset}; "
                        "not fused"
                    )
                    continue
                hits += rules.apply_to_model(model)
                continue
            # Dry run on a copy: how many fusions the user misses at this opset.
            scratch = scratch if scratch is not None else model.clone()
            key = (group.op, group.min_opset)
            missed[key] = missed.get(key, 0) + rules.apply_to_model(scratch)
        for (op, min_opset), count in missed.items():
            if count:
                self.context.note(
                    f"{self.name}: {count} {op} match(es) need opset {min_opset} "
                    f"(model has {opset}); rerun with --opset {min_opset}"
                )
        return hits


def infer_shapes(model: ir.Model) -> None:
    """Fill in shapes (ranks decide whether a [1]-shaped constant can broadcast a result up)."""
    # Best effort: the checks refuse what stays unknown.
    with contextlib.suppress(Exception):
        onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False)(model)


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def scalar(value: ir.Value | None, like: ir.Value | None) -> float | None:
    """A constant float scalar that combines with ``like`` without changing its shape or dtype.

    Shape-[1] constants (common in exports) qualify only when ``like``'s rank is known to be
    at least their rank, since against a rank-0 tensor they would broadcast the result to [1].
    """
    array = editing.constant_array(value, max_bytes=64)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    if like is not None and like.dtype is not None and value.dtype != like.dtype:
        return None
    if array.ndim > 0:
        like_rank = rank(like)
        if like_rank is None or like_rank < array.ndim:
            return None
    return float(array.reshape(()))


def is_scalar(value: ir.Value | None, like: ir.Value | None, expected: float) -> bool:
    got = scalar(value, like)
    return got is not None and bool(np.isclose(got, expected, rtol=RTOL, atol=0.0))


def is_exponent(value: ir.Value | None, x: ir.Value, expected: float) -> bool:
    """Pow's exponent: may have another dtype than the base (an int exponent is common)."""
    array = editing.constant_array(value, max_bytes=64)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return False
    x_rank = rank(x)
    if array.ndim > 0 and (x_rank is None or x_rank < array.ndim):
        return False
    return float(array.reshape(())) == expected


def reduce_axes(node: ir.Node) -> list[int] | None:
    """A Reduce* node's axes (attribute before opset 18, input after); None when unknown.

    An empty list means "all axes" (noop_with_empty_axes=0), the caller resolves it by rank.
    """
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return editing.const_ints(node.inputs[1])
    axes = editing.attribute(node, "axes")
    if axes is not None:
        return [int(a) for a in axes]
    if editing.attribute(node, "noop_with_empty_axes", 0):
        return None  # would be an Identity: not a normalization
    return []


def trailing_axis(axes: list[int], x_rank: int | None) -> int | None:
    """The ``axis`` attribute for a reduction over ``axes`` if they are a trailing block."""
    if not axes:
        return 0 if x_rank is not None else None
    if x_rank is None:
        if any(a >= 0 for a in axes):
            return None
        normalized = sorted(set(axes))
        count = len(normalized)
        return -count if normalized == list(range(-count, 0)) else None
    if any(a < -x_rank or a >= x_rank for a in axes):
        return None
    normalized = sorted({a % x_rank for a in axes})
    start = x_rank - len(normalized)
    if normalized != list(range(start, x_rank)):
        return None
    return start - x_rank  # negative: stays right if a later pass changes leading dims


def affine_param(value: ir.Value, x: ir.Value, axis: int) -> ir.Value | np.ndarray | None:
    """``value`` as LayerNormalization/RMSNormalization scale or bias, or None if it can't be.

    It must be a float constant of x's dtype that spans exactly the normalized dims: ORT
    checks that the scale has as many elements as the normalized block. Leading 1-dims are
    dropped (the array comes back, for a new Constant) when x's rank shows they cannot
    broadcast the result up.
    """
    array = editing.constant_array(value)
    if array is None or value.dtype != x.dtype or array.dtype.kind != "f":
        return None
    count = -axis if axis < 0 else None
    x_rank = rank(x)
    if count is None:
        if x_rank is None:
            return None
        count = x_rank - axis
    stripped = array.shape
    while len(stripped) > count and stripped[0] == 1:
        stripped = stripped[1:]
    if len(stripped) != count:
        return None
    if array.ndim > count and (x_rank is None or x_rank < array.ndim):
        return None
    dims = x.shape.dims[-count:] if x.shape is not None else [None] * count
    for have, want in zip(stripped, dims, strict=True):
        if isinstance(want, int):
            if have != want:
                return None
        elif have == 1:
            return None  # x's dim may be larger: the original broadcasts, ORT would refuse
    return value if array.ndim == count else array.reshape(stripped)


def ones(x: ir.Value, axis: int) -> np.ndarray | None:
    """A unit scale for a LayerNorm without gamma (needs the normalized dims to be static)."""
    if x.shape is None:
        return None
    dims = x.shape.dims[axis:]
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    return np.ones(tuple(int(d) for d in dims), dtype=np.float32)


def as_input(op, param: ir.Value | np.ndarray) -> ir.Value:
    """In a rule's ``rewrite``: the value itself, or a new Constant for a reshaped array."""
    if isinstance(param, np.ndarray):
        return op.Constant(value=ir.tensor(param))
    return param
