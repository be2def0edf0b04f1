"""graphopt's rewrite passes. Importing this package registers every built-in pass."""

from graphopt.passes import erasure, fusion, pruning, quantization  # noqa: F401  (registration)
