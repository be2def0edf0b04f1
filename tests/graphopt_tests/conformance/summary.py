"""Summary plugin: prints the conformance counts at the end of the run (also under xdist).

Each test records its counts with ``record_property``; the properties travel with the test
reports from xdist workers to the controller, where they are summed here.

The folder's conftest registers this plugin. Under ``pytest tests -n 2`` the xdist controller
never loads that conftest (it collects nothing), so the summary then needs
``pytest_plugins = ["graphopt_tests.conformance.summary"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

_node_results: list[dict[str, Any]] = []
_light_results: list[dict[str, Any]] = []


def pytest_runtest_logreport(report) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key == "conformance":
            _node_results.append(value)
        elif key == "light_model":
            _light_results.append(value)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _node_results and not _light_results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("graphopt conformance")
    if _node_results:
        _node_summary(write)
    if _light_results:
        write("light models (random weights): nodes before -> after, worst rel. error")
        for row in sorted(_light_results, key=lambda r: r["model"]):
            worst = row["worst_rel"]
            extra = f", rolled back: {row['rolled_back']}" if row["rolled_back"] else ""
            worst_text = f"{worst:.2g}" if worst is not None else "n/a"
            write(
                f"  {row['model']:<14} {row['nodes_before']:>5} -> {row['nodes_after']:<5} "
                f"{worst_text}{extra}"
            )


def _node_summary(write) -> None:
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in _node_results:
        by_mode.setdefault(row["mode"], []).append(row)
    first = next(iter(by_mode.values()))
    cases = sum(r["cases"] for r in first)
    before = sum(r["passing_before"] for r in first)
    write(
        f"node cases: {cases} in {len(first)} op families; passing in ORT before graphopt: {before}"
    )
    not_before: Counter[str] = Counter()
    for row in first:
        not_before.update(row["not_before"])
    if not_before:
        write(f"  not passing before ({cases - before}), most common reasons:")
        for reason, count in not_before.most_common(8):
            write(f"    {count:>4}  {reason}")
    for mode, rows in by_mode.items():
        checked = sum(r["checked"] for r in rows)
        after = sum(r["passing_after"] for r in rows)
        not_baked: Counter[str] = Counter()
        for row in rows:
            not_baked.update(row["not_baked"])
        skipped = sum(not_baked.values())
        write(
            f"{mode:>8}: checked {checked}, passing after {after}, regressed {checked - after}"
            + (f", not bakeable {skipped}" if mode == "baked" else "")
        )
        for reason, count in not_baked.most_common():
            write(f"    not baked {count:>4}  {reason}")
        for row in rows:
            for line in row["regressions"]:
                write(f"    REGRESSED {line}")
