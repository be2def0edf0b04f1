"""Exact layer fusions, one module per family."""
