"""Quantization coverage: every catalog model through every ``--quantize`` mode, checked.

Per model and mode, one ``graphopt.api.optimize`` call (with its verification) and then:

- (a) the output passes ``onnx.checker``;
- (b) ONNX Runtime (CPU) runs it with graph optimizations off, its outputs finite ("n/a"
  where ORT's CPU provider has no kernel for the type: bf16, whose fidelity graphopt
  measures on a float simulation, shown instead);
- (c) as deployed: with ORT's optimizations on (where it fuses Q/DQ into integer kernels with
  their own numerics) the outputs agree with the optimizations-off run, mean cosine within
  ``DEPLOY_SLACK`` ("n/a" for fp8, whose target is TensorRT: ORT 1.32's optimizer mishandles
  float8 Q/DQ, which graphopt's report says);
- (d) a fixed point: ``graphopt optimize`` run again on the output (same ``--target``, no
  ``--quantize``) leaves the same op sequence, so a quantized model stays quantized and
  unchanged.

Fidelity against the float original is shown, not judged: the inputs are generated (seeded
noise, or rendered text for the PP-OCR models) and most catalog weights are random, so the
numbers say how the modes compare on one architecture, not how accurate a trained model
stays (``bench/quantize.py`` measures that on real weights and data). int8 and fp8 calibrate
on ``--calib random`` (32 generated samples). The PP-OCR models (real weights) calibrate on 32
rendered text images and are compared on 8 others: on noise their outputs are ~0.

Usage: python bench/quantize_coverage.py [--models a,b] [--modes int8/ort,...]
       [--results FILE.jsonl] [--markdown FILE.md] [--render-only]
Rows are appended to ``--results`` as models finish (one child process per model), so a
long run can be split; ``--markdown`` renders the latest row of every model and mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# label -> OptimizeOptions fields
MODES: dict[str, dict] = {
    "int8/ort": {"quantize": "int8", "calib": "random", "target": "ort"},
    "int8/portable": {"quantize": "int8", "calib": "random"},
    "int8-dynamic/ort": {"quantize": "int8-dynamic", "target": "ort"},
    "int4-weight/ort": {"quantize": "int4-weight", "target": "ort"},
    "fp16/ort": {"quantize": "fp16", "target": "ort"},
    "bf16": {"quantize": "bf16"},
    "fp8/tensorrt": {"quantize": "fp8", "calib": "random", "target": "tensorrt", "opset": 19},
}
# (c): ORT's fused kernels round differently from the Q/DQ reference; more than this much
# mean cosine apart is a deployment that computes something else.
DEPLOY_SLACK = 0.01


@dataclass
class Run:
    """One model through one mode."""

    model: str
    mode: str
    seconds: float = 0.0
    valid: bool | None = None
    runs: bool | None = None  # None: n/a (ORT has no kernel for the type)
    deploys: bool | None = None  # None: n/a
    fixed_point: bool | None = None
    cosine: float | None = None  # worst output's mean cosine vs the original, ORT off
    cosine_deployed: float | None = None  # the same with ORT's optimizations on
    size: float | None = None  # file size / the original's
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:240] if text else type(exc).__name__


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64) if a.ndim else a.reshape(1, 1)
    b = b.reshape(len(b), -1).astype(np.float64) if b.ndim else b.reshape(1, 1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos = np.where(both_zero, 1.0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0))
    return float(cos.mean())


def _outputs(path: Path, feeds: dict, optimized: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def _worst_cosine(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    return min(
        _mean_cosine(a, b)
        for a, b in zip(reference, got, strict=True)
        if np.issubdtype(a.dtype, np.floating)
    )


def check(name: str, mode: str, workdir: Path, calib_text: Path | None) -> Run:
    """Every check of one model through one mode."""
    import onnx

    from graphopt import api, models
    from graphopt.inputs import make_inputs
    from graphopt.io import load

    run = Run(name, mode)
    source = models.get(name)
    shapes = models.input_shapes(name)
    fields = dict(MODES[mode])
    if calib_text is not None and fields.get("calib") == "random":
        fields["calib"] = str(calib_text)
    out = workdir / f"{name}.{mode.replace('/', '_')}.onnx"
    start = time.perf_counter()
    try:
        result = api.optimize(source, out, api.OptimizeOptions(input_shapes=shapes, **fields))
    except Exception as exc:
        run.errors.append(f"optimize: {_short(exc)}")
        run.seconds = time.perf_counter() - start
        return run
    run.seconds = time.perf_counter() - start
    record = result.report.details.get("quantize")
    run.summary = record.headline() if record is not None else ""
    run.size = out.stat().st_size / source.stat().st_size
    try:
        onnx.checker.check_model(str(out))
        run.valid = True
    except Exception as exc:
        run.valid = False
        run.errors.append(f"checker: {_short(exc)}")
    if calib_text is not None:
        # Fidelity on held-out rendered text too: on noise PP-OCR's outputs are ~0 everywhere
        # and their cosine says nothing.
        from graphopt.models.ocr import text_images

        ((input_name, shape),) = shapes.items()
        feeds = {input_name: text_images(8, [8, *shape[1:]], seed=7)}
    else:
        feeds = make_inputs(load(source).model, shapes, seed=3)
    reference = _outputs(source, feeds, optimized=False)
    unrunnable = getattr(record, "ort_unrunnable", "")
    if unrunnable:
        run.notes.append("ORT CPU has no kernel for it; fidelity from graphopt's simulation")
        fidelity = record.fidelity if record is not None else {}
        cosines = [f.mean_cosine for fs in fidelity.values() for f in fs]
        run.cosine = min(cosines) if cosines else None
    else:
        try:
            got = _outputs(out, feeds, optimized=False)
            run.runs = all(np.isfinite(g).all() for g in got if g.dtype.kind == "f")
            run.cosine = _worst_cosine(reference, got)
            if not run.runs:
                run.errors.append("ORT: non-finite outputs")
        except Exception as exc:
            run.runs = False
            run.errors.append(f"ORT: {_short(exc)}")
    if MODES[mode]["quantize"] == "fp8":
        run.notes.append("deployed check n/a: TensorRT target (ORT's optimizer mishandles fp8)")
    elif run.runs:
        try:
            deployed = _outputs(out, feeds, optimized=True)
            run.cosine_deployed = _worst_cosine(reference, deployed)
            run.deploys = abs(run.cosine_deployed - run.cosine) <= DEPLOY_SLACK
            if not run.deploys:
                run.errors.append(
                    f"ORT optimized: cosine {run.cosine_deployed:.4f} vs {run.cosine:.4f} "
                    "unoptimized"
                )
        except Exception as exc:
            run.deploys = False
            run.errors.append(f"ORT optimized: {_short(exc)}")
    again = out.with_name(out.stem + ".again.onnx")
    target = MODES[mode].get("target", "portable")
    try:
        second = api.optimize(out, again, api.OptimizeOptions(input_shapes=shapes, target=target))
        before = [(n.domain, n.op_type) for n in result.model.graph]
        after = [(n.domain, n.op_type) for n in second.model.graph]
        run.fixed_point = before == after
        if not run.fixed_point:
            run.errors.append(f"optimized again: {len(before)} -> {len(after)} nodes")
    except Exception as exc:
        run.fixed_point = False
        run.errors.append(f"optimized again: {_short(exc)}")
    for path in (out, again):
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
    return run


def check_model(name: str, modes: list[str], results: Path) -> None:
    """Every mode of one model; each row appended to ``results`` as it finishes."""
    from graphopt import models

    with tempfile.TemporaryDirectory(prefix="graphopt-qcov-") as tmp:
        workdir = Path(tmp)
        calib_text = None
        if models.spec(name).family == "ppocr":
            # Seeded noise leaves PP-OCR det's map at ~0: nothing to calibrate or compare.
            from prune_coverage import _text_calibration

            calib_text = _text_calibration(models.input_shapes(name), workdir)
        for mode in modes:
            try:
                run = check(name, mode, workdir, calib_text)
            except Exception as exc:  # a crash is a failed row, not a lost run
                run = Run(name, mode, errors=[f"crash: {_short(exc)}"])
            with results.open("a") as sink:
                sink.write(json.dumps(asdict(run)) + "\n")
            status = "ok" if run.ok else "FAIL " + "; ".join(run.errors)
            print(f"{name} {mode}: {status} ({run.seconds:.0f} s)", flush=True)


def load_runs(path: Path) -> list[Run]:
    latest: dict[tuple[str, str], Run] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                run = Run(**json.loads(line))
                latest[(run.model, run.mode)] = run
    return list(latest.values())


def _mark(flag: bool | None) -> str:
    return "n/a" if flag is None else ("✓" if flag else "✗")


def render(runs: list[Run], command: str) -> str:
    modes = [m for m in MODES if any(r.mode == m for r in runs)]
    by_model: dict[str, dict[str, Run]] = {}
    for run in runs:
        by_model.setdefault(run.model, {})[run.mode] = run
    head = "| model | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes) + "\n"
    lines = []
    for model, row in by_model.items():
        cells = []
        for mode in modes:
            run = row.get(mode)
            if run is None:
                cells.append("–")
            elif not run.ok:
                cells.append("✗ " + "; ".join(run.errors).replace("|", "\\|"))
            else:
                cos = f"{run.cosine:.4f}" if run.cosine is not None else "–"
                cells.append(f"✓ {cos}, {run.size:.2f}×")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    failed = [r for r in runs if not r.ok]
    text = (
        f"**{len(runs) - len(failed)} of {len(runs)} model × mode runs pass** (a)–(d) over "
        f"{len(by_model)} models."
    )
    if failed:
        text += " Failing: " + ", ".join(f"{r.model} {r.mode}" for r in failed) + "."
    legend = (
        "Cell: ✓ mean cosine of the worst output against the original (generated inputs, ORT "
        "optimizations off; bf16: graphopt's float simulation), file size / the original's; "
        "✗ with the failed check."
    )
    return head + "\n".join(lines) + f"\n\n{text}\n\n{legend}\n\nCommand: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated catalog names (default: catalog)")
    parser.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    parser.add_argument(
        "--results",
        default=str(Path(tempfile.gettempdir()) / "graphopt-quantize-coverage.jsonl"),
        help="JSON lines file the rows are appended to (default: in the temp folder)",
    )
    parser.add_argument("--markdown", help="write the table of every row in --results here")
    parser.add_argument("--render-only", action="store_true", help="only render --results")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    results = Path(args.results)
    modes = args.modes.split(",") if args.modes else list(MODES)
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    if args.child:
        check_model(args.models, modes, results)
        return
    if not args.render_only:
        from graphopt import models

        names = (
            [n.strip() for n in args.models.split(",") if n.strip()]
            if args.models
            else models.names()
        )
        for name in names:
            command = [sys.executable, __file__, "--child", "--models", name]
            command += ["--modes", ",".join(modes), "--results", str(results)]
            # One process per model: a crash or hang of one model costs only its own rows.
            try:
                subprocess.run(command, timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                with results.open("a") as sink:
                    for mode in modes:
                        row = Run(name, mode, errors=[f"timeout: over {args.timeout:.0f} s"])
                        sink.write(json.dumps(asdict(row)) + "\n")
    runs = load_runs(results)
    command = "python bench/quantize_coverage.py --markdown FILE.md"
    text = render(runs, command)
    print(text.split("\n\n")[1])
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
