"""The ``graphopt`` command line.

Exit codes: 0 success; 1 a check failed (verification); 2 bad input or usage;
3 internal error (a bug: please report it) or out of memory (one line saying so);
4 written but not verified (ONNX Runtime cannot run the original model on the generated
inputs, or all its outputs are empty; never with --no-verify), or written but its --engine
not built (no TensorRT module imports); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from graphopt import __version__
from graphopt.commands import COMMANDS
from graphopt.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_VERIFIED,
    EXIT_OK,
    GraphoptError,
    UserInputError,
    is_out_of_memory,
    is_rust_panic,
)

if TYPE_CHECKING:  # imported when a command runs, so that --help stays fast
    from graphopt.api import OptimizeOptions
    from graphopt.registry import PassOption

EXIT_INTERNAL = 3
# What the run was doing, for the out-of-memory message ("out of memory while verifying"):
# set by optimize's progress callback. One run per process, so module state is enough.
_stage = ["starting"]
# What str.splitlines breaks at.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # main() prefixes "graphopt: error: " already; a subcommand's parser names itself in
        # the help hint ("graphopt optimize --help"), not as a second prefix.
        raise UserInputError(f"{message} (see {self.prog} --help)")


def build_parser(lossy_flags: bool = True) -> argparse.ArgumentParser:
    """The parser; ``lossy_flags`` False leaves out the flags the lossy passes declare, which
    cost loading every pass (0.25 s), for commands other than ``optimize``."""
    parser = _ArgumentParser(
        prog="graphopt",
        description="Optimize exported ONNX graphs: erase, fuse, verify.",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 bad input or usage, 3 internal error "
        "or out of memory, "
        "4 written but not verified, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what passes do")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_ArgumentParser
    )

    opt = commands.add_parser(
        "optimize",
        help="run a pipeline of passes on a model",
        description="Run the default exact pipeline (or the passes you "
        "name) on a model, verify it against the original in ONNX "
        "Runtime, and write the result.",
    )
    opt.add_argument("input", help="model file (.onnx)")
    # Also accepted after the command (`graphopt optimize --verbose`); SUPPRESS keeps the
    # top-level flag's value when it is not repeated here.
    opt.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="list every pass in the report (also those that changed nothing) and log what "
        "passes do",
    )
    opt.add_argument("-o", "--output", help="output file (default: IN_STEM.opt.onnx beside IN)")
    opt.add_argument("--in-place", action="store_true", help="replace the input atomically")
    opt.add_argument(
        "--passes",
        help="comma-separated passes to run, in this order; a lossy pass asked for with "
        "--prune must be in the list (where it runs)",
    )
    opt.add_argument("--skip", help="comma-separated passes to leave out of the pipeline")
    opt.add_argument("--recipe", help="YAML recipe file (see README for the schema)")
    opt.add_argument("--no-verify", action="store_true", help="do not compare with ORT")
    opt.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max error relative to each output's largest magnitude, for every output "
        "(default by the model's float type: float32 1e-4, float16 7.8e-3, bfloat16 6.3e-2)",
    )
    opt.add_argument(
        "--custom-ops",
        action="append",
        metavar="LIB.so",
        help="ONNX Runtime custom-op library registered in every ORT session graphopt "
        "creates, to verify models with custom ops (repeatable)",
    )
    opt.add_argument(
        "--provider",
        metavar="P[,P...]",
        help="ONNX Runtime execution provider(s) of verification and of the lossy passes' "
        "calibration and fidelity runs: cpu (default), cuda, tensorrt, openvino, ... or ORT's "
        "full names; one that is not available is an error",
    )
    opt.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DxD...",
        help="bind an input's shape, e.g. input:1x3x224x224 (repeatable)",
    )
    opt.add_argument(
        "--verify-inputs",
        metavar="FILE.npz",
        help="verify on your own data: one array per model input (numpy.savez; no pickles)",
    )
    opt.add_argument(
        "--fold-limit",
        default=None,
        help="largest new tensor constant folding may create: 1MB (default), 512KB, bytes, or none",
    )
    opt.add_argument(
        "--external-data",
        action="store_true",
        help="write weights to OUT.data (automatic past 2 GB)",
    )
    opt.add_argument("--seed", type=int, default=None, help="seed of generated inputs (0)")
    opt.add_argument(
        "--target",
        # option_checks.TARGETS, not imported: --help stays fast.
        choices=("portable", "ort", "tensorrt"),
        default=None,
        help="portable (default): standard ONNX ops only; ort: also ONNX Runtime's "
        "com.microsoft fused ops; tensorrt: standard ops in the forms TensorRT's parser "
        "takes (symmetric int8 Q/DQ, int4 weights with float16 activations)",
    )
    opt.add_argument(
        "--opset",
        type=int,
        default=None,
        help="raise the default-domain opset to N first (onnx version converter, verified)",
    )
    opt.add_argument(
        "--save-ort-optimized",
        metavar="PATH",
        help="also write ONNX Runtime's optimized form of the output for deployment "
        "(level extended; PATH.ort: the .ort format of ORT Mobile/minimal builds)",
    )
    # TensorRT: --engine, --shapes, --builder-level, --compute-capability.
    from graphopt.backends.tensorrt.cli_options import add_engine_arguments

    add_engine_arguments(opt)
    if lossy_flags:
        _add_lossy_flags(opt)

    ins = commands.add_parser(
        "inspect",
        help="summarize a model: ops, params, FLOPs, I/O",
        description="Op histogram, parameters, size, FLOPs at the given "
        "or default shapes, opsets, inputs and outputs.",
    )
    ins.add_argument("input", help="model file (.onnx)")
    ins.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DxD...",
        help="bind an input's shape for FLOPs (repeatable)",
    )
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")

    ana = commands.add_parser(
        "analyze",
        help="channel dependency analysis: zero-invariant (prunable) groups",
        description="Build the channel dependency graph and list the zero-invariant groups: "
        "members, units, share of FLOPs and params, prunable or blocked with the reason. "
        "The model is analysed as `optimize --prune` prunes it: after the default exact "
        "passes, run on a copy (--raw: as the file is).",
    )
    ana.add_argument("input", help="model file (.onnx)")
    ana.add_argument(
        "--raw",
        action="store_true",
        help="analyse the file as it is, without the default exact passes first",
    )
    ana.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DxD...",
        help="bind an input's shape (repeatable)",
    )
    ana.add_argument("--json", action="store_true", help="print JSON instead of tables")

    _add_calib_command(commands)

    commands.add_parser(
        "passes",
        help="list the registered passes",
        description="List every pass: name, exact or lossy, stage, subgraph handling, description.",
    )
    for name in COMMANDS:
        _command_module(name).add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Pipes and CI logs get 120 columns rather than rich's 80, so pass names are not cut.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True, highlight=False)
    if threading.current_thread() is threading.main_thread():
        # Only the main thread may set handlers (main() also runs from other threads).
        signal.signal(signal.SIGTERM, _raise_interrupt)
    args: argparse.Namespace | None = None
    _stage[0] = "starting"
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser(lossy_flags="optimize" in words)
        args = parser.parse_args(words)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        if not args.verbose:
            _quiet_libraries()
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        _stage[0] = f"running graphopt {args.command}"
        if args.command in COMMANDS:
            return _command_module(args.command).run(args, out, err)
        return _COMMANDS[args.command](args, out, err)
    except GraphoptError as exc:
        _say(err, f"graphopt: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("graphopt: interrupted", markup=False)
        return EXIT_INTERRUPTED
    except MemoryError as exc:
        # The machine's limit, not the user's input (2) nor a crash to report (a traceback).
        _say(err, f"graphopt: error: {_out_of_memory(args, exc)}")
        return EXIT_INTERNAL
    except Exception as exc:
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise

        if is_out_of_memory(exc):  # ONNX Runtime's failed allocations are generic errors
            _say(err, f"graphopt: error: {_out_of_memory(args, exc)}")
            return EXIT_INTERNAL
        # A crash on a corrupt input file is bad input (exit 2), whichever stage hit it.
        blame = _blame_input(args, exc)
        if blame is not None:
            _say(err, f"graphopt: error: {blame}")
            return EXIT_BAD_INPUT
        _say(
            err,
            f"graphopt: internal error: {type(exc).__name__}: {exc} "
            "(set GRAPHOPT_DEBUG=1 for a traceback)",
        )
        return EXIT_INTERNAL
    except BaseException as exc:
        # A Rust library's panic (tokenizers, ...) reaches Python as pyo3's PanicException,
        # a BaseException: without this it left a traceback and exit 1. Other
        # BaseExceptions (SystemExit from argparse) go on as before.
        if not is_rust_panic(exc) or os.environ.get("GRAPHOPT_DEBUG"):
            raise
        _say(
            err,
            f"graphopt: internal error: {type(exc).__name__}: {exc} "
            "(set GRAPHOPT_DEBUG=1 for a traceback)",
        )
        return EXIT_INTERNAL


def _check_files(
    args: argparse.Namespace, output: str | Path | None, options: OptimizeOptions
) -> None:
    """Refuse, before any work, a file the run writes that it also reads or writes otherwise
    (run_files.check_overwrites, given the files only the CLI knows: --recipe, and
    --save-ort-optimized, written last over whatever is there)."""
    from graphopt import io
    from graphopt.run_files import check_overwrites

    also_written = []
    if args.save_ort_optimized is not None:
        if not args.save_ort_optimized.strip():
            raise UserInputError("--save-ort-optimized: empty path; give the file to write")
        io.check_output_target(Path(args.save_ort_optimized))
        also_written.append(("--save-ort-optimized", args.save_ort_optimized))
    also_read = [("the --recipe file", args.recipe)] if args.recipe else []
    check_overwrites(
        args.input,
        output,
        options,
        in_place=args.in_place,
        also_read=also_read,
        also_written=also_written,
    )


def _say(err: Console, message: str) -> None:
    """One line on stderr, whatever the message holds: a path or a library's error with a
    line break in it is shown with the break escaped."""
    one_line = message.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")
    err.print(one_line, markup=False, soft_wrap=True)


def _out_of_memory(args: argparse.Namespace | None, exc: BaseException) -> str:
    """One line: what ran out of memory, ORT's words for it if any, and what to try."""
    match = re.search(r"failed to allocate memory[^\n;]*|std::bad_alloc", str(exc), re.I)
    detail = f" (ONNX Runtime: {match.group(0).strip()})" if match else ""
    command = getattr(args, "command", None)
    hint = (
        "try --no-verify / a smaller --input-shape"
        if command == "optimize"
        # calib has no --input-shape: its arrays' sizes come from these.
        else "try a smaller --size or --limit"
        if command == "calib"
        else "try a smaller --input-shape"
    )
    return f"out of memory while {_stage[0]}{detail}; {hint}"


