"""Input dims named by an expression of other dims, and the bindings that follow them.

optimum and the TorchScript exporter name an attention mask's length ``past_sequence_length
+ sequence_length``: not a dim of its own but the sum of two others. Bound on its own (16
beside a past of 32 and a sequence of 16) the model indexes past the mask and ORT fails in a
Gather, so such a dim follows its terms wherever dims are bound (:func:`follow_expressions`,
called by :mod:`graphopt.inputs` for both verification shapes, the enlarged retries,
``compare`` and ``--calib random``), and ``--input-shape`` values that contradict it are
refused (:func:`check_expressions`). Read-only, like :mod:`graphopt.input_dims`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.input_dims import (
    dim_key,
    dim_keys,
    given_dims,
    graph_inputs,
    input_shape_flag,
    symbolic_dims,
)

# An expression tree: an int, a dim name, or (operator, left, right).
Expression = int | str | tuple[str, "Expression", "Expression"]

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][\w.]*)|([-+*()]))")


def parse_dim_expression(text: str) -> Expression | None:
    """``text`` as + - * of dim names and integers (parentheses allowed), or None when it is
    a plain name or not such an expression (``input[1]``, ``?``)."""
    tokens = _tokenize(text)
    if tokens is None or not any(t in ("+", "-", "*") for t in tokens):
        return None
    parser = _Parser(tokens)
    try:
        tree = parser.sum()
    except ValueError:
        return None
    return tree if parser.done() else None


def _tokenize(text: str) -> list[str] | None:
    tokens: list[str] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            return None
        tokens.append(match.group(match.lastindex or 0))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over the tokens: sum := product (('+'|'-') product)*, product :=
    atom ('*' atom)*, atom := int | name | '(' sum ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.index = 0

    def done(self) -> bool:
        return self.index == len(self.tokens)

    def _peek(self) -> str | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError("unexpected end")
        self.index += 1
        return token

    def sum(self) -> Expression:
        tree = self.product()
        while self._peek() in ("+", "-"):
            tree = (self._take(), tree, self.product())
        return tree

    def product(self) -> Expression:
        tree = self.atom()
        while self._peek() == "*":
            tree = (self._take(), tree, self.atom())
        return tree

    def atom(self) -> Expression:
        token = self._take()
        if token == "(":
            tree = self.sum()
            if self._take() != ")":
                raise ValueError("unbalanced")
            return tree
        if token.isdigit():
            return int(token)
        if token in ("+", "-", "*", ")"):
            raise ValueError(f"unexpected {token}")
        return token


def expression_terms(tree: Expression) -> set[str]:
    """The dim names ``tree`` reads."""
    if isinstance(tree, int):
        return set()
    if isinstance(tree, str):
        return {tree}
    return expression_terms(tree[1]) | expression_terms(tree[2])


def evaluate_expression(tree: Expression, dims: Mapping[str, int]) -> int | None:
    """``tree``'s value at ``dims``; None while a term is unbound."""
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        return dims.get(tree)
    left, right = evaluate_expression(tree[1], dims), evaluate_expression(tree[2], dims)
    if left is None or right is None:
        return None
    return left + right if tree[0] == "+" else left - right if tree[0] == "-" else left * right


def dim_expressions(model: ir.Model | ir.Graph, inferred: bool = True) -> dict[str, Expression]:
    """{key: expression} for the symbolic dims whose name is an expression of other symbolic
    dims of the inputs (``past_sequence_length + sequence_length``). A name whose terms are
    not all dims of the inputs stays a plain name: it may just contain a dash.

    ``inferred``: also a mask length read as past + sequence (:func:`_mask_totals`), which
    binds generated inputs; False for refusing what the user gave (a guess refuses nothing).
    """
    keys = set(symbolic_dims(model))
    expressions: dict[str, Expression] = {}
    for key in keys:
        tree = parse_dim_expression(key)
        if tree is not None and expression_terms(tree) <= keys - {key}:
            expressions[key] = tree
    if inferred:
        expressions.update(_mask_totals(model, keys, expressions))
    return expressions


_MASK_NAME = re.compile(r"mask", re.IGNORECASE)


def _mask_totals(
    model: ir.Model | ir.Graph, keys: set[str], known: Mapping[str, Expression]
) -> dict[str, Expression]:
    """{mask length: past + sequence} for a decoder exported with a symbol of its own for
    the mask (torch.export names it ``total`` beside ``seq`` and ``past_seq``).

    Nothing in such a graph states the relation (the mask is read through computed
    indices), yet the model fails unless it holds: an attention mask covers the cached and
    the new tokens. The evidence taken: the last dim of a ``*mask*`` input is a symbol no
    other input has, and the graph's outputs declare one sum of input dims (the present
    cache's ``past_seq + seq``). That sum binds the mask's length; anything less clear-cut
    leaves the dims independent.
    """
    graph = model.graph if isinstance(model, ir.Model) else model
    sums = {
        dim.value
        for output in graph.outputs
        for dim in (output.shape or ())
        if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in known
    }
    trees = [parse_dim_expression(text) for text in sorted(sums)]
    trees = [t for t in trees if t is not None and _is_sum_of(t, keys)]
    if len(trees) != 1:
        return {}
    places = symbolic_dims(model)
    totals: dict[str, Expression] = {}
    for value in graph_inputs(model):
        if not _MASK_NAME.search(value.name) or not value.shape:
            continue
        key = dim_key(value, len(value.shape) - 1)
        if key is None or key in known or key in expression_terms(trees[0]):
            continue
        owners = {other.name for other, _ in places.get(key, [])}
        if all(_MASK_NAME.search(name) for name in owners):
            totals[key] = trees[0]
    return totals


