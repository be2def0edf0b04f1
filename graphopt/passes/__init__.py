"""graphopt's rewrite passes. Importing this package registers every built-in pass."""

# blocks before pruning: within Stage.PRUNE, whole blocks go before channels are counted.
from graphopt.passes import (  # noqa: F401
    blocks,
    decomposition,
    erasure,
    factorization,
    fusion,
    pruning,
    quantization,
    sparsity,
)
from graphopt.passes.sparsity import lowering  # noqa: F401  (registration)
