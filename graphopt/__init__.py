"""graphopt: compiler-style graph rewriting for exported ONNX neural-network graphs."""

from graphopt.api import OptimizeResult, optimize

__version__ = "0.1.0"
__all__ = ["OptimizeResult", "__version__", "optimize"]
