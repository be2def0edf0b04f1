"""Calibration samples: loaded from ``.npz`` (never pickles) or generated, split, batched.

An ``.npz`` holds one array per model input, shaped ``[N, ...]``; sample ``i`` is
``array[i:i+1]``. Sequences come pre-padded, with their masks, so every sample of an input
has the same shape and samples can be fed together in batches where the model's batch dim
is free. The last ``holdout`` share of the samples is kept apart: fitting (importance,
compensation) never sees it, and the fidelity report is measured on it only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.inputs import graph_inputs, make_inputs

RANDOM_SAMPLES = 32
BATCH = 8


@dataclass
class CalibrationSet:
    arrays: dict[str, np.ndarray]
    source: str  # file name or "random"
    batch: int = 1
    # Cut each batch of padded sequences to its longest real sequence (the model's sequence
    # dim is free and padding is masked): the same statistics at a fraction of the cost.
    trim: bool = False

    @property
    def count(self) -> int:
        return len(next(iter(self.arrays.values())))

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one sample per input (batch 1): what FLOPs are counted at."""
        return {name: (1, *a.shape[1:]) for name, a in self.arrays.items()}

    def split(self, holdout: float) -> tuple[CalibrationSet, CalibrationSet | None]:
        """(fit, held-out); no held-out part when there are fewer than 2 samples."""
        n = self.count
        held = max(1, round(n * holdout)) if n >= 2 else 0
        if held == 0:
            return self, None
        fit = {k: v[: n - held] for k, v in self.arrays.items()}
        rest = {k: v[n - held :] for k, v in self.arrays.items()}
        return (
            CalibrationSet(fit, self.source, self.batch, self.trim),
            CalibrationSet(rest, self.source, self.batch, self.trim),
        )

    def batches(self, trim: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of ``batch`` samples; ``trim=False`` keeps the padded width."""
        mask_name = _mask_name(self.arrays) if self.trim and trim else None
        for start in range(0, self.count, self.batch):
            feeds = {k: v[start : start + self.batch] for k, v in self.arrays.items()}
            if mask_name is not None:
                feeds = _trimmed(feeds, mask_name)
            yield feeds


def _mask_name(arrays: dict[str, np.ndarray]) -> str | None:
    for name, array in arrays.items():
        if "mask" in name.lower() and array.ndim == 2:
            return name
    return None


def _trimmed(feeds: dict[str, np.ndarray], mask_name: str) -> dict[str, np.ndarray]:
    mask = feeds[mask_name]
    used = np.flatnonzero(mask.any(axis=0))
    width = int(used[-1]) + 1 if used.size else 1
    if width == mask.shape[1]:
        return feeds
    # Only right padding is cut: every [batch, seq] input loses the all-padding columns.
    return {
        k: v[:, :width] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v
        for k, v in feeds.items()
    }


def load_calibration(path: str, model: ir.Model) -> CalibrationSet:
    """Calibration samples from ``path`` (an ``.npz``) checked against the model's inputs."""
    from graphopt.calibration import load_npz

    arrays = load_npz(path)
    inputs = {v.name: v for v in graph_inputs(model)}
    missing = sorted(set(inputs) - set(arrays))
    if missing:
        raise UserInputError(f"{path}: no array for model input(s) {', '.join(missing)}")
    arrays = {k: arrays[k] for k in inputs}  # extra keys are ignored, order follows the model
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise UserInputError(f"{path}: every array needs the same number N ≥ 1 of samples")
    for name, array in arrays.items():
        expected = _numpy_dtype(inputs[name])
        if expected is not None and array.dtype != expected:
            raise UserInputError(
                f"{path}: input {name!r} is {array.dtype}, the model expects {expected}"
            )
        shape = inputs[name].shape
        if shape is not None and len(shape) != array.ndim:
            raise UserInputError(
                f"{path}: input {name!r} has rank {array.ndim - 1} per sample after the "
                f"sample axis; the model expects shape {list(shape)} (sample i is array[i:i+1])"
            )
    return CalibrationSet(arrays, path, _batch_size(model), _free_sequence(model))


def random_calibration(
    model: ir.Model, shapes: dict[str, tuple[int, ...]], count: int = RANDOM_SAMPLES
) -> CalibrationSet:
    """Generated samples (``--calib random``): seeded, shaped like the verification inputs."""
    samples = [make_inputs(model, shapes, seed=1000 + i) for i in range(count)]
    arrays = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    return CalibrationSet(arrays, "random", _batch_size(model))


def _free_sequence(model: ir.Model) -> bool:
    """Every 2-D input has a symbolic second dim (so batches may be cut to their length)."""
    two_d = [v for v in graph_inputs(model) if v.shape is not None and len(v.shape) == 2]
    return bool(two_d) and all(not isinstance(v.shape[1], int) for v in two_d)


def _batch_size(model: ir.Model) -> int:
    """Feed several samples at once only when every input's first dim is free."""
    for value in graph_inputs(model):
        if value.shape is None or not value.shape.dims or isinstance(value.shape[0], int):
            return 1
    return BATCH


def _numpy_dtype(value: ir.Value) -> np.dtype | None:
    try:
        return np.dtype(value.dtype.numpy()) if value.dtype is not None else None
    except Exception:  # bfloat16 and friends: no plain numpy dtype to compare with
        return None
