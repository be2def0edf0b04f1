"""Structured pruning: remove channels, hidden units and heads of zero-invariant groups."""

from graphopt.passes.pruning import prune  # noqa: F401  (registers the pass)
