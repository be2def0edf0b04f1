"""Exact erasure passes: dead and no-op ops, constant folding, CSE, dedup.

The import order is the order passes run in within a stage.
"""

# isort: off
from graphopt.passes.erasure import (  # noqa: F401  (imported for registration)
    # isort: on
    initializer_inputs,
    shape_folding,
    shape_reads,  # shape-through-slice, shape-concat
    constant_folding,
    identity,
    dropout,
    noop_ops,
    squeeze_unsqueeze,
    transpose_merge,  # also registers transpose-into-reshape
    reshape_merge,
    reshape_target,
    cse,
    dedup_initializers,
    dead_code,
)
# isort: on
