"""Low-rank factorization of single weights (plain and activation-aware SVD)."""

from graphopt.passes.factorization import factorize  # noqa: F401  (registers the pass)
