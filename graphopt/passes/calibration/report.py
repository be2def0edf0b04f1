"""The shared body of a lossy pass's report section: headline, notes, the pass's own table,
what it left alone and why, and fidelity against the model it was given.

Every lossy pass (prune excepted, whose report predates this) prints its section in this
order, so a reader finds the same things in the same places whichever pass ran.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity, fidelity_table

# Items of the "left alone" line shown before "and N more".
SHOWN_LEFT = 8


def fidelity_json(fidelity: dict[str, list[Fidelity]]) -> dict[str, list[dict[str, Any]]]:
    """``{"calibration": [...], "held-out": [...]}`` as JSON-ready lists."""
    return {name: [f.to_json() for f in rows] for name, rows in fidelity.items()}


def removed_share(before: int, after: int) -> float:
    """``1 − after / before`` (0 when there was nothing): the share a lossy pass removed."""
    return 1.0 - after / before if before else 0.0


def record_tail(record: Any) -> dict[str, Any]:
    """The keys a lossy pass's record ends its JSON with: fidelity, where its samples came
    from, the notes, and the EoRA record when ``--compensation eora`` added paths."""
    tail = {
        "fidelity": fidelity_json(record.fidelity),
        "fidelity_source": record.fidelity_source,
        "notes": record.notes,
    }
    compensation = getattr(record, "compensation", None)
    if compensation is not None:
        tail["compensation"] = compensation.to_json()
    return tail


def left_line(label: str, items: list[str]) -> str:
    """``  left dense: a: why; b: why and 3 more`` (the first :data:`SHOWN_LEFT` items)."""
    shown = "; ".join(items[:SHOWN_LEFT])
    more = f" and {len(items) - SHOWN_LEFT} more" if len(items) > SHOWN_LEFT else ""
    return f"  {label}: {shown}{more}"


def render_section(
    console: Console,
    headline: str,
    notes: list[str],
    table: Table | None,
    left_label: str,
    left: list[str],
    fidelity_title: str,
    fidelity: dict[str, list[Fidelity]],
    compensation: Any = None,
) -> None:
    """Print one lossy pass's section (see the module docstring), then the EoRA record's
    (``compensation``) when the pass added paths."""
    console.print(headline, markup=False)
    for note in notes:
        console.print(f"  {note}", markup=False)
    if table is not None:
        console.print(table)
    if left:
        console.print(left_line(left_label, left), markup=False)
    if fidelity:
        console.print(fidelity_table(fidelity_title, fidelity))
    if compensation is not None:
        compensation.render(console)
