"""Optimization profiles: the min/opt/max shape of every input with a dynamic dim.

From ``--shapes name:min=1x3x224x224,opt=4x3x224x224,max=8x3x224x224`` where given; from
``--input-shape name:1x3x224x224`` (one fixed shape: min = opt = max) otherwise; else derived
per dynamic dim from what the dim usually is in deployment, so that an engine serves more than
the one size graphopt verified with:

- the batch (first dim of an input of rank >= 2): 1 / 1 / 8;
- the spatial dims of an image (the last two of a rank-4 float input): 224 (fixed);
- the sequence of a token input (dim 1 of a rank-2 integer input): 1 / 128 / 512;
- any other dim: 1 / 16 / 64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from graphopt.errors import UserInputError

BATCH = (1, 1, 8)
IMAGE_SIDE = (224, 224, 224)
SEQUENCE = (1, 128, 512)
OTHER = (1, 16, 64)
_KEYS = ("min", "opt", "max")
# The largest profile dim graphopt passes on: TensorRT-RTX 1.7's set_shape refuses 2**31 to
# 2**32 - 1 ("inconsistent with other shapes"), takes some larger values and raises TypeError
# past int64; each would otherwise surface as an internal error after the ONNX is written.
MAX_DIM = 2**31 - 1


@dataclass(frozen=True)
class InputProfile:
    """One input's min/opt/max shapes and where they came from."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    source: str  # "--shapes", "--input-shape" or "derived"

    def describe(self) -> str:
        dims = ", ".join(f"{k}={_text(getattr(self, k))}" for k in _KEYS)
        return f"{self.name}: {dims} ({self.source})"


def parse_shapes(specs: Sequence[str] | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Repeated ``name:min=AxB,opt=AxB,max=AxB`` into {name: (min, opt, max)}."""
    result: dict[str, tuple[tuple[int, ...], ...]] = {}
    for spec in specs or ():
        name, sep, body = spec.rpartition(":")
        parts = dict(p.split("=", 1) for p in body.split(",") if "=" in p)
        if not sep or not name or sorted(parts) != sorted(_KEYS) or body.count("=") != 3:
            raise UserInputError(
                f"--shapes {spec!r}: expected NAME:min=DxD,opt=DxD,max=DxD, e.g. "
                "input:min=1x3x224x224,opt=4x3x224x224,max=8x3x224x224"
            )
        try:
            shapes = tuple(tuple(int(d) for d in parts[k].lower().split("x")) for k in _KEYS)
        except ValueError:
            raise UserInputError(f"--shapes {spec!r}: dims must be integers") from None
        low, opt, high = shapes
        if not len(low) == len(opt) == len(high):
            raise UserInputError(f"--shapes {spec!r}: min, opt and max differ in rank")
        if any(not 0 < a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
            raise UserInputError(f"--shapes {spec!r}: need 0 < min <= opt <= max in every dim")
        if max(high, default=0) > MAX_DIM:
            raise UserInputError(
                f"--shapes {spec!r}: dims must be at most {MAX_DIM} (what TensorRT takes)"
            )
        result[name] = shapes
    return result


def plan_profiles(
    inputs: Sequence[tuple[str, tuple[int, ...], bool]],
    shapes: Mapping[str, tuple[tuple[int, ...], ...]],
    input_shapes: Mapping[str, tuple[int, ...]],
) -> list[InputProfile]:
    """Profiles of the network's inputs that have a dynamic dim (-1). ``inputs``: (name, dims
    as the parsed network has them, is a floating-point input)."""
    names = {name for name, _, _ in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise UserInputError(
            f"--shapes: no network input named {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(sorted(names))})"
        )
    profiles = []
    for name, dims, is_float in inputs:
        if name in shapes:
            low, opt, high = shapes[name]
            if len(low) != len(dims) or any(
                d >= 0 and not a == b == c == d
                for d, a, b, c in zip(dims, low, opt, high, strict=True)
            ):
                raise UserInputError(
                    f"--shapes {name}: does not fit the input's dims {_text(dims, '?')}"
                )
            profiles.append(InputProfile(name, low, opt, high, "--shapes"))
        elif all(d >= 0 for d in dims):
            continue
        elif name in input_shapes:
            fixed = tuple(input_shapes[name])
            profiles.append(InputProfile(name, fixed, fixed, fixed, "--input-shape"))
        else:
            ranges = [_derived(dims, axis, is_float) for axis in range(len(dims))]
            low, opt, high = (tuple(r[i] for r in ranges) for i in range(3))
            profiles.append(InputProfile(name, low, opt, high, "derived"))
    return profiles


def _derived(dims: tuple[int, ...], axis: int, is_float: bool) -> tuple[int, int, int]:
    if dims[axis] >= 0:
        return (dims[axis],) * 3
    rank = len(dims)
    if axis == 0 and rank >= 2:
        return BATCH
    if rank == 4 and is_float and axis >= 2:
        return IMAGE_SIDE
    if rank == 2 and not is_float and axis == 1:
        return SEQUENCE
    return OTHER


def _text(dims: Sequence[int], unknown: str = "-1") -> str:
    return "x".join(unknown if d < 0 else str(d) for d in dims) or "scalar"
