"""What a channel rule answers: couplings between channel dims, or why it refuses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Coupling:
    """Channel ``src_idx[i]`` of the arriving dim goes with channel ``dst_idx[i]`` of ``dst``."""

    dst: ir.Value
    dst_axis: int
    src_idx: np.ndarray
    dst_idx: np.ndarray
    # The destination's size on dst_axis when the rule knows it (identity: the source's).
    dst_size: int | None = None


@dataclass(frozen=True)
class Blocked:
    reason: str


@dataclass(frozen=True)
class Unknown(Blocked):
    """Blocked for want of a size that coupling elsewhere may still teach (retried)."""


Result = list[Coupling] | Blocked


def identity(dst: ir.Value, axis: int, n: int) -> Coupling:
    idx = np.arange(n, dtype=np.int64)
    return Coupling(dst, axis, idx, idx, n)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
