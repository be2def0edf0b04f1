"""``--shapes``: dims TensorRT cannot take and names the model has no input for are one-line
errors (exit 2) before the pipeline writes anything; what TensorRT's set_shape refuses anyway
is one line too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.tensorrt.build import _set_shape
from graphopt.backends.tensorrt.module import find_tensorrt
from graphopt.backends.tensorrt.profiles import (
    MAX_DIM,
    InputProfile,
    ProfileInput,
    parse_shapes,
    plan,
    plan_profiles,
)
from graphopt.backends.tensorrt.size_bounds import SizeBounds
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


# One range per dim name across inputs; what the model bounds; shape tensors.


def _emb_file(path: Path) -> Path:
    """y = MatMul(emb * mask, W): emb [batch, seq, 16] float, mask [batch, seq] int64."""
    weight = numpy_helper.from_array(np.eye(16, dtype=np.float32), "W")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]),
            helper.make_node("Mul", ["emb", "mu"], ["e2"]),
            helper.make_node("MatMul", ["e2", "W"], ["y"]),
        ],
        "emb",
        [
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 16]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        [weight, axes],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _positions_model(rows: int, sliced: bool) -> onnx.ModelProto:
    """Token and position embeddings, GPT-2 style (positions = Range(0, seq), looked up in a
    table of ``rows``) or BERT style (a position_ids buffer of ``rows`` sliced to seq)."""
    rng = np.random.default_rng(0)
    tokens = numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "tok")
    table = numpy_helper.from_array(rng.standard_normal((rows, 8)).astype(np.float32), "pos")
    consts = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "zero1"),
        numpy_helper.from_array(np.array([1], np.int64), "one1"),
        numpy_helper.from_array(np.arange(rows, dtype=np.int64)[None], "position_ids"),
    ]
    nodes = [
        helper.make_node("Gather", ["tok", "input_ids"], ["t"]),
        helper.make_node("Shape", ["input_ids"], ["len1"], start=1, end=2),
    ]
    if sliced:
        nodes.append(helper.make_node("Slice", ["position_ids", "zero1", "len1", "one1"], ["ids"]))
    else:
        nodes += [
            helper.make_node("Squeeze", ["len1"], ["len"]),
            helper.make_node("Range", ["zero", "len", "one"], ["r"]),
            helper.make_node("Unsqueeze", ["r", "zero1"], ["ids"]),
        ]
    nodes += [
        helper.make_node("Gather", ["pos", "ids"], ["p"], name="position_lookup"),
        helper.make_node("Add", ["t", "p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "positions",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [tokens, table, *consts],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(*specs: tuple[str, tuple, bool, tuple]) -> list[ProfileInput]:
    return [ProfileInput(name, dims, is_float, keys) for name, dims, is_float, keys in specs]


EMB_INPUTS = _inputs(
    ("emb", (-1, -1, 16), True, ("batch", "seq", None)),
    ("mask", (-1, -1), False, ("batch", "seq")),
)


def test_a_dim_shared_by_name_takes_one_range_in_every_input() -> None:
    # Each input's profile was derived alone: emb's seq 1/16/64, mask's 1/128/512, which
    # TensorRT refused ("kOPT values are not self-consistent").
    planned = plan(EMB_INPUTS, {}, {})
    by_name = {p.name: p for p in planned.profiles}
    assert by_name["emb"].min == (1, 1, 16) and by_name["mask"].min == (1, 1)
    assert by_name["emb"].opt[:2] == by_name["mask"].opt == (1, 128)
    assert by_name["emb"].max[:2] == by_name["mask"].max == (8, 512)
    # --shapes for one input binds the shared dims in the other.
    given = plan(EMB_INPUTS, parse_shapes(["emb:min=1x1x16,opt=2x16x16,max=4x32x16"]), {})
    mask = next(p for p in given.profiles if p.name == "mask")
    assert (mask.min, mask.opt, mask.max) == ((1, 1), (2, 16), (4, 32))
    assert mask.source == "--shapes emb"


def test_input_shape_binds_its_dims_in_every_input_that_uses_them() -> None:
    # bert's --input-shape input_ids:1x16 left attention_mask at 1x1..8x512.
    inputs = _inputs(
        ("input_ids", (-1, -1), False, ("batch", "sequence")),
        ("attention_mask", (-1, -1), False, ("batch", "sequence")),
    )
    profiles = plan_profiles(inputs, {}, {"input_ids": (1, 16)})
    mask = next(p for p in profiles if p.name == "attention_mask")
    assert mask.min == mask.opt == mask.max == (1, 16)
    assert mask.source == "--input-shape input_ids"


def test_shapes_contradicting_on_a_shared_dim_are_one_line_before_any_work(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    source = _emb_file(tmp_path / "emb.onnx")
    out = tmp_path / "o.onnx"
    args = ["optimize", str(source), "-o", str(out), "--target", "tensorrt"]
    args += ["--engine", str(tmp_path / "e.plan")]
    emb, mask = "emb:min=1x1x16,opt=1x16x16,max=2x32x16", "mask:min=1x1,opt=1x8,max=2x32"
    assert main([*args, "--shapes", emb, "--shapes", mask]) == 2
    err = capsys.readouterr().err.strip()
    assert "dim 'seq' is 1/8/32 here but 1/16/32 there" in err and "\n" not in err, err
    assert not out.exists()


def test_shapes_given_twice_for_one_input_are_refused() -> None:
    # The last one won silently; --input-shape refuses the same.
    spec = "x:min=1x4,opt=2x4,max=8x4"
    with pytest.raises(UserInputError, match="--shapes x: given twice, with different ranges"):
        parse_shapes([spec, "x:min=1x4,opt=2x4,max=9x4"])
    assert parse_shapes([spec, spec]) == {"x": ((1, 4), (2, 4), (8, 4))}  # the same: harmless


def test_an_engine_builds_with_dims_shared_across_inputs(trt, tmp_path: Path, capsys) -> None:
    source = _emb_file(tmp_path / "emb.onnx")
    args = ["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--target", "tensorrt"]
    assert main([*args, "--engine", str(tmp_path / "e.plan")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "profile emb: min=1x1x16, opt=1x128x16, max=8x512x16 (derived)" in out
    assert "profile mask: min=1x1, opt=1x128, max=8x512 (derived)" in out


@pytest.mark.parametrize("sliced", [False, True])
def test_the_sequence_max_is_read_from_the_position_table(sliced: bool) -> None:
    bounds = SizeBounds(_positions_model(96, sliced), {"input_ids": ("batch", "sequence")})
    assert bounds.read_keys() == {"batch", "sequence"}
    limit = bounds.largest("sequence", {"batch": 1})
    assert limit is not None and limit.size == 96
    assert ("Slice" if sliced else "Gather 'position_lookup'") in limit.why
    assert bounds.largest("batch", {"sequence": 16}) is None  # no table bounds the batch

    def largest(key, sizes):
        found = bounds.largest(key, sizes)
        return (found.size, found.why) if found else None

    inputs = _inputs(("input_ids", (-1, -1), False, ("batch", "sequence")))
    planned = plan(inputs, {}, {}, largest=largest)
    assert planned.profiles[0].max == (8, 96) and planned.profiles[0].opt == (1, 96)
    assert any("'sequence'" in n and "max from the model" in n for n in planned.notes)
    # A --shapes max past the table stands, with a warning.
    shapes = parse_shapes(["input_ids:min=1x1,opt=1x64,max=1x512"])
    warned = plan(inputs, shapes, {}, None, largest).notes
    assert any(n.startswith("warning: --shapes input_ids") and "at most 96" in n for n in warned)


def test_token_ids_are_no_positions() -> None:
    # The vocabulary Gather (50 rows) reads the input's values, not its shape: it bounds no
    # dim, or every sequence would stop at 50.
    bounds = SizeBounds(_positions_model(1000, sliced=False), {"input_ids": ("b", "s")})
    assert [lookup.node for lookup in bounds.lookups] == ["position_lookup"]
    limit = bounds.largest("s", {"b": 1})
    assert limit is not None and limit.size == 1000


def test_a_guessed_max_is_said_with_the_flag_that_sets_it() -> None:
    planned = plan(EMB_INPUTS, {}, {}, largest=lambda key, sizes: None)
    guess = [n for n in planned.notes if "a guess" in n]
    assert len(guess) == 1 and "dim 'seq' (emb, mask) 1/128/512" in guess[0]
    assert "--shapes emb:min=1x1x16,opt=1x128x16,max=8x512x16" in guess[0]


def _shape_input_file(path: Path) -> Path:
    """y = Reshape(x [2, 6], shape): ``shape`` (int64 [2]) is a shape tensor."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_shape_tensor_input_needs_its_values_before_any_work(
    no_tensorrt, tmp_path: Path, capsys
) -> None:
    # "no optimization profile has been defined" after the write, or "missing values for
    # shape input" with --shapes of its dims.
    source = _shape_input_file(tmp_path / "s.onnx")
    out = tmp_path / "o.onnx"
    args = ["optimize", str(source), "-o", str(out), "--no-verify", "--target", "tensorrt"]
    args += ["--engine", str(tmp_path / "s.plan")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "input 'shape' is a shape tensor" in err and "--shapes shape:min=VxV" in err
    assert main([*args, "--shapes", "shape:min=1,opt=2,max=3"]) == 2
    assert "holding 2 value(s): give 2 values" in capsys.readouterr().err
    assert not out.exists()


def test_a_shape_tensor_input_takes_its_values_range(trt, tmp_path: Path, capsys) -> None:
    source = _shape_input_file(tmp_path / "s.onnx")
    args = ["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--no-verify"]
    args += ["--target", "tensorrt", "--engine", str(tmp_path / "s.plan")]
    assert main([*args, "--shapes", "shape:min=1x1,opt=3x4,max=12x12"]) == 0
    assert "profile shape: values min=1x1, opt=3x4, max=12x12 (--shapes)" in capsys.readouterr().out
    assert (tmp_path / "s.plan").stat().st_size > 1000


def test_input_shape_contradicting_shapes_on_a_shared_dim_is_refused() -> None:
    """--input-shape input_ids:1x16 with --shapes attention_mask:...opt=1x32... gave
    input_ids the profile 1/32/64 silently; two --shapes that disagree were refused."""
    inputs = _inputs(
        ("input_ids", (-1, -1), False, ("batch", "sequence")),
        ("attention_mask", (-1, -1), False, ("batch", "sequence")),
    )
    shapes = parse_shapes(["attention_mask:min=1x1,opt=1x32,max=1x64"])
    with pytest.raises(UserInputError) as refused:
        plan(inputs, shapes, {"input_ids": (1, 16)})
    message = str(refused.value)
    assert message == (
        "--input-shape input_ids and --shapes attention_mask: dim 'sequence' is 16 here but "
        "1/32/64 there; inputs that share a named dim take one range: give input_ids the "
        "same --shapes range, or make them agree"
    )
    # Agreeing (a fixed --shapes of the same size), or the input's own --shapes: as before.
    same = parse_shapes(["attention_mask:min=1x16,opt=1x16,max=1x16"])
    assert plan(inputs, same, {"input_ids": (1, 16)}).profiles
    own = parse_shapes(["input_ids:min=1x1,opt=1x32,max=1x64"])
    assert plan(inputs, own, {"input_ids": (1, 16)}).profiles


def test_input_shape_conflict_is_refused_before_the_passes(tmp_path: Path) -> None:
    """check_model (run on the input model before any pass) refuses it too, given the
    --input-shape bindings."""
    import onnx_ir as ir

    from graphopt.backends.tensorrt.build import check_model
    from graphopt.backends.tensorrt.cli_options import EngineOptions

    source = _emb_file(tmp_path / "emb.onnx")
    model = ir.load(str(source))
    options = EngineOptions(tmp_path / "e.plan", shapes=["mask:min=1x1,opt=1x8,max=1x32"])
    check_model(model, options, fp8=False)  # no --input-shape: fine
    with pytest.raises(UserInputError, match="--input-shape emb and --shapes mask: dim 'seq'"):
        check_model(model, options, fp8=False, input_shapes={"emb": (1, 16, 16)})


def test_optimize_refuses_the_input_shape_conflict_before_writing(tmp_path: Path, capsys) -> None:
    """The same refusal from the command line, before any pass and before the ONNX is
    written (it came after the write, at the build)."""
    source = _emb_file(tmp_path / "emb.onnx")
    out = tmp_path / "o.onnx"
    args = ["optimize", str(source), "-o", str(out), "--target", "tensorrt"]
    args += ["--engine", str(tmp_path / "e.plan"), "--input-shape", "emb:1x16x16"]
    args += ["--shapes", "mask:min=1x1,opt=1x8,max=1x32"]
    assert main(args) == 2
    assert "--input-shape emb and --shapes mask: dim 'seq'" in capsys.readouterr().err
    assert not out.exists()
