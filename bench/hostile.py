"""Run the whole hostile-input corpus and print the outcome per category.

Every case must exit 2 with one ``graphopt: error:`` line or exit 0 with an output that
loads and matches the original in ORT (see tests/graphopt_tests/robustness/corpus.py).

Usage: python bench/hostile.py [--subprocess] [--category NAME ...]
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
    print(f"{'category':18s} {'cases':>5s} {'exit 0':>7s} {'exit 2':>7s} {'fail':>5s}")
    for category, counts in outcomes.items():
        total = sum(counts.values())
        print(
            f"{category:18s} {total:5d} {counts['exit 0']:7d} {counts['exit 2']:7d} "
            f"{counts['fail']:5d}"
        )
    total = sum(sum(c.values()) for c in outcomes.values())
    print(f"{total} cases in {elapsed:.1f} s, {len(failures)} failures")
    for outcome in failures:
        print(f"FAIL {outcome.case.id}: exit {outcome.code}: {outcome.problems}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
