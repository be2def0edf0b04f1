"""Terminal rendering of run reports (rich tables). Nothing here changes a model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

from graphopt.pipeline import RunReport
from graphopt.registry import all_passes


def pass_table(report: RunReport) -> Table:
    title = (
        f"passes: nodes {report.nodes_before} -> {report.nodes_after} "
        "(non-Constant, subgraphs included)"
    )
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ("pass", "kind", "runs", "hits", "nodes removed", "time (s)", "status"):
        table.add_column(
            column,
            justify="left" if column in ("pass", "kind", "status") else "right",
            no_wrap=column == "pass",
        )
    for s in report.stats:
        table.add_row(
            s.name,
            "exact" if s.exact else "lossy",
            str(s.runs),
            str(s.hits),
            str(s.nodes_removed),
            f"{s.seconds:.3f}",
            s.status,
        )
    return table


def verification_table(report: RunReport, lossy: bool = False) -> Table | None:
    result = report.lossy_check if lossy else report.verification
    if result is None or not result.outputs:
        return None
    title = (
        "lossy change (ONNX Runtime, original vs result, generated inputs)"
        if lossy
        else "verification (ONNX Runtime, original vs optimized)"
        if report.lossy_check is None
        else "verification of the exact passes (ONNX Runtime, vs the lossy passes' result)"
    )
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ("output", "max abs err", "max rel err", "cosine"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in result.outputs:
        table.add_row(out.name, f"{out.max_abs:.3g}", f"{out.max_rel:.3g}", f"{out.cosine:.6f}")
    return table


def print_report(report: RunReport, console: Console) -> None:
    console.print(pass_table(report))
    for lossy in (True, False):
        table = verification_table(report, lossy)
        if table is not None:
            console.print(table)
    prune = report.details.get("prune")
    if prune is not None and prune.fidelity_pruned:
        console.print(pruning_table(prune))
    for note in report.notes:
        console.print(f"note: {note}")
    for name in report.rolled_back:
        console.print(
            f"[yellow]rolled back:[/] {name} (failed verification or crashed; see status)"
        )
    if report.verification_skipped:
        console.print(f"[yellow]not verified:[/] {report.verification_skipped}")
    elif report.verification is not None:
        verdict = "[green]passed[/]" if report.verification.ok else "[red]FAILED[/]"
        console.print(
            f"verification {verdict}: worst relative error {report.verification.worst_rel:.3g}"
        )
        # Which input shapes the verdict covers (a second one catches baked dims); plain text:
        # dim names such as x[2] are not rich markup.
        shapes = report.verification.shapes
        if shapes:
            label = "input shape" if len(shapes) == 1 else f"{len(shapes)} input shapes"
            console.print(f"checked at {label}: " + " | ".join(shapes), markup=False)
        if report.verification.shape_note:
            console.print(f"note: {report.verification.shape_note}", markup=False)
    console.print(
        f"nodes {report.nodes_before} -> {report.nodes_after} "
        f"(non-Constant, subgraphs included) in {report.seconds:.2f} s"
    )


def pruning_table(prune) -> Table:
    """Fidelity of pruning on held-out calibration samples, before/after compensation."""
    table = Table(
        title=(
            f"pruning {prune.target}: FLOPs -{100 * prune.flops_removed:.1f}%, params "
            f"-{100 * prune.params_removed:.1f}%; fidelity on {prune.heldout_samples} held-out "
            f"calibration samples ({prune.calibration})"
        ),
        title_justify="left",
        show_edge=False,
    )
    for column in ("output", "stage", "max rel err", "mean abs err", "mean cosine"):
        table.add_column(column, justify="left" if column in ("output", "stage") else "right")
    rows = [("pruned", prune.fidelity_pruned)]
    if prune.fidelity_compensated:
        rows.append((f"+ {prune.compensation}", prune.fidelity_compensated))
    for stage, fidelities in rows:
        for f in fidelities:
            table.add_row(
                f.output, stage, f"{f.max_rel:.3g}", f"{f.mean_abs:.3g}", f"{f.mean_cosine:.4f}"
            )
    return table


def passes_table() -> Table:
    table = Table(show_edge=False)
    for column in ("pass", "kind", "stage", "subgraphs", "description"):
        table.add_column(column)
    for name, cls in all_passes().items():
        table.add_row(
            name,
            "exact" if cls.exact else "lossy",
            cls.stage.name.lower(),
            "yes" if cls.handles_subgraphs else "untouched",
            cls.description(),
        )
    return table


@contextlib.contextmanager
def progress_display(console: Console) -> Iterator:
    """A status line naming the running pass; silent when stderr is not a terminal."""
    if not console.is_terminal:
        yield lambda message: None
        return
    with console.status("loading") as status:
        yield lambda message: status.update(f"running {message}")
