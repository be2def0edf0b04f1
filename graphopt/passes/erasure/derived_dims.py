"""Which symbolic dims inference derives from the graph inputs, as opposed to declared ones.

:func:`~graphopt.analysis.shapes.reconcile_shapes` keeps a declared input symbol where
inference finds only an unknown dim and its two bindings of the inputs do not contradict it
(the fusions match on the exporters' names). Those bindings give every symbol the same
size, so they cannot tell ``S`` from ``T``: a value_info that calls ``z[N, T, 8]`` (a Slice
whose end is computed, which inference leaves ``[N, ?, 8]``) ``[N, S, 8]`` stands. A pass
that equates two tensors' dims by their names (reshape-target copying a dim, noop-ops
removing a Reshape to the "same" shape) would fold that lie into the graph. So such a pass
asks :class:`DerivedDims`: a name counts only where inference from the graph inputs alone,
on a copy with every intermediate shape forgotten, puts that input symbol there too, or,
where that inference finds no name at all (a position table sliced by a Range over the
sequence length: every decoder export), where inference with the shape arithmetic folded,
at two bindings of the inputs in which distinct symbols take distinct sizes, gives that
symbol's size both times (the rule a declared int meets).
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.analysis.contrib_shapes import replace_contrib_ops
from graphopt.analysis.shapes import (
    Check,
    concrete_checks,
    distinct_bindings,
    input_symbols,
    onnx_inference,
)

# Per value name: its dims as inference derives them, the input symbol's name or None.
Derived = dict[str, tuple[str | None, ...]]


class DerivedDims:
    """Input symbols as inference derives them for ``model``, computed on first use (a pass
    that never compares names across tensors pays nothing); valid while the pass runs."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._symbols = input_symbols(model)
        self._derived: Derived | None = None
        self._checks: list[Check] | None = None

    def symbol(self, value: ir.Value | None, axis: int) -> str | None:
        """The input symbol ``value`` has at ``axis`` when its shape says so and inference
        from the graph inputs derives it there too, else None."""
        declared = _symbol_at(value, axis)
        if value is None or declared is None or declared not in self._symbols:
            return None
        if value.graph is self._model.graph and value.is_graph_input():
            return declared  # the model's inputs declare the symbols: nothing to derive
        if self._derived is None:
            self._derived = _derive(self._model, self._symbols)
        derived = self._derived.get(value.name or "")
        if derived is not None and axis < len(derived) and derived[axis] == declared:
            return declared
        if derived is not None and axis < len(derived) and derived[axis] is not None:
            return None  # inference names another symbol there: the declaration is wrong
        return declared if self._confirmed(value, axis, declared) else None

    def _confirmed(self, value: ir.Value, axis: int, declared: str) -> bool:
        """Whether folded inference at both distinct bindings gives ``declared``'s size at
        ``axis`` of ``value`` (computed once, on the first dim symbolic inference left
        unnamed)."""
        if self._checks is None:
            self._checks = _concrete(self._model)
        if not self._checks:
            return False
        for shapes, sizes in self._checks:
            shape = shapes.get(value.name or "")
            if shape is None or axis >= len(shape) or shape[axis] != sizes.get(declared):
                return False
        return True

    def same(self, a: ir.Value | None, a_axis: int, b: ir.Value | None, b_axis: int) -> bool:
        """Whether dim ``a_axis`` of ``a`` and ``b_axis`` of ``b`` are one input symbol, by
        what inference derives (equal names at run time: the inputs' shapes promise it)."""
        name = self.symbol(a, a_axis)
        return name is not None and name == self.symbol(b, b_axis)


def _symbol_at(value: ir.Value | None, axis: int) -> str | None:
    """The name of ``value``'s symbolic dim ``axis`` (None: an int, unknown or unnamed)."""
    shape = value.shape if value is not None else None
    if shape is None or not 0 <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim.value if isinstance(dim, ir.SymbolicDim) else None


def _derive(model: ir.Model, symbols: set[str]) -> Derived:
    """Inference on a copy whose node outputs forgot their shapes: per value name, the input
    symbols it derives (names made up by inference are None: another run may reuse them)."""
    copy = model.clone()
    graphs = list(copy.graphs())
    for graph in graphs:
        # Contrib ops have no onnx inference: standard stand-ins carry the shapes past them.
        replace_contrib_ops(graph)
    for graph in graphs:
        for node in graph:
            for value in node.outputs:
                if value.const_value is None:
                    value.shape = None
    onnx_inference(copy)  # never raises: a failed inference derives nothing
    found: dict[str, set[tuple[str | None, ...]]] = {}
    for graph in graphs:
        for node in graph:
            for value in node.outputs:
                if value.name and value.shape is not None:
                    dims = tuple(_known_symbol(d, symbols) for d in value.shape)
                    found.setdefault(value.name, set()).add(dims)
    # A name two scopes use with different shapes: trust neither.
    return {name: next(iter(dims)) for name, dims in found.items() if len(dims) == 1}


def _known_symbol(dim: int | ir.SymbolicDim, symbols: set[str]) -> str | None:
    return dim.value if isinstance(dim, ir.SymbolicDim) and dim.value in symbols else None


def _concrete(model: ir.Model) -> list[Check]:
    """Folded inference at the two distinct bindings of the inputs (none when it fails)."""
    return concrete_checks(model, [], fold=True, bindings=distinct_bindings(model))
