"""Long differential fuzz run of the default exact pipeline (random valid graphs vs ORT).

Same generator and property as tests/graphopt_tests/robustness/test_fuzz_exact_passes.py,
with many more examples and a fresh random seed unless one is given. Prints the rate and, on a
mismatch, hypothesis's minimal failing graph and a reproduction blob.

Usage: python bench/fuzz.py [--examples 10000] [--seed N] [--minutes M] [--max-blocks 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, given, seed, settings

from graphopt_tests.robustness.fuzzgraphs import check_optimize_preserves, models


class _Stop(Exception):
    """Raised inside the property when the time budget is spent."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--max-blocks", type=int, default=8)
    args = parser.parse_args()
    run_seed = args.seed if args.seed is not None else int(time.time())
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    count = 0
    start = time.perf_counter()

    @seed(run_seed)
    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(models(max_blocks=args.max_blocks))
    def prop(proto) -> None:
        nonlocal count
        if deadline is not None and time.monotonic() > deadline:
            raise _Stop
        count += 1
        check_optimize_preserves(proto)

    status = 0
    try:
        prop()
    except _Stop:
        pass
    except Exception as exc:  # a mismatch: hypothesis has printed the minimal example
        print(f"MISMATCH: {type(exc).__name__}: {exc}")
        status = 1
    elapsed = time.perf_counter() - start
    print(
        f"seed {run_seed}: {count} examples in {elapsed:.1f} s "
        f"({count / elapsed:.1f} examples/s); {'mismatch found' if status else 'no mismatch'}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
