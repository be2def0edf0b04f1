"""Data for the lossy passes: calibration samples (a user's file or generated), running a model
to observe its tensors on them, and fidelity against the original model.

Shared by pruning, quantization and the passes that follow; no pass of its own.
"""

from graphopt.registry import PassOption

# The one declaration of ``--calib``: every lossy pass that takes calibration data lists this
# option, so the CLI builds one flag that reaches each of them (graphopt.registry.flag_owners).
CALIB_OPTION = PassOption(
    "calib",
    str,
    "",
    "calibration samples: one [N, ...] array per model input (random: generated)",
    flag="--calib",
    metavar="FILE.npz|random",
)
