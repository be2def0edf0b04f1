"""Pruning coverage (issue 3): prune every model at flops=0.3 and check the result.

Per model, two runs of ``graphopt.api.optimize`` (verification off: pruning is lossy):
``l2`` (magnitude, no data) and ``activation+lsq`` (activation-aware criterion with
least-squares compensation, fitted on ``--calib random``: generated inputs, not real data;
the PP-OCR models fit on rendered text images instead, ``graphopt.models.ocr.text_images``,
since noise leaves the detector's map at ~0).
Each run's model must be (a) valid for ``onnx.checker``, (b) run in ONNX Runtime and
(c) have >= 25% fewer FLOPs at the model's test shapes. Once per model, (d) the
zero-invariance self-check (zig_check.check_groups, 1e-6) on one random unit of every
prunable group; when the final outputs amplify float rounding, or are zero whatever the
input, it is judged on the tensors just past the removed channels (``boundary``). On the
activation+lsq run, (e) compensation moved the outputs closer to the original's on held-out
samples (for every output: mean |error| lower and mean cosine not lower, the PruneReport's
fidelity_compensated vs fidelity_pruned);
where pruning alone left every output exactly unchanged (a random-weight ViT: zero head), it
asks that compensation leaves them unchanged too, and the table says so; likewise where the
original's outputs are numerically zero (largest |output| < 1e-6 on generated inputs: random
weights with eval-mode BatchNorm make deep EfficientNets' logits ~1e-15), compensation must
not move them further than pruning did.

``--image-size N`` builds the non-catalog torchvision models at N×N (``torchvision:NAME@N``;
a ViT with ``image_size=N`` where its patch divides N; Swin and MaxViT keep 224): the same
layers and groups at a quarter of the cost for N = 112, which is how the 2-core coverage
runs of 2026-12-02 fitted in a session. Fewer pixels also mean fewer rows per feature for
least squares, a harder case for (e).

Models over ``--max-params`` / ``--max-gflops`` (the VGGs, vit_l/h, regnet_y_32/128gf,
wide_resnet101_2, convnext_large, efficientnet_b7/v2_l) are skipped and counted as such,
for time, not memory: every compensation stage runs the model prefix on the 24 fitting
and validation samples; resnet34 alone took 12 minutes on 2 shared cores. Raise the limits
to include them where more cores are available.

Usage: python bench/prune_coverage.py [--models a,b | --set catalog|extra|all]
       [--results FILE.jsonl] [--markdown FILE] [--max-params 100e6]
Results are appended to ``--results`` one JSON row per model as they finish, so a long run
can be split; ``--markdown`` renders every row in that file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RATIO = 0.3
MIN_REMOVED = 0.25
TOLERANCE = 1e-6
COS_SLACK = 1e-3
# Below this largest |output| (inputs are ~N(0, 1)) a model's outputs are numerically zero.
ZERO_SCALE = 1e-6
TRANSFORMERS = [
    "bert_tiny",
    "gpt2_tiny",
    "vit_tiny",
    "llama_tiny",
    "qwen2_tiny",
    "bert_tiny_ts",
    "gpt2_tiny_ts",
    "llama_tiny_ts",
    "minilm",
    "minilm_ts",
]
OCR = ["ppocr_det", "ppocr_rec"]
# (label, OptimizeOptions fields)
RUNS = {
    "l2": {"criterion": "l2", "compensation": "none"},
    "act+lsq": {"criterion": "activation", "compensation": "lsq", "calib": "random"},
}


@dataclass
class RunResult:
    valid: bool = False
    runs: bool = False
    flops_removed: float = 0.0
    closer: bool | None = None  # None: not asked (no compensation in this run)
    cos_pruned: float = float("nan")
    cos_compensated: float = float("nan")
    abs_pruned: float = float("nan")
    abs_compensated: float = float("nan")
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    note: str = ""  # why (e) was judged differently, shown in the table

    @property
    def ok(self) -> bool:
        return (
            self.valid
            and self.runs
            and self.flops_removed >= MIN_REMOVED
            and self.closer is not False
            and not self.errors
        )


@dataclass
class Row:
    model: str
    family: str
    runs: dict[str, RunResult] = field(default_factory=dict)
    zig_ok: bool = False
    zig_rel: float = float("nan")
    zig_mode: str = ""  # "outputs" or "boundary"
    zig_groups: int = 0
    skipped: str = ""  # a reason when the model was not run at all
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calibration: str = "random"  # what act+lsq fitted on: "random" or "rendered text"

    @property
    def ok(self) -> bool:
        return (
            not self.skipped
            and self.zig_ok
            and not self.errors
            and all(r.ok for r in self.runs.values())
            and len(self.runs) == len(RUNS)
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Row:
        runs = {k: RunResult(**v) for k, v in data.pop("runs").items()}
        return cls(runs=runs, **data)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def prune_run(source: Path, out: Path, shapes: dict, fields: dict) -> tuple[RunResult, object]:
    """One optimize call at flops=0.3 and checks (a), (b), (c), (e) on its output."""
    import onnx

    from graphopt import api
    from graphopt.analysis.flops import model_flops
    from graphopt.inputs import make_inputs
    from graphopt.io import load, to_proto
    from graphopt.verify import run_model

    result = RunResult()
    start = time.perf_counter()
    options = api.OptimizeOptions(
        prune=f"flops={RATIO}", verify=False, input_shapes=dict(shapes), **fields
    )
    try:
        optimized = api.optimize(source, out, options)
    except Exception as exc:
        result.errors.append(f"optimize: {_short(exc)}")
        result.seconds = time.perf_counter() - start
        return result, None
    report = optimized.report.details.get("prune")
    pruned = load(out).model
    try:
        onnx.checker.check_model(to_proto(pruned))
        result.valid = True
    except Exception as exc:
        result.errors.append(f"checker: {_short(exc)}")
    try:
        run_model(pruned, make_inputs(pruned, shapes, seed=3))
        result.runs = True
    except Exception as exc:
        result.errors.append(f"ORT: {_short(exc)}")
    try:
        original = load(source).model
        before = model_flops(original, shapes).total
        after = model_flops(pruned, shapes).total
        result.flops_removed = 1.0 - after / before if before else 0.0
        if result.flops_removed < MIN_REMOVED:
            why = f"FLOPs -{100 * result.flops_removed:.1f}% < {100 * MIN_REMOVED:.0f}%"
            if report is not None:
                why += f" ({report.groups_pruned}/{report.groups_prunable} groups pruned)"
            result.errors.append(why)
    except Exception as exc:
        result.errors.append(f"flops: {_short(exc)}")
    if fields.get("compensation", "none") != "none":
        _judge_compensation(result, report, _output_scale(source, shapes))
    result.seconds = time.perf_counter() - start
    return result, report


def _output_scale(source: Path, shapes: dict) -> float:
    """Largest |output| of the original model on generated inputs (seed 3)."""
    from graphopt.inputs import make_inputs
    from graphopt.io import load
    from graphopt.verify import run_model

    original = load(source).model
    outputs = run_model(original, make_inputs(original, shapes, seed=3))
    return max((float(np.abs(o).max()) for o in outputs if o.dtype.kind == "f"), default=0.0)


def _judge_compensation(result: RunResult, report, scale: float = 1.0) -> None:
    """(e): compensated mean |error| below the uncompensated one for every float output."""
    if report is None or not report.fidelity_pruned or not report.fidelity_compensated:
        result.closer = False
        result.errors.append("no held-out fidelity in the PruneReport")
        return
    pairs = list(zip(report.fidelity_pruned, report.fidelity_compensated, strict=True))
    # The output that moved most without compensation is the one shown.
    worst = max(range(len(pairs)), key=lambda i: pairs[i][0].mean_abs)
    before, after = pairs[worst]
    result.cos_pruned, result.cos_compensated = before.mean_cosine, after.mean_cosine
    result.abs_pruned, result.abs_compensated = before.mean_abs, after.mean_abs
    moved = [(b, a) for b, a in pairs if b.mean_abs > 0]
    if not moved:
        # Pruning left every output exactly as it was (torchvision zero-initialises the ViT
        # head, so a random-weight ViT's logits are 0 whatever the layers below compute):
        # "closer" cannot be met, so (e) asks that compensation keeps the outputs exact.
        result.closer = all(a.mean_abs == 0 for _, a in pairs)
        result.note = "outputs unchanged by pruning, and by compensation"
        if not result.closer:
            result.errors.append("compensation moved outputs that pruning left exact")
        return
    if scale < ZERO_SCALE:
        # Random weights with eval-mode BatchNorm at its default statistics can make a deep
        # net's outputs vanish (EfficientNet-B4 and deeper: logits ~1e-15, all rounding):
        # there is nothing to be closer to, so (e) asks that compensation moved them no
        # further than pruning did, and the table says so.
        result.closer = all(a.mean_abs <= b.mean_abs for b, a in pairs)
        result.note = (
            f"outputs numerically zero (max |y| {scale:.0e}) on generated inputs; "
            "compensation moved them no further"
        )
        if not result.closer:
            result.errors.append("compensation moved numerically-zero outputs further")
        return
    result.closer = all(helped(b, a) for b, a in moved)
    if not report.compensation_kept:
        result.closer = False
        result.errors.append("compensation not kept: it did not help on the validation slice")
        return
    if not result.closer:
        bad = next((b.output for b, a in moved if not helped(b, a)), "-")
        result.errors.append(f"compensation did not help on output {bad!r}")


def helped(before, after) -> bool:
    """Closer on both measures: lower mean |error|, and mean cosine not lower (beyond 1e-3)."""
    return after.mean_abs < before.mean_abs and after.mean_cosine >= before.mean_cosine - COS_SLACK


def zig_check(source: Path, shapes: dict, row: Row) -> None:
    """(d): zeroing a unit of every prunable group equals removing it (1e-6)."""
    from graphopt.analysis.zig import analyze
    from graphopt.io import load
    from graphopt.passes.pruning.zig_check import check_groups

    model = load(source).model
    report = analyze(model, shapes)
    row.zig_groups = len(report.prunable)
    result = check_groups(model, report, shapes=shapes, tolerance=TOLERANCE)
    # Outputs that are zero whatever the input (torchvision ViTs' zero head) are judged past
    # the removed channels by check_groups itself.
    mode = "boundary" if result.boundary else "outputs"
    row.zig_mode, row.zig_rel, row.zig_ok = mode, result.max_rel, result.ok
    if result.ok or not np.isfinite(result.max_rel):
        if not result.ok:
            row.errors.append(f"zero-invariance: {result.detail[:300]}")
        return
    # Final outputs may amplify float rounding (deep nets, softmax); the tensors right past the
    # removed channels show whether the groups themselves are exact.
    outputs = {v.name for v in model.graph.outputs}
    result = check_groups(model, report, shapes=shapes, tolerance=TOLERANCE, boundary=True)
    inner = {k: v for k, v in result.per_output.items() if k not in outputs}
    rel = max(inner.values(), default=float("inf"))
    row.zig_mode, row.zig_rel, row.zig_ok = "boundary", rel, rel <= TOLERANCE
    if not row.zig_ok:
        final = max((v for k, v in result.per_output.items() if k in outputs), default=0.0)
        row.errors.append(
            f"zero-invariance: max rel {rel:.3g} at the boundary, {final:.3g} at the outputs"
        )


def check_model(name: str, workdir: Path) -> Row:
    """Every check on one catalog model (built through the cache when missing)."""
    from graphopt import models

    start = time.perf_counter()
    row = Row(name, models.spec(name).family)
    try:
        source = models.get(name)
        shapes = models.input_shapes(name)
    except Exception as exc:
        row.skipped = f"does not build/export: {_short(exc)}"
        return row
    runs = dict(RUNS)
    if row.family == "ppocr":
        # Seeded noise leaves PP-OCR det's probability map at ~0 everywhere: nothing to fit
        # or to compare. Rendered words are data both OCR models respond to.
        runs["act+lsq"] = {**RUNS["act+lsq"], "calib": str(_text_calibration(shapes, workdir))}
        row.calibration = "rendered text"
    for label, fields in runs.items():
        out = workdir / f"{name.replace(':', '_')}.{label.replace('+', '_')}.onnx"
        row.runs[label], _ = prune_run(source, out, shapes, fields)
        out.unlink(missing_ok=True)
        out.with_name(out.name + ".data").unlink(missing_ok=True)
    try:
        zig_check(source, shapes, row)
    except Exception as exc:
        row.errors.append(f"zero-invariance: {_short(exc)}")
    row.seconds = time.perf_counter() - start
    return row


def _text_calibration(shapes: dict, workdir: Path) -> Path:
    """An npz of rendered text images at the OCR model's input shape (32 samples)."""
    from graphopt.models.ocr import text_images

    (name, shape), *_ = shapes.items()
    path = workdir / f"text_{'x'.join(map(str, shape))}.npz"
    np.savez(path, **{name: text_images(32, shape, seed=0)})
    return path


