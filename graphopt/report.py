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


def verification_table(report: RunReport) -> Table | None:
    result = report.verification
    if result is None or not result.outputs:
        return None
    table = Table(
        title="verification (ONNX Runtime, original vs optimized)",
        title_justify="left",
        show_edge=False,
    )
    for column in ("output", "max abs err", "max rel err", "cosine"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in result.outputs:
        table.add_row(out.name, f"{out.max_abs:.3g}", f"{out.max_rel:.3g}", f"{out.cosine:.6f}")
    return table


def print_report(report: RunReport, console: Console) -> None:
    console.print(pass_table(report))
    table = verification_table(report)
    if table is not None:
        console.print(table)
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
    console.print(
        f"nodes {report.nodes_before} -> {report.nodes_after} "
        f"(non-Constant, subgraphs included) in {report.seconds:.2f} s"
    )


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
