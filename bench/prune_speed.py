"""Pruning speed: ORT CPU time of a pruned model vs the original, by channel alignment.

For each ``--round-to`` value, prune the model at ``--prune`` (l2 magnitude: the criterion
does not change the shapes' cost) and time original vs pruned side by side (bench/timing.py:
paired interleaved rounds, median of per-round ratios) at 1 and 2 threads and each batch.

Usage: python bench/prune_speed.py [--model resnet50] [--prune flops=0.5]
       [--round-to 1,8,16,auto] [--batches 1,8] [--pairs 20] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import paired_speedups

from graphopt import api, models
from graphopt.analysis.flops import model_flops
from graphopt.input_dims import graph_inputs
from graphopt.io import load


def dynamic_batch_copy(path: Path, out: Path) -> Path:
    """The model with its batch dim made symbolic, so batch 8 can be timed too."""
    import onnx

    proto = onnx.load(path)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    onnx.save(proto, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--prune", default="flops=0.5")
    parser.add_argument("--round-to", default="1,8,16,auto")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--markdown")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-prune-speed-"))
    source = dynamic_batch_copy(models.get(args.model), tmp / "original.onnx")
    name = graph_inputs(load(source).model)[0].name
    rows = []
    for align in args.round_to.split(","):
        out = tmp / f"pruned_{align}.onnx"
        options = api.OptimizeOptions(
            prune=args.prune,
            round_to=None if align == "auto" else int(align),
            verify=False,
            input_shapes={name: (1, 3, 224, 224)},
        )
        api.optimize(source, out, options)
        shapes = {name: (1, 3, 224, 224)}
        ratio = (
            model_flops(load(out).model, shapes).total
            / model_flops(load(source).model, shapes).total
        )
        cells = []
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = {name: np.random.default_rng(0).random((batch, 3, 224, 224), np.float32)}
            for threads in (int(t) for t in args.threads.split(",")):
                (speed,) = paired_speedups([source, out], feeds, threads, args.pairs)
                cells.append(f"{speed:.2f}×")
                print(f"round_to={align} batch={batch} threads={threads}: {speed:.2f}×", flush=True)
        rows.append(f"| {align} | {ratio:.3f} | " + " | ".join(cells) + " |")
    header = ["round_to", "FLOPs kept"] + [
        f"b{b} t{t}" for b in args.batches.split(",") for t in args.threads.split(",")
    ]
    text = "\n".join(
        [
            f"{args.model} pruned at {args.prune}: speed vs original (ORT CPU, ENABLE_ALL, "
            f"median of {args.pairs} paired rounds)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *rows,
        ]
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
