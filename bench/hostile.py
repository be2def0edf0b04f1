"""Run the whole hostile-input corpus and print the outcome per category.

Every case must exit 2 with one ``graphopt: error:`` line, exit 0 with an output that loads
and matches the original in ORT, exit 4 (written, not verified: ORT cannot run the original),
or exit 3 only as out of memory (see tests/graphopt_tests/robustness/corpus.py, ``run_case``).

Usage: python bench/hostile.py [--subprocess] [--category NAME ...] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from graphopt_tests.robustness.corpus import CASES, run_case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subprocess", action="store_true", help="one process per case")
    parser.add_argument("--category", action="append", help="only these categories")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    failures = []
    start = time.perf_counter()
    for case in CASES:
        if args.category and case.category not in args.category:
            continue
        with tempfile.TemporaryDirectory(prefix="graphopt-hostile-") as folder:
            outcome = run_case(case, Path(folder), subprocess=args.subprocess)
        key = "fail" if not outcome.ok else f"exit {outcome.code}"
        outcomes[case.category][key] += 1
        if not outcome.ok:
            failures.append(outcome)
    elapsed = time.perf_counter() - start
    # Every allowed outcome gets a column (exit 3: out of memory; exit 4: written, not verified).
    keys = ["exit 0", "exit 2", "exit 3", "exit 4", "fail"]
    keys += sorted({k for c in outcomes.values() for k in c} - set(keys))
    lines = ["| category | cases | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for category, counts in outcomes.items():
        cells = [category, str(sum(counts.values()))] + [str(counts[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    every = Counter()
    for counts in outcomes.values():
        every.update(counts)
    total = sum(every.values())
    lines.append(
        "| **all** | " + " | ".join(str(n) for n in [total] + [every[k] for k in keys]) + " |"
    )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    print(f"{total} cases in {elapsed:.1f} s, {len(failures)} failures")
    for outcome in failures:
        print(f"FAIL {outcome.case.id}: exit {outcome.code}: {outcome.problems}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