def _is_sum_of(tree: Expression, keys: set[str]) -> bool:
    """Whether ``tree`` adds two or more distinct dims of ``keys`` (``past_seq + seq``)."""
    if not isinstance(tree, tuple) or tree[0] != "+":
        return False
    terms = expression_terms(tree)
    return len(terms) >= 2 and terms <= keys


def follow_expressions(
    model: ir.Model | ir.Graph,
    dims: Mapping[str, int],
    fixed: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """``dims`` with every expression-named dim (:func:`dim_expressions`) set from its terms.

    ``fixed``: the dims the user bound (:func:`given_dims`). A fixed expression dim keeps its
    value, and where exactly one of its terms is free that term is solved for (a mask of 9
    given beside a sequence of 1 makes the past 8), rather than defaulted and contradicted.
    """
    bound = dict(dims)
    fixed = fixed or {}
    expressions = dim_expressions(model)
    for key, tree in expressions.items():
        if key in fixed:
            _solve_free_term(tree, fixed[key], bound, fixed)
    # Terms may themselves be expressions: a few passes settle any acyclic chain.
    for _ in range(len(expressions)):
        for key, tree in expressions.items():
            value = evaluate_expression(tree, bound)
            if key not in fixed and value is not None:
                bound[key] = value
    return bound


def _solve_free_term(
    tree: Expression, target: int, bound: dict[str, int], fixed: Mapping[str, int]
) -> None:
    """Set the one term of ``tree`` not in ``fixed`` so that ``tree`` is ``target``, where
    ``tree`` is linear in it with a whole, non-negative solution; else leave ``bound``."""
    free = [t for t in expression_terms(tree) if t not in fixed]
    if len(free) != 1:
        return
    term = free[0]
    at = [evaluate_expression(tree, {**bound, term: x}) for x in (0, 1, 2)]
    if any(v is None for v in at):
        return
    slope = at[1] - at[0]
    if slope == 0 or at[2] - at[1] != slope or (target - at[0]) % slope:
        return  # not linear in the term, or no whole solution
    value = (target - at[0]) // slope
    if value >= 0:
        bound[term] = value


def check_expressions(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse an expression-named dim (:func:`dim_expressions`) given at another size than
    its given terms make: a mask of 10 beside a past of 8 and a sequence of 1 is not a run
    the model takes (ORT fails in a Gather, or reads past the mask)."""
    given = given_dims(model, shapes)
    for key, tree in dim_expressions(model, inferred=False).items():
        value = evaluate_expression(tree, given)
        if key not in given or value is None or value == given[key]:
            continue
        name, shape = _first_given(model, shapes, key)
        terms = ", ".join(f"{t}={given[t]}" for t in sorted(expression_terms(tree)))
        flag = input_shape_flag(name, shape)
        raise UserInputError(
            f"{flag}: dim {key!r} is {given[key]} here, but the other shapes "
            f"give {terms}, so it must be {value}"
        )


def _first_given(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]], key: str
) -> tuple[str, tuple[int, ...]]:
    """The first given input (and its shape) that binds dim ``key``."""
    for value, _axis in symbolic_dims(model)[key]:
        shape = shapes.get(value.name)
        if shape is not None and len(shape) == len(value.shape or ()):
            return value.name, tuple(shape)
    raise KeyError(key)


def refuse_all_empty(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a zero-sized dim when it leaves every input empty: on empty tensors any rewrite
    compares equal. Where other inputs keep elements the run is meaningful, and some models
    need it: a decoder's first (prefill) step feeds an empty KV cache (past 1xHx0xD) beside
    the prompt's ids. (Outputs that still come back empty are refused by verification.)"""
    zero = [(name, tuple(shape)) for name, shape in shapes.items() if 0 in shape]
    if not zero:
        return
    given = given_dims(model, shapes)
    bound = follow_expressions(model, given, fixed=given)
    keys = dim_keys(model)
    for value in graph_inputs(model):
        if not _is_empty(value, shapes.get(value.name), bound, keys):
            return
    name, shape = zero[0]
    raise UserInputError(
        f"{input_shape_flag(name, shape)}: a zero-sized dim gives empty tensors, on which any "
        "rewrite compares equal; use dims of at least 1"
    )


def _is_empty(
    value: ir.Value,
    shape: tuple[int, ...] | None,
    bound: Mapping[str, int],
    keys: Mapping[tuple[str, int], str],
) -> bool:
    """Whether ``value`` is fed no elements: its given shape has a 0, or a declared dim of it
    is fixed at 0 or bound to 0 by the given shapes. Undeclared and not given: unknown, so
    not counted as empty."""
    if shape is not None:
        return 0 in shape
    if value.shape is None:
        return False
    for axis, dim in enumerate(value.shape):
        key = keys.get((value.name, axis))
        size = dim if key is None else bound.get(key)
        if size == 0:
            return True
    return False