def _blame_input(args: argparse.Namespace | None, exc: Exception) -> str | None:
    """Why the input file, not graphopt, is at fault for ``exc`` (ONNX's checker); or None."""
    path = getattr(args, "input", None)
    if not path:
        return None
    from graphopt.io import explain_failure

    return explain_failure(path, exc)


class _NoTracebacks(logging.Filter):
    """Log records keep their message but lose attached tracebacks (shown with -v only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def _quiet_libraries() -> None:
    # onnx-ir and onnxscript log recoverable failures (e.g. shape inference on an odd model)
    # as warnings with a full traceback; without -v the user gets graphopt's own one-line
    # messages only.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTracebacks) for f in handler.filters):
            handler.addFilter(_NoTracebacks())


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _cmd_optimize(args: argparse.Namespace, out: Console, err: Console) -> int:
    from graphopt.api import OptimizeOptions, default_output_path, optimize
    from graphopt.input_dims import parse_input_shapes
    from graphopt.pipeline import PassSpec
    from graphopt.recipe import load_recipe, parse_size
    from graphopt.registry import get_pass
    from graphopt.report import describe_stage, print_report, progress_display

    if args.recipe is not None and not args.recipe.strip():
        # Not "no recipe": the user named one, and an empty path reads as the current folder.
        raise UserInputError("--recipe: empty path; give the recipe file")
    options = load_recipe(args.recipe) if args.recipe is not None else OptimizeOptions()
    # `is not None`: an empty --passes "" is a mistake, not "the default pipeline".
    if args.passes is not None:
        names = _names(args.passes, "--passes")
        options.passes = [PassSpec(get_pass(n).name) for n in names]
    if args.skip:
        # An empty --skip skips nothing (scripts pass --skip "$SKIP"); a list of only commas
        # is still a mistake.
        options.skip = [get_pass(n).name for n in _names(args.skip, "--skip")]
    if args.no_verify:
        options.verify = False
    if args.tolerance is not None:
        options.tolerance = args.tolerance
    if args.custom_ops:
        options.custom_ops = list(args.custom_ops)
    if args.provider:
        options.provider = args.provider
    if args.input_shape:
        options.input_shapes.update(parse_input_shapes(args.input_shape))
    if args.verify_inputs is not None:
        options.verify_inputs = args.verify_inputs
    if args.fold_limit is not None:
        options.fold_limit_bytes = parse_size(args.fold_limit)
    if args.external_data:
        options.external_data = True
    if args.seed is not None:
        options.seed = args.seed
    if args.target is not None:
        options.target = args.target
    if args.opset is not None:
        options.opset = args.opset
    _lossy_options(args, options)
    from graphopt.backends.tensorrt.build import EngineBuildError
    from graphopt.backends.tensorrt.cli_options import engine_options, print_engine_report

    options.engine = engine_options(args)
    output = args.output
    if output is None and not args.in_place:
        output = default_output_path(Path(args.input))
    _check_files(args, output, options)
    _stage[0] = "loading the model"
    with progress_display(err) as display:

        def progress(message: str) -> None:
            _stage[0] = describe_stage(message)
            display(message)

        engine_failure = None
        try:
            result = optimize(
                args.input, output, options, in_place=args.in_place, progress=progress
            )
        except EngineBuildError as exc:
            # The engine failed after the passes (parser, builder): the report still counts.
            result, engine_failure = exc.result, exc
    _stage[0] = "printing the report"
    print_report(result.report, out, verbose=args.verbose)
    if result.output_path is None:  # --in-place, the engine failed: the input stays
        out.print(
            f"{args.input}: left as it was (with --engine, --in-place replaces the input only "
            "once the engine builds)",
            markup=False,
            soft_wrap=True,
        )
    else:
        out.print(f"wrote {result.output_path}", markup=False)
    if engine_failure is not None:
        _say(err, f"graphopt: error: the engine was not built: {engine_failure}")
        return engine_failure.exit_code
    if args.save_ort_optimized:
        from graphopt.backends.ort import save_optimized

        saved = save_optimized(
            result.output_path, args.save_ort_optimized, custom_ops=options.custom_ops
        )
        out.print(f"wrote {saved} (ONNX Runtime's optimized model)", markup=False)
    if result.engine is not None and not print_engine_report(result.engine, out, err, args.verbose):
        return EXIT_NOT_VERIFIED  # written, but the engine asked for was not built
    missed = result.report.targets_missed
    if missed:
        # A target the user set is a check: missed, the run failed (exit 1), though the
        # model the report describes is written for a look.
        _say(err, f"graphopt: error: {'; '.join(missed)} (written all the same)")
        return EXIT_CHECK_FAILED
    if options.verify and not result.report.verified:
        # Asked to verify and could not: the output stands, but nothing proved it exact.
        report = result.report
        reason = report.verification_skipped or report.unverified_after or "no verification ran"
        # One line even when an input's name holds a line break (the reason names inputs).
        reason = reason.translate({ord(c): repr(c)[1:-1] for c in _LINE_BREAKS})
        _say(err, f"graphopt: error: written but not verified: {reason}")
        return EXIT_NOT_VERIFIED
    return EXIT_OK


def _dest(name: str) -> str:
    return f"lossy__{name}"


def _add_lossy_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per lossy pass, built from what the pass declares (its flag and
    the options that have one): a new lossy pass needs no change here. An option flag two
    passes declare (``--calib``) is one argument, listed with the first pass."""
    from graphopt.registry import flag_key, flag_owners, flagged_lossy_passes

    owners = flag_owners()
    added: set[str] = set()
    for cls in flagged_lossy_passes():
        group = parser.add_argument_group(f"{cls.name}: {cls.description()}")
        key = flag_key(cls.flag)
        if cls.flag_metavar is None:  # a switch (--sparse-kernels)
            group.add_argument(
                cls.flag, dest=_dest(key), action="store_const", const="on", help=cls.flag_help
            )
        else:
            group.add_argument(
                cls.flag, dest=_dest(key), metavar=cls.flag_metavar, help=cls.flag_help
            )
        for option in cls.options:
            if option.flag is None or flag_key(option.flag) in added:
                continue
            key = flag_key(option.flag)
            added.add(key)
            also = [t.owner.name for t in owners[key] if t.owner is not cls]
            group.add_argument(
                option.flag,
                dest=_dest(key),
                type=_flag_type(option),
                choices=option.choices,
                metavar=option.metavar or option.name.upper(),
                default=None,
                help=option.help + (f" (also for {', '.join(also)})" if also else ""),
            )


