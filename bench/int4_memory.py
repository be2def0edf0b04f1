"""Peak memory of ``--quantize int4-weight`` on a LLaMA-style decoder of over 1 GB.

Builds a ``transformers.LlamaForCausalLM`` from a :class:`transformers.LlamaConfig` (seeded
random weights; nothing is downloaded), exports it to ONNX with its weights in external data
(cached under ``--work``), then runs ``graphopt optimize MODEL -o OUT --quantize int4-weight
--target ort`` once per variant (RTN / GPTQ, embeddings quantized or not), each in a fresh
process, and prints a markdown table: wall time, peak RSS (the child's ``ru_maxrss``), peak
RSS over the fp32 weight bytes, the growth over the fixed cost (the same command on the same
architecture with ~2 MB of weights, as ``tests/.../test_int4_memory.py`` measures it) over the
weight bytes, output size and the report's fidelity::

    python bench/int4_memory.py --work /tmp/int4-bench                # 8 layers, ~2 GB
    python bench/int4_memory.py --work /tmp/int4-bench --layers 4     # ~1.25 GB
    python bench/int4_memory.py --work /tmp/int4-bench --only rtn,gptq
    python bench/int4_memory.py --work /tmp/int4-bench --no-baseline  # skip the ~2 MB runs

The issue's bound: the peak grows by at most 1.5× the weight bytes over the fixed cost.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_NAME = "decoder.onnx"
SEQ_LEN = 32
CALIB_SAMPLES = 16

# The fixed-cost decoder: the same architecture (and layer count) with ~2 MB of weights.
TINY = {"hidden": 64, "intermediate": 176, "vocab": 1000}

# One command in a fresh wrapper process: RUSAGE_CHILDREN is the peak over every child the
# wrapper waited for, i.e. over exactly this command.
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True)
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak_kib * 1024,
                  "stdout": proc.stdout.decode(errors="replace"),
                  "stderr": proc.stderr.decode(errors="replace").strip().splitlines()[-3:]}))
"""

VARIANTS = {
    "rtn": ["--int4-method", "rtn", "--quantize-embeddings", "true"],
    "rtn-emb-float": ["--int4-method", "rtn", "--quantize-embeddings", "false"],
    "gptq": ["--int4-method", "gptq", "--quantize-embeddings", "true"],
    "gptq-emb-float": ["--int4-method", "gptq", "--quantize-embeddings", "false"],
}


@dataclass
class Result:
    label: str
    command: list[str]
    rc: int
    wall_s: float
    peak_rss_bytes: int
    out_bytes: int
    fidelity: str
    stderr: list[str]
    baseline_bytes: int | None = None  # the same command's peak on the ~2 MB decoder


