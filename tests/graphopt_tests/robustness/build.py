"""Building blocks of the hostile corpus: the case registry and small-model helpers.

Every case is a function that writes one model (plus any side files) into a fresh folder
and returns the model's path.

Categories cover what a model downloaded from anywhere may hold: corrupt protobufs, absurd
versions, unknown domains, cycles, dangling and duplicate names, huge declared dims, unsafe
external data, wrong tensor sizes, subgraphs with outer-scope references, non-ASCII names.
Generation is seeded: the same corpus on every run and machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

F = TensorProto.FLOAT
I64 = TensorProto.INT64


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    build: Callable[[Path], Path]

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


CASES: list[Case] = []


def _add(category: str, name: str, build: Callable[[Path], Path]) -> None:
    CASES.append(Case(category, name, build))


# --- building blocks ---------------------------------------------------------------------


def vi(name: str, dtype: int = F, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, [1, 4] if shape is None else shape)


def model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 17,
    ir_version: int = 8,
    extra_opsets: list[onnx.OperatorSetIdProto] = (),  # type: ignore[assignment]
    functions: list[onnx.FunctionProto] = (),  # type: ignore[assignment]
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(initializers))
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
        functions=list(functions),
    )
    proto.ir_version = ir_version
    return proto


def base_model(n: int = 4) -> onnx.ModelProto:
    """A small valid model every exact pass has something to do on."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    one = onnx.numpy_helper.from_array(np.ones(n, np.float32), "one")
    return model(
        [
            helper.make_node("Identity", ["x"], ["x1"]),
            helper.make_node("MatMul", ["x1", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["h2"]),
            helper.make_node("Mul", ["h2", "one"], ["h3"]),
            helper.make_node("Relu", ["h3"], ["y"]),
        ],
        [vi("x", F, [1, n])],
        [vi("y", F, [1, n])],
        [w, b, one],
    )


def write(proto: onnx.ModelProto | bytes, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    path.write_bytes(proto if isinstance(proto, bytes) else proto.SerializeToString())
    return path


def writer(make: Callable[[], onnx.ModelProto | bytes]) -> Callable[[Path], Path]:
    return lambda folder: write(make(), folder)


_BASE_BYTES: dict[int, bytes] = {}


def base_bytes(n: int = 8) -> bytes:
    if n not in _BASE_BYTES:
        _BASE_BYTES[n] = base_model(n).SerializeToString()
    return _BASE_BYTES[n]
