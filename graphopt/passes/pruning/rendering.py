"""Terminal rendering of a pruning record: what was removed and the held-out fidelity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from graphopt.report import signed_percent

if TYPE_CHECKING:
    from graphopt.passes.pruning.pruner import PruneReport


def headline(prune: PruneReport, label: str) -> str:
    """``label: N units from G/P groups; FLOPs -x%, params -y%; zero-invariance check …``."""
    line = (
        f"{label}: {prune.units_removed} units from {prune.groups_pruned}/"
        f"{prune.groups_prunable} groups; FLOPs {signed_percent(-prune.flops_removed)}, "
        f"params {signed_percent(-prune.params_removed)}"
    )
    if prune.check.startswith("skipped"):
        line += f"; zero-invariance check {prune.check}"
    elif prune.check:
        line += f"; zero-invariance check {prune.check} ({prune.check_seconds:.2f} s)"
    return line


def print_pruning(prune: PruneReport, console: Console) -> bool:
    """What pruning did, from its record: one line, and the held-out fidelity when there is
    calibration data. False when there is nothing to print (nothing was pruned)."""
    if not prune.summary:
        return False
    console.print(headline(prune, f"pruning {prune.target}"), markup=False)
    if prune.fidelity_pruned:
        console.print(pruning_table(prune))
    return True


def pruning_table(prune: PruneReport) -> Table:
    """Fidelity of pruning on held-out calibration samples, before/after compensation."""
    table = Table(
        title=(
            f"pruning fidelity on {prune.heldout_samples} held-out calibration samples "
            f"({prune.calibration})"
        ),
        title_justify="left",
        show_edge=False,
    )
    rows = [("pruned", prune.fidelity_pruned)]
    if prune.fidelity_compensated:
        rows.append((f"+ {prune.compensation}", prune.fidelity_compensated))
    # Integer and bool outputs (class ids, counts) are right only where equal: their share
    # of equal values is their measure, as in the other lossy tables; the cosine, mean abs
    # and max rel of ids say nothing of them ("cosine 0.8844" beside 55% of labels equal).
    integer = any(f.equal_share is not None for _, fidelities in rows for f in fidelities)
    columns = ["output", "stage", "max rel err", "mean abs err", "mean cosine"]
    for column in [*columns, "equal"] if integer else columns:
        table.add_column(column, justify="left" if column in ("output", "stage") else "right")
    for stage, fidelities in rows:
        for f in fidelities:
            if f.equal_share is None:
                cells = [f"{f.max_rel:.3g}", f"{f.mean_abs:.3g}", f"{f.mean_cosine:.4f}"]
                cells += ["-"] if integer else []
            else:
                cells = ["-", "-", "-", f"{f.equal_share:.1%}"]
            table.add_row(f.output, stage, *cells)
    return table