def model_list(args) -> tuple[list[str], list[tuple[str, str]]]:
    """(names to run, [(name, skip reason)])."""
    from graphopt import models
    from graphopt.models import vision

    skipped: list[tuple[str, str]] = []
    if args.models:
        wanted = [n.strip() for n in args.models.split(",") if n.strip()]
        return [_resolve(n, args.image_size) for n in wanted], skipped
    chosen: list[str] = []
    if args.set in ("catalog", "all"):
        chosen += models.names("torchvision") + TRANSFORMERS + OCR
    if args.set in ("extra", "all"):
        for tv in vision.torchvision_classifiers():
            if tv in vision.TORCHVISION_MODELS:
                continue
            side = args.image_size or 224
            if vision.fixed_side(tv, side):
                side = 224
            params, gflops = vision.torchvision_size(tv, side)
            if params > args.max_params or gflops > args.max_gflops:
                skipped.append(
                    (
                        vision.EXTRA_PREFIX + tv,
                        f"heavy ({params / 1e6:.0f}M params, {gflops:.1f} GFLOPs at {side}): over "
                        f"--max-params {args.max_params:.0e} / --max-gflops {args.max_gflops}",
                    )
                )
                continue
            chosen.append(vision.ensure_torchvision(tv, args.image_size))
    return chosen, skipped


