"""Shared test helpers: build small models, run a pass, check outputs against ORT."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt import io
from graphopt.analysis.stats import count_nodes
from graphopt.inputs import make_inputs
from graphopt.output_errors import compare
from graphopt.registry import GraphPass, PassContext
from graphopt.verify import run_model

TOLERANCE = 1e-4


def import_or_skip(module: str, reason: str) -> ModuleType:
    """``module``, or a skip printing ``reason`` when it is not installed at all.

    Unlike ``pytest.importorskip``, a module that is installed but fails to import (a broken
    release, a folder of the checkout shadowing it) fails the test instead of hiding as a skip.
    """
    if find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not installed: {reason}")
    return importlib.import_module(module)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[np.ndarray | onnx.TensorProto] | dict[str, np.ndarray] = (),
    opset: int = 17,
    ir_version: int = 8,
) -> ir.Model:
    """An onnx-ir model from onnx.helper pieces; dict initializers are named by their keys."""
    if isinstance(initializers, dict):
        tensors = [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()]
    else:
        tensors = list(initializers)
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), tensors)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    onnx.checker.check_model(proto)
    return io.load(proto).model


def tensor_info(name: str, dtype: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def run_pass(
    model: ir.Model, pass_cls: type[GraphPass], context: PassContext | None = None, **options
) -> tuple[ir.Model, int]:
    """Run one pass on a copy of ``model``; return (rewritten copy, hits)."""
    copy = model.clone()
    graph_pass = pass_cls(context or PassContext(), **options)
    graph_pass(copy)
    return copy, graph_pass.hits


def assert_same_outputs(
    before: ir.Model,
    after: ir.Model,
    feeds: dict[str, np.ndarray] | None = None,
    tolerance: float = TOLERANCE,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """ORT outputs of ``after`` match ``before`` within ``tolerance`` (relative), same shapes."""
    feeds = feeds if feeds is not None else make_inputs(before, shapes or {}, seed=1)
    ref = run_model(before, feeds)
    got = run_model(after, feeds)
    assert len(ref) == len(got)
    for value, r, g in zip(before.graph.outputs, ref, got, strict=True):
        err = compare(value.name, r, g)
        assert err.shape_ok, f"{value.name}: {err.detail}"
        assert err.max_rel <= tolerance, f"{value.name}: rel error {err.max_rel}"


def random_calib(folder: Path, shape: Sequence[int], name: str = "x", seed: int = 1) -> str:
    """A calibration file of seeded standard-normal samples for input ``name``."""
    path = folder / "calib.npz"
    np.savez(path, **{name: np.random.default_rng(seed).standard_normal(shape, np.float32)})
    return str(path)


def op_types(model: ir.Model) -> list[str]:
    """Op types of all nodes (subgraphs included), Constant nodes included."""
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


def roundtrip(model: ir.Model) -> ir.Model:
    """Serialize and re-load (checks the rewritten model is a valid protobuf)."""
    proto = io.to_proto(model)
    onnx.checker.check_model(proto, full_check=False)
    return io.load(proto).model


__all__ = [
    "TOLERANCE",
    "assert_same_outputs",
    "count_nodes",
    "make_model",
    "op_types",
    "roundtrip",
    "run_pass",
    "tensor_info",
]


# --- test-only passes for the pass manager, CLI and API tests (never registered globally) ---


class AddToSubPass(GraphPass):
    """Test only: rewrite every Add into a Sub, claiming to be exact (breaks outputs)."""

    name = "test-add-to-sub"
    exact = True

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "Add" and node.domain == "":
                node.op_type = "Sub"
                hits += 1
        return hits


class SilentAddToSubPass(AddToSubPass):
    """Test only: like test-add-to-sub, but reports no hits (a pass that lies)."""

    name = "test-silent-add-to-sub"

    def rewrite(self, model: ir.Model) -> int:
        super().rewrite(model)
        return 0


class CrashingPass(GraphPass):
    """Test only: edits the model half-way, then raises."""

    name = "test-crash"

    def rewrite(self, model: ir.Model) -> int:
        for node in model.graph:
            node.op_type = "Sub" if node.op_type == "Add" else node.op_type
        raise RuntimeError("simulated bug in a pass")


def register_for_test(monkeypatch, *classes: type[GraphPass]) -> None:
    """Register test-only passes for one test (undone by ``monkeypatch``)."""
    from graphopt import registry

    registry.all_passes()  # load the built-in passes first
    for cls in classes:
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)


def function_constant_file(path: Path, location: str) -> Path:
    """``path``: y = x + F(), x [4], the local function F returning a Constant of 4 floats
    stored as external data at ``location`` (offset 0, length 16)."""
    tensor = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    function = helper.make_function(
        "local",
        "F",
        [],
        ["c"],
        [helper.make_node("Constant", [], ["c"], value=tensor)],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("F", [], ["c"], domain="local"),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
    )
    proto = helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    path.write_bytes(proto.SerializeToString())
    return path
