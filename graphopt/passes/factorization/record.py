"""What a factorize run did, and how far it moved the outputs: the pass's report section.

One :class:`FactorizeRecord` per run (``context.details["factorize"]``): the rank rule and
method (and whether the method was the default), each factorized layer's rank, FLOPs before
and after, relative output error and measured speed ratio, the layers left whole and why,
the model's FLOPs before and after, and fidelity against the original on the calibration
samples it was fitted on and on held-out ones. :attr:`FactorizeRecord.fitted` keeps what a
compensation step run afterwards needs (not in the JSON: arrays and graph objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity
from graphopt.passes.calibration.report import record_tail, removed_share, render_section

if TYPE_CHECKING:
    from graphopt.passes.compensation.record import CompensationRecord

SHOWN_LAYERS = 24
# Removed FLOPs further than this past a flops=R target are said, with the cause: more than
# asked is another model than the one asked for (fidelity pays for it), as pruning says.
OVERSHOOT_TOLERANCE = 0.02


@dataclass
class LayerFactorization:
    node: str
    op: str
    kind: str  # "ffn", "attention" or ""
    shape: list[int]  # [N, K] canonical
    rank: int
    full: int
    flops_before: int
    flops_after: int
    # Relative output error ‖XΔWᵀ‖ / ‖XWᵀ‖ on calibration inputs (or ‖ΔW‖ / ‖W‖): the square
    # root of the squared ratio the allocation adds up (shown as is, it understated the error).
    error: float | None
    speedup: float | None  # measured time(layer) / time(pair); None: not measured


@dataclass
class Fitted:
    """One factorized layer, for a compensation step run after the pass (EoRA): the original
    canonical weight, the new nodes, the layer's input and output values, the input Gram."""

    name: str
    weight: np.ndarray  # the original W[N, K], float32
    approx: np.ndarray  # U·V, the weight the two nodes compute, float32
    first: ir.Node
    second: ir.Node
    input: ir.Value
    output: ir.Value
    gram: np.ndarray | None  # XᵀX / rows of the input as the pass saw it (None: no data)


@dataclass
class FactorizeRecord:
    rule: str
    method: str = ""
    defaults: list[str] = field(default_factory=list)
    error_kind: str = "output"  # or "weight" (no calibration data)
    speed_check: str = "on"
    layers: list[LayerFactorization] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flops_before: int = 0
    flops_after: int = 0
    target_flops: int = 0  # FLOPs to remove (flops=R), else 0
    # The flops=R target missed beyond the slack (size_targets.size_target_missed); "" when met
    # or for a per-layer rule. Read by RunReport.targets_missed: the CLI exits 1 after writing.
    target_missed: str = ""
    fidelity: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_source: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: str = ""
    fitted: list[Fitted] = field(default_factory=list)
    # --compensation eora:R: the low-rank paths added after factorizing (fidelity is then the
    # model's with them; the compensation record keeps the fidelity without).
    compensation: CompensationRecord | None = None

    @property
    def flops_removed(self) -> float:
        return removed_share(self.flops_before, self.flops_after)

    def overshoot_note(self, multiple: int) -> str | None:
        """A note when a flops=R run removed more than R by over :data:`OVERSHOOT_TOLERANCE`
        of the model's FLOPs, with what caused it; None otherwise."""
        if not self.target_flops or not self.flops_before:
            return None
        asked = self.target_flops / self.flops_before
        removed = self.flops_removed
        if removed - asked <= OVERSHOOT_TOLERANCE:
            return None
        planned = sum(layer.flops_before - layer.flops_after for layer in self.layers)
        planned_share = planned / self.flops_before
        causes = []
        slow = sum(1 for _, why in self.skipped if why.endswith("not faster"))
        if slow:
            causes.append(
                f"the speed check left {slow} layer(s) whole (not faster in ORT), so the "
                "target came from fewer layers"
            )
        causes.append(
            f"ranks move in steps of {multiple} (--round-to) and the least-error choice that "
            f"reaches the target takes whole steps: the chosen ranks save {planned_share:.1%} "
            "by the layers' own FLOPs"
        )
        if removed - planned_share > OVERSHOOT_TOLERANCE:
            causes.append(
                f"the model's FLOPs fell by {removed - planned_share:.1%} more than the layers' "
                "savings (counted at the calibration shapes)"
            )
        return (
            f"{self.rule}: overshot: {removed:.1%} of the model's FLOPs removed where "
            f"{asked:.0%} was asked; " + "; ".join(causes)
        )

    def headline(self) -> str:
        return (
            f"factorize {self.rule}: {len(self.layers)} layers factorized, {len(self.skipped)} "
            f"left whole; model FLOPs {self.flops_before:,} -> {self.flops_after:,} "
            f"({self.flops_removed:.1%} removed); method {self.method}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "method": self.method,
            "defaults": self.defaults,
            "error_kind": self.error_kind,
            "speed_check": self.speed_check,
            "layers": [layer.__dict__ for layer in self.layers],
            "skipped": [list(s) for s in self.skipped],
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_removed": self.flops_removed,
            **({"target_missed": self.target_missed} if self.target_missed else {}),
            **record_tail(self),
        }

    def render(self, console: Console) -> bool:
        render_section(
            console,
            self.headline(),
            self.notes,
            layer_table(self) if self.layers else None,
            "left whole",
            [f"{name}: {why}" for name, why in self.skipped],
            f"factorize fidelity against the original ({self.fidelity_source})",
            self.fidelity,
            self.compensation,
        )
        return True


def layer_table(record: FactorizeRecord) -> Table:
    what = "output error ‖ΔY‖/‖Y‖" if record.error_kind == "output" else "weight error (no data)"
    table = Table(
        title=f"factorized layers (relative {what})", title_justify="left", show_edge=False
    )
    columns = ("layer", "op", "block", "N x K", "rank", "FLOPs", "error", "speed")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "op", "block") else "right")
    for layer in record.layers[:SHOWN_LAYERS]:
        table.add_row(
            layer.node,
            layer.op,
            layer.kind,
            f"{layer.shape[0]} x {layer.shape[1]}",
            f"{layer.rank}/{layer.full}",
            f"{layer.flops_after / layer.flops_before:.0%}" if layer.flops_before else "",
            "" if layer.error is None else f"{layer.error:.3g}",
            "" if layer.speedup is None else f"{layer.speedup:.2f}x",
        )
    if len(record.layers) > SHOWN_LAYERS:
        more = f"... {len(record.layers) - SHOWN_LAYERS} more"
        table.add_row(more, *([""] * (len(columns) - 1)))
    return table
