"""Long differential fuzz run of the default exact pipeline (random valid graphs vs ORT).

Same generator and property as tests/graphopt_tests/robustness/test_fuzz_exact_passes.py,
with many more examples and a fresh random seed unless one is given. Prints the rate and, on a
mismatch, hypothesis's minimal failing graph and a reproduction blob.

Usage: python bench/fuzz.py [--examples 10000] [--seed N] [--minutes M] [--max-blocks 8]
       [--opsets 7,9,11,13,17,18] [--dtypes float32,float16,...] [--dynamic N,S|none]
       [--blocks conv_bn,if_branch,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, given, seed, settings
from onnx import TensorProto

from graphopt_tests.robustness.fuzzgraphs import (
    BLOCKS,
    DTYPES,
    OPSETS,
    check_optimize_preserves,
    models,
)


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t and t != "none"]


class _Stop(Exception):
    """Raised inside the property when the time budget is spent."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--max-blocks", type=int, default=8)
    parser.add_argument("--opsets", default=",".join(map(str, OPSETS)), help="drawn from")
    names = ",".join(TensorProto.DataType.Name(d).lower() for d in DTYPES)
    parser.add_argument("--dtypes", default=names, help="element types drawn from")
    parser.add_argument("--dynamic", default="N,S", help="symbolic dims that may be drawn")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help="blocks that may be drawn")
    args = parser.parse_args()
    strategy = models(
        max_blocks=args.max_blocks,
        opsets=tuple(int(o) for o in _csv(args.opsets)),
        dtypes=tuple(TensorProto.DataType.Value(d.upper()) for d in _csv(args.dtypes)),
        dynamic=tuple(_csv(args.dynamic)),
        blocks=tuple(_csv(args.blocks)),
    )
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
    @given(strategy)
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
