"""``--exclude`` names the user's model: op types and node names as the input has them, though
the exact passes before quantization fuse (``fc1`` MatMul + ``fc1_bias`` Add -> a Gemm named
``fc1_bias``) and unnamed nodes are listed as ``OpType_index`` of the input model; the report
prints the names it takes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.analysis.origins import snapshot
from graphopt.api import OptimizeOptions
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.passes.fusion.matmul_add import FuseMatMulAddPass
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.passes.quantization.record import QuantRecord
from graphopt.registry import PassContext
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _model(named: bool = True) -> ir.Model:
    rng = np.random.default_rng(0)

    def name(text: str) -> str:
        return text if named else ""

    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name=name("fc1")),
            helper.make_node("Add", ["a", "b"], ["ab"], name=name("fc1_bias")),
            helper.make_node("Relu", ["ab"], ["r"], name=name("act")),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name=name("fc2")),
        ],
        [tensor_info("x", F, ["B", 32])],
        [tensor_info("y", F, ["B", 16])],
        {
            "w": rng.standard_normal((32, 64)).astype(np.float32),
            "b": rng.standard_normal(64).astype(np.float32),
            "w2": rng.standard_normal((64, 16)).astype(np.float32),
        },
    )


def _fused_then_quantized(model: ir.Model, **options) -> tuple[ir.Model, QuantRecord]:
    """As the pass manager runs it: the input recorded, the exact fusion, then quantize."""
    context = PassContext()
    context.original_nodes = snapshot(model)
    FuseMatMulAddPass(context)(model)
    assert [n.op_type for n in model.graph] == ["Gemm", "Relu", "MatMul"]
    QuantizePass(context, calib="random", **options)(model)
    return model, context.details["quantize"]


def _precisions(record: QuantRecord) -> dict[str, str]:
    return {x.node: x.precision for x in record.layers if x.op_type in ("Gemm", "MatMul")}


def test_an_op_type_excludes_the_layers_fused_from_it():
    """``--exclude MatMul``: both of the user's MatMuls stay float, the one fused into a Gemm
    too (it used to be quantized while the report said "kept in float: MatMul")."""
    with pytest.raises(UserInputError, match="every candidate stays float"):
        _fused_then_quantized(_model(), mode="int8", exclude="MatMul")
    _, record = _fused_then_quantized(_model(), mode="int8", exclude="Gemm")
    assert set(_precisions(record).values()) == {"int8"}  # the user's model has no Gemm
    assert "--exclude Gemm: the model has no Gemm node" in record.notes


@pytest.mark.parametrize("pattern", ["fc1", "fc1_bias", "fc1*"])
def test_a_name_of_the_users_model_excludes_the_layer_it_was_fused_into(pattern):
    _, record = _fused_then_quantized(_model(), mode="int8", exclude=pattern)
    assert _precisions(record) == {"fc1_bias": "float", "fc2": "int8"}


def test_unnamed_nodes_are_named_by_their_position_in_the_users_model():
    _, record = _fused_then_quantized(_model(named=False), mode="int8")
    # MatMul_0 + Add_1 -> the Gemm, MatMul_3: positions in the input, not in the fused graph.
    assert _precisions(record) == {"MatMul_0": "int8", "MatMul_3": "int8"}
    assert "layers (names as --exclude takes them): MatMul_0 (Gemm) int8, MatMul_3 (MatMul) " in (
        record.layers_line()
    )
    for pattern, kept in (
        ("MatMul_3", "MatMul_3"),
        ("Add_1", "MatMul_0"),
        ("MatMul_0", "MatMul_0"),
    ):
        _, record = _fused_then_quantized(_model(named=False), mode="int8", exclude=pattern)
        assert _precisions(record)[kept] == "float"
    with pytest.raises(UserInputError, match="layers \\(names as --exclude takes them\\)"):
        _fused_then_quantized(_model(named=False), mode="int8", exclude="MatMul_2")


def test_the_run_matches_the_users_model_with_the_input_recorded():
    """End to end: the pass manager records the input before the exact passes."""
    options = OptimizeOptions(quantize="int8", calib="random", exclude="fc1")
    result = graphopt.optimize(_model(), None, options)
    record = result.report.details["quantize"]
    assert _precisions(record) == {"fc1_bias": "float", "fc2": "int8"}


def test_without_a_recorded_input_the_listed_names_are_those_exclude_takes():
    """No record of the input (the pass run alone): names are positions in the graph given,
    and the report's layer line prints them, so what it lists is what --exclude takes."""
    context = PassContext()
    model = _model(named=False)
    FuseMatMulAddPass(context)(model)
    QuantizePass(context, mode="int8", calib="random")(model)
    line = context.details["quantize"].layers_line()
    assert "Gemm_0 (Gemm) int8, MatMul_2 (MatMul) int8" in line
    model = _model(named=False)
    FuseMatMulAddPass(context)(model)
    QuantizePass(context, mode="int8", calib="random", exclude="MatMul_2")(model)
    assert _precisions(context.details["quantize"])["MatMul_2"] == "float"


def test_an_empty_exclude_is_refused_in_one_line(tmp_path, capsys):
    from graphopt import io

    source = tmp_path / "m.onnx"
    io.save(_model(), source)
    out = str(tmp_path / "q.onnx")
    code = main(["optimize", str(source), "-o", out, "--quantize", "int8-dynamic", "--exclude", ""])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "q.onnx").exists()
    assert "--exclude '': no pattern given" in err and "\n" not in err
