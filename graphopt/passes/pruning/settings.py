"""What a pruning run is asked to do: target, criterion, allocation, rounding, compensation."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.errors import UserInputError

CRITERIA = ("l1", "l2", "bn_scale", "activation", "fluctuation", "reconstruction")
DATA_CRITERIA = ("activation", "fluctuation", "reconstruction")
ALLOCATIONS = ("uniform", "global")
COMPENSATIONS = ("none", "bias", "lsq")
TARGET_KINDS = ("flops", "params")


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

    def __post_init__(self) -> None:
        for value, allowed, flag in (
            (self.criterion, CRITERIA, "--criterion"),
            (self.allocation, ALLOCATIONS, "--allocation"),
            (self.compensation, COMPENSATIONS, "--compensation"),
        ):
            if value not in allowed:
                raise UserInputError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
        if self.round_to is not None and self.round_to < 1:
            raise UserInputError(f"--round-to {self.round_to}: must be a positive integer")
        if not 0.0 < self.max_group_ratio <= 1.0:
            raise UserInputError("max_group_ratio must be in (0, 1]")

    @property
    def needs_data(self) -> bool:
        return self.criterion in DATA_CRITERIA or self.compensation != "none"
