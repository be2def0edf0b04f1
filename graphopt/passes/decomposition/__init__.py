"""Module-level decomposition (MoDeGPT): MLP, Q/K and V/O inner dimensions reduced jointly."""

from graphopt.passes.decomposition import decompose  # noqa: F401  (registers the pass)