def _resolve(name: str, side: int | None = None) -> str:
    from graphopt import models
    from graphopt.models import vision

    if name in models.names() and (side is None or models.spec(name).family != "torchvision"):
        return name
    if "@" in name:
        name, side = name.split("@")[0], int(name.split("@")[1])
    return vision.ensure_torchvision(name, side)


def _mark(flag: bool | None) -> str:
    return "–" if flag is None else ("✓" if flag else "✗")


def render(rows: list[Row], command: str) -> str:
    head = (
        "| model | l2: valid / ORT / FLOPs | act+lsq: valid / ORT / FLOPs | zero-inv. "
        "| compensation closer (worst output: cos, mean abs pruned → lsq) | result |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.model} | – | – | – | – | skipped: {row.skipped} |")
            continue
        shown = row.model + (f" (calib: {row.calibration})" if row.calibration != "random" else "")
        cells = []
        for label in RUNS:
            r = row.runs.get(label)
            if r is None:
                cells.append("–")
                continue
            c = "✓" if r.flops_removed >= MIN_REMOVED else "✗"
            cells.append(f"{_mark(r.valid)} / {_mark(r.runs)} / {c} −{100 * r.flops_removed:.0f}%")
        zig = f"{_mark(row.zig_ok)} {row.zig_rel:.0e}" + (
            " (boundary)" if row.zig_mode == "boundary" else ""
        )
        if row.zig_ok and not row.zig_groups:
            zig = "– (no prunable group)"
        comp = row.runs.get("act+lsq")
        if comp is not None and comp.note:
            closer = f"{_mark(comp.closer)} {comp.note}"
        elif comp is not None and comp.closer is not None and np.isfinite(comp.abs_pruned):
            closer = (
                f"{_mark(comp.closer)} cos {comp.cos_pruned:.3f} → {comp.cos_compensated:.3f}, "
                f"{comp.abs_pruned:.3g} → {comp.abs_compensated:.3g}"
            )
        else:
            closer = _mark(comp.closer if comp else None)
        verdict = "✓" if row.ok else "✗ " + "; ".join(all_errors(row)).replace("|", "\\|")
        lines.append(f"| {shown} | {cells[0]} | {cells[1]} | {zig} | {closer} | {verdict} |")
    return head + "\n".join(lines) + "\n\n" + summary(rows) + "\n\nCommand: `" + command + "`\n"


