"""What an erase-blocks run did, and how far it moved the outputs: the pass's report section.

One :class:`ErasureRecord` per run (``context.details["erase-blocks"]``): every block found
(first node, kind, share of the model's FLOPs it saves, score), which were erased and with
which replacement, the candidates refused and why, FLOPs before and after, and fidelity
against the input model on the calibration samples and held-out ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity
from graphopt.passes.calibration.report import record_tail, removed_share, render_section


@dataclass
class BlockEntry:
    name: str  # the block's first node
    kind: str  # "residual", "attention" or "transformer layer"
    input: str
    output: str
    flops: int  # FLOPs saved by erasing it alone (net of its replacement)
    share: float  # flops / the model's FLOPs
    score: float  # lower: less missed
    removed: bool = False
    replacement: str = ""


@dataclass
class ErasureRecord:
    target: str  # "2 blocks" or "flops=0.25"
    score: str = ""
    replacement: str = ""
    defaults: list[str] = field(default_factory=list)
    blocks: list[BlockEntry] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    flops_before: int = 0
    flops_after: int = 0
    # max over outputs of 1 - mean cosine with the chosen blocks erased together (the joint
    # re-measure of the removal scores, on the scoring samples)
    joint_score: float | None = None
    fidelity: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_source: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: str = ""
    # The flops=R target missed beyond the slack (size_targets.size_target_missed); "" when met
    # or for a count. Read by RunReport.targets_missed: the CLI exits 1 after writing.
    target_missed: str = ""

    @property
    def removed(self) -> list[BlockEntry]:
        return [b for b in self.blocks if b.removed]

    @property
    def flops_removed(self) -> float:
        return removed_share(self.flops_before, self.flops_after)

    def headline(self) -> str:
        return (
            f"erase-blocks {self.target}: {len(self.removed)} of {len(self.blocks)} blocks "
            f"erased ({self.flops_removed:.1%} of FLOPs), score {self.score}, replacement "
            f"{self.replacement}; {len(self.refused)} candidate(s) refused"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "score": self.score,
            "replacement": self.replacement,
            "defaults": self.defaults,
            "blocks": [b.__dict__ for b in self.blocks],
            "refused": [list(r) for r in self.refused],
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_removed": self.flops_removed,
            "joint_score": self.joint_score,
            **({"target_missed": self.target_missed} if self.target_missed else {}),
            **record_tail(self),
        }

    def render(self, console: Console) -> bool:
        render_section(
            console,
            self.headline(),
            self.notes,
            block_table(self) if self.blocks else None,
            "refused",
            [f"{name}: {why}" for name, why in self.refused],
            f"erase-blocks fidelity against the input model ({self.fidelity_source})",
            self.fidelity,
        )
        return True


def block_table(record: ErasureRecord) -> Table:
    table = Table(
        title=f"blocks (score: {record.score}, lower is erased first)",
        title_justify="left",
        show_edge=False,
    )
    for column in ("block", "kind", "output", "FLOPs", "share", "score", "erased"):
        table.add_column(
            column, justify="left" if column in ("block", "kind", "output") else "right"
        )
    for b in record.blocks:
        table.add_row(
            b.name,
            b.kind,
            b.output,
            f"{b.flops:,}",
            f"{b.share:.1%}",
            f"{b.score:.4g}",
            b.replacement if b.removed else "",
        )
    return table
