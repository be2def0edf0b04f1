"""``graphopt optimize``'s engine flags (--engine, --shapes, --builder-level,
--compute-capability), the options they fill, and the engine part of the report.

Imported by every ``graphopt`` invocation to build its parser, so it imports nothing heavy
(the build itself, onnx and TensorRT load only when --engine is given).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from graphopt.backends.tensorrt.build import EngineReport

# --compute-capability spellings (TensorRT-RTX's ComputeCapability SM75 ... SM121).
COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")


@dataclass
class EngineOptions:
    """How ``--engine`` builds a TensorRT engine from the optimized model."""

    path: str | os.PathLike
    shapes: list[str] = field(default_factory=list)  # "name:min=AxB,opt=AxB,max=AxB"
    builder_level: int | None = None  # 0-5; None: TensorRT's default (3)
    compute_capabilities: list[str] = field(default_factory=list)  # "8.9", "12.0"
    # The run's input model and ONNX output, where known (the CLI fills them): the engine
    # path must be neither, and --shapes names are checked against the input before the
    # passes run rather than after the ONNX output is written.
    input_path: str | os.PathLike | None = None
    output_path: str | os.PathLike | None = None


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "TensorRT engine (needs tensorrt_rtx or tensorrt; pip install 'graphopt[tensorrt]')"
    )
    group.add_argument(
        "--engine",
        metavar="OUT.plan",
        help="also build and serialize a TensorRT engine from the output (exit 4 when no "
        "TensorRT module imports: the ONNX is written, the engine is not)",
    )
    group.add_argument(
        "--shapes",
        action="append",
        metavar="NAME:min=DxD,opt=DxD,max=DxD",
        help="optimization profile of a dynamic input (repeatable; a dim it shares by name "
        "with other inputs takes this range there too; a shape-tensor input, e.g. one "
        "feeding Reshape's shape, takes its values' range; default: from --input-shape, "
        "else derived per dim: batch 1/1/8, sequence 1/128/512 capped at what the model "
        "takes, image 224)",
    )
    group.add_argument(
        "--builder-level",
        type=int,
        metavar="0-5",
        help="TensorRT builder optimization level (default 3)",
    )
    group.add_argument(
        "--compute-capability",
        action="append",
        choices=COMPUTE_CAPABILITIES,
        help="TensorRT-RTX target GPU architectures (repeatable; default: this machine's "
        "GPU, or 8.9 without one; FP8 needs >= 8.9)",
    )


def engine_options(args: argparse.Namespace) -> EngineOptions | None:
    """The engine options the flags ask for; None without --engine (other flags refused)."""
    from graphopt.errors import UserInputError

    if args.engine is None:
        given = [
            flag
            for flag, value in (
                ("--shapes", args.shapes),
                ("--builder-level", args.builder_level),
                ("--compute-capability", args.compute_capability),
            )
            if value is not None
        ]
        if given:
            raise UserInputError(f"{', '.join(given)} only apply with --engine OUT.plan")
        return None
    from pathlib import Path

    from graphopt.api import default_output_path

    output = args.output
    if getattr(args, "in_place", False):
        output = args.input
    elif output is None:
        output = default_output_path(Path(args.input))
    return EngineOptions(
        args.engine,
        list(args.shapes or ()),
        args.builder_level,
        list(args.compute_capability or ()),
        input_path=args.input,
        output_path=output,
    )


def print_engine_report(report: EngineReport, out: Console, err: Console, verbose: bool) -> bool:
    """The engine part of the report; False when no engine was built (the reason on stderr)."""
    if not report.built:
        err.print(
            f"graphopt: error: written but the engine was not built: {report.skipped}",
            markup=False,
            soft_wrap=True,
        )
        return False
    counts = ", ".join(f"{p} {n}" for p, n in sorted(report.precision_counts().items()))
    out.print(
        f"engine: {report.path}, {report.engine_bytes / 1e6:.1f} MB, built in "
        f"{report.seconds:.2f} s with {report.module}; {len(report.layers)} layers "
        f"(declared output precisions: {counts})",
        markup=False,
        soft_wrap=True,
    )
    for line in report.settings:
        out.print(f"  {line}", markup=False)
    for change in report.precision_changes:
        out.print(f"  precision change: {change}", markup=False, soft_wrap=True)
    for profile in report.profiles:
        out.print(f"  profile {profile.describe()}", markup=False)
    for note in report.notes:
        out.print(f"  note: {note}", markup=False, soft_wrap=True)
    if verbose:
        for layer in report.layers:
            out.print(f"  {layer.name}  {layer.kind}  {'/'.join(layer.precisions)}", markup=False)
    else:
        out.print("  (-v lists every layer with its declared precision)", markup=False)
    return True
