"""What a decompose run did and what it cost: the pass's report section.

One :class:`DecomposeRecord` per run (``context.details["decompose"]``): per module its inner
dimension before and after, its relative output error on the calibration statistics and the
FLOPs it removed; the modules left as they are and why; totals; fidelity against the input
model on calibration and held-out samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity, summary
from graphopt.passes.calibration.report import fidelity_json, removed_share, render_section

SHOWN_MODULES = 30


@dataclass
class ModuleRecord:
    layer: int
    kind: str  # mlp, qk, vo
    before: int  # inner dim: MLP width, or heads × head dim
    after: int
    error: float  # relative output error ‖ΔY‖/‖Y‖ (not squared) on the calibration statistics
    flops: int  # FLOPs removed (at the run's shapes)


@dataclass
class DecomposeRecord:
    target: str
    modules: str
    calibration: str = ""
    # The share of the selected modules' inner channels removed, weighted by channels (not
    # the mean of per-module shares: a module of 64 channels is not worth one of 1024).
    ratio: float = 0.0
    inner_before: int = 0  # inner channels of the selected modules, before
    inner_after: int = 0  # and after
    allocation: str = "uniform"
    decomposed: list[ModuleRecord] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (where, kind, why)
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    fidelity: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_source: str = ""
    check: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: str = ""
    # The size target missed beyond the slack (size_targets.size_target_missed); "" when met.
    # Read by RunReport.targets_missed: the CLI exits 1 after writing the model.
    target_missed: str = ""

    @property
    def flops_removed(self) -> float:
        return removed_share(self.flops_before, self.flops_after)

    @property
    def inner_removed(self) -> float:
        return removed_share(self.inner_before, self.inner_after)

    def spread(self) -> tuple[float, float]:
        """The least and the most share of one selected module's inner dim removed."""
        shares = [1 - m.after / m.before for m in self.decomposed if m.before]
        if self.inner_before > sum(m.before for m in self.decomposed):
            shares.append(0.0)  # selected modules left whole
        return (min(shares), max(shares)) if shares else (0.0, 0.0)

    def inner_text(self) -> str:
        removed = self.inner_before - self.inner_after
        line = f"inner channels -{self.inner_removed:.0%} ({removed:,} of {self.inner_before:,})"
        low, high = self.spread()
        if high - low > 0.005:
            line += f", per module -{low:.0%}..-{high:.0%}"
        return line

    def headline(self) -> str:
        line = (
            f"decompose {self.target} ({self.modules}): {len(self.decomposed)} modules "
            f"decomposed, {len(self.skipped)} left; {self.inner_text()}; FLOPs "
            f"{self.flops_before:,} -> {self.flops_after:,} (-{self.flops_removed:.1%}); "
            f"params {self.params_before:,} -> {self.params_after:,}"
        )
        held = self.fidelity.get("held-out")
        if held:
            line += f"; held-out: {summary(held)}"
        return line

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("decomposed", "fidelity")}
        out["decomposed"] = [m.__dict__ for m in self.decomposed]
        out["skipped"] = [list(s) for s in self.skipped]
        out["flops_removed"] = self.flops_removed
        out["fidelity"] = fidelity_json(self.fidelity)
        return out

    def render(self, console: Console) -> bool:
        render_section(
            console,
            self.headline(),
            self.notes,
            module_table(self) if self.decomposed else None,
            "left as they are",
            [f"{w} {k}: {why}" for w, k, why in self.skipped],
            f"decompose fidelity against the input model ({self.fidelity_source})",
            self.fidelity,
        )
        return True


def module_table(record: DecomposeRecord) -> Table:
    table = Table(
        title="decomposed modules (relative output error on calibration statistics)",
        title_justify="left",
        show_edge=False,
    )
    for column in ("layer", "kind", "inner dim", "error", "FLOPs removed"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for m in record.decomposed[:SHOWN_MODULES]:
        table.add_row(str(m.layer), m.kind, f"{m.before} -> {m.after}", f"{m.error:.3g}",
                      f"{m.flops:,}")  # fmt: skip
    if len(record.decomposed) > SHOWN_MODULES:
        table.add_row(f"... {len(record.decomposed) - SHOWN_MODULES} more", "", "", "", "")
    return table
