"""Private modules of onnxscript/onnx-ir are imported in one place, under bounded versions."""

from __future__ import annotations

import ast
import re
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import private_apis

ROOT = Path(__file__).resolve().parents[2]
BOUNDED = ("onnxscript", "onnx-ir")
ALLOWED = Path("graphopt/private_apis.py")


def _private_imports(source: str) -> list[str]:
    """Dotted module names with a ``_private`` part that ``source`` imports from our deps."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in ("onnxscript", "onnx_ir") and any(
                p.startswith("_") and not p.startswith("__") for p in parts[1:]
            ):
                found.append(name)
    return found


def test_private_modules_are_imported_only_in_private_apis() -> None:
    offenders = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "graphopt").rglob("*.py"))
        if path.relative_to(ROOT) != ALLOWED
        and (names := _private_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_the_scan_sees_a_private_import() -> None:
    assert _private_imports("from onnxscript.rewriter import _ir_utils, pattern\n")
    assert _private_imports("import onnx_ir._core\n")
    assert not _private_imports("from onnxscript.rewriter import pattern\n")


def test_packages_with_private_use_are_bounded_above() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in BOUNDED:
        (spec,) = [d for d in deps if re.match(rf"{re.escape(package)}\b[<>=!~ ]", d)]
        assert "<" in spec, f"{package} has no upper bound: {spec}"


# --- ORT's symbolic shape inference: a time limit ---------------------------------------------


def _tiny_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tick() -> None:
    """A Python call for the deadline hook to see."""


@pytest.fixture
def endless(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ORT's tool loop in Python (as sympy does on a hard expression) for up to 10 s;
    yields how many times its inference step was entered."""
    entered: list[int] = []

    def looping(self: Any) -> bool:
        entered.append(1)
        stop = time.monotonic() + 10  # bounded: a broken limit fails the test, not hangs it
        while time.monotonic() < stop:
            _tick()
        self.run_ = False
        return True

    tool = private_apis._symbolic_shape_tool()
    monkeypatch.setattr(tool.SymbolicShapeInference, "_infer_impl", looping)
    monkeypatch.setattr(private_apis, "_timed_out", {})
    return entered


def test_symbolic_shapes_of_a_small_model() -> None:
    out = private_apis.symbolic_shape_inference(_tiny_model())
    assert out is not None
    (y,) = out.graph.output
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["N", 4]
    assert sys.getprofile() is None


def test_symbolic_shapes_stop_at_the_time_limit(endless: list[int]) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="ran out of time"):
        private_apis.symbolic_shape_inference(_tiny_model(), time_limit=0.2)
    assert time.monotonic() - start < 5
    assert sys.getprofile() is None


def test_a_model_that_ran_out_of_time_is_not_tried_again(
    endless: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(private_apis, "SYMBOLIC_SHAPES_TIME_LIMIT_S", 0.2)
    for _ in range(3):  # as each --target ort fusion pass would ask
        with pytest.raises(TimeoutError):
            private_apis.symbolic_shape_inference(_tiny_model())
    assert len(endless) == 1
    # A longer limit than the one it ran out of is a new try.
    with pytest.raises(TimeoutError):
        private_apis.symbolic_shape_inference(_tiny_model(), time_limit=0.3)
    assert len(endless) == 2


def test_symbolic_shapes_time_limit_in_another_thread(endless: list[int]) -> None:
    seen: dict[str, object] = {}

    def work() -> None:
        start = time.monotonic()
        try:
            private_apis.symbolic_shape_inference(_tiny_model(), time_limit=0.2)
        except TimeoutError as error:
            seen["error"] = error
        seen["seconds"] = time.monotonic() - start
        seen["profile"] = sys.getprofile()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(seen["error"], TimeoutError)
    assert seen["seconds"] < 5
    assert seen["profile"] is None
    assert sys.getprofile() is None


def test_a_profiler_keeps_its_hook() -> None:
    calls: list[str] = []

    def profiler(frame: object, event: str, arg: object) -> None:
        calls.append(event)

    sys.setprofile(profiler)
    try:
        out = private_apis.symbolic_shape_inference(_tiny_model())
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert out is not None
    assert calls  # it saw the tool run


def test_the_ort_fusions_keep_onnx_shapes_when_time_runs_out(
    endless: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphopt import io
    from graphopt.passes.fusion.ort import _base

    monkeypatch.setattr(private_apis, "SYMBOLIC_SHAPES_TIME_LIMIT_S", 0.2)
    model = io.load(_tiny_model()).model
    assert _base._symbolic_shapes(model) is None
    assert endless == [1]
    # With a run's context the user reads why the fusions had ONNX's shapes only, once.
    from graphopt.registry import PassContext

    context = PassContext()
    for _ in range(2):
        assert _base._symbolic_shapes(model, context) is None
    assert context.notes == [
        "ORT's symbolic shape inference ran out of time (0.2 s); the --target ort fusions "
        "used ONNX's shapes"
    ]


@pytest.mark.parametrize(
    ("op", "inputs"),
    [
        ("MatMulIntegerToFloat", ["a", "b", "a_scale", "b_scale"]),
        ("DynamicQuantizeMatMul", ["x", "b", "b_scale"]),
    ],
)
def test_quantized_matmuls_get_their_shapes(op: str, inputs: list[str]) -> None:
    """ORT's tool has no rule for the contrib MatMuls int8-dynamic writes: every shape after
    them was unknown, and --target ort's attention fusions found no heads in a quantized
    RoBERTa or GPT-2."""
    a_type = TensorProto.UINT8 if op == "MatMulIntegerToFloat" else TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node(op, inputs, ["y"], domain="com.microsoft"),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info(inputs[0], a_type, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("b", TensorProto.INT8, [8, 4], [1] * 32),
            helper.make_tensor("a_scale", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("b_scale", TensorProto.FLOAT, [], [0.1]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    inferred = private_apis.symbolic_shape_inference(model)
    assert inferred is not None
    (z,) = inferred.graph.output
    dims = [d.dim_param or d.dim_value for d in z.type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 4] and z.type.tensor_type.elem_type == TensorProto.FLOAT
