#!/usr/bin/env bash
# GPU check: what of graphopt runs on an NVIDIA machine we do not control, and how torch's
# 2:4 semi-structured sparse matmul compares with dense on BERT-base FFN shapes.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]     (default: $OUT if set, else ./gpu_check_results)
#
# Written for a machine whose Python may differ from ours (seen: Python 3.12, torch 2.11,
# CPU-only onnxruntime 1.30, no internet, nothing installable): it installs nothing and
# uses the interpreter on PATH ($PYTHON to choose another). Pure-Python dependencies can be
# carried in a folder named by $GRAPHOPT_DEPS (put on PYTHONPATH, e.g. made here with
# `pip install --target DIR --no-deps onnx-ir rich ...`); compiled ones (onnx, onnxruntime)
# must match the machine's Python, so each step says what it could not import instead of
# failing the run. Every step has its own time limit; the whole run stays under 8 minutes.
#
# Results (at most 6 files): env.txt, pure_python.json, pytest.txt, sparse24.json,
# sparse24.txt (a table), summary.txt. Exit 0 when the script ran to the end (the results
# say what passed), 2 on bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${1:-${OUT:-gpu_check_results}}
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: no $PYTHON on PATH (set PYTHON)" >&2
    exit 2
fi
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
export PYTHONPATH="$ROOT:$ROOT/tests${GRAPHOPT_DEPS:+:$GRAPHOPT_DEPS}${PYTHONPATH:+:$PYTHONPATH}"
# Models built by the checks go under the results' scratch folder, not into ~/.cache.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export GRAPHOPT_CACHE="$SCRATCH/cache"
START=$(date +%s)
step() { echo "== $1 ($(($(date +%s) - START)) s)"; }

step "environment"
{
    date -u
    uname -a
    "$PYTHON" -VV
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 \
        || echo "nvidia-smi: not available"
    "$PYTHON" - <<'PY'
import importlib.metadata as md

for name in ("torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnx-ir",
             "onnxscript", "rich", "PyYAML", "ml-dtypes", "pytest", "tensorrt", "tensorrt-rtx"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
try:
    import torch

    print("torch.cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
        print("cusparselt", torch.backends.cusparselt.is_available())
except Exception as exc:  # the report, not the run, says what is missing
    print("torch import failed:", type(exc).__name__, exc)
PY
} >"$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt"

step "pure-Python parts of graphopt"
timeout 180 "$PYTHON" - "$RESULTS/pure_python.json" <<'PY'
"""Each check in turn; one that cannot import or fails is recorded with its first line."""
import json
import subprocess
import sys
import time
import traceback

results = []


def check(name, function):
    start = time.perf_counter()
    try:
        detail = function() or ""
        ok = True
    except Exception as exc:  # recorded, never fatal: the next check may still run
        lines = traceback.format_exception_only(type(exc), exc)
        detail, ok = lines[-1].strip(), False
    results.append({"check": name, "ok": ok, "detail": str(detail)[:500],
                    "seconds": round(time.perf_counter() - start, 3)})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {str(detail)[:200]}", flush=True)


def timing():
    from graphopt.timing import Spread, interleaved, pair_ratios

    times = interleaved([lambda: sum(range(20000)), lambda: sum(range(20000))], 21)
    ratio = Spread.of(pair_ratios(times[0], times[1]))
    return f"same work A A: ratio {ratio.median:.3f} (p10 {ratio.p10:.3f}, p90 {ratio.p90:.3f})"


def cli_parser():
    from graphopt.cli import build_parser

    build_parser(lossy_flags=False)
    return "argparse tree built (rich imported)"


def imports(module):
    def run():
        __import__(module)
        return f"{module} imported"

    return run


def graphopt(*args):
    def run():
        done = subprocess.run([sys.executable, "-m", "graphopt", *args], capture_output=True,
                              text=True, timeout=120)
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)}")
        return " | ".join(tail)

    return run


def build_demo():
    from graphopt.models import build

    return str(build("demo"))


check("graphopt.timing (paired interleaved rounds)", timing)
check("graphopt CLI parser", cli_parser)
for module in ("numpy", "onnx", "onnx_ir", "onnxruntime", "graphopt.api", "graphopt.passes"):
    check(f"import {module}", imports(module))
