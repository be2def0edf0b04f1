"""What a factorize run is asked to do: the rank rule, the method, and the speed check.

Rank rules (``--factorize``), per layer ``W[N, K]`` replaced by ``U[N, r] · V[r, K]``:

* ``flops=R``: remove the share R of the *model's* FLOPs, ranks allocated across layers by
  their measured error (:mod:`.allocation`);
* ``energy=E``: the smallest rank whose (whitened) singular values keep the share E of the
  energy;
* ``ratio=R``: rank = R × the layer's full rank ``min(N, K)``;
* ``rank=K``: the same rank everywhere.

Ranks are multiples of ``--round-to`` (default :data:`DEFAULT_MULTIPLE`): GEMM kernels tile
their inner dimension, a rank of 97 runs as slowly as 104.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from graphopt.errors import UserInputError
from graphopt.passes.calibration import is_calibration_file

METHODS = ("svd", "asvd")
DATA_METHODS = ("asvd",)
KINDS = ("flops", "energy", "ratio", "rank")
DEFAULT_MULTIPLE = 8
# Layers thinner than this on either side have no rank worth removing.
MIN_SIDE = 32
_RULE = re.compile(r"(flops|energy|ratio|rank)=([0-9.eE+-]+)")
_EXPECTED = "expected flops=R, energy=E, ratio=R or rank=K (e.g. flops=0.25)"


@dataclass(frozen=True)
class RankRule:
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> RankRule:
        raw = str(text).strip().lower().replace(" ", "")
        match = _RULE.fullmatch(raw)
        if not match:
            raise UserInputError(f"--factorize {text!r}: {_EXPECTED}")
        kind = match[1]
        try:
            value = float(match[2])
        except ValueError:
            raise UserInputError(f"--factorize {text!r}: {_EXPECTED}") from None
        if kind == "rank":
            if not match[2].isdigit() or value < 1:  # 1e308 is no rank
                raise UserInputError(f"--factorize {text!r}: rank=K needs a positive integer")
        elif kind == "energy" and not 0.0 < value <= 1.0:
            raise UserInputError(f"--factorize {text!r}: energy=E needs 0 < E <= 1")
        elif kind != "energy" and not 0.0 < value < 1.0:
            raise UserInputError(f"--factorize {text!r}: {kind}=R needs 0 < R < 1")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}={int(self.value) if self.kind == 'rank' else f'{self.value:g}'}"


def aligned(rank: float, multiple: int, full: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at least one multiple, at most
    ``full`` (a layer whose aligned rank reaches full rank is not worth factorizing)."""
    step = max(1, multiple)
    rounded = max(step, math.ceil(rank / step - 1e-9) * step)
    return min(rounded, full)


def candidate_ranks(full: int, multiple: int) -> list[int]:
    """The aligned ranks below ``full``, ascending."""
    step = max(1, multiple)
    return list(range(step, full, step))


def speed_check_mode(text: str | None) -> str:
    """``on``, ``off`` or a replay file (a model this pass wrote, or its JSON record)."""
    raw = str(text or "on").strip()
    if raw.lower() in ("on", "off"):
        return raw.lower()
    if raw.lower().endswith((".onnx", ".json")):
        return raw
    raise UserInputError(
        f"--factorize-speed-check {text!r}: expected on, off, or a FILE.onnx/FILE.json to replay"
    )


@dataclass(frozen=True)
class Choices:
    """The method of a run and whether it was the default."""

    method: str
    defaulted: tuple[str, ...] = ()
    data_aware: bool = False

    def note(self, calib: str | None) -> str:
        from graphopt.passes.calibration import choices_note

        return choices_note(
            "factorize",
            {"method": self.method},
            self.defaulted,
            self.data_aware,
            calib,
            "no calibration data, only plain svd is possible",
            "--factorize-",
        )


def resolve_method(method: str | None, calib: str | None) -> Choices:
    """The method asked for, else asvd with a calibration file and svd without one (or with
    ``--calib random``: generated inputs say nothing about real activations, the rule of every
    lossy pass); asvd without any data is bad input naming ``--calib``."""
    data_aware = is_calibration_file(calib)
    if method is None:
        return Choices("asvd" if data_aware else "svd", ("method",), data_aware)
    chosen = str(method).strip().lower()
    if chosen not in METHODS:
        raise UserInputError(f"--factorize-method {method!r}: choose one of {', '.join(METHODS)}")
    if chosen in DATA_METHODS and not calib:
        raise UserInputError(
            f"factorize: method {chosen} needs calibration data: pass --calib FILE.npz "
            "(or --calib random to use generated inputs, not recommended)"
        )
    return Choices(chosen, (), data_aware)
