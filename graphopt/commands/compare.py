"""``graphopt compare A B``: two models on the same inputs, and how far apart their outputs are.

Exit 0 when every output is within tolerance, 1 when one is not (or the models do not line
up: other inputs or outputs, an output of another shape), 2 on bad input (a file that cannot
be read, an unusable ``--inputs`` file, a model A that ONNX Runtime cannot run). The logic
is in :mod:`graphopt.backends.ort_compare`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Any

from graphopt.commands.bench import add_session_arguments

if TYPE_CHECKING:
    from rich.console import Console

# Width of the longest bar in --histogram.
BAR_WIDTH = 40


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``compare`` subparser."""
    parser = commands.add_parser(
        "compare",
        help="compare two models' outputs on the same inputs (exit 1 when they differ)",
        description="Run models A and B in ONNX Runtime on the same inputs (your .npz, or "
        "generated at two shapes where dims are symbolic, with the seed printed) and "
        "report per output: max abs error, error relative to A's largest magnitude, cosine "
        "and argmax agreement over the last axis (trailing size-1 axes dropped). Exit 0 "
        "within tolerance, 1 otherwise, 2 on bad input.",
    )
    parser.add_argument("model_a", metavar="A", help="reference model (.onnx)")
    parser.add_argument("model_b", metavar="B", help="model to check against A (.onnx)")
    parser.add_argument(
        "--inputs",
        metavar="FILE.npz",
        help="your inputs: one array per model input (numpy.savez; no pickles)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DxD...",
        help="bind an input's shape for generated inputs (repeatable)",
    )
    # None: not given, so that a seed next to --inputs (which it cannot affect) is refused.
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the generated inputs (0; not with --inputs)"
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="largest error relative to each output's largest magnitude (default by A's "
        "float type, as optimize verifies: float32 1e-4, float16 7.8e-3, bfloat16 6.3e-2)",
    )
    parser.add_argument(
        "--cos-min", type=float, default=None, help="smallest cosine allowed (default: none)"
    )
    parser.add_argument(
        "--histogram",
        action="store_true",
        help="show each output's errors by decade of relative error",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)"
    )
    # ORT's optimizations off by default: what differs is then the models, not how ORT
    # fused each of them (optimize's verification runs the same way).
    add_session_arguments(parser, default_level="disable")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Compare; print the tables (or JSON) and the verdict; exit 0 / 1 / 2."""
    from graphopt.backends.ort_compare import CompareRequest, run_compare, to_json
    from graphopt.backends.ort_custom_ops import using_custom_ops
    from graphopt.errors import EXIT_CHECK_FAILED, EXIT_OK

    request = CompareRequest.from_namespace(args)
    with using_custom_ops(args.custom_ops or []):
        result = run_compare(request)
    if args.json:
        sys.stdout.write(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        _render(result, out)
    if not result.ok:
        err.print(f"graphopt: compare: FAIL: {result.reason}", markup=False, soft_wrap=True)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _render(result: Any, out: Console) -> None:
    from rich.table import Table

    out.print(f"A: {result.a}\nB: {result.b}", markup=False, soft_wrap=True)
    out.print(f"inputs: {result.inputs}", markup=False, soft_wrap=True)
    for index, shapes in enumerate(result.shapes, 1):
        out.print(f"  shape {index}: {shapes}", markup=False, soft_wrap=True)
    if result.shape_note:
        out.print(f"  ({result.shape_note})", markup=False, soft_wrap=True)
    if result.rows:
        table = Table(title_justify="left")
        for name, justify in (
            ("shape", "right"),
            ("output", "left"),
            ("dims", "left"),
            ("max abs", "right"),
            ("rel err", "right"),
            ("cosine", "right"),
            ("argmax", "right"),
            ("", "left"),
        ):
            table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for row in result.rows:
            table.add_row(
                str(row.shape_index + 1),
                row.name,
                row.layout,
                "-" if row.empty else _number(row.max_abs),
                "-" if row.empty else _number(row.max_rel),
                "-" if row.empty else f"{row.cosine:.6f}",
                "-" if row.argmax_agreement is None else f"{row.argmax_agreement:.2%}",
                "empty" if row.empty else "ok" if row.ok else "FAIL",
            )
        out.print(table)
    if any(row.histogram for row in result.rows):
        _render_histograms(result, out)
    cos = f", cosine >= {result.cos_min:g}" if result.cos_min is not None else ""
    tolerance = f"rel err <= {result.rtol:g}{cos}"
    # On failure the reason goes to stderr (one line), as graphopt's errors do.
    verdict = f"PASS: every output within {tolerance}" if result.ok else f"FAIL ({tolerance})"
    out.print(verdict, markup=False)


def _render_histograms(result: Any, out: Console) -> None:
    from graphopt.backends.ort_compare import histogram_labels

    labels = histogram_labels()
    for row in result.rows:
        if not row.histogram:
            continue
        out.print(
            f"errors of {row.name!r} (shape {row.shape_index + 1}), |a-b| / max|a|:",
            markup=False,
        )
        total = sum(row.histogram) or 1
        peak = max(row.histogram) or 1
        # Up to the largest error's bucket: the empty ones above it say nothing.
        last = max(i for i, count in enumerate(row.histogram) if count) if any(row.histogram) else 0
        for label, count in zip(labels[: last + 1], row.histogram[: last + 1], strict=True):
            bar = "#" * math.ceil(BAR_WIDTH * count / peak) if count else ""
            out.print(f"  {label:>13} {count:>10} {count / total:7.2%} {bar}", markup=False)


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
