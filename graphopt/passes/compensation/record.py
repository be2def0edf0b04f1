"""What an EoRA compensation did: per layer its rank and output error before and after, the
layers left without a path and why, the FLOPs and parameters the paths add, and fidelity
against the pass's input model without and with the paths.

A lossy pass that compensates keeps one :class:`CompensationRecord` on its own record (its
``compensation`` field) and renders it inside its report section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity, fidelity_table
from graphopt.passes.calibration.report import fidelity_json

SHOWN_LAYERS = 24


@dataclass
class LayerCompensation:
    node: str
    outputs: int  # N
    inputs: int  # K
    rank: int
    error_before: float  # ‖X·ΔWᵀ‖ / ‖X·Wᵀ‖ on calibration inputs, without the path
    error_after: float  # the same with the path
    params: int  # r·(N + K)
    flops_per_row: int  # 2·r·(N + K) + N per input row (token, position)


@dataclass
class CompensationRecord:
    owner: str
    rank: int
    layers: list[LayerCompensation] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fidelity_before: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_after: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_source: str = ""
    flops_before: int = 0  # the model's FLOPs at the run's shapes, before the paths
    flops_added: int = 0
    notes: list[str] = field(default_factory=list)
    # Why the paths were fitted and then taken out again ("" when they stay): they did not
    # lower the held-out error. ``layers`` and the fidelity tables say what they would have
    # done; the model has none of them (no parameters, no FLOPs added).
    dropped: str = ""

    @property
    def params(self) -> int:
        return 0 if self.dropped else sum(layer.params for layer in self.layers)

    def headline(self) -> str:
        if self.dropped:
            return (
                f"EoRA rank {self.rank}: {len(self.layers)} float32 low-rank paths fitted and "
                f"dropped ({self.dropped}); +0 parameters, +0 FLOPs"
            )
        share = f" ({self.flops_added / self.flops_before:.2%})" if self.flops_before else ""
        return (
            f"EoRA rank {self.rank}: {len(self.layers)} float32 low-rank paths added, "
            f"{len(self.skipped)} layers without; +{self.params:,} parameters, "
            f"+{self.flops_added:,} FLOPs{share}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "layers": [layer.__dict__ for layer in self.layers],
            "skipped": [list(s) for s in self.skipped],
            "params": self.params,
            "flops_before": self.flops_before,
            "flops_added": self.flops_added,
            "fidelity_before": fidelity_json(self.fidelity_before),
            "fidelity_after": fidelity_json(self.fidelity_after),
            "fidelity_source": self.fidelity_source,
            "notes": self.notes,
            **({"dropped": self.dropped} if self.dropped else {}),
        }

    def render(self, console: Console) -> bool:
        console.print(f"  {self.headline()}", markup=False)
        for note in self.notes:
            console.print(f"    {note}", markup=False)
        if self.layers:
            console.print(layer_table(self))
        if self.skipped:
            shown = "; ".join(f"{name}: {why}" for name, why in self.skipped[:8])
            more = f" and {len(self.skipped) - 8} more" if len(self.skipped) > 8 else ""
            console.print(f"    no path: {shown}{more}", markup=False)
        if self.fidelity_after:
            both: dict[str, list[Fidelity]] = {}
            for label, values in self.fidelity_before.items():
                both[f"{label}, without EoRA"] = values
                if label in self.fidelity_after:
                    both[f"{label}, with EoRA"] = self.fidelity_after[label]
            console.print(
                fidelity_table(
                    f"{self.owner} fidelity without and with EoRA ({self.fidelity_source})", both
                )
            )
        return True


def layer_table(record: CompensationRecord) -> Table:
    table = Table(
        title="EoRA paths (relative output error ‖ΔY‖/‖Y‖ on calibration inputs)",
        title_justify="left",
        show_edge=False,
    )
    for column in ("layer", "N x K", "rank", "error without", "error with", "params"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in record.layers[:SHOWN_LAYERS]:
        table.add_row(
            layer.node,
            f"{layer.outputs} x {layer.inputs}",
            str(layer.rank),
            f"{layer.error_before:.3g}",
            f"{layer.error_after:.3g}",
            f"{layer.params:,}",
        )
    if len(record.layers) > SHOWN_LAYERS:
        table.add_row(f"... {len(record.layers) - SHOWN_LAYERS} more", "", "", "", "", "")
    return table
