"""Print the exactness table (rows collected from test properties, so xdist works too)."""

from __future__ import annotations

from graphopt_tests.models.exactness import HEADER


def pytest_terminal_summary(terminalreporter):
    rows = [
        value
        for key in ("passed", "failed")
        for report in terminalreporter.stats.get(key, [])
        if getattr(report, "when", "") == "call"
        for name, value in getattr(report, "user_properties", [])
        if name == "exactness_row"
    ]
    if rows:
        terminalreporter.section("graphopt exactness (default exact pipeline)")
        terminalreporter.write_line(HEADER)
        for row in sorted(rows):
            terminalreporter.write_line(row)
