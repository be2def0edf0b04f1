"""graphopt's int8 block-sparse kernel (``graphopt.SparseQMatMul``) vs ORT's dense int8 MatMuls.

    python -m graphopt.kernels build          # once: the custom-op library
    python bench/sparse_int8_kernels.py [--pairs 30] [--quick] [--markdown OUT.md] [--library PATH]
    python bench/sparse_int8_kernels.py --baseline-library OLD.so  # also time OLD.so each round

One process, one ORT session per operator, all three timed side by side in every round:

- **QLinearMatMul** (ONNX, static): u8 activations x the same int8 weight stored dense (zeros
  included), u8 output (it requantizes: a little more work than ours at the end);
- **MatMulIntegerToFloat** (com.microsoft): the same, float output, i.e. exactly our op's
  contract (what ORT's dynamic quantization emits);
- **ours**: ``SparseQMatMul`` with the weight packed by ``graphopt.kernels.packing.pack_bsr_s8``.

With ``--baseline-library`` a fourth session runs the same ``SparseQMatMul`` model from another
build of the library (e.g. a copy of the previous one) in the same rounds, so a kernel change is
measured under the same machine state: two more columns, its ms and time(baseline)/time(ours).

Shapes are BERT-base's FFN (K x N = 768 x 3072 and 3072 x 768) at M = 1 and 128 rows, block
sparsity 0.5 to 0.95 in 1x4 blocks (other block shapes at 0.8), intra-op threads 1 and 2.
Speed follows the project's rule: warm-up, ``--pairs`` paired interleaved rounds (one call of
each operator per round), the median of the per-round ratios time(baseline) / time(ours); ms
are per-operator medians (ORT's per-run overhead, a few us, included). The output states the
command, date, versions, CPU, the kernels' ISA and the load average: on a shared machine
these numbers are noisy, rerun the command on a quiet one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from timing import add_library_options

from graphopt.backends.ort_custom_ops import register_custom_ops
from graphopt.kernels import library_path
from graphopt.kernels.packing import BsrS8Packed, pack_bsr_s8, packed_bytes
from graphopt.timing import WARMUP, interleaved, pair_ratios

SHAPES = ((768, 3072), (3072, 768))
ROWS = (1, 128)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
MAIN_BLOCK = (1, 4)
OTHER_BLOCKS = ((1, 8), (1, 16), (2, 4), (4, 4))
OTHER_AT = 0.8
A_SCALE, A_ZERO = 0.02, 128
W_SCALE = 0.01
SEED = 0


@dataclass(frozen=True)
class Case:
    K: int
    N: int
    M: int
    R: int
    C: int
    sparsity: float
    threads: int


@dataclass(frozen=True)
class Result:
    case: Case
    ms: dict[str, float]  # median ms per call: qlinear, mmitf, ours
    vs_qlinear: float
    vs_mmitf: float
    max_rel: float  # ours vs MatMulIntegerToFloat
    dense_bytes: int
    packed_bytes: int
    vs_base: float | None = None  # time(baseline library) / time(ours), median per round


def block_sparse_int8(K: int, N: int, R: int, C: int, sparsity: float, seed: int) -> np.ndarray:
    """Random int8 [K, N] weight with ``sparsity`` of its R x C blocks (over outputs n, k) zero."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    w[w == 0] = 1  # every kept block stays kept: the sparsity is exactly the dropped blocks
    rows, cols = -(-N // R), -(-K // C)
    keep = np.ones(rows * cols, dtype=bool)
    keep[rng.permutation(rows * cols)[: round(sparsity * rows * cols)]] = False
    mask = np.repeat(np.repeat(keep.reshape(rows, cols), R, axis=0), C, axis=1)[:N, :K]
    return np.where(mask.T, w, np.int8(0)).astype(np.int8)


def _model(nodes, inits, K: int, N: int, out_type: int, opsets) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", K])],
        [helper.make_tensor_value_info("Y", out_type, ["M", N])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 10
    return model.SerializeToString()


def qlinear_model(w: np.ndarray) -> bytes:
    K, N = w.shape
    inits = {
        "a_s": np.float32(A_SCALE),
        "a_z": np.uint8(A_ZERO),
        "W": w,
        "w_s": np.float32(W_SCALE),
        "w_z": np.int8(0),
        "y_s": np.float32(0.5),
        "y_z": np.uint8(128),
    }
    inputs = ["A", "a_s", "a_z", "W", "w_s", "w_z", "y_s", "y_z"]
    node = helper.make_node("QLinearMatMul", inputs, ["Y"])
    return _model([node], inits, K, N, TensorProto.UINT8, [("", 21)])


def mmitf_model(w: np.ndarray) -> bytes:
    K, N = w.shape
    inits = {
        "W": w,
        "a_s": np.float32(A_SCALE),
        "w_s": np.float32(W_SCALE),
        "a_z": np.uint8(A_ZERO),
    }
    node = helper.make_node(
        "MatMulIntegerToFloat", ["A", "W", "a_s", "w_s", "a_z"], ["Y"], domain="com.microsoft"
    )
    return _model([node], inits, K, N, TensorProto.FLOAT, [("", 21), ("com.microsoft", 1)])


def sparse_model(packed: BsrS8Packed) -> bytes:
    inits = {
        "a_s": np.float32(A_SCALE),
        "a_z": np.uint8(A_ZERO),
        "values": packed.values,
        "col_idx": packed.col_idx,
        "row_ptr": packed.row_ptr,
        "w_s": packed.w_scale,
        "w_rowsum": packed.w_rowsum,
    }
    node = helper.make_node(
        "SparseQMatMul",
        ["A", "a_s", "a_z", "values", "col_idx", "row_ptr", "w_s", "w_rowsum"],
        ["Y"],
        domain="graphopt",
        K=packed.K,
        N=packed.N,
        block_r=packed.R,
        block_c=packed.C,
        activation="",
    )
    return _model([node], inits, packed.K, packed.N, TensorProto.FLOAT, [("", 21), ("graphopt", 1)])


def session(model: bytes, threads: int, library: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    register_custom_ops(options, library)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_case(case: Case, library: Path, pairs: int, baseline: Path | None = None) -> Result:
    w = block_sparse_int8(case.K, case.N, case.R, case.C, case.sparsity, SEED)
    packed = pack_bsr_s8(w, W_SCALE, case.R, case.C)
    a = np.random.default_rng(SEED + 1).integers(0, 256, size=(case.M, case.K), dtype=np.uint8)
    feeds = {"A": a}
    models = {
        "qlinear": qlinear_model(w),
        "mmitf": mmitf_model(w),
        "ours": sparse_model(packed),
    }
    sessions = {k: session(m, case.threads, library) for k, m in models.items()}
    if baseline is not None:
        sessions["base"] = session(models["ours"], case.threads, baseline)
    ours = sessions["ours"].run(None, feeds)[0]
    ref = sessions["mmitf"].run(None, feeds)[0]
    max_rel = float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
    if baseline is not None:
        base_out = sessions["base"].run(None, feeds)[0]
        base_rel = np.max(np.abs(base_out - ref)) / max(float(np.max(np.abs(ref))), 1e-30)
        max_rel = max(max_rel, float(base_rel))

    def call(s: ort.InferenceSession):
        return lambda: s.run(None, feeds)

    # One call per timed sample, even at M = 1 (~30 us): on a loaded machine a longer sample
    # is likely to include a preemption, which the median then cannot filter out.
    names = list(sessions)
    times = interleaved([call(sessions[k]) for k in names], pairs, warmup=WARMUP)
    by_name = dict(zip(names, times, strict=True))
    return Result(
        case,
        {k: statistics.median(t) * 1e3 for k, t in by_name.items()},
        statistics.median(pair_ratios(by_name["qlinear"], by_name["ours"])),
        statistics.median(pair_ratios(by_name["mmitf"], by_name["ours"])),
        max_rel,
        w.nbytes,
        packed_bytes(packed) + packed.row_ptr.nbytes,
        statistics.median(pair_ratios(by_name["base"], by_name["ours"]))
        if baseline is not None
        else None,
    )


def cases(quick: bool) -> list[Case]:
    out: list[Case] = []
    sparsities = (0.8,) if quick else SPARSITIES
    for threads in (1, 2):
        for K, N in SHAPES:
            for M in ROWS:
                for s in sparsities:
                    out.append(Case(K, N, M, *MAIN_BLOCK, s, threads))
                if not quick:
                    for R, C in OTHER_BLOCKS:
                        out.append(Case(K, N, M, R, C, OTHER_AT, threads))
    return out


def row(r: Result) -> str:
    c = r.case
    return (
        f"| {c.K}x{c.N} | {c.M} | {c.R}x{c.C} | {c.sparsity:.2f} | {c.threads} "
        f"| {r.ms['qlinear']:.3f} | {r.ms['mmitf']:.3f} | {r.ms['ours']:.3f} "
        f"| **{r.vs_qlinear:.2f}x** | {r.vs_mmitf:.2f}x | {r.packed_bytes / r.dense_bytes:.2f} "
        f"| {r.max_rel:.1e} |"
        + (f" {r.ms['base']:.3f} | {r.vs_base:.2f}x |" if r.vs_base is not None else "")
    )


HEADER = (
    "| K x N | M | block | sparsity | threads | QLinearMatMul ms | MatMulIntegerToFloat ms "
    "| ours ms | ours vs QLinearMatMul | ours vs MatMulIntegerToFloat | bytes vs dense int8 "
    "| max rel err vs MatMulIntegerToFloat |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)
BASE_HEADER = (
    HEADER.split("\n")[0]
    + " baseline library ms | ours vs baseline library |\n"
    + HEADER.split("\n")[1]
    + "---|---|"
)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def preamble(library: Path, args: argparse.Namespace) -> str:
    isa = os.environ.get("GRAPHOPT_KERNELS_ISA", "(auto: highest the CPU has)")
    command = " ".join(["python", *sys.argv])
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- versions: onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy "
            f"{np.__version__}, Python {platform.python_version()}",
            f"- CPU: {cpu_model()} ({os.cpu_count()} cores); GRAPHOPT_KERNELS_ISA={isa}",
            f"- library: {library}",
            *(
                [f"- baseline library: {args.baseline_library} (timed in the same rounds)"]
                if args.baseline_library is not None
                else []
            ),
            f"- timing: {args.pairs} paired interleaved rounds after {WARMUP} warm-up calls; "
            "ms = median per call; ratios = median of per-round time(baseline)/time(ours)",
            "- QLinearMatMul requantizes to uint8; MatMulIntegerToFloat and ours output float "
            "(the like-for-like baseline). Weights: per-tensor scale, A zero point 128.",
            f"- load average before timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    add_library_options(parser)
    parser.add_argument("--quick", action="store_true", help="1x4 at sparsity 0.8 only")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    library = args.library or library_path()
    if library is None:
        sys.exit("graphopt's kernels are not built: run `python -m graphopt.kernels build`")
    print(preamble(library, args), flush=True)
    print()
    header = HEADER if args.baseline_library is None else BASE_HEADER
    print(header, flush=True)
    results = []
    for case in cases(args.quick):
        results.append(run_case(case, library, args.pairs, args.baseline_library))
        print(row(results[-1]), flush=True)
    after = f"load average after timing: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    print(f"\n{after}")
    if args.markdown is not None:
        table = "\n".join([header, *(row(r) for r in results)])
        args.markdown.write_text(f"{preamble(library, args)}\n\n{table}\n\n{after}\n")


if __name__ == "__main__":
    main()