def all_errors(row: Row) -> list[str]:
    """Every failure reason of a row, each run's prefixed with the run's label."""
    return (
        [row.skipped] * bool(row.skipped)
        + row.errors
        + [f"{k}: {e}" for k, r in row.runs.items() for e in r.errors]
    )


def summary(rows: list[Row]) -> str:
    tv = [r for r in rows if r.family == "torchvision" and not r.skipped]
    heavy = sum(r.skipped.startswith("heavy") for r in rows if r.family == "torchvision")
    tv_skipped = [r for r in rows if r.family == "torchvision" and r.skipped]
    others = [r for r in rows if r.family != "torchvision" and not r.skipped]
    tv_ok = sum(r.ok for r in tv)
    other_ok = sum(r.ok for r in others)
    share = 100 * tv_ok / len(tv) if tv else 0.0
    text = (
        f"**{tv_ok} of {len(tv)} torchvision models prunable end to end ({share:.0f}%, "
        f"target ≥ 95%)**; {len(tv_skipped)} torchvision models not checked ({heavy} heavy, the "
        f"others not run yet: reasons in the table); "
        f"transformer/OCR models: {other_ok} of {len(others)} pass."
    )
    failed = [r.model for r in tv + others if not r.ok]
    if failed:
        text += f" Failing: {', '.join(failed)}."
    return text


