"""How often the static TensorRT lint table agrees with TensorRT's real ONNX parser.

``python bench/tensorrt_lint_agreement.py [--every N] [--show]``: every ONNX node test (or
every Nth) plus the catalog models given with ``--models`` (ONNX files), each parsed by the
installed TensorRT module and linted by the static table. Prints the agreement count and,
with --show, each disagreement with both reasons.
"""

from __future__ import annotations

import argparse
import sys
import time

import onnx

from graphopt.backends.tensorrt.agreement import node_tests, verdict
from graphopt.backends.tensorrt.module import find_tensorrt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1, help="take every Nth node test")
    parser.add_argument("--models", nargs="*", default=[], help="more ONNX files")
    parser.add_argument("--show", action="store_true", help="print each disagreement")
    args = parser.parse_args()
    trt = find_tensorrt().found
    if trt is None:
        print("no TensorRT module:", find_tensorrt().why_not())
        return 1
    start = time.perf_counter()
    cases = [c for i, c in enumerate(node_tests()) if i % args.every == 0]
    cases += [(path, onnx.load(path)) for path in args.models]
    verdicts = [verdict(trt, name, model) for name, model in cases]
    agree = sum(v.agrees for v in verdicts)
    rejected = sum(not v.parser_ok for v in verdicts)
    print(
        f"{trt.describe()}: static table agrees with the parser on {agree}/{len(verdicts)} "
        f"cases ({rejected} rejected by the parser) in {time.perf_counter() - start:.1f} s"
    )
    for v in verdicts:
        if not v.agrees and args.show:
            side = "parser rejects" if not v.parser_ok else "table rejects"
            reason = v.parser_reason if not v.parser_ok else v.static_reason
            print(f"  {v.name}: {side}: {' '.join(reason.split())[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
