"""What a sparsify run did, and how far it moved the outputs: the pass's report section.

One :class:`SparsityRecord` per run (``context.details["sparsify"]``): the pattern, the
criterion and allocation (and which were defaults), each layer's achieved sparsity and output
error, the layers left dense and why, and fidelity against the dense original on the
calibration samples it was fitted on and on held-out ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity
from graphopt.passes.calibration.report import record_tail, render_section

if TYPE_CHECKING:
    from graphopt.passes.compensation.record import CompensationRecord

# Layers listed in the terminal table; the rest are summarized in one line.
SHOWN_LAYERS = 24


@dataclass
class LayerSparsity:
    node: str
    op: str
    kind: str  # "ffn", "attention" or ""
    params: int
    sparsity: float  # share of the weight that is zero after the pass
    # ‖XΔWᵀ‖² / ‖XWᵀ‖² on calibration inputs (or ‖ΔW‖² / ‖W‖² without data): the squared
    # ratio the allocation adds up across layers. Never shown as is: see :attr:`error`.
    error_squared: float | None
    method: str  # the criterion actually used for this layer

    @property
    def error(self) -> float | None:
        """The relative output error ``‖XΔWᵀ‖ / ‖XWᵀ‖`` (or weight error): what the report
        and the JSON show. The squared ratio read as a relative error understated it (0.09
        shown for a layer whose outputs moved by 31%)."""
        return None if self.error_squared is None else math.sqrt(max(self.error_squared, 0.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op": self.op,
            "kind": self.kind,
            "params": self.params,
            "sparsity": self.sparsity,
            "error": self.error,
            "method": self.method,
        }


@dataclass
class SparsityRecord:
    pattern: str
    criterion: str = ""
    allocation: str = ""
    defaults: list[str] = field(default_factory=list)
    # "output" (‖X ΔW‖ / ‖X W‖ on calibration inputs) or "weight" (‖ΔW‖ / ‖W‖, no data).
    error_kind: str = "output"
    layers: list[LayerSparsity] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # {"calibration": [...], "held-out": [...]} (or "generated" without a calibration file)
    fidelity: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_source: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: str = ""
    # --compensation eora:R: the low-rank paths added after sparsifying (fidelity is then the
    # model's with them; the record keeps the fidelity without).
    compensation: CompensationRecord | None = None

    @property
    def zeros(self) -> int:
        return round(sum(layer.params * layer.sparsity for layer in self.layers))

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def headline(self) -> str:
        share = self.zeros / self.params if self.params else 0.0
        return (
            f"sparsity {self.pattern}: {len(self.layers)} layers sparsified ({share:.1%} of "
            f"their {self.params:,} weights zero), {len(self.skipped)} left dense; criterion "
            f"{self.criterion}, allocation {self.allocation}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "criterion": self.criterion,
            "allocation": self.allocation,
            "defaults": self.defaults,
            "error_kind": self.error_kind,
            "layers": [layer.to_json() for layer in self.layers],
            "skipped": [list(s) for s in self.skipped],
            **record_tail(self),
        }

    def render(self, console: Console) -> bool:
        render_section(
            console,
            self.headline(),
            self.notes,
            layer_table(self) if self.layers else None,
            "left dense",
            [f"{name}: {why}" for name, why in self.skipped],
            f"sparsity fidelity against the dense original{self._with_paths()} "
            f"({self.fidelity_source})",
            self.fidelity,
            self.compensation,
        )
        return True

    def _with_paths(self) -> str:
        # With --compensation the rows are the model written, its EoRA paths in (the
        # sparsifier measures them after); the title said "sparsity" of rows that equal
        # the "with EoRA" ones below.
        paths = self.compensation
        return (
            ", EoRA paths included" if paths and paths.fidelity_after and not paths.dropped else ""
        )


def layer_table(record: SparsityRecord) -> Table:
    what = "output error ‖ΔY‖/‖Y‖" if record.error_kind == "output" else "weight error (no data)"
    table = Table(
        title=f"sparsified layers (relative {what})", title_justify="left", show_edge=False
    )
    for column in ("layer", "op", "block", "weights", "sparsity", "error", "method"):
        table.add_column(column, justify="left" if column in ("layer", "op", "block") else "right")
    for layer in record.layers[:SHOWN_LAYERS]:
        error = "" if layer.error is None else f"{layer.error:.3g}"
        table.add_row(
            layer.node,
            layer.op,
            layer.kind,
            f"{layer.params:,}",
            f"{layer.sparsity:.1%}",
            error,
            layer.method,
        )
    if len(record.layers) > SHOWN_LAYERS:
        table.add_row(f"... {len(record.layers) - SHOWN_LAYERS} more", "", "", "", "", "", "")
    return table