def build(work: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> Path:
    """Export the decoder once (cached: the folder name holds its shape)."""
    folder = work / f"llama_l{layers}_h{hidden}_i{intermediate}_v{vocab}"
    path = folder / MODEL_NAME
    if path.exists() and (folder / (MODEL_NAME + ".data")).exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # onnx.save appends to an existing data file: an interrupted export's bytes would stay.
    (folder / (MODEL_NAME + ".data")).unlink(missing_ok=True)
    # Exported in a child process: torch's copy of the weights is gone before graphopt runs.
    code = _EXPORT.format(
        layers=layers, hidden=hidden, inter=intermediate, vocab=vocab, path=str(path)
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


_EXPORT = """
import os, tempfile, onnx, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(
    hidden_size={hidden}, intermediate_size={inter}, num_hidden_layers={layers},
    num_attention_heads=16, num_key_value_heads=4, vocab_size={vocab},
    max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)
class Logits(torch.nn.Module):
    # An explicit all-ones mask: without one, transformers traces its packed-sequence check
    # (aten::diff, which the TorchScript exporter cannot express).
    def __init__(self):
        super().__init__()
        self.model = transformers.LlamaForCausalLM(config).eval()

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

model = Logits().eval()
ids = torch.randint(0, {vocab}, (1, 16))
with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, "raw.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (ids,), raw, input_names=["input_ids"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={{"input_ids": {{0: "batch", 1: "seq"}}}})
    del model
    proto = onnx.load(raw)
onnx.save(proto, {path!r}, save_as_external_data=True, all_tensors_to_one_file=True,
          location=os.path.basename({path!r}) + ".data", size_threshold=1024)
"""


def write_calib(folder: Path, vocab: int) -> Path:
    """``CALIB_SAMPLES`` sequences of seeded random token ids (the weights are random too)."""
    path = folder / "calib.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, input_ids=rng.integers(0, vocab, (CALIB_SAMPLES, SEQ_LEN), dtype=np.int64))
    return path


def data_bytes(model: Path) -> int:
    """The initializers' bytes (not the data file's size: a file written twice holds more)."""
    import onnx

    proto = onnx.load(model, load_external_data=False)
    total = 0
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        total += int(entries["length"]) if "length" in entries else len(tensor.raw_data)
    return total


def run(label: str, model: Path, calib: Path) -> Result:
    out = model.parent / f"out_{label}.onnx"
    for old in model.parent.glob(out.name + "*"):
        old.unlink()
    command = [sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out)]
    command += ["--quantize", "int4-weight", "--target", "ort", *VARIANTS[label]]
    if "gptq" in label:
        command += ["--calib", str(calib)]
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, check=True
    )
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in model.parent.glob(out.name + "*"))
    return Result(
        label,
        command,
        data["rc"],
        data["wall_s"],
        data["peak_rss_bytes"],
        size,
        fidelity_of(data["stdout"]),
        data["stderr"],
    )


def fidelity_of(report: str) -> str:
    """The report's fidelity rows (sample set: mean cosine), ORT-optimized repeats left out."""
    found = []
    for line in report.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if len(cells) == 6 and re.fullmatch(r"-?\d\.\d{4}", cells[4]) and "ORT" not in cells[1]:
            found.append(f"{cells[1]} cos {cells[4]}")
    return "; ".join(found) or "?"


def print_table(results: list[Result], size: int) -> None:
    print(f"\nfp32 weight bytes: {size / 2**20:.0f} MiB\n")
    print(
        "| variant | rc | wall s | peak RSS MiB | peak / weights | baseline MiB "
        "| (peak - baseline) / weights | output MiB | fidelity |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base, growth = "-", "-"
        if r.baseline_bytes is not None:
            base = f"{r.baseline_bytes / 2**20:.0f}"
            growth = f"{(r.peak_rss_bytes - r.baseline_bytes) / size:.2f}x"
        print(
            f"| {r.label} | {r.rc} | {r.wall_s:.0f} | {r.peak_rss_bytes / 2**20:.0f} | "
            f"{r.peak_rss_bytes / size:.2f}x | {base} | {growth} | "
            f"{r.out_bytes / 2**20:.0f} | {r.fidelity} |"
        )
    for r in results:
        print(f"\n{r.label}: {' '.join(r.command)}")
        if r.rc:
            print("  stderr:", *r.stderr, sep="\n    ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="cache folder for the model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", default=",".join(VARIANTS), help="variants, comma-separated")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the fixed-cost runs (each variant again on a ~2 MB decoder)",
    )
    args = parser.parse_args(argv)
    labels = [v for v in args.only.split(",") if v]
    unknown = sorted(set(labels) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    model = build(args.work, args.layers, args.hidden, args.intermediate, args.vocab)
    calib = write_calib(model.parent, args.vocab)
    tiny = None
    if not args.no_baseline:
        tiny = build(args.work, args.layers, **TINY)
        tiny_calib = write_calib(tiny.parent, TINY["vocab"])
    results = []
    for label in labels:
        result = run(label, model, calib)
        if tiny is not None:
            result.baseline_bytes = run(label, tiny, tiny_calib).peak_rss_bytes
        results.append(result)
        print(f"{label}: done in {result.wall_s:.0f} s", file=sys.stderr, flush=True)
    print_table(results, data_bytes(model))
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
