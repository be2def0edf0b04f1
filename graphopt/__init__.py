"""graphopt: compiler-style graph rewriting for exported ONNX neural-network graphs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphopt import _deferred

# Before anything imports onnx-ir: its sympy import is start-up time most runs never use.
_deferred.defer_heavy_imports()

if TYPE_CHECKING:
    from graphopt.api import OptimizeResult, optimize

__version__ = "0.1.0"
__all__ = ["OptimizeResult", "__version__", "optimize"]


def __getattr__(name: str):
    # The API is imported on first use, so that `graphopt --help` and `graphopt passes`
    # do not pay for onnx, onnx-ir and numpy.
    if name in ("optimize", "OptimizeResult"):
        from graphopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
