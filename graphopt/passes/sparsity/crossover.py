"""The measured crossover of ``sparse-kernels``: dense MatMul against graphopt's sparse op.

Whether a sparse layer is worth lowering depends on its shape, its sparsity, the packed
format and the machine: a fixed threshold would be wrong somewhere. So the pass times both
forms of a layer here, on this machine, in one-node ONNX Runtime sessions (the dense one with
ORT's optimizations on, as a user runs it; the threads the pass is told), a few paired and
interleaved runs, and keeps each side's fastest run (see :func:`measure`).

Results are cached per user (``~/.cache/graphopt/kernels/crossover-<cpu>.json``, or under
``$XDG_CACHE_HOME``), keyed by the CPU signature, a digest of the kernel library and the
layer's *shape class*: kind, K and N rounded up to 3 significant bits, M likewise, format,
sparsity in 5% steps and threads. A layer of a class already timed reuses the timing, so a
rerun decides the same (the decisions also travel in the output model's metadata, see
:mod:`graphopt.passes.sparsity.lowering`). Writes are atomic (a temporary file renamed over
the cache); a cache that cannot be read or written is ignored: it only saves time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.backends.ort_custom_ops import OWN_DOMAIN, OWN_DOMAIN_VERSION
from graphopt.errors import UserInputError

# Paired rounds per measurement after the warm-up: the whole decision on MiniLM (three shape
# classes) stays around a second of timing, plus the sessions' creation.
PAIRS = 15
WARMUP = 3
# Each timed call runs this long at least (repeating the run): sub-millisecond layers are
# otherwise timed at the clock's and Python's resolution.
MIN_CALL_SECONDS = 2e-3
CACHE_VERSION = 4  # 4: A at its rank; 3: epilogues timed; 2: fastest rounds; 1: medians
# The output model's record of every decision (metadata_props), replayable as decisions.
METADATA_KEY = "graphopt.sparse_kernels"
# CPU features that change which kernel (ours or MLAS's) runs: part of the signature.
_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx")


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one run of a layer and its epilogue: dense, the sparse op with the
    epilogue fused, and (layers with an activation) the sparse op with the activation left
    to ORT, whose vectorized Gelu can beat a fused scalar one."""

    dense_ms: float
    sparse_ms: float
    separate_ms: float | None = None

    @property
    def best(self) -> tuple[str, float]:
        """The faster sparse form: ``("fused", ms)`` or ``("separate", ms)``."""
        if self.separate_ms is not None and self.separate_ms < self.sparse_ms:
            return "separate", self.separate_ms
        return "fused", self.sparse_ms

    @property
    def speedup(self) -> float:
        fastest = self.best[1]
        return self.dense_ms / fastest if fastest > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        data = {"dense_ms": self.dense_ms, "sparse_ms": self.sparse_ms}
        if self.separate_ms is not None:
            data["separate_ms"] = self.separate_ms
        return data


