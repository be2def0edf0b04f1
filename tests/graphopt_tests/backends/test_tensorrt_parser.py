"""The TensorRT backend against TensorRT's real parser and builder (tensorrt_rtx builds
ahead of time without a GPU): static-table agreement, every rejected node, engine builds,
--requantize symmetric. Skipped, saying why, when no TensorRT module is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.api import OptimizeOptions, optimize
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.errors import CheckFailedError
from graphopt_tests.backends.trt_models import line_file

# Every 10th ONNX node test (sorted by name): 189 cases, ~90 of them rejected by the parser.
SAMPLE_EVERY = 10


def test_static_table_agrees_with_the_parser_on_node_tests(trt) -> None:
    from graphopt.backends.tensorrt.agreement import node_tests, verdict

    cases = [c for i, c in enumerate(node_tests()) if i % SAMPLE_EVERY == 0]
    verdicts = [verdict(trt, name, model) for name, model in cases]
    disagree = {v.name for v in verdicts if not v.agrees}
    rejected = sum(not v.parser_ok for v in verdicts)
    print(f"agreement {len(verdicts) - len(disagree)}/{len(verdicts)}, parser rejected {rejected}")
    assert len(verdicts) > 150 and rejected > 50  # both verdicts well represented
    assert disagree == set()


def _mlp(path: Path) -> Path:
    """x[batch, 64] -> MatMul -> Relu -> MatMul -> y[batch, 16]."""
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _ort_dynamic(source: Path, target: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
    return target


def test_lint_lists_every_rejected_node(trt, tmp_path: Path) -> None:
    from graphopt.backends.tensorrt.lint import lint_tensorrt

    model = onnx.load(_ort_dynamic(_mlp(tmp_path / "mlp.onnx"), tmp_path / "dyn.onnx"))
    real = lint_tensorrt(model)
    table = lint_tensorrt(model, static=True)
    # The parser stops at the first rejection; lint cuts it out and parses on.
    assert len(real.errors) == len(table.errors) >= 4
    assert {f.op_type for f in real.errors} == {"DynamicQuantizeLinear", "MatMulInteger"}
    assert real.checker.endswith("parser") and table.checker == "static rule table"


def test_requantize_symmetric_makes_an_ort_dynamic_model_build(trt, tmp_path: Path) -> None:
    dynamic = _ort_dynamic(_mlp(tmp_path / "mlp.onnx"), tmp_path / "dyn.onnx")
    plan = tmp_path / "dyn.plan"
    with pytest.raises(CheckFailedError, match=r"node '.*' \(DynamicQuantizeLinear\).*fix:"):
        optimize(dynamic, tmp_path / "plain.onnx", OptimizeOptions(engine=EngineOptions(plan)))
    result = optimize(
        dynamic,
        tmp_path / "sym.onnx",
        OptimizeOptions(target="tensorrt", requantize="symmetric", engine=EngineOptions(plan)),
    )
    record = result.report.details["requantize"]
    assert len(record.layers) == 2  # the two MatMulIntegers
    worst = max(f.max_rel for f in next(iter(record.fidelity.values())))
    assert 0 < worst < 0.05  # re-rounded (lossy), and measured
    assert result.engine is not None and result.engine.built
    assert "int8" in result.engine.precision_counts()


@pytest.mark.parametrize("name", ["demo", "digits", "light_squeezenet"])
def test_engine_builds_for_catalog_models(trt, tmp_path: Path, name: str) -> None:
    from graphopt.models import catalog

    missing = catalog.missing_requirements(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")
    plan = tmp_path / f"{name}.plan"
    result = optimize(
        catalog.get(name),
        tmp_path / f"{name}.onnx",
        OptimizeOptions(target="tensorrt", engine=EngineOptions(plan, builder_level=1)),
    )
    engine = result.engine
    assert engine is not None and engine.built, engine and engine.skipped
    assert plan.stat().st_size == engine.engine_bytes > 0
    assert engine.layers and set(engine.precision_counts()) >= {"float32"}
    assert "builder optimization level 1" in engine.settings
    print(f"{name}: {engine.engine_bytes / 1e6:.1f} MB in {engine.seconds:.2f} s")


def test_int8_engine_holds_int8_layers(trt, tmp_path: Path) -> None:
    from graphopt.models import catalog

    result = optimize(
        catalog.get("demo"),
        tmp_path / "demo8.onnx",
        OptimizeOptions(
            target="tensorrt",
            quantize="int8",
            calib="random",
            engine=EngineOptions(tmp_path / "d.plan"),
        ),
    )
    assert result.engine is not None and result.engine.built
    assert result.engine.precision_counts()["int8"] > 0


def test_fp8_engine_needs_compute_capability_89(trt, tmp_path: Path) -> None:
    from graphopt.errors import UserInputError
    from graphopt.models import catalog

    def run(capability: str):
        engine = EngineOptions(tmp_path / "f.plan", compute_capabilities=[capability])
        options = OptimizeOptions(
            target="tensorrt", opset=19, quantize="fp8", calib="random", engine=engine
        )
        return optimize(catalog.get("demo"), tmp_path / "f.onnx", options)

    with pytest.raises(UserInputError, match="FP8 tensors, which need compute capability"):
        run("8.6")
    result = run("8.9")
    assert result.engine is not None and result.engine.precision_counts()["fp8"] > 0


def test_a_build_failing_on_a_derived_profile_says_so_and_given_shapes_build(
    trt, tmp_path: Path
) -> None:
    # A text-line model: any width, but the height is 48 in practice. The derived 224x224
    # profile cannot be reshaped; the error must say the profile was guessed and how to give it.
    src = line_file(tmp_path / "line.onnx")
    plan = tmp_path / "line.plan"
    derived = OptimizeOptions(target="tensorrt", verify=False)
    derived.engine = EngineOptions(plan)
    with pytest.raises(CheckFailedError) as caught:
        optimize(src, tmp_path / "a.onnx", derived)
    message = str(caught.value)
    assert "\n" not in message
    assert "profile was derived, not given: x: min=1x3x224x224" in message and "--shapes" in message
    given = OptimizeOptions(target="tensorrt", verify=False)
    given.engine = EngineOptions(plan, shapes=["x:min=1x3x48x160,opt=1x3x48x320,max=8x3x48x640"])
    assert optimize(src, tmp_path / "b.onnx", given).engine.built
