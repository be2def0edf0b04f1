"""``graphopt inspect`` / ``analyze`` on inputs that are not tensors, and the MACs line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from graphopt.cli import main
from graphopt_tests.helpers import tensor_info

F = TensorProto.FLOAT


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _save(folder: Path, name: str, nodes, inputs, outputs, opset: int = 18) -> str:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return str(path)


def _optional_model(folder: Path) -> str:
    """OptionalHasElement on an optional(tensor float [2, 3]) input, and Relu on x."""
    element = helper.make_tensor_type_proto(F, [2, 3])
    return _save(
        folder,
        "optional.onnx",
        [
            helper.make_node("OptionalHasElement", ["o"], ["has"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [
            helper.make_value_info("o", helper.make_optional_type_proto(element)),
            tensor_info("x", F, [2, 3]),
        ],
        [tensor_info("has", TensorProto.BOOL, []), tensor_info("y", F, [2, 3])],
    )


def _sequence_model(folder: Path) -> str:
    """SequenceLength of a sequence input, and ConcatFromSequence + Relu on it."""
    element = helper.make_tensor_type_proto(F, ["n", 3])
    return _save(
        folder,
        "sequence.onnx",
        [
            helper.make_node("SequenceLength", ["s"], ["length"]),
            helper.make_node("ConcatFromSequence", ["s"], ["c"], axis=0),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [helper.make_value_info("s", helper.make_sequence_type_proto(element))],
        [tensor_info("length", TensorProto.INT64, []), tensor_info("y", F, [None, 3])],
    )


@pytest.mark.parametrize("build", [_optional_model, _sequence_model])
def test_inspect_and_analyze_take_sequence_and_optional_inputs(
    build, tmp_path: Path, capsys
) -> None:
    """Both exited 2 with "cannot generate data for it ...; run with --no-verify", a flag
    they do not have: they need no data, such an input is one of unknown shape."""
    path = build(tmp_path)
    code, out, err = _run(["inspect", path, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary["flops_shapes"]) <= {"x"}  # no shape bound for o or s
    assert not summary["flops_not_counted"]  # sequence/optional ops move data: 0 FLOPs
    code, _, err = _run(["inspect", path], capsys)
    assert code == 0, err
    for extra in ([], ["--raw"]):
        code, _, err = _run(["analyze", path, *extra], capsys)
        assert code == 0, err


def test_what_depends_on_a_sequence_input_has_unknown_shape(tmp_path: Path, capsys) -> None:
    code, out, err = _run(["inspect", _sequence_model(tmp_path), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["flops_unknown_shape"] == {"Relu": 1}


def test_input_shape_of_a_sequence_input_is_bad_input(tmp_path: Path, capsys) -> None:
    path = _sequence_model(tmp_path)
    code, _, err = _run(["inspect", path, "--input-shape", "s:2x3"], capsys)
    assert code == 2 and "input 's' is a sequence, not a tensor" in err
    assert len(err.strip().splitlines()) == 1


def test_macs_count_multiply_adds_only(tmp_path: Path, capsys) -> None:
    """A Relu on 1x3 showed "3 FLOPs (1.5 MACs)": MACs were FLOPs / 2 whatever the ops."""
    path = _save(
        tmp_path,
        "relu.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", F, [1, 3])],
        [tensor_info("y", F, [1, 3])],
    )
    code, out, err = _run(["inspect", path], capsys)
    assert code == 0, err
    assert "1.5 MACs" not in out and "0 MACs of matrix products" in out
    code, out, _ = _run(["inspect", path, "--json"], capsys)
    data = json.loads(out)
    assert data["flops"] == 3 and data["macs"] == 0