def _flag_type(option: PassOption) -> Callable[[str], Any]:
    """argparse's conversion of an option flag: numbers as numbers; a choice in its declared
    spelling (``--criterion L1`` is ``l1``, as in recipes and the API), which argparse's
    case-sensitive ``choices`` check then accepts."""
    if option.type in (int, float):
        return option.type
    return option.canonical if option.choices else str


def _lossy_options(args: argparse.Namespace, options: OptimizeOptions) -> None:
    """The lossy passes' flags into ``options.flags``, by key; the API resolves them (which
    pass each goes to, a recipe's pass they refine, or the error for one given alone)."""
    from graphopt.registry import flag_names

    for key in sorted(flag_names()):
        value = getattr(args, _dest(key), None)
        if value is not None:
            options.flags[key] = value


def _cmd_inspect(args: argparse.Namespace, out: Console, err: Console) -> int:
    from graphopt.analysis.summary import render_summary, summarize, summary_json
    from graphopt.input_dims import check_input_shapes, parse_input_shapes
    from graphopt.io import load

    loaded = load(args.input)
    shapes = parse_input_shapes(args.input_shape)
    check_input_shapes(loaded.model, shapes)  # FLOPs at a shape the model cannot take: none
    summary = summarize(loaded.model, shapes)
    if args.json:
        _print_json(summary_json(summary))
    else:
        render_summary(summary, out)
    return EXIT_OK