def load_rows(path: Path) -> list[Row]:
    rows: dict[str, Row] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = Row.from_json(json.loads(line))
                rows[row.model] = row  # the latest run of a model wins
    return list(rows.values())


def _run_here(name: str, workdir: Path) -> Row:
    try:
        return check_model(name, workdir)
    except Exception as exc:  # a crash is a failed row, not a lost run
        traceback.print_exc()
        return Row(name, "?", errors=[f"crash: {_short(exc)}"])


def _run_isolated(name: str, timeout: float) -> Row:
    """``name`` checked in a child process: one model per process, so that no state left by
    an earlier model (seen: a later model's FLOPs measured wrong in the same process) and
    no crash or hang of one model affects the others."""
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "row.jsonl"
        command = [sys.executable, __file__, "--models", name, "--results", str(results)]
        # A name@side entry is registered in this process only: the child resolves it again.
        try:
            subprocess.run(command, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return Row(name, "?", errors=[f"timeout: over {timeout:.0f} s"])
        rows = load_rows(results)
        return rows[0] if rows else Row(name, "?", errors=["crash: the child wrote no row"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated catalog or torchvision names")
    parser.add_argument("--set", choices=["catalog", "extra", "all"], default="catalog")
    parser.add_argument(
        "--results",
        default=str(Path(tempfile.gettempdir()) / "graphopt-prune-coverage.jsonl"),
        help="JSON lines file the rows are appended to (default: in the temp folder)",
    )
    parser.add_argument("--markdown", help="write the table of every row in --results here")
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--max-gflops", type=float, default=25.0)
    parser.add_argument(
        "--image-size",
        type=int,
        help="build the non-catalog torchvision models at this side (torchvision:NAME@SIDE); "
        "Swin, MaxViT and ViTs whose patch does not divide it keep 224",
    )
    parser.add_argument("--render-only", action="store_true", help="only render --results")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    args = parser.parse_args()
    results = Path(args.results)
    if not args.render_only:
        names, skipped = model_list(args)
        with results.open("a") as sink:
            for name, reason in skipped:
                print(f"{name}: skipped: {reason}", flush=True)
                sink.write(json.dumps(Row(name, "torchvision", skipped=reason).to_json()) + "\n")
            workdir = Path(tempfile.mkdtemp(prefix="graphopt-prune-coverage-"))
            for name in names:
                row = (
                    _run_here(name, workdir)
                    if len(names) == 1
                    else _run_isolated(name, args.timeout)
                )
                sink.write(json.dumps(row.to_json()) + "\n")
                sink.flush()
                status = "ok" if row.ok else "FAIL " + "; ".join(all_errors(row))
                print(f"{name}: {status} ({row.seconds:.0f} s)", flush=True)
    rows = load_rows(results)
    print(summary(rows))
    if args.markdown:
        command = "python bench/prune_coverage.py --set all --markdown " + args.markdown
        Path(args.markdown).write_text(render(rows, command))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
