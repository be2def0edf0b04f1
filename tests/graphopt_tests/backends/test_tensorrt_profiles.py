"""``--shapes``: dims TensorRT cannot take and names the model has no input for are one-line
errors (exit 2) before the pipeline writes anything; what TensorRT's set_shape refuses anyway
is one line too."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto, helper

from graphopt.backends.tensorrt.build import _set_shape
from graphopt.backends.tensorrt.module import find_tensorrt
from graphopt.backends.tensorrt.profiles import MAX_DIM, InputProfile, parse_shapes
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt_tests.backends.trt_models import relu_file
from graphopt_tests.helpers import import_or_skip


@pytest.mark.parametrize(
    "spec",
    [
        "x:min=1x4,opt=2x4,max=99999999999999999999x4",  # past int64: TypeError in TensorRT
        f"x:min=1x4,opt=2x4,max={MAX_DIM + 1}x4",  # RuntimeError in TensorRT
        f"x:min={2**63}x4,opt={2**63}x4,max={2**63}x4",
    ],
)
def test_dims_past_what_tensorrt_takes_are_refused(spec: str) -> None:
    with pytest.raises(UserInputError, match=f"at most {MAX_DIM}"):
        parse_shapes([spec])


def test_the_largest_dim_is_taken() -> None:
    spec = f"x:min=1x4,opt=2x4,max={MAX_DIM}x4"
    assert parse_shapes([spec]) == {"x": ((1, 4), (2, 4), (MAX_DIM, 4))}


def test_huge_dims_and_unknown_names_fail_before_the_onnx_is_written(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    source = relu_file(tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    base = ["optimize", str(source), "-o", str(out), "--no-verify", "--engine"]
    base.append(str(tmp_path / "m.plan"))
    for spec, reason in [
        ("x:min=1x4,opt=2x4,max=99999999999999999999x4", "dims must be at most"),
        ("y:min=1x4,opt=2x4,max=3x4", "no input named 'y' in"),
    ]:
        assert main([*base, "--shapes", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert reason in err and "\n" not in err and "Traceback" not in err, err
        assert not out.exists() and not (tmp_path / "m.plan").exists()
    assert "(inputs: x)" in err


def test_what_set_shape_refuses_is_one_line() -> None:
    class Profile:
        def set_shape(self, *args):
            raise TypeError("set_shape(): incompatible function arguments.\n    1. (self, ...)")

    given = InputProfile("x", (1, 4), (2, 4), (3, 4), "--shapes")
    with pytest.raises(UserInputError) as caught:
        _set_shape(Profile(), given)
    message = str(caught.value)
    assert message == (
        "profile x: min=1x4, opt=2x4, max=3x4 (--shapes): TensorRT refuses it "
        "(set_shape(): incompatible function arguments.)"
    )


def test_a_profile_the_real_set_shape_refuses_is_a_user_error() -> None:
    import_or_skip("tensorrt_rtx", "pip install 'graphopt[tensorrt]' (TensorRT-RTX)")
    from graphopt.backends.tensorrt.module import parse

    find_tensorrt.cache_clear()
    trt = find_tensorrt().found
    assert trt is not None, find_tensorrt().why_not()
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    parsed = parse(trt, model.SerializeToString())
    assert parsed.ok
    profile = parsed.builder.create_optimization_profile()
    # Past what parse_shapes lets through; TensorRT says "inconsistent with other shapes".
    given = InputProfile("x", (1, 4), (2, 4), (MAX_DIM + 1, 4), "--shapes")
    with pytest.raises(UserInputError, match="TensorRT refuses it"):
        _set_shape(profile, given)
    _set_shape(profile, InputProfile("x", (1, 4), (2, 4), (MAX_DIM, 4), "--shapes"))
    assert profile.get_shape("x")[2] == (MAX_DIM, 4)
