"""Peak memory of graphopt's commands on a large external-data model.

Generates a chain of MatMul layers (default 40 × 4096×4096 fp32 = 2.7 GB) whose weights live
in ``model.onnx.data``, written in chunks so the generator never holds a whole layer, then
runs each command in a fresh process and reports its peak RSS and wall time: ``inspect``,
``analyze`` (table and ``--json``), ``optimize --no-verify`` (erasure), pruning
(``optimize --prune params=0.3 --criterion l1 --no-verify``, when the CLI has ``--prune``)
and, with ``--verify``, ``optimize`` with ONNX Runtime verification::

    python bench/memory.py /tmp/graphopt-mem               # 40 layers of 4096 (2.7 GB)
    python bench/memory.py /tmp/graphopt-mem --layers 8 --dim 2048
    python bench/memory.py /tmp/graphopt-mem --reuse --verify

The hidden dims between layers are zero-invariant groups (prunable), so ``analyze`` and the
pruning pass see every weight.

Peak RSS is the child's ``ru_maxrss`` read by a one-shot wrapper process (so one command's
peak never leaks into another's). Memory-mapped weight pages that a command touches count in
RSS, so a pass or a save that reads every weight shows up here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

MODEL_NAME = "model.onnx"
CHUNK_ELEMENTS = 4 * 2**20  # 16 MB of float32 at a time

# Runs one command and prints its peak RSS; a fresh wrapper per command keeps peaks apart
# (RUSAGE_CHILDREN is the maximum over every child a process ever waited for).
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak_kib * 1024,
                  "stderr": tail}))
"""


@dataclass
class Measurement:
    label: str
    rc: int
    wall_s: float
    peak_rss_bytes: int
    stderr: list[str]


def generate(folder: Path, layers: int, dim: int, seed: int = 0, duplicates: int = 0) -> Path:
    """Write ``folder/model.onnx`` + ``model.onnx.data``; returns the model path.

    The last ``duplicates`` layers repeat the bytes of the last distinct layer, so that a
    deduplicating pass has to compare whole weights (which it must do without loading them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    data_name = MODEL_NAME + ".data"
    layer_elements = dim * dim
    layer_bytes = layer_elements * 4
    initializers = []
    nodes = []
    scale = np.float32(1.0 / np.sqrt(dim))  # keeps activations O(1) through the chain
    with open(folder / data_name, "wb") as data:
        for index in range(layers):
            offset = data.tell()
            source = min(index, max(0, layers - duplicates - 1))
            chunk_rng = np.random.default_rng([seed, source])
            remaining = layer_elements
            while remaining:
                count = min(CHUNK_ELEMENTS, remaining)
                chunk = chunk_rng.standard_normal(count, dtype=np.float32) * scale
                data.write(chunk.tobytes())
                remaining -= count
            name = f"w{index}"
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[dim, dim])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(layer_bytes)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [f"h{index}", name], [f"h{index + 1}"]))
    graph = helper.make_graph(
        nodes,
        "memory-bench",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / MODEL_NAME
    path.write_bytes(model.SerializeToString())
    return path


def graphopt_command() -> list[str]:
    exe = shutil.which("graphopt", path=str(Path(sys.executable).parent)) or shutil.which(
        "graphopt"
    )
    return [exe] if exe else [sys.executable, "-m", "graphopt"]


def measure(label: str, command: list[str]) -> Measurement:
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return Measurement(
        label, result["rc"], result["wall_s"], result["peak_rss_bytes"], result["stderr"]
    )


def baseline() -> Measurement:
    """Peak RSS of a process that only imports graphopt's CLI (what every command pays)."""
    code = "import graphopt.cli, graphopt.api, graphopt.registry; graphopt.registry.all_passes()"
    return measure("python + imports", [sys.executable, "-c", code])


PRUNE_ARGS = ["--prune", "params=0.3", "--criterion", "l1", "--no-verify"]


def supports_prune() -> bool:
    """Whether this graphopt's ``optimize`` has the pruning flags."""
    out = subprocess.run(
        [*graphopt_command(), "optimize", "--help"], capture_output=True, text=True, check=False
    )
    return "--prune" in out.stdout and "--criterion" in out.stdout


def commands(model: Path, out: Path) -> dict[str, list[str]]:
    """Every measured command line, by label; ``out`` is the optimized model's path."""
    exe = graphopt_command()
    optimize = [*exe, "optimize", str(model), "-o", str(out)]
    return {
        "inspect": [*exe, "inspect", str(model)],
        "analyze": [*exe, "analyze", str(model)],
        "analyze --json": [*exe, "analyze", "--json", str(model)],
        "optimize --no-verify": [*optimize, "--no-verify"],
        "prune params=0.3 l1 --no-verify": [*optimize, *PRUNE_ARGS],
        # Verification runs the original and the result in ONNX Runtime: ORT holds the
        # weights itself, so this row measures ORT as much as graphopt.
        "optimize (verify)": optimize,
    }


def run_all(
    model: Path, passes: list[str] | None = None, verify: bool = False, prune: bool | None = None
) -> list[Measurement]:
    out = model.with_name("model.opt.onnx")
    lines = commands(model, out)
    labels = ["inspect", "analyze", "analyze --json", "optimize --no-verify"]
    if supports_prune() if prune is None else prune:
        labels.append("prune params=0.3 l1 --no-verify")
    if verify:
        labels.append("optimize (verify)")
    results = [baseline(), *(measure(label, lines[label]) for label in labels)]
    for name in passes or []:
        results.append(
            measure(
                f"optimize --passes {name}",
                [*lines["optimize --no-verify"], "--passes", name],
            )
        )
    return results


def data_bytes(model: Path) -> int:
    return (model.parent / (model.name + ".data")).stat().st_size


def print_table(results: list[Measurement], size: int) -> None:
    print(f"model weights: {size / 2**30:.2f} GiB ({size} bytes)")
    print(f"{'command':<40} {'rc':>3} {'wall (s)':>9} {'peak RSS (MiB)':>15} {'RSS/model':>10}")
    for r in results:
        print(
            f"{r.label:<40} {r.rc:>3} {r.wall_s:>9.2f} {r.peak_rss_bytes / 2**20:>15.1f} "
            f"{r.peak_rss_bytes / size:>10.3f}"
        )
        if r.rc != 0:
            print("    " + " | ".join(r.stderr))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where the model is generated")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument(
        "--duplicates",
        type=int,
        default=0,
        help="the last N layers repeat the last distinct layer's weights",
    )
    parser.add_argument("--reuse", action="store_true", help="keep an existing model")
    parser.add_argument("--passes", default="", help="also run these passes one at a time")
    parser.add_argument("--verify", action="store_true", help="also run optimize with ORT checks")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    model = args.folder / MODEL_NAME
    if not (args.reuse and model.exists()):
        start = time.perf_counter()
        model = generate(args.folder, args.layers, args.dim, duplicates=args.duplicates)
        print(f"generated {model} in {time.perf_counter() - start:.1f} s", flush=True)
    passes = [p for p in args.passes.split(",") if p]
    results = run_all(model, passes, args.verify)
    if args.json:
        print(
            json.dumps(
                {"data_bytes": data_bytes(model), "results": [r.__dict__ for r in results]},
                indent=2,
            )
        )
    else:
        print_table(results, data_bytes(model))
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
