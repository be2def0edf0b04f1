"""Per-channel activation statistics over calibration data, measured in ONNX Runtime.

The tensors of interest become extra graph outputs of a copy of the model; each batch's
values are reduced on the fly to per-channel sums, sums of squares and, where compensation
needs them, Gram matrices, so memory stays at one batch of activations plus C×C
accumulators. Padded sequence positions (a 2-D ``*mask*`` input that is 0) are left out of
every statistic: they are not data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.analysis.dependency import DimKey
from graphopt.errors import UserInputError
from graphopt.passes.calibration.samples import CalibrationSet


@dataclass
class ChannelStats:
    """Running per-channel moments of one activation along its channel axis."""

    count: float = 0.0
    total: np.ndarray | None = None  # Σ x_j
    squares: np.ndarray | None = None  # Σ x_j²
    gram: np.ndarray | None = None  # Σ x xᵀ, when asked for

    def add(self, rows: np.ndarray, gram: bool = False) -> None:
        rows = rows.astype(np.float64, copy=False)
        if self.total is None:
            self.total = np.zeros(rows.shape[1])
            self.squares = np.zeros(rows.shape[1])
            if gram:
                self.gram = np.zeros((rows.shape[1], rows.shape[1]))
        self.count += rows.shape[0]
        self.total += rows.sum(axis=0)
        self.squares += np.einsum("ij,ij->j", rows, rows)
        if self.gram is not None:
            self.gram += rows.T @ rows

    @property
    def covariance(self) -> np.ndarray:
        n = max(self.count, 1.0)
        return self.gram / n - np.outer(self.mean, self.mean)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1.0)

    @property
    def norm(self) -> np.ndarray:
        """‖X_j‖₂ over every calibration position (Wanda's activation norm)."""
        return np.sqrt(self.squares)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.squares / max(self.count, 1.0) - self.mean**2, 0.0)


def channel_rows(array: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """The activation as a (positions × channels) matrix, padded positions dropped."""
    moved = np.moveaxis(array, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if mask is not None and moved.ndim == 3 and moved.shape[:2] == mask.shape:
        rows = rows[mask.reshape(-1) != 0]
    return rows


def sequence_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """A 2-D (batch × sequence) mask input, if the model has one."""
    for name, array in feeds.items():
        if "mask" in name.lower() and array.ndim == 2:
            return array
    return None


def with_outputs(model: ir.Model, names: list[str], only: bool = False) -> ir.Model:
    """A copy of ``model`` that also outputs the values named ``names``; with ``only``, just
    those, and the nodes they do not need are dropped (a prefix runs faster than the model)."""
    clone = model.clone()
    by_name = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        for out in node.outputs:
            by_name[out.name] = out
    if only:
        clone.graph.outputs.clear()
    present = {v.name for v in clone.graph.outputs}
    for name in names:
        if name in present:
            continue
        value = by_name.get(name)
        if value is None:
            raise KeyError(f"no value named {name!r} to observe")
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        clone.graph.outputs.append(value)
        present.add(name)
    if only:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(clone)
    return clone


def observe(
    model: ir.Model, names: list[str], calib: CalibrationSet
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per batch: (feeds, {name: activation}) for the named values of ``model``."""
    if not names:
        # Nothing asked: the model with no output that ``with_outputs`` would build is one
        # ONNX Runtime refuses to load. Each batch observes no value, without a session.
        for feeds in calib.batches():
            yield feeds, {}
        return
    session = observation_session(with_outputs(model, names, only=True))
    for feeds in calib.batches():
        values = run_observation(session, names, feeds, calib.source)
        yield feeds, dict(zip(names, values, strict=True))


def observation_session(model: ir.Model):
    """An ORT session to observe ``model`` with (its outputs are the values observed)."""
    from graphopt.sessions import make_session

    try:
        # ORT optimizations on: statistics do not need bit-exactness, and it is faster.
        return make_session(model, optimize=True)
    except Exception as exc:
        raise RuntimeError(f"ONNX Runtime cannot load the model to observe: {exc}") from exc


def run_observation(session, names: list[str], feeds: dict, source: str) -> list[np.ndarray]:
    """``names`` on ``feeds``; a failure is the calibration data's, said in one line."""
    from graphopt.ortrun import run_session

    wanted = {i.name for i in session.get_inputs()}
    try:
        return run_session(session, names, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"calibration data ({source}) does not run through the model: {line[:200]}"
        ) from None


# Covariances are kept for channel counts up to this (C×C float64 each).
MAX_GRAM_CHANNELS = 4096


def channel_statistics(
    model: ir.Model, keys: list[DimKey], calib: CalibrationSet, gram: bool = False
) -> dict[DimKey, ChannelStats]:
    """Per-channel moments of each (value, axis) in ``keys`` (and covariances with ``gram``)."""
    stats = {key: ChannelStats() for key in keys}
    names = sorted({name for name, _ in keys})
    for feeds, values in observe(model, names, calib):
        mask = sequence_mask(feeds)
        for key in keys:
            rows = channel_rows(values[key[0]], key[1], mask)
            stats[key].add(rows, gram and rows.shape[1] <= MAX_GRAM_CHANNELS)
    return stats
