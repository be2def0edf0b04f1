"""graphopt's rewrite passes. Importing this package registers every built-in pass."""

# TensorRT's --requantize symmetric (a lossy pass that lives with the TensorRT backend).
from graphopt.backends.tensorrt import requantize  # noqa: F401  (registration)
from graphopt.passes import erasure, fusion, pruning, quantization, sparsity  # noqa: F401
from graphopt.passes.sparsity import lowering  # noqa: F401  (registration)
