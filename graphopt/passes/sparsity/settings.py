"""What a sparsify run is asked to do: the pattern, the criterion, the allocation, the layers.

Patterns (``--sparsity``), in the weight's canonical form ``W[N, K]`` (N outputs, K the
reduction axis; see :mod:`.layers` for how Conv/MatMul/Gemm weights map onto it):

* ``N:M`` (e.g. ``2:4``): in every group of M consecutive K elements of one output, N are
  kept. Fixed ratio ``1 - N/M``.
* ``block:RxC=S``: tiles of R outputs × C consecutive K elements are zeroed whole; each row
  of tiles loses the share S of its tiles (``block:1x4`` is VNNI's 4-byte dot product).
* ``unstructured=S``: single elements; each output row loses the share S of its weights.

Per-row quotas (every output, or row of tiles, loses the same share) are chosen on purpose:
balanced rows are what row-parallel sparse kernels want, and Wanda (Sun et al. 2023) found
per-output comparison groups better than layer-wide ones for magnitude-like scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphopt.errors import UserInputError
from graphopt.passes.calibration import fill_defaults

CRITERIA = ("magnitude", "wanda", "reconstruction")
DATA_CRITERIA = ("wanda", "reconstruction")
ALLOCATIONS = ("uniform", "global")
# Without real data only the data-free criterion is possible; with a calibration file the
# criterion that measured best (bench/sparsity_fidelity.py: reconstruction is clearly ahead
# of wanda and magnitude on MiniLM and the CNNs, at seconds per model). Allocation stays
# uniform by default: global is opt-in (see the report of bench/sparsity_fidelity.py).
DATA_FREE_DEFAULTS = {"criterion": "magnitude", "allocation": "uniform"}
DATA_AWARE_DEFAULTS = {"criterion": "reconstruction", "allocation": "uniform"}
CHOICES = ("criterion", "allocation")

_NM = re.compile(r"(\d+):(\d+)")
_BLOCK = re.compile(r"block:(\d+)x(\d+)=([0-9.eE+-]+)")
_UNSTRUCTURED = re.compile(r"unstructured=([0-9.eE+-]+)")
_EXPECTED = "expected N:M (e.g. 2:4), block:RxC=S (e.g. block:1x4=0.8) or unstructured=S"


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern on ``W[N, K]``.

    ``group`` > 0: N:M (keep ``keep`` of every ``group`` consecutive K elements). Else tiles
    of ``rows`` × ``cols`` with the share ``ratio`` of each row of tiles zeroed.
    """

    ratio: float
    keep: int = 0
    group: int = 0
    rows: int = 1
    cols: int = 1

    @classmethod
    def parse(cls, text: str) -> Pattern:
        raw = str(text).strip().lower().replace(" ", "")
        if match := _NM.fullmatch(raw):
            keep, group = int(match[1]), int(match[2])
            if not 0 < keep < group:
                raise UserInputError(f"--sparsity {text!r}: N:M needs 0 < N < M, e.g. 2:4")
            return cls(ratio=1.0 - keep / group, keep=keep, group=group)
        if match := _BLOCK.fullmatch(raw):
            rows, cols = int(match[1]), int(match[2])
            if rows < 1 or cols < 1:
                raise UserInputError(f"--sparsity {text!r}: block sizes must be positive")
            return cls(ratio=_ratio(text, match[3]), rows=rows, cols=cols)
        if match := _UNSTRUCTURED.fullmatch(raw):
            return cls(ratio=_ratio(text, match[1]))
        raise UserInputError(f"--sparsity {text!r}: {_EXPECTED}")

    @property
    def is_nm(self) -> bool:
        return self.group > 0

    @property
    def k_multiple(self) -> int:
        """The reduction size must be a multiple of this."""
        return self.group if self.is_nm else self.cols

    @property
    def n_multiple(self) -> int:
        """The output count must be a multiple of this."""
        return 1 if self.is_nm else self.rows

    def with_ratio(self, ratio: float) -> Pattern:
        return Pattern(ratio, self.keep, self.group, self.rows, self.cols)

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.keep}:{self.group}"
        if self.rows == 1 and self.cols == 1:
            return f"unstructured={self.ratio:g}"
        return f"block:{self.rows}x{self.cols}={self.ratio:g}"


def _ratio(text: str, number: str) -> float:
    try:
        ratio = float(number)
    except ValueError:
        ratio = -1.0
    if not 0.0 < ratio < 1.0:
        raise UserInputError(f"--sparsity {text!r}: the share S must be in (0, 1); {_EXPECTED}")
    return ratio


LAYER_GROUPS = ("all", "ffn", "attention")


def parse_layers(text: str) -> tuple[str, ...]:
    """``--sparsity-layers ffn,attention,*dense*`` as its comma-separated terms (non-empty).
    A given text with no term (``""``, ``",,"``) is refused: read as ``all``, a typo would
    have selected every layer."""
    terms = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not terms:
        raise UserInputError(
            f"layers {text!r}: expected all, ffn, attention or name globs, comma-separated"
        )
    return terms


@dataclass(frozen=True)
class Choices:
    """Criterion and allocation of a run, and which of them were defaults."""

    criterion: str
    allocation: str
    defaulted: tuple[str, ...] = ()
    data_aware: bool = False

    def note(self, calib: str | None) -> str:
        """One report line: every choice, the defaulted ones marked, and why those defaults."""
        from graphopt.passes.calibration import choices_note

        choices = {name: getattr(self, name) for name in CHOICES}
        return choices_note(
            "sparsify",
            choices,
            self.defaulted,
            self.data_aware,
            calib,
            "no calibration data, only magnitude is possible",
            "--sparsity-",
        )


def resolve_choices(criterion: str | None, allocation: str | None, calib: str | None) -> Choices:
    """Fill unset choices from the defaults that fit ``calib`` (a file: data-aware)."""
    given = {"criterion": criterion, "allocation": allocation}
    values, defaulted, data_aware = fill_defaults(
        given, calib, DATA_AWARE_DEFAULTS, DATA_FREE_DEFAULTS
    )
    for name, allowed in (("criterion", CRITERIA), ("allocation", ALLOCATIONS)):
        if values[name] not in allowed:
            raise UserInputError(
                f"--sparsity-{name} {values[name]!r}: choose one of {', '.join(allowed)}"
            )
    return Choices(**values, defaulted=defaulted, data_aware=data_aware)
