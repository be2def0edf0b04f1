"""TensorRT engine builds from ``graphopt optimize --target tensorrt``, one row per model and
precision: does TensorRT's parser take the output, and what does the builder make of it.

    python bench/tensorrt_engines.py --models resnet18,mobilenet_v2,bert_tiny,minilm \
        --forms fp32,fp16,int8,int4-weight --work /tmp/trt

Needs ``tensorrt_rtx`` (``pip install -e ".[tensorrt]"``) or ``tensorrt``; the build runs
ahead of time on the CPU (no GPU: the engine is not run, and no tactic is timed). int8 uses
generated calibration inputs (``--calib random``): this checks what the parser and builder
accept, not accuracy. Prints a markdown table, a row as each build ends. ``--models all``:
every model of the catalog; the ONNX and plan files are deleted after their row unless
``--keep`` (the whole catalog's engines take tens of GB).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def build_row(model: str, form: str, work: Path) -> str:
    from graphopt.api import optimize
    from graphopt.models import build

    src = Path(build(model))
    out = work / f"{model}.{form}.onnx"
    plan = work / f"{model}.{form}.plan"
    flags = {} if form == "fp32" else {"quantize": form}
    if form in ("int8", "fp8"):
        flags["calib"] = "random"
    # Blockwise int4 DequantizeLinear is opset 21; float8 Q/DQ opset 19 (the pass says so
    # rather than raising the opset behind the user's back).
    opset = {"int4-weight": 21, "fp8": 19}.get(form)
    start = time.perf_counter()
    how = "built"
    try:
        try:
            result = optimize(src, out, _options(plan, opset, flags, []))
        except Exception as exc:
            if "profile was derived" not in str(exc):
                raise
            # What the error tells a user to do: give the shapes the model takes. The
            # catalog's test shape is opt, batch 1 to 8 around it.
            how = "built with --shapes from the catalog's test shape (derived profile fails)"
            result = optimize(src, out, _options(plan, opset, flags, _catalog_shapes(model)))
    except Exception as exc:  # a row, not a crash: the table says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"| {model} | {form} | failed: {first[:200]} | | | | |"
    total = time.perf_counter() - start
    engine = result.engine
    if engine is None or not engine.built:
        reason = engine.skipped if engine is not None else "no engine report"
        return f"| {model} | {form} | not built: {reason} | | | | |"
    counts = engine.precision_counts()
    precisions = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return (
        f"| {model} | {form} | {how} | {engine.engine_bytes / 2**20:.1f} MiB | "
        f"{engine.seconds:.2f} s | {len(engine.layers)} ({precisions}) | {total:.1f} s |"
    )


def _options(plan: Path, opset: int | None, flags: dict, shapes: list[str]):
    from graphopt.api import OptimizeOptions
    from graphopt.backends.tensorrt.cli_options import EngineOptions

    options = OptimizeOptions(target="tensorrt", verify=False, opset=opset, **flags)
    options.engine = EngineOptions(plan, shapes=shapes)
    return options


def _catalog_shapes(model: str) -> list[str]:
    """``--shapes`` for each input at the catalog's test shape, batch 1 / test / 8."""
    from graphopt.models import input_shapes

    specs = []
    for name, shape in input_shapes(model).items():
        low, high = (1, *shape[1:]), (max(8, shape[0]), *shape[1:])
        dims = ["x".join(map(str, s)) for s in (low, shape, high)]
        specs.append(f"{name}:min={dims[0]},opt={dims[1]},max={dims[2]}")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,bert_tiny,minilm")
    parser.add_argument("--forms", default="fp32,fp16,int8,int4-weight")
    parser.add_argument("--work", default="/tmp/graphopt-trt-engines")
    parser.add_argument("--keep", action="store_true", help="keep the ONNX and plan files")
    args = parser.parse_args()
    if args.models == "all":
        from graphopt.models import names

        args.models = ",".join(names())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from graphopt.backends.tensorrt.module import find_tensorrt

    shown = "all" if len(args.models.split(",")) > 8 else args.models
    found = find_tensorrt().found
    if found is None:
        raise SystemExit(f"no TensorRT module: {find_tensorrt().why_not()}")
    print(f"- command: `python bench/tensorrt_engines.py --models {shown} --forms {args.forms}`")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"- date: {date}; load {os.getloadavg()[0]:.1f}")
    cpu = platform.processor() or platform.machine()
    print(f"- TensorRT module: {found.name} {found.version}; {cpu}, no GPU")
    print()
    header = ["model", "form", "parse + build", "engine", "build time"]
    header += ["layers (declared output precisions)", "optimize + build"]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---:|---|---:|")
    for model in args.models.split(","):
        for form in args.forms.split(","):
            print(build_row(model, form, work), flush=True)
            if not args.keep:
                for path in work.glob(f"{model}.{form}.*"):
                    path.unlink()


if __name__ == "__main__":
    main()
