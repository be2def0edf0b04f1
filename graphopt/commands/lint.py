"""``graphopt lint --target tensorrt MODEL``: would TensorRT's ONNX parser take this model?

With ``tensorrt_rtx`` or ``tensorrt`` installed the real parser decides and every node it
rejects is listed; ``--static`` (or no module) uses the static rule table. Each error names
the node, its op, the reason and the graphopt option or pass that fixes it. The parser
runs in a child process: should it crash on the model, that is one error line (TensorRT
cannot load the model) and the static table's findings follow. Exit 0 when clean (warnings
allowed), 1 on errors (a parser crash included), 2 on bad input.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

TARGETS = ("tensorrt",)


def add_parser(commands: argparse._SubParsersAction) -> None:
    lint = commands.add_parser(
        "lint",
        help="check that a deployment target accepts a model (TensorRT's ONNX parser)",
        description="Check a model against a deployment target. tensorrt: TensorRT's own "
        "ONNX parser when tensorrt_rtx or tensorrt is installed (every rejected node is "
        "listed), else a static rule table of what that parser rejects. Exit 0 clean, "
        "1 errors found, 2 bad input.",
    )
    lint.add_argument("input", help="model file (.onnx)")
    lint.add_argument("--target", choices=TARGETS, default="tensorrt", help="(tensorrt)")
    lint.add_argument(
        "--static",
        action="store_true",
        help="use the static rule table even when a TensorRT module is installed",
    )
    lint.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    import json
    import sys

    import onnx_ir as ir

    from graphopt.backends.tensorrt.lint import lint_tensorrt
    from graphopt.errors import EXIT_CHECK_FAILED, EXIT_OK
    from graphopt.io import load

    # graphopt's loader: its checks turn a corrupt or hostile file into one line (exit 2),
    # and external-data locations that leave the model's folder are refused there.
    loaded = load(args.input)
    model = ir.serde.serialize_model(loaded.model)
    # TensorRT's parser reads external data beside the model's file, not the current folder.
    result = lint_tensorrt(model, static=args.static, path=loaded.path)
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=1) + "\n")
        return EXIT_CHECK_FAILED if result.errors else EXIT_OK
    for finding in result.findings:
        out.print(finding.describe(), markup=False, soft_wrap=True)
        if finding.fix:
            out.print(f"  fix: {finding.fix}", markup=False, soft_wrap=True)
    verdict = "rejected" if result.errors else "accepted"
    note = f" ({result.note})" if result.note else ""
    out.print(
        f"{args.input}: {verdict} by {result.checker}{note}: {len(result.errors)} error(s), "
        f"{len(result.warnings)} warning(s)",
        markup=False,
        soft_wrap=True,
    )
    return EXIT_CHECK_FAILED if result.errors else EXIT_OK