def _cmd_analyze(args: argparse.Namespace, out: Console, err: Console) -> int:
    from graphopt.analysis.zig import analyze, render_report
    from graphopt.input_dims import check_input_shapes, parse_input_shapes
    from graphopt.io import load

    loaded = load(args.input)
    shapes = parse_input_shapes(args.input_shape)
    check_input_shapes(loaded.model, shapes)  # --raw too, as optimize refuses them
    model, prepared = loaded.model, ""
    if not args.raw:
        # Pruning runs after the exact passes: exporters' Transpose/Identity-wrapped weights,
        # unfolded shape arithmetic and unfused BatchNorms block groups that cleanup frees.
        from graphopt.api import OptimizeOptions, optimize

        result = optimize(model, None, OptimizeOptions(verify=False, input_shapes=shapes))
        model = result.model
        prepared = (
            "analysed after the default exact passes (on a copy: nodes "
            f"{result.report.nodes_before} -> {result.report.nodes_after}), as optimize "
            "--prune sees it; --raw: the file as is"
        )
    report = analyze(model, shapes)
    if args.json:
        data = report.to_json()
        data["exact_passes_first"] = not args.raw
        _print_json(json.dumps(data, indent=1))
    else:
        render_report(report, out)
        if prepared:
            out.print(prepared, markup=False)
    return EXIT_OK


