"""What the calibration data says about each block: its angular distance and its replacement.

One run of the input model observes every block's input ``x`` and output ``y``; per block,
positions × channels (padded sequence positions left out) are reduced on the fly to

* the angular distance ``arccos(cos(x, y)) / π`` averaged over positions (ShortGPT's and
  "The Unreasonable Ineffectiveness of the Deeper Layers"' block importance);
* ``Σ (y - x)``, for the mean replacement ``x + mean(y - x)``;
* with ``linear``, the Gram matrix of ``[x, 1]`` and ``[x, 1]ᵀ y``, for the ridge least
  squares ``y ≈ x·A + b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.blocks.erasing import Replacement
from graphopt.passes.blocks.finding import Block
from graphopt.passes.calibration.activations import channel_rows, observe, sequence_mask
from graphopt.passes.calibration.samples import CalibrationSet


@dataclass
class BlockData:
    count: float = 0.0
    angle: float = 0.0  # Σ arccos(cos)/π over positions
    delta: np.ndarray | None = None  # Σ (y - x)
    gram: np.ndarray | None = None  # Σ [x,1]ᵀ[x,1]
    cross: np.ndarray | None = None  # Σ [x,1]ᵀ y

    def add(self, x: np.ndarray, y: np.ndarray, linear: bool) -> None:
        x, y = x.astype(np.float64), y.astype(np.float64)
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cos = np.einsum("ij,ij->i", x, y) / np.where(norms > 0, norms, 1.0)
        cos = np.where(norms > 0, np.clip(cos, -1.0, 1.0), 1.0)
        self.angle += float(np.sum(np.arccos(cos))) / np.pi
        self.count += x.shape[0]
        diff = (y - x).sum(axis=0)
        self.delta = diff if self.delta is None else self.delta + diff
        if linear:
            ones = np.hstack([x, np.ones((x.shape[0], 1))])
            gram, cross = ones.T @ ones, ones.T @ y
            self.gram = gram if self.gram is None else self.gram + gram
            self.cross = cross if self.cross is None else self.cross + cross

    @property
    def angular(self) -> float:
        return self.angle / max(self.count, 1.0)

    def replacement(self, kind: str, ridge: float) -> Replacement:
        if kind == "none" or self.delta is None:
            return Replacement("none")
        if kind == "mean":
            return Replacement("mean", bias=self.delta / max(self.count, 1.0))
        assert self.gram is not None and self.cross is not None
        channels = self.gram.shape[0] - 1
        # Ridge relative to the mean input energy, and not on the bias row: the fit stays
        # well posed for channels that never vary (dead ReLU channels) without shrinking b.
        scale = float(np.trace(self.gram[:channels, :channels])) / max(channels, 1)
        penalty = np.full(channels + 1, ridge * max(scale, 1e-12))
        penalty[-1] = 0.0
        solution = np.linalg.solve(self.gram + np.diag(penalty), self.cross)
        return Replacement("linear", bias=solution[-1], matrix=solution[:-1])


def block_data(
    model: ir.Model, blocks: list[Block], calib: CalibrationSet, linear: bool
) -> list[BlockData]:
    """Each block's statistics on ``calib``, observed on ``model`` (the input model)."""
    names = sorted({name for b in blocks for name in (b.input, b.output)})
    data = [BlockData() for _ in blocks]
    for feeds, values in observe(model, names, calib):
        mask = sequence_mask(feeds)
        for block, entry in zip(blocks, data, strict=True):
            x, y = values[block.input], values[block.output]
            axis = block.channel_axis % max(x.ndim, 1)
            entry.add(channel_rows(x, axis, mask), channel_rows(y, axis, mask), linear)
    return data