if all(r["ok"] for r in results if r["check"] in ("import graphopt.api", "import onnxruntime")):
    check("build the demo model (no torch)", build_demo)
    demo = next((r["detail"] for r in results if r["check"].startswith("build the demo")
                 and r["ok"]), None)
    if demo:
        optimized = demo.replace(".onnx", ".gpucheck.onnx")
        check("graphopt optimize demo", graphopt("optimize", demo, "-o", optimized))
        check("graphopt compare demo vs optimized", graphopt("compare", demo, optimized))
        check("graphopt bench demo optimized (CPU)",
              graphopt("bench", demo, optimized, "--runs", "10"))
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            check("graphopt bench --provider cuda",
                  graphopt("bench", demo, optimized, "--runs", "10", "--provider", "cuda"))
            check("graphopt compare --provider cuda",
                  graphopt("compare", demo, optimized, "--provider", "cuda", "--rtol", "1e-3"))
with open(sys.argv[1], "w") as handle:
    json.dump(results, handle, indent=1)
PY
echo "pure-Python step exit $?"

step "pytest on the tests that need no compiled extension beyond numpy"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    # --noconftest: the suite's conftest loads plugins that import onnx.
    timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest \
        tests/graphopt_tests/test_timing.py >"$RESULTS/pytest.txt" 2>&1
    echo "pytest exit $?" >>"$RESULTS/pytest.txt"
else
    echo "pytest is not installed: skipped" >"$RESULTS/pytest.txt"
fi
tail -3 "$RESULTS/pytest.txt"

step "2:4 semi-structured sparse vs dense (torch, BERT-base FFN shapes)"
timeout 240 "$PYTHON" - "$RESULTS/sparse24.json" "$RESULTS/sparse24.txt" <<'PY'
"""F.linear with a 2:4-sparse weight (torch.sparse.to_sparse_semi_structured) against the
same masked weight dense, per backend (CUTLASS, cuSPARSELt), dtype and token count.

Timing: CUDA events around blocks of ITERS calls, REPS blocks per side interleaved
(dense, sparse, sparse, dense, ...), median of per-block ratios dense / sparse (above 1:
sparse is faster). Error: max |sparse - dense| / max |dense| on the same inputs."""
import json
import statistics
import sys
import time

out_json, out_txt = sys.argv[1], sys.argv[2]
record = {"ok": False, "rows": [], "skipped": ""}
try:
    import torch
    import torch.nn.functional as F
except Exception as exc:
    record["skipped"] = f"torch does not import: {exc}"
else:
    if not torch.cuda.is_available():
        record["skipped"] = "torch sees no CUDA device"

WARMUP, ITERS, REPS = 10, 50, 7
# BERT-base FFN: 768 -> 3072 (up) and 3072 -> 768 (down); tokens = batch x 128.
LAYERS = {"ffn_up 768->3072": (768, 3072), "ffn_down 3072->768": (3072, 768)}
TOKENS = (128, 1024, 4096, 16384)


def mask_2_4(weight):
    """Keep the 2 largest |w| of every 4 along the input axis."""
    out_features, in_features = weight.shape
    groups = weight.abs().reshape(out_features, in_features // 4, 4)
    keep = groups.argsort(dim=-1, descending=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return weight * mask.reshape(out_features, in_features)


def block(function):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / ITERS * 1e3  # microseconds per call


def measure(backend, dtype, layer, tokens):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    in_features, out_features = LAYERS[layer]
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = mask_2_4(torch.randn(out_features, in_features, device="cuda", dtype=dtype,
                                  generator=generator))
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype, generator=generator)
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    sparse = to_sparse_semi_structured(weight)
    dense_out, sparse_out = F.linear(x, weight), F.linear(x, sparse)
    torch.cuda.synchronize()
    scale = dense_out.float().abs().max().item() or 1.0
    error = (sparse_out.float() - dense_out.float()).abs().max().item() / scale
    run_dense, run_sparse = (lambda: F.linear(x, weight)), (lambda: F.linear(x, sparse))
    for _ in range(WARMUP):
        run_dense()
        run_sparse()
    dense_us, sparse_us = [], []
    for rep in range(REPS):
        order = (run_dense, run_sparse) if rep % 2 == 0 else (run_sparse, run_dense)
        for function in order:
            (dense_us if function is run_dense else sparse_us).append(block(function))
    ratios = [d / s for d, s in zip(dense_us, sparse_us)]
    flops = 2 * tokens * in_features * out_features
    return {
        "backend": backend, "dtype": str(dtype).replace("torch.", ""), "layer": layer,
        "tokens": tokens, "dense_us": statistics.median(dense_us),
        "sparse_us": statistics.median(sparse_us),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios), "speedup_max": max(ratios),
        "dense_tflops": flops / statistics.median(dense_us) / 1e6,
        "max_rel_error": error,
    }


