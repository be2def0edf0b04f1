"""graphopt's fp32 block-sparse MatMul vs ORT's dense MatMul through a chain of layers.

    python bench/sparse_chain.py --layers 6 12 --sparsities 0.75 0.9 --pairs 40

``bench/sparse_kernels.py`` times one weight called over and over: its values stay in L3 and
the branch predictor learns its rows' lengths, which flatters a kernel with data-dependent
branches and a dense MatMul whose weight would otherwise stream from memory. Here one ORT
graph runs L BERT-base FFN pairs (768x3072 then 3072x768), each layer with its own weights,
dense against ``graphopt.SparseMatMul`` (BSR 1x4) with the same weights: what a model's
forward pass meets. M rows (default 1), 1 thread, warm-up, paired interleaved rounds;
speed-up = median over rounds of time(dense) / time(sparse); ms per layer = the graph's
median time / 2L.

    python bench/sparse_chain.py --baseline-library OLD.so  # also time OLD.so in each round

With ``--baseline-library`` every round also runs the sparse graph on a second custom-op
library (e.g. a copy of the previous build), so a kernel change is measured against the one it
replaces under the same machine state: the report adds the baseline's speed-up over dense and
the median per-round ratio time(baseline) / time(ours).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from sparse_kernels import OPSET, block_sparse_weight, cpu_name, make_session, max_rel
from timing import add_library_options

from graphopt.kernels import library_path, packing
from graphopt.timing import interleaved, pair_ratios

FFN = ((768, 3072), (3072, 768))


def chain_model(pairs: int, sparsity: float, sparse: bool, seed: int = 0) -> bytes:
    """``pairs`` FFN pairs, distinct seeded weights per layer, dense or packed BSR 1x4."""
    nodes, inits, previous = [], [], "A"
    for layer in range(2 * pairs):
        K, N = FFN[layer % 2]
        weight = block_sparse_weight(K, N, 1, 4, sparsity, seed + layer)
        out = "Y" if layer == 2 * pairs - 1 else f"Y{layer}"
        if sparse:
            packed = packing.pack_bsr(weight, 1, 4)
            names = [f"values{layer}", f"col_idx{layer}", f"row_ptr{layer}"]
            arrays = (packed.values, packed.col_idx, packed.row_ptr)
            inits += [numpy_helper.from_array(a, n) for a, n in zip(arrays, names, strict=True)]
            nodes.append(
                helper.make_node(
                    "SparseMatMul",
                    [previous, *names],
                    [out],
                    domain="graphopt",
                    K=K,
                    N=N,
                    block_r=1,
                    block_c=4,
                    activation="",
                )
            )
        else:
            inits.append(numpy_helper.from_array(weight, f"W{layer}"))
            nodes.append(helper.make_node("MatMul", [previous, f"W{layer}"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", 768])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", 768])],
        inits,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("graphopt", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6], help="FFN pairs")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9])
    parser.add_argument("--m", type=int, default=1, help="rows of A")
    parser.add_argument("--pairs", type=int, default=40, help="paired rounds")
    add_library_options(parser)
    args = parser.parse_args(argv)
    library = args.library if args.library is not None else library_path()
    if library is None:
        raise SystemExit("graphopt's kernel library is not built: python -m graphopt.kernels build")
    base_lib = args.baseline_library
    given = sys.argv[1:] if argv is None else argv
    lines = [
        f"- command: `python bench/sparse_chain.py {' '.join(given)}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; onnxruntime "
        f"{ort.__version__}, onnx {onnx.__version__}; CPU: {cpu_name()}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- library: `{library}`"
        + (f"; baseline library: `{base_lib}` (timed in the same rounds)" if base_lib else ""),
        "",
        "| FFN pairs | M | sparsity | dense ms/layer | sparse ms/layer | speed-up | max rel err |"
        + (
            " baseline ms/layer | baseline speed-up | baseline max rel err | ours vs baseline |"
            if base_lib
            else ""
        ),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if base_lib else ""),
    ]
    feed = {"A": np.random.default_rng(1).standard_normal((args.m, 768)).astype(np.float32)}
    for pairs in args.layers:
        for sparsity in args.sparsities:
            dense = make_session(chain_model(pairs, sparsity, False), 1, None)
            model = chain_model(pairs, sparsity, True)
            sparse = make_session(model, 1, library)
            sessions = [dense, sparse]
            if base_lib is not None:
                sessions.append(make_session(model, 1, base_lib))
            error = max_rel(dense.run(None, feed)[0], sparse.run(None, feed)[0])
            # Every timed run is primed by one of its own (graphopt.timing), so no library
            # gains from its place in the round.
            calls = [lambda s=s: s.run(None, feed) for s in sessions]
            times = interleaved(calls, args.pairs)
            ratio = float(np.median(pair_ratios(times[0], times[1])))
            per_layer = [float(np.median(t)) * 1e3 / (2 * pairs) for t in times]
            lines.append(
                f"| {pairs} | {args.m} | {sparsity:.2f} | {per_layer[0]:.4f} | "
                f"{per_layer[1]:.4f} | {ratio:.2f}x | {error:.1e} |"
            )
            if base_lib is not None:
                base = float(np.median(pair_ratios(times[0], times[2])))
                vs_base = float(np.median(pair_ratios(times[2], times[1])))
                base_error = max_rel(dense.run(None, feed)[0], sessions[2].run(None, feed)[0])
                lines[-1] += (
                    f" {per_layer[2]:.4f} | {base:.2f}x | {base_error:.1e} | {vs_base:.3f}x |"
                )
            print(lines[-1], flush=True)
    lines.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
