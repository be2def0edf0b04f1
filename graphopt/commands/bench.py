"""``graphopt bench MODEL [MODEL2 ...]``: latency and throughput in ONNX Runtime, side by side.

Per batch size: every model gets the same generated inputs (graphopt's input generator, the
seed printed), its own session with the chosen provider, threads and optimization level,
warm-up runs, then ``--runs`` interleaved rounds (:func:`graphopt.timing.interleaved`) so
that load from other processes falls on every model alike, each timed run primed by an
untimed run of the same model (every model timed warm). Reported per model: median, p10
and p90 latency, throughput (batch / median latency), and from the second model on its speed
relative to the first: the median over rounds of time(first) / time(model), with the p10-p90
of those per-round ratios as the spread.

The defaults follow the project's measure: ORT CPU, 1 intra-op thread, sequential
execution, ORT's graph optimizations on (what a deployment gets), 3 warm-up runs, 20 rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
# Past this many model runs in all, a progress bar is shown (on a terminal).
PROGRESS_MIN_RUNS = 50


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``bench`` subparser."""
    parser = commands.add_parser(
        "bench",
        help="time models in ONNX Runtime side by side (latency, throughput, ratio)",
        description="Time one or more models in ONNX Runtime on the same generated inputs: "
        "warm-up, then interleaved runs so that drift hits every model alike. Reports "
        "median/p10/p90 latency and throughput per batch size, and each model's speed "
        "relative to the first (median of per-round ratios, with their p10-p90).",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model files (.onnx, .ort)")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        metavar="N",
        help="batch sizes to time (binds the models' symbolic batch dim; default: the "
        "generated inputs' batch: 1 for a symbolic batch dim, else the inputs' first dim)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ORT intra-op threads (default 1, the project's measure; 0: ORT's default)",
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"timed rounds (default {DEFAULT_RUNS})"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help=f"untimed runs per model first (default {DEFAULT_WARMUP})",
    )
    add_session_arguments(parser, default_level="all")
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DxD...",
        help="bind an input's shape, e.g. input:1x3x224x224 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_session_arguments(parser: argparse.ArgumentParser, default_level: str) -> None:
    """``--provider``, ``--opt-level`` and ``--custom-ops``: shared with ``compare``."""
    from graphopt.backends.ort import OPT_LEVELS

    parser.add_argument(
        "--provider",
        action="append",
        metavar="P",
        help="ORT execution provider: cpu (default), cuda, tensorrt, openvino, dml, coreml, "
        "... or ORT's full name; comma-separated or repeated for a priority list",
    )
    parser.add_argument(
        "--opt-level",
        choices=tuple(OPT_LEVELS),
        default=default_level,
        help=f"ORT graph optimization level (default {default_level})",
    )
    parser.add_argument(
        "--custom-ops",
        action="append",
        metavar="LIB.so",
        help="ONNX Runtime custom-op library to register (repeatable)",
    )


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Time the models; print a table or JSON. Exit 0, or 2 on bad input."""
    from graphopt.backends.ort_bench import BenchRequest, run_bench, to_json
    from graphopt.backends.ort_custom_ops import using_custom_ops
    from graphopt.errors import EXIT_OK

    request = BenchRequest.from_namespace(args)
    with using_custom_ops(args.custom_ops or []), _progress(err, request) as tick:
        result = run_bench(request, tick)
    if args.json:
        sys.stdout.write(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
        sys.stdout.flush()
    else:
        _render(result, out)
    return EXIT_OK


class _progress:
    """A rich progress bar over all rounds when the run is long and stderr a terminal."""

    def __init__(self, err: Console, request: Any) -> None:
        self.err = err
        self.total = request.rounds * max(1, len(request.batches))
        self.enabled = err.is_terminal and self.total * len(request.models) >= PROGRESS_MIN_RUNS
        self.progress = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        self.progress.__enter__()
        task = self.progress.add_task("timing rounds", total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def _render(result: Any, out: Console) -> None:
    from rich.table import Table

    config = result.config
    out.print(
        f"ONNX Runtime {result.ort_version}, {', '.join(config.providers)}, "
        f"{config.threads or 'default'} intra-op thread(s), opt level {config.opt_level}; "
        f"{result.warmup} warm-up + {result.rounds} interleaved rounds (each timed run "
        f"primed by one untimed); inputs seed "
        f"{result.seed}",
        markup=False,
        soft_wrap=True,
    )
    for batch in result.batches:
        title = f"batch {batch.batch}" if batch.batch is not None else "default batch"
        table = Table(title=f"{title}: {batch.shapes}", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("model", overflow="fold")
        for name in ("items/run", "median ms", "p10 ms", "p90 ms", "items/s"):
            table.add_column(name, justify="right")
        table.add_column("vs #1 (p10-p90)", justify="right")
        for index, row in enumerate(batch.rows, 1):
            table.add_row(
                str(index),
                row.path,
                str(row.items),
                f"{row.latency.median * 1e3:.3f}",
                f"{row.latency.p10 * 1e3:.3f}",
                f"{row.latency.p90 * 1e3:.3f}",
                "-" if row.throughput is None else f"{row.throughput:.1f}",
                _ratio_cell(row),
            )
        out.print(table)
    if any(len(b.rows) > 1 for b in result.batches):
        out.print(
            "vs #1: median over rounds of time(#1) / time(model); above 1.00x the model is "
            "faster than #1",
            markup=False,
        )
    if any(row.per_item for b in result.batches for row in b.rows):
        out.print(
            "per item: that model runs another batch than #1 (items/run), so its ratio is of "
            "the time per item: (time(#1) / items(#1)) / (time(model) / items(model))",
            markup=False,
        )


def _ratio_cell(row: Any) -> str:
    """``1.23x (1.18-1.27)``, marked ``per item`` where the batches differ; ``ref`` for #1."""
    from graphopt.backends.ort_bench import ratio_text

    if row.ratio is None:
        return "ref"
    return ratio_text(row.ratio) + (" per item" if row.per_item else "")
