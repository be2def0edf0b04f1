"""graphopt's rewrite passes. Importing this package registers every built-in pass."""

# TensorRT's --requantize symmetric (a lossy pass that lives with the TensorRT backend).
from graphopt.backends.tensorrt import requantize  # noqa: F401  (registration)

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
