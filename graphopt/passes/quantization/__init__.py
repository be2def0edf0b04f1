"""Quantization (lossy, ``Stage.QUANTIZE``): INT8 static and dynamic, INT4 weight-only,
FP16/BF16 and FP8, placed where the target runtime fuses it.

``quantize.py`` is the pass (options in, one mode's function out); each mode lives in its own
module and is imported only when asked for, so registering the pass stays cheap.
"""

# requantize: TensorRT's --requantize symmetric, for models another tool quantized.
from graphopt.passes.quantization import quantize, requantize  # noqa: F401  (registration)
