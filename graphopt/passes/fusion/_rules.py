"""What the pattern fusions share: a pass running onnxscript rewrite rules, gated by opset.

Each pattern fusion (LayerNorm, Gelu, RMSNorm, activations) is a set of onnxscript
``RewriteRule`` groups, each needing a minimum default-domain opset for the op it creates.
A group whose op the model's opset lacks is not applied: its matches are only counted
(nothing is rewritten), so that the report can say how many ``--opset N`` would fuse.

``commute=True`` turns one rule into every input order of its Add/Mul nodes (up to ~1000
variants for Gelu), and onnxscript tries every variant at every node. Each rule is therefore
wrapped in a structural pre-check: the op types along the pattern's producer chains must
appear at the same input positions in the graph before the full matcher runs.

The rules' own check functions read constants through the helpers here, which are strict on
purpose: a constant matches only when it is a float scalar of the input's dtype, whose shape
cannot broadcast the result up, and whose value is within ``RTOL`` of the expected number.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript.rewriter import pattern

from graphopt import editing
from graphopt.passes.fusion import _common
from graphopt.private_apis import pattern_ir as _pattern_ir
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

    @classmethod
    def applies(cls, op_types: frozenset[str]) -> bool:
        # The same test ``rewrite`` makes first (there on default-domain ops only).
        if cls.trigger_ops and op_types.isdisjoint(cls.trigger_ops):
            return False
        return op_types.issuperset(cls.required_ops)

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
        missed: dict[tuple[str, int], int] = {}
        claimed: set[ir.Node] = set()  # nodes a counted (not applied) match would replace
        # Groups run in order, each over the whole model: a group with the larger pattern
        # goes first, as onnxscript tries rules node by node and the smaller pattern's root
        # comes first in the graph.
        for group in self.groups():
            rules = plausible_rules(group.make_rules(), group.commute, model)
            if not rules:
                continue
            if opset >= group.min_opset:
                from graphopt.ortrun import has_kernel  # onnxruntime only when needed

                if not has_kernel(group.op, opset):
                    self.context.note(
                        f"{self.name}: ONNX Runtime has no {group.op} kernel at opset {opset}; "
                        "not fused"
                    )
                    continue
                hits += pattern.RewriteRuleSet(rules).apply_to_model(model)
                continue
            # Count only: how many fusions the user misses at this opset.
            key = (group.op, group.min_opset)
            missed[key] = missed.get(key, 0) + count_matches(rules, model, claimed)
        for (op, min_opset), count in missed.items():
            if count:
                # The pass runs before and after --quantize, which may raise the opset in
                # between (9 -> 13): the note of the opset the model is written at stands.
                marker = f" {op} match(es) need opset {min_opset} "
                self.context.notes[:] = [
                    note
                    for note in self.context.notes
                    if not (note.startswith(f"{self.name}: ") and marker in note)
                ]
                self.context.note(
                    f"{self.name}: {count} {op} match(es) need opset {min_opset} "
                    f"(model has {opset}); rerun with --opset {min_opset}"
                )
        return hits


# The ops GraphPattern.commute() swaps the inputs of (onnxscript keeps this list private).
_COMMUTATIVE_OPS = frozenset(
    ("", op, "")
    for op in (
        *("Add", "Mul", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr", "BitwiseXor"),
        *("Equal", "Max", "Mean", "Min", "Sum"),
    )
)


class _AnchoredRule:
    """A rewrite rule that rejects a node cheaply when the pattern's op types cannot match.

    Everything but ``try_rewrite`` is the wrapped rule's (RewriteRuleSet reads ``name``,
    ``remove_nodes``, ``as_function`` and the visitors).
    """

    def __init__(self, rule: pattern.RewriteRule) -> None:
        self._rule = rule
        self.root = _root(rule)

    def __getattr__(self, name: str):
        return getattr(self._rule, name)

    def __str__(self) -> str:
        return str(self._rule)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        if self.root is not None and not could_match(self.root, node):
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


def _root(rule: pattern.RewriteRule) -> _pattern_ir.NodePattern | None:
    # Private in onnxscript, but stable: the GraphPattern a rule matches. Multi-output
    # patterns have no single root to pre-check, so they always go to the matcher.
    target = rule._target_pattern
    return target.output_nodes[0] if target.has_single_output_node else None


def could_match(
    pattern_node: _pattern_ir.NodePattern, node: ir.Node, *, commuted: bool = False
) -> bool:
    """A necessary condition for onnxscript's matcher to match ``pattern_node`` at ``node``.

    Compares only fixed op types, input counts and which inputs are computed by which op;
    whatever it cannot judge (op alternatives, constants, variables) it lets through.
    ``commuted``: also accept the input orders ``GraphPattern.commute()`` would generate.
    """
    op = pattern_node.op
    if isinstance(op, _pattern_ir.StringConstantPattern) and op.value() != node.op_type:
        return False
    patterns = pattern_node.inputs
    if len(node.inputs) > len(patterns) and not pattern_node.allow_other_inputs:
        return False
    if commuted and pattern_node.op_identifier() in _COMMUTATIVE_OPS:
        if len(patterns) != 2:
            return True
        return _inputs_could_match(patterns, node, commuted) or _inputs_could_match(
            patterns[::-1], node, commuted
        )
    return _inputs_could_match(patterns, node, commuted)


def _inputs_could_match(patterns, node: ir.Node, commuted: bool) -> bool:
    for value, value_pattern in zip(node.inputs, patterns, strict=False):
        if not isinstance(value_pattern, _pattern_ir.NodeOutputPattern):
            continue
        producer = value.producer() if value is not None else None
        if producer is None or value.index() != value_pattern.output_index:
            return False
        if not could_match(value_pattern.producer(), producer, commuted=commuted):
            return False
    return True


def plausible_rules(
    rules: Sequence[pattern.RewriteRule], commute: bool, model: ir.Model
) -> list[_AnchoredRule]:
    """The (commuted) rules that pass ``could_match`` at some node of ``model``, in order.

    What ``RewriteRuleSet(rules, commute=commute)`` would try, less the rules that cannot
    match anywhere. Commuting is the costly step (one rule becomes up to 2^k patterns), so
    a rule is commuted only when one of its input orders passes the pre-check somewhere.
    The replacements create the fused op, which no pattern contains: a rewrite never makes
    another rule of the group plausible.
    """
    by_op: dict[str, list[ir.Node]] = {}
    every: list[ir.Node] = []
    functions = (node for f in model.functions.values() for node in f)
    for node in itertools.chain(editing.all_nodes(model), functions):
        by_op.setdefault(node.op_type, []).append(node)
        every.append(node)

    def candidates(root: _pattern_ir.NodePattern) -> list[ir.Node]:
        op = root.op
        if isinstance(op, _pattern_ir.StringConstantPattern):
            return by_op.get(op.value(), [])
        return every

    kept: list[_AnchoredRule] = []
    for rule in rules:
        root = _root(rule)
        if root is not None and not any(
            could_match(root, n, commuted=commute) for n in candidates(root)
        ):
            continue
        for variant in rule.commute() if commute else [rule]:
            anchored = _AnchoredRule(variant)
            if anchored.root is None or any(
                could_match(anchored.root, n) for n in candidates(anchored.root)
            ):
                kept.append(anchored)
    return kept


def count_matches(rules: Sequence[_AnchoredRule], model: ir.Model, claimed: set[ir.Node]) -> int:
    """How many rewrites ``RewriteRuleSet(rules).apply_to_model`` would make, changing nothing.

    Like onnxscript, the first rule whose rewrite succeeds at a node wins. A match that
    shares a node with an earlier one (in ``claimed``, updated here) is not counted: applied
    for real, the earlier rewrite would have removed that node.
    """

    def walk(graph: ir.Graph | ir.Function) -> int:
        count = 0
        for node in graph:
            for rule in rules:
                delta = rule.try_rewrite(model, graph, node)
                if delta is None:
                    continue
                nodes = set(delta.match.nodes)
                if nodes.isdisjoint(claimed):
                    claimed.update(nodes)
                    count += 1
                    break
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    count += walk(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    count += sum(walk(sub) for sub in attr.value)
        return count

    # apply_to_model does this first too: the rules' checks read Constant nodes' values.
    onnxscript.optimizer.basic_constant_propagation(model.graph)
    total = walk(model.graph)
    for function in model.functions.values():
        onnxscript.optimizer.basic_constant_propagation(function)
        total += walk(function)
    return total


def infer_shapes(model: ir.Model) -> None:
    """Fill in shapes (ranks decide whether a [1]-shaped constant can broadcast a result up)."""
    # Best effort: the checks refuse what stays unknown.
    with contextlib.suppress(Exception):
        editing.fill_missing_shapes(model)


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
