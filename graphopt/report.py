"""Terminal rendering of run reports (rich tables). Nothing here changes a model.

What a report says, once each: the passes that changed the model (all of them with
``--verbose``) and how many others ran without a change or were skipped; what pruning did;
the notes; and the verdict. A run with lossy passes has two verdicts that must not be read as
one: the exact passes *verified* (against the original, and after a lossy pass against its
result) and the lossy change *measured* against the original, which no tolerance applies to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from rich.console import Console
from rich.table import Table

from graphopt.pipeline import PassStats, RunReport
from graphopt.registry import all_passes
from graphopt.verify import VerifyResult


@runtime_checkable
class RenderedDetails(Protocol):
    """A pass's structured result (``report.details[name]``) that prints itself.

    The core knows no pass: a lossy pass's record renders its own section (pruning: what was
    removed and the held-out fidelity) and names the note it stands for (``summary``), which
    is then not printed a second time.
    """

    summary: str

    def render(self, console: Console) -> bool:
        """Print the section; False when there is nothing to print."""
        ...


def signed_percent(change: float) -> str:
    """A relative change with exactly one sign: ``+296.7%``, ``-25.0%``, ``0.0%``.

    Callers used to print ``-{removed}%``, which gave ``--296.7%`` when the count grew
    (a negative share removed); the sign belongs to the number.
    """
    percent = 100 * change
    if abs(percent) < 0.05:
        return "0.0%"  # not "-0.0%"
    return f"{percent:+.1f}%"


def shown(stats: PassStats) -> bool:
    """Whether the default (not verbose) table lists a pass: it changed the model, it was
    rolled back, or it is a lossy pass the user asked for."""
    return bool(stats.hits or stats.nodes_removed or stats.status != "ok") or (
        not stats.exact and stats.runs > 0
    )


def pass_table(report: RunReport, verbose: bool = False) -> Table | None:
    """The per-pass table: every pass with ``verbose``, else those :func:`shown`; None if
    there is nothing to list."""
    rows = [s for s in report.stats if verbose or shown(s)]
    if not rows:
        return None
    title = "passes" if verbose else "passes that changed the model"
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ("pass", "kind", "runs", "hits", "nodes removed", "time (s)", "status"):
        table.add_column(
            column,
            justify="left" if column in ("pass", "kind", "status") else "right",
            no_wrap=column == "pass",
        )
    for s in rows:
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


def hidden_passes_line(report: RunReport) -> str:
    """What the default table leaves out, counted ("" when it leaves out nothing)."""
    hidden = [s for s in report.stats if not shown(s)]
    if not hidden:
        return ""
    idle = sum(1 for s in hidden if s.runs)
    skipped = len(hidden) - idle
    parts = []
    if idle:
        parts.append(f"{idle} ran without a change")
    if skipped:
        parts.append(
            f"{skipped} skipped (none of their ops in the model, or not a pass of this --target)"
        )
    return f"{len(hidden)} more passes: {', '.join(parts)}; --verbose lists every pass"


def verification_table(result: VerifyResult, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    # Integer and boolean outputs are compared element by element: the share equal, no
    # float error measures (a cosine of class ids or flags means nothing).
    counted = any(out.equal_share is not None for out in result.outputs)
    columns = ("output", "max abs err", "max rel err", "cosine", *(("equal",) if counted else ()))
    for column in columns:
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in result.outputs:
        if getattr(out, "not_compared", ""):
            # Random in the original, or empty at every shape: zeros here would read "equal".
            cells = (f"not compared ({out.not_compared})", "-", "-")
            table.add_row(out.name, *cells, *(("-",) if counted else ()))
            continue
        if out.equal_share is not None:
            table.add_row(out.name, "-", "-", "-", f"{out.equal_share:.1%}")
            continue
        row = [out.name, f"{out.max_abs:.3g}", f"{out.max_rel:.3g}", f"{out.cosine:.6f}"]
        table.add_row(*row, *(("-",) if counted else ()))
    return table


def print_report(report: RunReport, console: Console, verbose: bool = False) -> None:
    table = pass_table(report, verbose)
    console.print(table if table is not None else "no pass changed the model")
    if not verbose:
        hidden = hidden_passes_line(report)
        if hidden:
            console.print(hidden, markup=False)
    rendered = {
        details.summary
        for details in report.details.values()
        if isinstance(details, RenderedDetails) and details.render(console)
    }
    lossy = report.lossy_check is not None and bool(report.lossy_check.outputs)
    # A lossy change ORT cannot run (bf16) has no lossy_check, yet it is a lossy run: the
    # exact passes' check before it is not "original vs optimized".
    lossy = lossy or bool(report.lossy_unrunnable)
    if report.verification is not None and report.verification.outputs and not lossy:
        console.print(
            verification_table(
                report.verification, "verification (ONNX Runtime, original vs optimized)"
            )
        )
    if lossy and report.lossy_check is not None and len(report.lossy_check.outputs) > 1:
        console.print(verification_table(report.lossy_check, _lossy_title(report)))
    for note in report.notes:
        if note in rendered:
            continue  # printed above from the pass's record itself
        console.print(f"note: {note}", markup=False)
    for name in report.rolled_back:
        console.print(
            f"[yellow]rolled back:[/] {name} (failed verification or crashed; see status)"
        )
    if report.verification_skipped:
        console.print(f"[yellow]not verified:[/] {report.verification_skipped}")
    elif lossy:
        _print_lossy_verdict(report, console)
    elif report.verification is not None:
        verdict = "[green]passed[/]" if report.verification.ok else "[red]FAILED[/]"
        # The tolerance, when it is not the default 1e-4 (a float16/bfloat16 computation, a
        # --tolerance): "passed" says little without it.
        at = getattr(report.verification, "tolerance_text", "")
        console.print(
            f"verification {verdict}{' ' + at if at else ''}: worst relative error "
            f"{report.verification.worst_rel:.3g}"
        )
    if not report.verification_skipped:
        _print_shapes(report.verification or report.lossy_check, console)
    console.print(
        f"nodes {report.nodes_before} -> {report.nodes_after} "
        f"(non-Constant, subgraphs included) in {report.seconds:.2f} s"
    )


def _lossy_names(report: RunReport) -> str:
    return ", ".join(s.name for s in report.stats if not s.exact and s.runs) or "lossy passes"


def _lossy_title(report: RunReport) -> str:
    return (
        f"lossy change vs {report.reference_name} ({_lossy_names(report)}; ONNX Runtime on the "
        "verification inputs; measured, not checked)"
    )


def _print_lossy_verdict(report: RunReport, console: Console) -> None:
    """The exact passes' verification and the lossy change: two things, named, once each."""
    checks = report.exact_checks
    if not checks:
        console.print("exact passes: none ran, nothing to verify")
    else:
        failed = [c for c in checks if not c.result.ok]
        verdict = "[red]FAILED[/]" if failed else "verified"
        against = " and ".join(
            f"against {c.reference} (worst rel error {c.result.worst_rel:.3g})" for c in checks
        )
        console.print(f"exact passes: {verdict} {against}")
        for check in failed:
            console.print(f"  {check.result.reason}", markup=False)
    if report.unverified_after:
        console.print(f"[yellow]not verified:[/] {report.unverified_after}")
    lossy = report.lossy_check
    if lossy is None:
        console.print(
            f"lossy change vs {report.reference_name} ({_lossy_names(report)}): not run in ONNX "
            "Runtime; its fidelity above is measured on a float simulation of its rounding",
            markup=False,
        )
        return
    if len(lossy.outputs) > 1:
        return  # per output in the table titled "lossy change vs the original"
    (out,) = lossy.outputs
    if out.equal_share is not None:
        share = f"{out.equal_share:.1%}"
        console.print(f"{_lossy_title(report)}: {share} of elements equal", markup=False)
        return
    console.print(
        f"{_lossy_title(report)}: cosine {out.cosine:.6f}, max rel error {out.max_rel:.3g}, "
        f"max abs error {out.max_abs:.3g}",
        markup=False,
    )


def _print_shapes(result: VerifyResult | None, console: Console) -> None:
    """Which input shapes the verdict covers (a second one catches baked dims); plain text:
    dim names such as x[2] are not rich markup."""
    if result is None:
        return
    if result.shapes:
        count = len(result.shapes)
        label = "input shape" if count == 1 else f"{count} input shapes"
        console.print(f"checked at {label}: " + " | ".join(result.shapes), markup=False)
    if result.shape_note:
        console.print(f"note: {result.shape_note}", markup=False)


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


def describe_stage(message: str) -> str:
    """A progress message as a phrase: ``running constant-folding (round 2)`` for a pass,
    other messages ("verifying", "writing the output") as they are."""
    name = message.split(" (round ")[0]
    return f"running {message}" if name in all_passes() else message


@contextlib.contextmanager
def progress_display(console: Console) -> Iterator:
    """A status line naming the running pass; silent when stderr is not a terminal."""
    if not console.is_terminal:
        yield lambda message: None
        return
    with console.status("loading the model") as status:
        yield lambda message: status.update(describe_stage(message))
