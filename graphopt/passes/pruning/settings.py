"""What a pruning run is asked to do: target, criterion, allocation, rounding, compensation."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.errors import UserInputError
from graphopt.passes.calibration import fill_defaults

CRITERIA = ("l1", "l2", "bn_scale", "activation", "fluctuation", "reconstruction")
DATA_CRITERIA = ("activation", "fluctuation", "reconstruction")
ALLOCATIONS = ("uniform", "global")
COMPENSATIONS = ("none", "bias", "lsq")
TARGET_KINDS = ("flops", "params")

# The three choices a user may leave unset, resolved by :func:`resolve_choices`.
CHOICES = ("criterion", "compensation", "allocation")
# Without real data (no calibration, or ``--calib random``: generated inputs, whose statistics
# say nothing about the data the model will see) only the data-free choices are safe.
DATA_FREE_DEFAULTS = {"criterion": "l2", "compensation": "none", "allocation": "uniform"}
# With a calibration file: the setting that measured best across the project's real-weight
# models, fidelity weighed against time (bench/prune_defaults.py; BENCHMARKS.md, "Pruning
# defaults").
DATA_AWARE_DEFAULTS = {"criterion": "reconstruction", "compensation": "lsq", "allocation": "global"}


@dataclass(frozen=True)
class PruneTarget:
    """Remove ``ratio`` of the model's ``kind`` (FLOPs or parameters)."""

    kind: str
    ratio: float

    @classmethod
    def parse(cls, text: str) -> PruneTarget:
        kind, sep, number = str(text).partition("=")
        kind = kind.strip().lower()
        try:
            ratio = float(number)
        except ValueError:
            ratio = -1.0
        if not sep or kind not in TARGET_KINDS or not 0.0 < ratio < 1.0:
            raise UserInputError(
                f"--prune {text!r}: expected flops=R or params=R with 0 < R < 1 "
                "(the fraction to remove), e.g. flops=0.3"
            )
        return cls(kind, ratio)

    def __str__(self) -> str:
        return f"{self.kind}={self.ratio:g}"


@dataclass(frozen=True)
class PruneSettings:
    target: PruneTarget
    criterion: str = "l2"
    allocation: str = "uniform"
    # No group loses more than this fraction of its units (global allocation above all).
    max_group_ratio: float = 0.8
    # Kept channel counts are multiples of this; None picks the documented default.
    round_to: int | None = None
    compensation: str = "none"
    # Ridge strength relative to the mean diagonal of the activation covariance.
    ridge: float = 0.3
    # Fraction of the calibration samples held out for the fidelity report (never fitted on).
    holdout: float = 0.25
    # Check that removing the chosen units equals zeroing them (zig_check.check_chosen) and
    # refuse the result otherwise; off with --no-verify.
    check: bool = True

    def __post_init__(self) -> None:
        for value, allowed, flag in (
            (self.criterion, CRITERIA, "--criterion"),
            (self.allocation, ALLOCATIONS, "--allocation"),
            (self.compensation, COMPENSATIONS, "--compensation"),
        ):
            if value not in allowed:
                # --compensation also takes eora:RANK (resolved before these settings).
                listed = [*allowed, "eora:RANK"] if flag == "--compensation" else allowed
                raise UserInputError(f"{flag} {value!r}: choose one of {', '.join(listed)}")
        if self.round_to is not None and self.round_to < 1:
            raise UserInputError(f"--round-to {self.round_to}: must be a positive integer")
        if not 0.0 < self.max_group_ratio <= 1.0:
            raise UserInputError("max_group_ratio must be in (0, 1]")

    @property
    def needs_data(self) -> bool:
        return self.criterion in DATA_CRITERIA or self.compensation != "none"


@dataclass(frozen=True)
class Choices:
    """Criterion, compensation and allocation of a run, and which of them were defaults."""

    criterion: str
    compensation: str
    allocation: str
    # The names (of CHOICES) the caller left unset, in CHOICES order.
    defaulted: tuple[str, ...] = ()
    # Whether those defaults were the calibration-file ones (else the data-free ones).
    data_aware: bool = False

    def note(self, calib: str | None) -> str:
        """One report line: every choice, the defaulted ones marked, and why those defaults."""
        from graphopt.passes.calibration import choices_note

        choices = {name: getattr(self, name) for name in CHOICES}
        return choices_note(
            "prune", choices, self.defaulted, self.data_aware, calib, "no calibration data", "--"
        )


def resolve_choices(
    criterion: str | None,
    compensation: str | None,
    allocation: str | None,
    calib: str | None,
) -> Choices:
    """Fill the choices the caller left unset (None or "") from the defaults that fit ``calib``.

    The one place defaults are decided, so that the CLI, the API and recipes agree: an unset
    choice takes :data:`DATA_AWARE_DEFAULTS` when ``calib`` is a file, else
    :data:`DATA_FREE_DEFAULTS`; a choice the caller set is kept as given (and validated later
    by :class:`PruneSettings`), even when it equals a default.
    """
    given = {"criterion": criterion, "compensation": compensation, "allocation": allocation}
    values, defaulted, data_aware = fill_defaults(
        given, calib, DATA_AWARE_DEFAULTS, DATA_FREE_DEFAULTS
    )
    return Choices(**values, defaulted=defaulted, data_aware=data_aware)
