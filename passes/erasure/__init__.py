"""Exact erasure passes: dead and no-op ops, constant folding, CSE, dedup."""

from graphopt.passes.erasure import (  # noqa: F401  (imported for registration)
    dead_code,
)
