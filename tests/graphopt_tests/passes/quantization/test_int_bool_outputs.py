"""A quantized model with an integer or bool output (``pos = Greater(y, 0)``): that output is
right only where equal, so it neither sets the tolerance of the exact passes after the
quantization (it made it 1: any error accepted) nor reads as a cosine."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.api import OptimizeOptions
from graphopt.output_errors import compare


def _bool_output_model() -> ir.Model:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("Greater", ["y", "z"], ["pos"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 64]),
            helper.make_tensor_value_info("pos", TensorProto.BOOL, ["B", 64]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(0, np.float32), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.serde.deserialize_model(model)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8"])
def test_the_tolerance_after_quantize_comes_from_float_outputs(mode):
    flags = {"quantize": mode}
    if mode == "int8":
        flags["calib"] = "random"
    result = graphopt.optimize(_bool_output_model(), None, OptimizeOptions(**flags))
    record = result.report.details["quantize"]
    first = next(iter(record.fidelity.values()))
    pos = next(f for f in first if f.output == "pos")
    y = next(f for f in first if f.output == "y")
    assert pos.equal_share is not None and pos.equal_share < 1.0  # some flipped
    assert 0 < record.exact_tolerance_after == pytest.approx(y.max_rel)
    assert record.exact_tolerance_after < 0.1


def test_integer_and_bool_outputs_carry_their_share_of_equal_elements():
    ref = np.array([[True, False, True, True]])
    got = np.array([[True, True, True, True]])
    error = compare("pos", ref, got)
    assert error.equal_share == 0.75
    assert compare("ids", np.arange(4), np.arange(4)).equal_share == 1.0
    assert compare("y", np.ones(4, np.float32), np.ones(4, np.float32)).equal_share is None


def _compare_model(offset: float, threshold: float) -> ir.Model:
    """y = x + offset, pos = y > threshold."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "d"], ["y"]),
            helper.make_node("Greater", ["y", "t"], ["pos"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("pos", TensorProto.BOOL, [4]),
        ],
        [
            numpy_helper.from_array(np.array(offset, np.float32), "d"),
            numpy_helper.from_array(np.array(threshold, np.float32), "t"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.serde.deserialize_model(model)


def test_a_comparison_may_flip_where_its_float_inputs_are_within_the_tolerance():
    """Exact verification compares a bool output as equal or not; a rewrite that moves y by
    less than the tolerance flips ``y > 0`` where y is that close to 0. Such flips are within
    the tolerance (max rel: the widest distance of a flipped element from the boundary);
    a flip where the compared values are far apart is not."""
    from graphopt.verify import Verifier

    feeds = {"x": np.array([-5e-5, 1.0, -2.0, 3.0], np.float32)}
    verifier = Verifier(_compare_model(0.0, 0.0), feeds=feeds, tolerance=1e-4)
    near = verifier.check(_compare_model(1e-4, 0.0))  # y moves 3e-5 rel; pos[0] flips
    assert near.ok, near.reason
    pos = near.outputs[1]
    assert pos.equal_share == 0.75 and pos.max_rel == pytest.approx(5e-5 / 3, rel=1e-3)
    far = verifier.check(_compare_model(0.0, 1.5))  # y unchanged; pos[1] flips, 1 from 0
    assert not far.ok and "'pos' off by 1" in far.reason


def test_the_lossy_change_table_shows_the_share_equal_of_a_bool_output(capsys):
    """It printed cosine 0.000000 and max rel 1 for a bool output 99% equal."""
    from rich.console import Console

    from graphopt.report import print_report

    options = OptimizeOptions(quantize="int8-dynamic")
    result = graphopt.optimize(_bool_output_model(), None, options)
    print_report(result.report, Console(width=200, force_terminal=False))
    text = capsys.readouterr().out
    table = text[text.index("lossy change vs the original") :]
    row = next(line for line in table.splitlines() if line.strip().startswith("pos "))
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[1:4] == ["-", "-", "-"] and cells[4].endswith("%"), row


def test_mixed_precision_targets_are_judged_on_float_outputs():
    """--min-cosine counted the bool output's cosine (0 once a flag flipped): a target the
    float output meets was unreachable. Only an all-integer model is judged on its own."""
    from graphopt.passes.calibration.fidelity import Fidelity
    from graphopt.passes.quantization.record import worst_cosine, worst_max_rel

    y = Fidelity("y", 0.01, 0.001, 0.9999)
    pos = Fidelity("pos", 1.0, 0.006, 0.0, equal_share=0.994)
    assert worst_cosine([y, pos]) == pytest.approx(0.9999)
    assert worst_max_rel([y, pos]) == pytest.approx(0.01)
    assert worst_cosine([pos]) == 0.0 and worst_max_rel([pos]) == 1.0
    options = OptimizeOptions(quantize="int8-dynamic", min_cosine=0.999)
    result = graphopt.optimize(_bool_output_model(), None, options)
    assert result.report.details["quantize"].layers_line()
