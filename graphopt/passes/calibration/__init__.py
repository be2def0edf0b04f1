"""Data for the lossy passes: calibration samples (a user's file or generated), running a model
to observe its tensors on them, and fidelity against the original model.

Shared by pruning, quantization and the passes that follow; no pass of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphopt.registry import PassOption

if TYPE_CHECKING:
    import onnx_ir as ir

    from graphopt.passes.calibration.samples import CalibrationSet
    from graphopt.registry import PassContext

# The one declaration of ``--calib``: every lossy pass that takes calibration data lists this
# option, so the CLI builds one flag that reaches each of them (graphopt.registry.flag_owners).
CALIB_OPTION = PassOption(
    "calib",
    str,
    "",
    "calibration samples: one [N, ...] array per model input (random: generated)",
    flag="--calib",
    metavar="FILE.npz|random",
    # --calib "" (an unset variable) is refused, as --recipe "" is: not "no data".
    nonempty=True,
)
# The share of the calibration samples a lossy pass keeps out of fitting to measure its
# fidelity on (0: none held out). At most 0.9, so something is left to fit on.
HOLDOUT_OPTION = PassOption(
    "holdout",
    float,
    0.25,
    "share of calibration samples kept for fidelity",
    bounds=(0.0, 0.9),
)


def is_calibration_file(calib: str | None) -> bool:
    """True when ``--calib`` names a file of real samples, not ``random`` or nothing: only
    then do the lossy passes pick their data-aware defaults."""
    return bool(calib) and calib != "random"


def fill_defaults(
    given: dict[str, str | None],
    calib: str | None,
    data_aware: dict[str, str],
    data_free: dict[str, str],
) -> tuple[dict[str, str], tuple[str, ...], bool]:
    """A lossy pass's choices with the unset ones (None or "") filled from the defaults that
    fit ``calib``: (values, the names defaulted in ``given``'s order, whether the defaults were
    the data-aware ones). A choice the caller set is kept as given, even when it equals a
    default; the pass validates it."""
    aware = is_calibration_file(calib)
    defaults = data_aware if aware else data_free
    defaulted = tuple(name for name, value in given.items() if not value)
    values = {name: value or defaults[name] for name, value in given.items()}
    return values, defaulted, aware


def calibration_for(
    owner: str, source: str, model: ir.Model, context: PassContext, fitted: str
) -> CalibrationSet:
    """The samples ``--calib SOURCE`` names for pass ``owner``: a user's ``.npz`` file, or
    ``random`` (generated inputs at the run's shapes, with a warning in the report that says
    what was ``fitted`` on them). The caller handles an empty ``source`` (whether it may run
    without data is the pass's own rule). Numerics are imported only when data is asked for.
    """
    if source == "random":
        context.note(
            f"warning: --calib random: {fitted} on generated inputs, not real data; fidelity "
            "numbers are on generated inputs too"
        )
        from graphopt.passes.calibration.samples import random_calibration

        calib = random_calibration(model, dict(context.input_shapes), owner=owner)
        if calib.note:  # sizes enlarged, or samples fed one at a time: said, not hidden
            context.note(calib.note)
        return calib
    from graphopt.passes.calibration.samples import load_calibration

    return load_calibration(source, model)


def choices_note(
    owner: str,
    choices: dict[str, str],
    defaulted: tuple[str, ...],
    data_aware: bool,
    calib: str | None,
    no_data: str,
    flag_prefix: str = "--",
) -> str:
    """One report line of a lossy pass's choices (``criterion l2 (default), ...``), the
    defaulted ones marked, and why those defaults: with a calibration file, ``--calib
    random`` (generated data) or no data at all (``no_data`` says what that allows)."""
    parts = [f"{name} {value}" + (" (default)" if name in defaulted else "")
             for name, value in choices.items()]  # fmt: skip
    line = f"{owner}: " + ", ".join(parts)
    if not defaulted:
        return line
    if data_aware:
        why = "defaults with a calibration file"
    elif calib == "random":
        why = "data-free defaults: --calib random is generated data"
    else:
        why = f"data-free defaults: {no_data}"
    flags = "/".join(flag_prefix + name for name in defaulted)
    return f"{line}; {why} ({flags} to choose)"
