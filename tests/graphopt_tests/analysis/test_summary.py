"""``graphopt inspect``: summary contents, JSON, tables; nothing is mutated or materialized."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from graphopt import io
from graphopt.analysis.summary import render_summary, summarize, summary_json
from graphopt.cli import main

F = TensorProto.FLOAT


def _rich_proto() -> onnx.ModelProto:
    """Conv + If subgraph + a local function + metadata, symbolic batch."""
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["y"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", F, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["y"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", F, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Double", ["z"], ["out"], domain="local"),
    ]
    double = helper.make_function(
        "local",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", F, ["batch", 3, 16, 16]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", F, ["batch", 4, 16, 16])],
        [onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[double],
        ir_version=8,
        producer_name="unit-test",
        producer_version="9.9",
    )
    helper.set_model_props(proto, {"author": "me"})
    return proto


def test_summary_fields() -> None:
    model = io.load(_rich_proto()).model
    s = summarize(model)
    assert s.ir_version == 8
    assert s.producer == "unit-test 9.9"
    assert s.opsets == {"ai.onnx": 17, "local": 1}
    assert [(i.name, i.dtype, i.shape) for i in s.inputs] == [
        ("x", "float", ["batch", 3, 16, 16]),
        ("cond", "bool", []),
    ]
    assert s.outputs[0].shape == ["batch", 4, 16, 16]
    assert s.ops == {"Conv": 1, "If": 1, "Neg": 1, "Relu": 1, "local.Double": 1}
    assert s.parameters == 4 * 3 * 3 * 3
    assert s.parameter_bytes == 4 * s.parameters
    assert s.has_subgraphs
    assert s.functions == ["local::Double"]
    assert not s.external_data
    assert s.metadata == {"author": "me"}
    assert s.flops_shapes == {"x": [1, 3, 16, 16], "cond": []}
    assert s.flops_by_op["Conv"] == 2 * 4 * 16 * 16 * 27
    # The function call has no formula: listed, not silently zero.
    assert s.flops_not_counted == {"local.Double": 1}


def test_summary_does_not_mutate_model() -> None:
    model = io.load(_rich_proto()).model
    before = io.to_proto(model).SerializeToString()
    summarize(model, {"x": (2, 3, 16, 16)})
    assert io.to_proto(model).SerializeToString() == before


def test_external_weights_are_never_read(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(
        _rich_proto(), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    model = io.load(path).model

    def boom(self, *args, **kwargs):
        raise AssertionError("external tensor materialized")

    monkeypatch.setattr(ir.ExternalTensor, "numpy", boom)
    monkeypatch.setattr(ir.ExternalTensor, "tobytes", boom)
    s = summarize(model)
    assert s.external_data and s.external_data_files == ["m.onnx.data"]
    assert s.parameter_bytes == 4 * 4 * 3 * 3 * 3
    assert s.flops_by_op["Conv"] == 2 * 4 * 16 * 16 * 27


def test_json_and_tables_render() -> None:
    s = summarize(io.load(_rich_proto()).model)
    data = json.loads(summary_json(s))
    assert data["flops"] == s.flops and data["ops"]["Conv"] == 1
    console = Console(record=True, width=120)
    render_summary(s, console)
    text = console.export_text()
    for needle in ("unit-test 9.9", "FLOPs", "Conv", "[batch, 3, 16, 16]", "local::Double"):
        assert needle in text


def test_cli_inspect_json(tmp_path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(_rich_proto(), path)
    assert main(["inspect", str(path), "--json", "--input-shape", "x:2x3x16x16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flops_shapes"]["x"] == [2, 3, 16, 16]
    assert data["flops_by_op"]["Conv"] == 2 * 2 * 4 * 16 * 16 * 27


def test_cli_inspect_table_and_bad_shape(tmp_path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(_rich_proto(), path)
    assert main(["inspect", str(path)]) == 0
    assert "ops" in capsys.readouterr().out
    assert main(["inspect", str(path), "--input-shape", "nope:1x2"]) == 2
    err = capsys.readouterr().err
    assert "unknown input" in err and "Traceback" not in err


@pytest.mark.parametrize("dims", ["1x3x16", ""])
def test_bad_rank_binding_is_not_a_crash(tmp_path, capsys, dims) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(_rich_proto(), path)
    code = main(["inspect", str(path), "--input-shape", f"x:{dims}"])
    assert code == 2
    err = capsys.readouterr().err
    # Refused before the summary by optimize's own check (graphopt.input_dims.check_input_shapes).
    assert "input 'x' has rank 4 ([batch, 3, 16, 16])" in err and "Traceback" not in err


def _symbolic_proto() -> onnx.ModelProto:
    """Dims named as exporters name them, and as expressions (one spans lines, as a sympy
    printout does); the model already uses the name ``expr0``."""
    multi_line = "floor((s0 - 1)/2)\n    + 1"
    x = helper.make_tensor_value_info("x", F, ["batch", "N", "unk__12", "s0"])
    z = helper.make_tensor_value_info("z", F, ["expr0", "2*s0 + 1", multi_line])
    y = helper.make_tensor_value_info("y", F, ["batch", "N", "unk__12", "2*s0 + 1"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x, z], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_symbolic_dims_print_as_short_names() -> None:
    s = summarize(io.load(_symbolic_proto()).model)
    assert [i.shape for i in s.inputs] == [
        ["batch", "N", "unk__12", "s0"],
        ["expr0", "expr1", "expr2"],  # expr0 is the model's own name: the next is taken
    ]
    assert s.outputs[0].shape == ["batch", "N", "unk__12", "expr1"]  # same text, same name
    assert s.symbols == {"expr1": "2*s0 + 1", "expr2": "floor((s0 - 1)/2) + 1"}
    console = Console(record=True, width=120)
    render_summary(s, console)
    text = console.export_text()
    assert "[expr0, expr1, expr2]" in text and "[batch, N, unk__12, s0]" in text
    assert "expr2 = floor((s0 - 1)/2) + 1" in text
    assert "2*s0 + 1]" not in text and "\n    + 1" not in text


def test_cli_inspect_json_uses_short_names(tmp_path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(_symbolic_proto(), path)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"][1]["shape"] == ["expr0", "expr1", "expr2"]
    assert data["symbols"]["expr2"] == "floor((s0 - 1)/2) + 1"
    assert all("\n" not in str(d) for t in data["inputs"] + data["outputs"] for d in t["shape"])


def _branching_proto() -> onnx.ModelProto:
    """If with a MatMul branch (2·4·8·8 FLOPs) and a Relu branch (32), then a Loop × 3."""
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t")]
    )
    else_graph = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [_vi("e")])
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Neg", ["v"], ["v2"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            _vi("v"),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _vi("v2")],
    )
    nodes = [
        helper.make_node(
            "If", ["c"], ["z"], name="pick", then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("Loop", ["trips", "", "z"], ["y"], name="repeat", body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [_vi("x"), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [_vi("y")],
        [
            onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), "w"),
            onnx.numpy_helper.from_array(np.array(3, np.int64), "trips"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, [4, 8])


def test_inspect_counts_the_larger_branch_and_loop_iterations(tmp_path, capsys) -> None:
    s = summarize(io.load(_branching_proto()).model)
    assert s.flops == 512 + 3 * 32
    assert s.flops_by_op == {"MatMul": 512, "Neg": 96}
    pick, repeat = s.flops_control_flow
    assert pick.bodies == {"then_branch": 512, "else_branch": 32} and pick.counted == 512
    assert (repeat.iterations, repeat.counted) == (3, 96)
    console = Console(record=True, width=140)
    render_summary(s, console)
    text = console.export_text()
    assert "If pick: then 512, else 32 FLOPs; the larger (then) is counted" in text
    assert "Loop repeat: body 32 FLOPs × 3 iterations" in text
    capsys.readouterr()  # the console above printed too
    path = tmp_path / "m.onnx"
    onnx.save_model(_branching_proto(), path)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flops"] == 608
    assert [c["node"] for c in data["flops_control_flow"]] == ["pick", "repeat"]
    assert data["flops_control_flow"][1]["iterations"] == 3
