"""Weight sparsity: N:M, block and unstructured patterns, stored dense-with-zeros."""

from graphopt.passes.sparsity import sparsify  # noqa: F401  (registers the pass)
