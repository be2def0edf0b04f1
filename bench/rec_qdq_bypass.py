"""PP-OCRv4 rec INT8: how much each single activation rounding moves the decoded text.

    python bench/rec_qdq_bypass.py --work /tmp/rec_bypass

Quantizes the recognizer as ``bench/quantize.py`` does (``--quantize int8 --target ort``,
calibrated on its 32 rendered lines of seed 0) and reads its 200 evaluation lines (seed 1)
greedily. Then, one at a time, it removes one activation Q/DQ pair from the quantized model
(the DequantizeLinear's readers read the float tensor instead), so that model differs from
the int8 one by one rounding less, and reads the lines again; last with every activation
Q/DQ removed (int8 weights only). The score is the share of lines whose label sequence
equals fp32's (``bench/quantize.py``'s ``lines_same``), beside the spaces read in all lines.
If the shift int8 causes sat in a few tensors, removing those would recover most lines and
removing any other would change little; nothing is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
import quantize as qb


def without_rounding(model: onnx.ModelProto, tensors: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose activation Q/DQ pairs on ``tensors`` are bypassed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantized = {
        n.output[0]: n.input[0]
        for n in copy.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] in tensors
    }
    dequantized = {
        n.output[0]: quantized[n.input[0]]
        for n in copy.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized
    }
    for node in copy.graph.node:
        for k, name in enumerate(node.input):
            if name in dequantized:
                node.input[k] = dequantized[name]
    return copy


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """The float tensors a QuantizeLinear rounds at run time (not weights: those are stored
    quantized, with no QuantizeLinear)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.input[0]
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in constants
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", choices=("random", "phrases"), default="random")
    parser.add_argument("--lines", type=int, default=200, help="evaluation lines")
    parser.add_argument("--work", default="/tmp/graphopt-rec-bypass")
    args = parser.parse_args(argv)
    from graphopt.models.ocr import rec_dictionary

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = qb.build("ppocr_rec")
    space = len(rec_dictionary(src)) + 1
    calib = qb.ocr_data(src, qb.CALIB_COUNT, seed=qb.CALIB_SEED, text=args.text)
    data = qb.ocr_data(src, args.lines, seed=qb.EVAL_SEED, text=args.text)
    dst = work / f"rec.int8.{args.text}.onnx"
    qb.graphopt_quantize(
        src, dst, quantize="int8", target="ort", calib=str(qb.save_npz(work / "calib.npz", calib))
    )
    reference = qb.ctc_labels(qb.outputs(src, data)[0])
    quantized = onnx.load(str(dst))

    def score(model: onnx.ModelProto) -> tuple[float, int]:
        path = work / "candidate.onnx"
        onnx.save(model, str(path))
        labels = qb.ctc_labels(qb.outputs(path, data)[0])
        return qb.lines_same(src, reference, labels)[0], sum(line.count(space) for line in labels)

    tensors = activation_tensors(quantized)
    base, base_spaces = score(quantized)
    fp32_spaces = sum(line.count(space) for line in reference)
    print(f"{args.lines} lines ({args.text}), fp32 reads {fp32_spaces} spaces")
    print(f"int8 ({len(tensors)} activation Q/DQ pairs): {base:.1%} same, {base_spaces} spaces")
    shares, spaces = [], []
    for name in tensors:
        same, count = score(without_rounding(quantized, {name}))
        shares.append(same)
        spaces.append(count)
        print(f"  without {name}: {same:.1%} lines same, {count} spaces", flush=True)
    same, count = score(without_rounding(quantized, set(tensors)))
    print(f"without every activation Q/DQ (int8 weights only): {same:.1%}, {count} spaces")
    changes = np.array(shares) - base
    print(
        f"one Q/DQ pair removed ({len(tensors)} models): lines same "
        f"{min(shares):.1%}-{max(shares):.1%} (median {statistics.median(shares):.1%}; "
        f"int8 {base:.1%}); better than int8 on {int((changes > 0).sum())}, worse on "
        f"{int((changes < 0).sum())}; spaces {min(spaces)}-{max(spaces)} (int8 {base_spaces}, "
        f"fp32 {fp32_spaces})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
