"""graphopt's fp32 sparse kernels against ORT's dense MatMul (MLAS sgemm), issue 15.

One-node models side by side in one process: (a) a dense ``MatMul`` (ORT_ENABLE_ALL) and
(b) a ``graphopt.SparseMatMul`` (BSR) or ``graphopt.SparseMatMul24`` (2:4) holding the same
weight packed by :mod:`graphopt.kernels.packing`. BERT-base FFN shapes (K x N = 768 x 3072 and
3072 x 768), M = 1 and 128, a sparsity sweep per block shape, intra-op threads 1 and 2.
Speed is the project's rule (:mod:`graphopt.timing`): warm-up, then paired interleaved
rounds, the median of the per-round ratios time(dense) / time(sparse) (> 1: ours wins).

Weights are random normal with whole blocks zeroed at random (exactly round(s * blocks)
blocks), so the kernels see an unstructured pattern of blocks as magnitude pruning makes.
Each sparse model's output is checked against the dense one (max|a-b| / max|a|).

    python bench/sparse_kernels.py                 # the full sweep (a few minutes)
    python bench/sparse_kernels.py --quick         # 1x4 and 2:4 only, three sparsities
    python bench/sparse_kernels.py --library PATH  # a library other than the package build
    python bench/sparse_kernels.py --baseline-library OLD.so  # also time OLD.so in each round

With ``--baseline-library`` every round runs dense, ours and the baseline library's op on the
same packed weight (three-way interleaved), so a kernel change is compared with the kernel it
replaces under the same machine state: the report adds the baseline's speedup over dense and
the median per-round ratio time(baseline) / time(ours).

Prints a markdown report (command, date, versions, CPU, load) with the speedup table, the
crossover sparsity per shape and the weight memory at 75% sparsity.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from timing import add_library_options

from graphopt.backends.ort_custom_ops import register_custom_ops
from graphopt.kernels import packing
from graphopt.timing import WARMUP, interleaved, pair_ratios

SHAPES = ((768, 3072), (3072, 768))
MS = (1, 128)
SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95)
BLOCKS = ((1, 4), (4, 1), (16, 1), (4, 4))
QUICK_SPARSITIES = (0.5, 0.75, 0.9)
MIN_SAMPLE_S = 2e-3  # a timed sample repeats a short run until it lasts about this long
OPSET = 17


@dataclass
class Row:
    K: int
    N: int
    M: int
    threads: int
    block: str  # "1x4", ..., "2:4"
    sparsity: float
    dense_ms: float
    sparse_ms: float
    speedup: float
    min_ratio: float
    error: float
    base_speedup: float | None = None  # dense / baseline library (median per-round ratio)
    vs_base: float | None = None  # baseline / ours (median per-round ratio)


def block_sparse_weight(K: int, N: int, R: int, C: int, sparsity: float, seed: int) -> np.ndarray:
    """Random normal [K, N] with round(sparsity * blocks) whole R x C blocks (R along N) zeroed."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    rows, cols = -(-N // R), -(-K // C)
    drop = np.zeros(rows * cols, dtype=bool)
    drop[rng.permutation(rows * cols)[: round(sparsity * rows * cols)]] = True
    mask = np.repeat(np.repeat(drop.reshape(rows, cols), R, axis=0), C, axis=1)[:N, :K]
    w[mask.T] = 0.0
    return w