def _add_calib_command(commands: argparse._SubParsersAction) -> None:
    cal = commands.add_parser(
        "calib",
        help="build a calibration .npz from a folder of images or a text file",
        description="Write the calibration data --calib takes (one array per model input) "
        "from a folder of images (the model's image input) or a file of sentences, one per "
        "line (its token inputs). Shapes and dtypes come from the model.",
    )
    cal.add_argument("input", help="model file (.onnx)")
    cal.add_argument("-o", "--output", required=True, help="output file (.npz)")
    source = cal.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="FOLDER", help="folder of images (sorted order)")
    source.add_argument("--text", metavar="FILE", help="text file, one sentence per line")
    cal.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its folder (local)")
    cal.add_argument("--seq-len", type=int, help="tokens per sentence (default: model's, or 128)")
    cal.add_argument(
        "--size",
        metavar="N|HxW",
        help="symbolic image dims: N for each, HxW for height and width (default 224)",
    )
    cal.add_argument("--resize", type=int, help="shorter side before the centre crop (>= crop)")
    # No argparse defaults for these: calib refuses an image option given with --text,
    # which it could not tell from a default.
    cal.add_argument("--crop", choices=("center", "none"), help="center (default) or none")
    cal.add_argument("--mean", help="per-channel mean after scaling, e.g. 0.485,0.456,0.406 (0)")
    cal.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225 (1)")
    cal.add_argument("--layout", choices=("nchw", "nhwc"), help="image layout (default: guess)")
    cal.add_argument("--channels", choices=("rgb", "bgr"), help="rgb (default) or bgr")
    cal.add_argument("--scale", type=float, help="pixels are divided by this first (255)")
    cal.add_argument("--limit", type=int, help="use at most N samples")
    cal.add_argument("--seed", type=int, help="shuffle the samples with this seed before --limit")


def _cmd_calib(args: argparse.Namespace, out: Console, err: Console) -> int:
    from graphopt.calib_builder import CalibRequest, build_calibration

    result = build_calibration(CalibRequest.from_namespace(args))
    out.print(result.describe(), markup=False, soft_wrap=True)
    return EXIT_OK


def _cmd_passes(args: argparse.Namespace, out: Console, err: Console) -> int:
    from graphopt.report import passes_table

    out.print(passes_table())
    return EXIT_OK


def _print_json(text: str) -> None:
    # Straight to stdout: rich's rendering costs ~75x the text's size in memory and time.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _names(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserInputError(
            f"{flag} {text!r}: names no pass; expected a comma-separated list of pass names"
        )
    return names


def _command_module(name: str):
    import importlib

    return importlib.import_module(f"graphopt.commands.{COMMANDS[name]}")


_COMMANDS = {
    "optimize": _cmd_optimize,
    "inspect": _cmd_inspect,
    "analyze": _cmd_analyze,
    "calib": _cmd_calib,
    "passes": _cmd_passes,
}


if __name__ == "__main__":
    sys.exit(main())
