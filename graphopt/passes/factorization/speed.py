"""Is the factorized pair faster than the layer? Measured in ONNX Runtime at the model's shapes.

Fewer FLOPs is not enough: two thin GEMMs stream the activations twice and a small rank
underfills the kernel's tiles, so a pair with 30% fewer FLOPs can run slower. Each layer's
original form and its pair at the chosen rank are timed as one-node ORT sessions (CPU, one
thread) with :func:`graphopt.passes.sparsity.crossover.measure` (paired, interleaved runs,
the fastest of each side). Results are cached per user by CPU signature and *shape class*
(op, sizes rounded up to 3 significant bits by ``crossover.bucket``, rank likewise, the M
rows or the spatial size), in ``~/.cache/graphopt/factorize/latency-<cpu>.json``, atomic
writes (``crossover.CrossoverCache``). The timings used are recorded in the output model's
metadata (:data:`METADATA_KEY`), and a later run can replay them from that model
(``--factorize-speed-check FILE.onnx``): the same decisions on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.editing import attribute
from graphopt.passes.sparsity.crossover import (
    CrossoverCache,
    Timing,
    bucket,
    cpu_cache_file,
    cpu_signature,
    measure,
    read_recorded,
)
from graphopt.passes.sparsity.layers import Layer

METADATA_KEY = "graphopt.factorize"
THREADS = 1


@dataclass
class Shape:
    """What a layer's timing depends on, at the run's shapes."""

    op: str
    n: int
    k: int
    rows: int  # MatMul/Gemm: rows of the input; Conv: output positions
    conv: tuple[int, ...] = ()  # Conv: (C, kh, kw, H, W) of the input
    attrs: dict[str, Any] = field(default_factory=dict)

    def key(self, rank: int) -> str:
        if self.op == "Conv":
            c, kh, kw, h, w = self.conv
            strides = "x".join(map(str, self.attrs.get("strides", [1, 1])))
            return (
                f"Conv|C{bucket(c)}|O{bucket(self.n)}|k{kh}x{kw}|s{strides}|"
                f"H{bucket(h)}|W{bucket(w)}|r{bucket(rank)}|t{THREADS}"
            )
        return (
            f"MatMul|K{bucket(self.k)}|N{bucket(self.n)}|M{bucket(self.rows)}|"
            f"r{bucket(rank)}|t{THREADS}"
        )


def layer_shape(layer: Layer, input_shape: tuple[int, ...] | None, rows: int) -> Shape:
    if layer.op != "Conv":
        return Shape("MatMul", layer.outputs, layer.canonical_k, rows)
    dims = tuple(input_shape or ())
    h, w = (dims[2], dims[3]) if len(dims) == 4 else (8, 8)
    attrs = {
        key: list(attribute(layer.node, key))
        for key in ("strides", "pads", "dilations")
        if attribute(layer.node, key) is not None
    }
    out, cin, kh, kw = layer.shape
    return Shape("Conv", out, layer.canonical_k, rows, (cin, kh, kw, h, w), attrs)


class SpeedCheck:
    """Timings by shape class: replayed, cached, or measured now (in that order)."""

    def __init__(self, replay: dict[str, dict[str, float]] | None = None) -> None:
        self.cache = CrossoverCache(cpu_cache_file("factorize", "latency"))
        self.replay = replay or {}
        self.used: dict[str, dict[str, float]] = {}
        self.measured = 0

    def timing(self, shape: Shape, rank: int) -> Timing:
        key = shape.key(rank)
        if key in self.replay:
            entry = self.replay[key]
            timing = Timing(float(entry["dense_ms"]), float(entry["sparse_ms"]))
        else:
            cached = self.cache.get(f"{_runtime()}|{key}")
            if cached is None:
                models, feeds = timing_models(shape, rank)
                cached = measure(models, feeds, THREADS)
                self.cache.put(f"{_runtime()}|{key}", cached)
                self.measured += 1
            timing = cached
        self.used[key] = {"dense_ms": timing.dense_ms, "sparse_ms": timing.sparse_ms}
        return timing


def _runtime() -> str:
    from graphopt.ortrun import import_onnxruntime

    return f"{cpu_signature()}|ort-{import_onnxruntime().__version__}"


def timing_models(shape: Shape, rank: int) -> tuple[list[onnx.ModelProto], dict[str, np.ndarray]]:
    """The layer alone and the factorized pair, random weights, and one input."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    to_array = onnx.numpy_helper.from_array

    def weight(*dims: int) -> np.ndarray:
        return rng.standard_normal(dims, dtype=np.float32) * np.float32(0.05)

    if shape.op == "Conv":
        c, kh, kw, hh, ww = shape.conv
        x = rng.standard_normal((1, c, hh, ww), dtype=np.float32)
        dims: list[Any] = ["b", c, "h", "w"]
        attrs = {k: v for k, v in shape.attrs.items()}
        dense = ([h.make_node("Conv", ["x", "w"], ["y"], **attrs)],
                 [to_array(weight(shape.n, c, kh, kw), "w")])  # fmt: skip
        pair = (
            [
                h.make_node("Conv", ["x", "v"], ["t"], **attrs),
                h.make_node("Conv", ["t", "u"], ["y"]),
            ],
            [to_array(weight(rank, c, kh, kw), "v"), to_array(weight(shape.n, rank, 1, 1), "u")],
        )
    else:
        # The input's leading dims symbolic, as exporters write them (see crossover).
        x = rng.standard_normal((1, shape.rows, shape.k), dtype=np.float32)
        dims = ["b", "m", shape.k]
        dense_w = to_array(weight(shape.k, shape.n), "w")
        dense = ([h.make_node("MatMul", ["x", "w"], ["y"])], [dense_w])
        pair = (
            [h.make_node("MatMul", ["x", "v"], ["t"]), h.make_node("MatMul", ["t", "u"], ["y"])],
            [to_array(weight(shape.k, rank), "v"), to_array(weight(rank, shape.n), "u")],
        )
    x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
    y_info = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)

    def model(nodes: list, inits: list) -> onnx.ModelProto:
        graph = h.make_graph(nodes, "factorize_speed", [x_info], [y_info], inits)
        built = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
        built.ir_version = 8
        return built

    return [model(*dense), model(*pair)], {"x": x}


def load_replay(source: str) -> dict[str, dict[str, float]]:
    """Timings by shape class from a model this pass wrote (its metadata) or a JSON file."""

    def timings(data: Any) -> dict[str, dict[str, float]]:
        return {str(k): {"dense_ms": float(v["dense_ms"]), "sparse_ms": float(v["sparse_ms"])}
                for k, v in data["timings"].items()}  # fmt: skip

    return read_recorded(source, METADATA_KEY, "factorize timings", timings)