if not record["skipped"]:
    started = time.time()
    record["device"] = torch.cuda.get_device_name(0)
    record["capability"] = list(torch.cuda.get_device_capability(0))
    record["torch"] = torch.__version__
    backends = ["cutlass"] + (["cusparselt"] if torch.backends.cusparselt.is_available() else [])
    for backend in backends:
        for dtype in (torch.float16, torch.bfloat16):
            for layer in LAYERS:
                for tokens in TOKENS:
                    if time.time() - started > 200:  # leave the run's 8 minutes intact
                        record["rows"].append({"backend": backend, "error": "time budget"})
                        continue
                    try:
                        row = measure(backend, dtype, layer, tokens)
                    except Exception as exc:  # one unsupported case must not end the rest
                        row = {"backend": backend, "dtype": str(dtype), "layer": layer,
                               "tokens": tokens, "error": f"{type(exc).__name__}: {exc}"[:300]}
                    record["rows"].append(row)
                    print(json.dumps(row), flush=True)
    record["ok"] = any("speedup_median" in r for r in record["rows"])
with open(out_json, "w") as handle:
    json.dump(record, handle, indent=1)
with open(out_txt, "w") as handle:
    if record["skipped"]:
        handle.write(f"skipped: {record['skipped']}\n")
    else:
        handle.write(f"{record['device']} sm_{''.join(map(str, record['capability']))}, "
                     f"torch {record['torch']}; speedup = dense / sparse time, median of "
                     f"{REPS} interleaved blocks of {ITERS} calls\n")
        handle.write(f"{'backend':<11}{'dtype':<10}{'layer':<20}{'tokens':>7}{'dense us':>10}"
                     f"{'sparse us':>11}{'speedup':>9}{'rel err':>10}\n")
        for r in record["rows"]:
            if "error" in r:
                handle.write(f"{r.get('backend', '')!s:<11}{r.get('dtype', '')!s:<10}"
                             f"{r.get('layer', '')!s:<20}{r.get('tokens', '')!s:>7}  "
                             f"error: {r['error']}\n")
                continue
            handle.write(f"{r['backend']:<11}{r['dtype']:<10}{r['layer']:<20}{r['tokens']:>7}"
                         f"{r['dense_us']:>10.1f}{r['sparse_us']:>11.1f}"
                         f"{r['speedup_median']:>8.2f}x{r['max_rel_error']:>10.2e}\n")
PY
echo "sparse step exit $?"
cat "$RESULTS/sparse24.txt" 2>/dev/null

step "summary"
{
    echo "gpu_check finished in $(($(date +%s) - START)) s"
    "$PYTHON" - "$RESULTS" <<'PY'
import json
import pathlib
import sys

folder = pathlib.Path(sys.argv[1])
try:
    checks = json.loads((folder / "pure_python.json").read_text())
    passed = sum(c["ok"] for c in checks)
    print(f"pure-Python checks: {passed}/{len(checks)} ok")
    for c in checks:
        if not c["ok"]:
            print(f"  FAIL {c['check']}: {c['detail'][:200]}")
except (OSError, ValueError) as exc:
    print(f"pure-Python checks: no results ({exc})")
try:
    sparse = json.loads((folder / "sparse24.json").read_text())
    if sparse["skipped"]:
        print(f"2:4 sparse timing: skipped ({sparse['skipped']})")
    else:
        timed = [r for r in sparse["rows"] if "speedup_median" in r]
        print(f"2:4 sparse timing: {len(timed)}/{len(sparse['rows'])} cases timed")
        for r in timed:
            print(f"  {r['backend']} {r['dtype']} {r['layer']} M={r['tokens']}: "
                  f"{r['speedup_median']:.2f}x")
except (OSError, ValueError) as exc:
    print(f"2:4 sparse timing: no results ({exc})")
PY
    tail -1 "$RESULTS/pytest.txt"
} >"$RESULTS/summary.txt" 2>&1
cat "$RESULTS/summary.txt"
exit 0
