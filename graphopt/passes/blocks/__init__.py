"""Block erasure: residual blocks scored on calibration data and the least useful removed."""

from graphopt.passes.blocks import erase  # noqa: F401  (registers the pass)