@functools.cache
def cpu_signature() -> str:
    """A short, stable name of this machine's CPU: architecture, model, features, cores."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    features = ",".join(f for f in _FEATURES if f in flags)
    text = f"{platform.machine()}|{model}|{features}|{os.cpu_count()}"
    return f"{platform.machine()}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def library_digest(path: Path) -> str:
    """The first 12 hex digits of the library's SHA-256: a rebuilt library is re-measured."""
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def bucket(value: int) -> int:
    """``value`` rounded up to 3 significant bits (384 -> 384, 1000 -> 1024, 1536 -> 1536)."""
    if value <= 8:
        return max(value, 1)
    step = 1 << (value.bit_length() - 3)
    return -(-value // step) * step


def shape_class(
    kind: str,
    K: int,
    N: int,
    M: int,
    fmt: str,
    sparsity: float,
    threads: int,
    library: str,
    epilogue: str = "none",
) -> str:
    """The cache key of a layer: what its timing depends on, bucketed. ``epilogue``: what
    follows the product (``bias+gelu``, ``relu``, ``none``)."""
    level = round(sparsity * 20) * 5
    return (
        f"{cpu_signature()}|lib-{library}|{kind}|K{bucket(K)}|N{bucket(N)}|M{bucket(M)}"
        f"|{fmt}|s{level}|t{threads}|{epilogue}"
    )


def cpu_cache_file(folder: str, stem: str) -> Path:
    """A per-user cache file of this CPU's measurements: ``graphopt/FOLDER/STEM-<cpu>.json``
    under ``$XDG_CACHE_HOME`` (else ``~/.cache``). Shared by every pass that times on the
    machine (sparse-kernel crossovers, factorize's speed check, ``--autotune``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "graphopt" / folder / f"{stem}-{cpu_signature()}.json"


def cache_path() -> Path:
    """The per-user cache file of this CPU's crossover measurements."""
    return cpu_cache_file("kernels", "crossover")


class CrossoverCache:
    """Timings by shape class, read once and written back atomically after each addition."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_path()
        self.entries: dict[str, dict[str, float]] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION:
                self.entries = {str(k): dict(v) for k, v in data["entries"].items()}

    def get(self, key: str) -> Timing | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        try:
            separate = entry.get("separate_ms")
            return Timing(
                float(entry["dense_ms"]),
                float(entry["sparse_ms"]),
                None if separate is None else float(separate),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def put(self, key: str, timing: Timing) -> None:
        self.entries[key] = timing.as_dict()
        data = {"version": CACHE_VERSION, "entries": dict(sorted(self.entries.items()))}
        # Atomic: a concurrent run reads the old file or the new one, never half of one.
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".crossover-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(data, handle, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def measure(
    models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], threads: int = 1
) -> Timing:
    """The fastest of ``PAIRS`` interleaved runs of each model on ``feeds``: dense, sparse
    and optionally the sparse form with its activation separate (see :class:`Timing`)."""
    from graphopt.backends.ort_custom_ops import register_active_custom_ops
    from graphopt.ortrun import import_onnxruntime

    ort = import_onnxruntime()

    def session(model: onnx.ModelProto):
        options = ort.SessionOptions()
        register_active_custom_ops(options, (), model=model)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        data = model.SerializeToString()
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    runs = [_runner(session(model), feeds) for model in models]
    for run in runs:
        for _ in range(WARMUP):
            run()
    repeat = max(1, int(MIN_CALL_SECONDS / max(_once(runs[0]), 1e-6)))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(PAIRS):
        for side, run in enumerate(runs):
            began = time.perf_counter()
            for _ in range(repeat):
                run()
            times[side].append((time.perf_counter() - began) * 1e3 / repeat)
    # The fastest round of each side, not the median: under other load on the machine the
    # dense side (its weight streams from the shared L3 cache) slowed 1x-3x between repeats
    # while the packed one (a fifth of the bytes) held; the minimum stayed within 10%.
    fastest = [_significant(min(t)) for t in times]
    return Timing(fastest[0], fastest[1], fastest[2] if len(fastest) > 2 else None)


def timing_models(
    layer: Any, sparse_parts: Callable[[Any], tuple[str, list[tuple[str, Any]], dict]]
) -> tuple[list[onnx.ModelProto], dict[str, np.ndarray]]:
    """Small models of the layer with its epilogue: dense (as ORT runs it, fusions on), the
    sparse op with the epilogue fused and, when there is an activation, the sparse op with
    the activation left to ORT; and a feed of M rows. ``layer`` is a lowering ``Layer``;
    ``sparse_parts(layer)`` gives its op (``packed_ops.op_parts`` with the packed weight)."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    K, M = layer.K, layer.rows
    # A's rank as in the model, its leading dims symbolic as exporters write them: with
    # static ones ORT rewrites MatMul + Add into Reshape + Gemm, and for int8 QDQ that
    # dequantizes the weight every run (8x slower than the MatMulIntegerToFloat it runs on
    # the model itself).
    rank = len(layer.a.shape) if layer.a is not None and layer.a.shape is not None else 2
    shape = (*([1] * (rank - 2)), M, K) if rank > 2 else (M, K)
    dims = [*(f"d{i}" for i in range(len(shape) - 1)), K]
    to_array = onnx.numpy_helper.from_array
    if layer.op == "QMatMul":
        assert layer.w_scale is not None and layer.a_scale is not None
        assert layer.a_zero is not None
        x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        x_info = h.make_tensor_value_info("x", onnx.TensorProto.UINT8, dims)
        w_scale = layer.w_scale if layer.w_scale.size > 1 else layer.w_scale.reshape(())
        dense_nodes = [
            h.make_node("DequantizeLinear", ["x", "sa", "za"], ["xf"]),
            h.make_node("DequantizeLinear", ["w", "sw"], ["wf"], axis=1),
            h.make_node("MatMul", ["xf", "wf"], ["mm"]),
        ]
        dense_inits = [
            to_array(layer.a_scale, "sa"),
            to_array(layer.a_zero, "za"),
            to_array(layer.w, "w"),
            to_array(w_scale, "sw"),
        ]
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
        x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
        dense_nodes = [h.make_node("MatMul", ["x", "w"], ["mm"])]
        dense_inits = [to_array(layer.w, "w")]

    def tail(source: str, bias: np.ndarray | None, act: str) -> tuple[list, list]:
        """Bias Add and activation as plain ONNX nodes, ending in "y"."""
        nodes, inits, last = [], [], source
        if bias is not None:
            inits.append(to_array(bias, "bias"))
            nodes.append(h.make_node("Add", [last, "bias"], ["biased"]))
            last = "biased"
        if act != "none":
            nodes.append(h.make_node("Relu" if act == "relu" else "Gelu", [last], ["act"]))
            last = "act"
        nodes.append(h.make_node("Identity", [last], ["y"]))
        return nodes, inits

    def sparse(variant: Any, outside: str) -> onnx.ModelProto:
        op_type, consts, attrs = sparse_parts(variant)
        names = [f"c{i}" for i in range(len(consts))]
        inits = [to_array(np.asarray(a), n) for n, (_, a) in zip(names, consts, strict=True)]
        node = h.make_node(op_type, ["x", *names], ["mm"], domain=OWN_DOMAIN, **attrs)
        nodes, more = tail("mm", None, outside)
        return model([node, *nodes], inits + more)

    def model(nodes: list, initializers: list) -> onnx.ModelProto:
        y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        graph = h.make_graph(nodes, "crossover", [x_info], [y], initializers)
        opsets = [h.make_opsetid("", 21), h.make_opsetid(OWN_DOMAIN, OWN_DOMAIN_VERSION)]
        built = h.make_model(graph, opset_imports=opsets)
        built.ir_version = 10
        return built

    nodes, inits = tail("mm", layer.bias, layer.activation)
    models = [model(dense_nodes + nodes, dense_inits + inits), sparse(layer, "none")]
    if layer.split is not None:
        models.append(sparse(layer.separate(), layer.activation))
    return models, {"x": x}


def _runner(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        session.run(None, feeds)

    return run


def _once(run: Callable[[], None]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def _significant(value: float) -> float:
    """4 significant digits: what the metadata records (and a replay reads back) equally."""
    return float(f"{value:.4g}")


def read_recorded(source: str, key: str, what: str, pick: Callable[[Any], Any]) -> Any:
    """``pick`` of the JSON a pass recorded under metadata ``key`` of a model it wrote (an
    ``.onnx`` path) or of a JSON file: how a rerun replays measured choices. Anything unreadable
    is a one-line error naming the file and ``what`` was being read."""
    path = Path(source)
    try:
        if path.suffix.lower() == ".onnx":
            proto = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in proto.metadata_props}
            if key not in props:
                raise UserInputError(f"{path}: no {key} in the model's metadata")
            data = json.loads(props[key])
        else:
            data = json.loads(path.read_text())
        return pick(data)
    except UserInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserInputError(f"{path}: cannot read {what} ({exc})") from None


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