def two_four_weight(K: int, N: int, seed: int) -> np.ndarray:
    """Random normal [K, N] keeping the 2 largest |w| of every 4 consecutive k (2:4 along K)."""
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    groups = w.T.reshape(N, K // 4, 4)
    smallest = np.argsort(np.abs(groups), axis=-1)[..., :2]
    np.put_along_axis(groups, smallest, 0.0, axis=-1)
    return np.ascontiguousarray(groups.reshape(N, K).T)


def _model(node: onnx.NodeProto, K: int, N: int, inits: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("graphopt", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def dense_model(w: np.ndarray) -> bytes:
    K, N = w.shape
    node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    return _model(node, K, N, [numpy_helper.from_array(w, "W")])


def bsr_model(p: packing.BsrPacked) -> bytes:
    node = helper.make_node(
        "SparseMatMul",
        ["A", "values", "col_idx", "row_ptr"],
        ["Y"],
        domain="graphopt",
        K=p.K,
        N=p.N,
        block_r=p.R,
        block_c=p.C,
        activation="",
    )
    inits = [
        numpy_helper.from_array(p.values, "values"),
        numpy_helper.from_array(p.col_idx, "col_idx"),
        numpy_helper.from_array(p.row_ptr, "row_ptr"),
    ]
    return _model(node, p.K, p.N, inits)


def model_24(p: packing.Packed24) -> bytes:
    node = helper.make_node(
        "SparseMatMul24",
        ["A", "values", "indices"],
        ["Y"],
        domain="graphopt",
        K=p.K,
        N=p.N,
        activation="",
    )
    inits = [
        numpy_helper.from_array(p.values, "values"),
        numpy_helper.from_array(p.indices, "indices"),
    ]
    return _model(node, p.K, p.N, inits)


def make_session(model: bytes, threads: int, library: Path | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if library is not None and register_custom_ops(options, library) is None:
        raise SystemExit(f"cannot register {library}")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def paired(
    dense: ort.InferenceSession,
    sparse: ort.InferenceSession,
    feed: dict,
    pairs: int,
    baseline: ort.InferenceSession | None = None,
) -> tuple[float, float, float, float, float | None, float | None]:
    """Per single run: median dense s, median sparse s, the median of the per-round ratios
    dense/sparse, and min(dense)/min(sparse) (the fastest samples: least hit by preemption on
    a loaded machine, where one side of a pair may lose the CPU for a whole time slice); with
    a baseline session (timed in the same rounds), the medians of the per-round ratios
    dense/baseline and baseline/sparse, else None twice."""
    sessions = [dense, sparse] + ([baseline] if baseline is not None else [])
    for s in sessions:
        for _ in range(WARMUP):
            s.run(None, feed)
    start = time.perf_counter()
    dense.run(None, feed)
    # Short runs are repeated inside a sample so the timer's resolution does not matter.
    inner = max(1, round(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-7)))

    def call(s: ort.InferenceSession):
        def run() -> None:
            for _ in range(inner):
                s.run(None, feed)

        return run

    times = [
        [t / inner for t in ts] for ts in interleaved([call(s) for s in sessions], pairs, warmup=0)
    ]
    dense_t, sparse_t = times[0], times[1]
    base = vs_base = None
    if baseline is not None:
        base = statistics.median(pair_ratios(dense_t, times[2]))
        vs_base = statistics.median(pair_ratios(times[2], sparse_t))
    return (
        statistics.median(dense_t),
        statistics.median(sparse_t),
        statistics.median(pair_ratios(dense_t, sparse_t)),
        min(dense_t) / min(sparse_t),
        base,
        vs_base,
    )


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return float(np.max(np.abs(a - b))) / scale if scale else float(np.max(np.abs(b), initial=0))


def crossover(points: list[tuple[float, float]]) -> str:
    """Lowest sparsity from which ours is at least as fast (linear between sweep points)."""
    points = sorted(points)
    if not points or points[-1][1] < 1.0:
        return f"> {points[-1][0]:.2f}" if points else "n/a"
    first = len(points) - 1
    while first > 0 and points[first - 1][1] >= 1.0:
        first -= 1
    if first == 0:
        return f"<= {points[0][0]:.2f}"
    (s0, r0), (s1, r1) = points[first - 1], points[first]
    return f"{s0 + (1.0 - r0) * (s1 - s0) / (r1 - r0):.2f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(argv: list[str]) -> list[str]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    isa = os.environ.get("GRAPHOPT_KERNELS_ISA", "(auto)")
    return [
        "# graphopt sparse kernels vs ORT dense MatMul",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in argv)}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; GRAPHOPT_KERNELS_ISA={isa}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in load)} (a shared, loaded "
        "machine gives noisy timings)",
        "- speedup: median over paired interleaved rounds of time(dense)/time(sparse), "
        "> 1 = sparse faster; min/min: fastest dense / fastest sparse sample (robust to "
        "preemption); ms: medians of single runs",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x4 and 2:4, sparsity .5/.75/.9")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--m", type=int, nargs="+", default=list(MS), help="rows of A")
    parser.add_argument("--blocks", nargs="+", help="block shapes RxC (R along N), e.g. 1x4")
    parser.add_argument("--sparsities", type=float, nargs="+")
    parser.add_argument("--no-24", action="store_true", help="skip the 2:4 rows")
    parser.add_argument("--pairs", type=int, default=20)
    add_library_options(parser)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    library = args.library
    if library is None:
        import graphopt.kernels

        library = graphopt.kernels.library_path()
        if library is None:
            print(graphopt.kernels.unavailable_reason(), file=sys.stderr)
            return 2
    blocks = (
        [tuple(int(x) for x in b.lower().split("x")) for b in args.blocks]
        if args.blocks
        else ([(1, 4)] if args.quick else list(BLOCKS))
    )
    sparsities = args.sparsities or (QUICK_SPARSITIES if args.quick else SPARSITIES)
    lines = header([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    rows: list[Row] = []
    memory: list[str] = []
    seed = 0
    for K, N in SHAPES:
        w_dense = np.random.default_rng(1000 + K).standard_normal((K, N)).astype(np.float32)
        feeds = {
            M: {"A": np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)}
            for M in args.m
        }
        dense_bytes = dense_model(w_dense)
        variants: list[tuple[str, float, np.ndarray, bytes, int]] = []
        for R, C in blocks:
            for s in sparsities:
                seed += 1
                w = block_sparse_weight(K, N, R, C, s, seed)
                p = packing.pack_bsr(w, R, C)
                variants.append((f"{R}x{C}", s, w, bsr_model(p), packing.packed_bytes(p)))
        if not args.no_24:
            seed += 1
            w = two_four_weight(K, N, seed)
            p24 = packing.pack_24(w)
            variants.append(("2:4", 0.5, w, model_24(p24), packing.packed_bytes(p24)))
        for name, s, _, _, nbytes in variants:
            if abs(s - 0.75) < 1e-9 or name == "2:4":
                memory.append(
                    f"| {K}x{N} | {name} | {s:.2f} | {nbytes / 2**20:.2f} | "
                    f"{nbytes / (K * N * 4):.1%} |"
                )
        for threads in args.threads:
            # The dense side is one model with a weight of the same size and density; its
            # values do not change its speed, so every variant is timed against it.
            dense = make_session(dense_bytes, threads, None)
            for name, s, w, model, _ in variants:
                sparse = make_session(model, threads, library)
                baseline = (
                    make_session(model, threads, args.baseline_library)
                    if args.baseline_library is not None
                    else None
                )
                for M in args.m:
                    feed = feeds[M]
                    expect = feed["A"] @ w
                    got = sparse.run(None, feed)[0]
                    err = max_rel(expect, got)
                    d, sp, ratio, best, base, vs_base = paired(
                        dense, sparse, feed, args.pairs, baseline
                    )
                    rows.append(
                        Row(
                            K,
                            N,
                            M,
                            threads,
                            name,
                            s,
                            d * 1e3,
                            sp * 1e3,
                            ratio,
                            best,
                            err,
                            base,
                            vs_base,
                        )
                    )
                    versus = (
                        f", baseline {base:.2f}x, ours/baseline {vs_base:.2f}x"
                        if base is not None
                        else ""
                    )
                    print(
                        f"{K}x{N} M={M} t={threads} {name} s={s:.2f}: {ratio:.2f}x "
                        f"(min/min {best:.2f}x, dense {d * 1e3:.3f} ms, "
                        f"sparse {sp * 1e3:.3f} ms, err {err:.1e}{versus})",
                        file=sys.stderr,
                    )
                del sparse, baseline
    with_base = args.baseline_library is not None
    if with_base:
        lines.append(f"- baseline library: `{args.baseline_library}` (timed in the same rounds)")
    lines += [
        "",
        "## Speedup over dense MatMul",
        "",
        "| K x N | M | threads | block | sparsity | dense ms | sparse ms | speedup | min/min "
        "| max rel err |" + (" baseline speedup | ours vs baseline |" if with_base else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_base else ""),
    ]
    for r in rows:
        extra = (
            f" {r.base_speedup:.2f} | {r.vs_base:.2f} |"
            if r.base_speedup is not None and r.vs_base is not None
            else ""
        )
        lines.append(
            f"| {r.K}x{r.N} | {r.M} | {r.threads} | {r.block} | {r.sparsity:.2f} | "
            f"{r.dense_ms:.3f} | {r.sparse_ms:.3f} | {r.speedup:.2f} | {r.min_ratio:.2f} | "
            f"{r.error:.1e} |{extra}"
        )
    lines += ["", "## Crossover sparsity (ours at least as fast from here on)", ""]
    lines += [
        "| K x N | M | threads | block | by median ratio | by min/min |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r.K, r.N, r.M, r.threads, r.block) for r in rows if r.block != "2:4"})
    for key in keys:
        mine = [r for r in rows if (r.K, r.N, r.M, r.threads, r.block) == key]
        by_median = crossover([(r.sparsity, r.speedup) for r in mine])
        by_min = crossover([(r.sparsity, r.min_ratio) for r in mine])
        K, N, M, t, b = key
        lines.append(f"| {K}x{N} | {M} | {t} | {b} | {by_median} | {by_min} |")
    lines += [
        "",
        "## Weight memory (values + indices vs dense fp32; target <= 35% at 75%)",
        "",
        "| K x N | block | sparsity | MiB | of dense |",
        "|---|---|---|---|---|",
        *memory,
        "",
        f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
