"""One check of option values (option_checks.validate_options) for the CLI, recipes and the API, and
the CLI's own argument mistakes: each a one-line UserInputError (exit 2), before any work."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt import io
from graphopt.api import OptimizeOptions
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.cli import build_parser
from graphopt.errors import UserInputError
from graphopt.option_checks import TARGETS, validate_options
from graphopt.pipeline import PassSpec
from graphopt.verify import Verifier
from graphopt_tests.helpers import AddToSubPass, register_for_test
from graphopt_tests.test_cli import model_file, run

F = TensorProto.FLOAT


def conv_bn_relu_file(folder: Path) -> Path:
    """Conv + BatchNormalization + Relu, x [N, 3, 16, 16]."""
    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(array.astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", F, ["N", 8, 16, 16])],
        [
            init("w", rng.standard_normal((8, 3, 3, 3))),
            init("s", rng.random(8) + 0.5),
            init("b", rng.standard_normal(8)),
            init("m", rng.standard_normal(8)),
            init("v", rng.random(8) + 0.5),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "conv.onnx"
    onnx.save_model(proto, path)
    return path


@pytest.mark.parametrize("tolerance", [math.nan, math.inf, -1.0, 0.0, True, "1e-3", 10**400])
def test_tolerance_must_be_a_finite_positive_number(tmp_path: Path, tolerance) -> None:
    # NaN compared false with every error: a corrupting exact pass was not rolled back.
    with pytest.raises(UserInputError, match=r"^tolerance \(--tolerance\): expected a finite"):
        graphopt.optimize(conv_bn_relu_file(tmp_path), None, OptimizeOptions(tolerance=tolerance))
    assert validate_options(OptimizeOptions(tolerance=np.float32(1e-3))).tolerance == (
        pytest.approx(1e-3)
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_cli_tolerance_must_be_a_finite_positive_number(tmp_path: Path, capsys, value) -> None:
    path = conv_bn_relu_file(tmp_path)
    code, _, err = run(["optimize", str(path), f"--tolerance={value}"], capsys)
    assert code == 2 and "expected a finite number > 0" in err
    assert not (tmp_path / "conv.opt.onnx").exists()


def test_a_nan_tolerance_cannot_pass_a_broken_model(tmp_path: Path) -> None:
    """The verifier's own comparison: an error is bad unless it is <= the tolerance."""
    model = io.load(model_file(tmp_path)).model
    broken = model.clone()
    AddToSubPass()(broken)
    verifier = Verifier(model)
    assert not verifier.check(broken, tolerance=math.nan).ok
    assert verifier.check(model.clone(), tolerance=math.inf).ok


def test_a_corrupting_pass_is_rolled_back_at_the_given_tolerance(tmp_path: Path, monkeypatch):
    register_for_test(monkeypatch, AddToSubPass)
    result = graphopt.optimize(model_file(tmp_path), None, OptimizeOptions(tolerance=1e-3))
    assert result.report.rolled_back == ["test-add-to-sub"]


BAD_FIELDS = [
    ({"external_data": "no"}, r"external_data \(--external-data\): expected True or False"),
    ({"target": "foo"}, r"target \(--target\): expected one of portable, ort, tensorrt"),
    ({"target": "ORT"}, r"target \(--target\): expected one of"),
    ({"seed": "1"}, r"seed \(--seed\): expected a whole number from 0"),
    ({"seed": 1.5}, r"seed \(--seed\)"),
    ({"seed": -1}, r"seed \(--seed\)"),
    ({"opset": "18"}, r"opset \(--opset\): expected an opset number"),
    ({"input_shapes": {"x": "2x3x16x16"}}, r"input_shapes \(--input-shape\): expected a dict"),
    ({"input_shapes": [("x", (1, 3, 16, 16))]}, r"input_shapes \(--input-shape\)"),
    ({"input_shapes": {"x": (-1, 3, 16, 16)}}, "dims must be non-negative"),
    ({"input_shapes": {"x": (1.5, 3, 16, 16)}}, "dims must be integers"),
    ({"input_shapes": {"x": (True, 3, 16, 16)}}, "dims must be integers"),
    ({"input_shapes": {"q": (1, 3, 16, 16)}}, "unknown input"),
    ({"input_shapes": {"x": (0, 3, 16, 16)}}, "zero-sized dim"),
    ({"verify_inputs": 5}, r"verify_inputs \(--verify-inputs\): expected an \.npz path"),
    ({"verify_inputs": [1, 2]}, r"verify_inputs \(--verify-inputs\)"),
    ({"verify_inputs": ""}, r"verify_inputs \(--verify-inputs\)"),
    ({"fold_limit_bytes": "1MB"}, r"fold_limit_bytes \(--fold-limit\): expected a whole"),
    ({"fold_limit_bytes": -5}, r"fold_limit_bytes \(--fold-limit\)"),
    ({"fold_limit_bytes": True}, r"fold_limit_bytes \(--fold-limit\)"),
    ({"verify": "yes"}, r"verify \(--no-verify\): expected True or False"),
    ({"custom_ops": [1]}, r"custom_ops \(--custom-ops\): expected a library path"),
    ({"custom_ops": b"lib.so"}, r"custom_ops \(--custom-ops\)"),
    ({"passes": "dead-code"}, r"passes \(--passes\): expected a list of PassSpec"),
    ({"passes": [1]}, r"passes \(--passes\)"),
    ({"passes": ["no-such-pass"]}, "unknown pass 'no-such-pass'"),
    ({"skip": "dead-code"}, r"skip \(--skip\): expected a list of pass names"),
    ({"lossy": [{"name": "prune"}]}, r"lossy: expected a list of PassSpec"),
    ({"provider": 5}, r"provider \(--provider\): expected provider names"),
    ({"engine": "m.plan"}, r"engine \(--engine\): expected EngineOptions"),
    # Each EngineOptions field of its flag's type: "2" was a raw TypeError, "8.9" four
    # capabilities ("8", ".", "8", "9"), a shapes string one profile per letter.
    ({"engine": EngineOptions("m.plan", builder_level="2")}, r"^engine\.builder_level \(--bui"),
    ({"engine": EngineOptions("m.plan", builder_level=True)}, r"engine\.builder_level"),
    (
        {"engine": EngineOptions("m.plan", compute_capabilities="8.9")},
        r"^engine\.compute_capabilities \(--compute-capability\): expected a list",
    ),
    ({"engine": EngineOptions("m.plan", compute_capabilities=[8.9])}, r"compute_capabilities"),
    ({"engine": EngineOptions("m.plan", shapes="x:min=1x3,opt=1x3,max=2x3")}, r"^engine\.shapes"),
    ({"engine": EngineOptions(5)}, r"^engine\.path: expected the engine's path"),
    # The lossy passes' values, refused before anything is loaded.
    (
        {"target": "ort", "sparse_kernels": True, "sparse_kernels_threads": 100000},
        r"option 'threads' \(--sparse-kernels-threads\): expected a number in \[1, ",
    ),
    (
        {"target": "ort", "sparse_kernels": True, "sparse_kernels_min_speedup": 0},
        r"option 'min_speedup' \(--sparse-kernels-min-speedup\): expected a number in",
    ),
    (
        {"target": "ort", "sparse_kernels": True, "sparse_kernels_min_speedup": -1},
        r"--sparse-kernels-min-speedup",
    ),
    ({"prune": "flops=0.3", "calib": ""}, r"option 'calib' \(--calib\): empty path"),
    ({"lossy": [PassSpec("prune", {"flops": 0.3, "calib": " "})]}, r"^lossy: .*empty path"),
    ({"quantize": "int4-weight", "block_size": "6x"}, r"option 'block_size'.*expected an integer"),
    ({"flags": ["prune"]}, r"flags: expected a dict"),
    # Past Python's 4300-digit str() limit: the metadata's JSON could not write it.
    ({"seed": 10**5000}, r"seed \(--seed\): expected .* 2\*\*64 - 1, got an integer of 16610 bits"),
    ({"seed": 1 << 64}, r"seed \(--seed\): expected a whole number from 0 to 2\*\*64 - 1"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS)
def test_each_field_is_checked_in_one_line(tmp_path: Path, fields: dict, message: str) -> None:
    path = conv_bn_relu_file(tmp_path)
    out = tmp_path / "out.onnx"
    with pytest.raises(UserInputError, match=message) as caught:
        graphopt.optimize(path, out, OptimizeOptions(**fields))
    assert "\n" not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("source", [123, None, [b"x"], 1.5], ids=["int", "None", "list", "float"])
def test_a_source_of_another_type_is_refused(source) -> None:
    with pytest.raises(UserInputError, match=r"^source: expected a model path, bytes"):
        graphopt.optimize(source)


def test_optimize_arguments_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    path = conv_bn_relu_file(tmp_path)
    with pytest.raises(UserInputError, match=r"^options: expected OptimizeOptions, got dict"):
        graphopt.optimize(path, None, {"verify": False})  # type: ignore[arg-type]
    for output in (5, b"x.onnx"):
        with pytest.raises(UserInputError, match=r"^output: expected a path"):
            graphopt.optimize(path, output)  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match=r"^progress: expected a callable"):
        graphopt.optimize(path, progress=5)  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match=r"^in_place: expected True or False"):
        graphopt.optimize(path, in_place="yes")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_friendly_spellings_are_normalized_and_the_callers_options_kept(tmp_path: Path) -> None:
    given = OptimizeOptions(
        passes=["dead-code", PassSpec("fuse-conv-bn")],
        skip=None,
        lossy=None,
        custom_ops=None,
        input_shapes={"x": [2, 3, 16, 16]},
        flags=None,
        target=None,
        seed=np.int64(3),
    )
    checked = validate_options(given)
    assert checked.passes == [PassSpec("dead-code"), PassSpec("fuse-conv-bn")]
    assert (checked.skip, checked.lossy, checked.custom_ops, checked.flags) == ([], [], [], {})
    assert checked.input_shapes == {"x": (2, 3, 16, 16)}
    assert (checked.target, checked.seed) == ("portable", 3)
    assert given.passes[0] == "dead-code" and given.skip is None  # the caller's, as given
    # A single library path is one library, not a list of letters.
    assert validate_options(OptimizeOptions(custom_ops="lib.so")).custom_ops == ["lib.so"]
    # None keeps its meaning where it has one: no fold limit, the dtype's tolerance.
    kept = validate_options(OptimizeOptions(fold_limit_bytes=None, tolerance=None))
    assert kept.fold_limit_bytes is None and kept.tolerance is None
    result = graphopt.optimize(conv_bn_relu_file(tmp_path), None, given)
    assert [s.name for s in result.report.stats] == ["dead-code", "fuse-conv-bn"]
    assert result.report.verified


def test_a_single_custom_ops_path_is_one_library(tmp_path: Path) -> None:
    path = conv_bn_relu_file(tmp_path)
    with pytest.raises(UserInputError, match=r"lib\.so: custom-op library not found"):
        graphopt.optimize(path, None, OptimizeOptions(custom_ops=str(tmp_path / "lib.so")))


def test_the_sparse_kernels_switch_takes_booleans() -> None:
    off = OptimizeOptions(target="ort", sparse_kernels=False)
    assert all(s.name != "sparse-kernels" for step in off.pipeline()[0] for s in step.passes)
    on = OptimizeOptions(target="ort", sparse_kernels=True).pipeline()[0]
    assert [s.name for s in on[-1].passes] == ["sparse-kernels"]
    for value in ("", 1):
        with pytest.raises(UserInputError, match="--sparse-kernels is a switch"):
            OptimizeOptions(target="ort", sparse_kernels=value).pipeline()


def test_targets_are_the_command_lines() -> None:
    parser = build_parser(lossy_flags=False)
    optimize = parser._subparsers._group_actions[0].choices["optimize"]  # type: ignore[union-attr]
    target = next(a for a in optimize._actions if a.dest == "target")
    assert tuple(target.choices) == TARGETS


def test_an_empty_pass_list_is_refused(tmp_path: Path, capsys) -> None:
    """It ran nothing and ended 'written but not verified' with no reason (exit 4)."""
    path = conv_bn_relu_file(tmp_path)
    with pytest.raises(UserInputError, match=r"^no passes to run: the pass list is empty$"):
        graphopt.optimize(path, None, OptimizeOptions(passes=[]))
    only = OptimizeOptions(passes=[PassSpec("dead-code")], skip=["dead-code"])
    with pytest.raises(UserInputError, match=r"^no passes to run: --skip leaves none of them$"):
        graphopt.optimize(path, None, only)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: []\n")
    code, _, err = run(["optimize", str(path), "--recipe", str(recipe)], capsys)
    assert code == 2 and "no passes to run" in err
    # --passes "" ran the whole default pipeline; --passes , was already refused.
    for value in ("", ",", " "):
        code, _, err = run(["optimize", str(path), "--passes", value], capsys)
        assert code == 2 and "--passes" in err and "names no pass" in err, err
    assert not (tmp_path / "conv.opt.onnx").exists()


def test_an_empty_recipe_or_ort_path_is_refused(tmp_path: Path, capsys) -> None:
    path = conv_bn_relu_file(tmp_path)
    code, _, err = run(["optimize", str(path), "--recipe", ""], capsys)
    assert code == 2 and "--recipe: empty path" in err
    code, _, err = run(["optimize", str(path), "--save-ort-optimized", ""], capsys)
    assert code == 2 and "--save-ort-optimized: empty path" in err
    assert not (tmp_path / "conv.opt.onnx").exists()


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["passes", "--json"], "unrecognized arguments: --json (see graphopt --help)"),
        (["optimize", "m.onnx", "--tolerance", "x"], "(see graphopt optimize --help)"),
        (["inspect"], "required: input (see graphopt inspect --help)"),
    ],
)
def test_usage_errors_say_graphopt_once(capsys, args: list[str], hint: str) -> None:
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.count("graphopt:") == 1 and err.startswith("graphopt: error: ")
    assert hint in err


def test_input_shapes_held_as_arrays_are_dims() -> None:
    """np.array(x.shape) as a shape worked before the one check of every option."""
    import numpy as np

    from graphopt.option_checks import validate_options

    checked = validate_options(OptimizeOptions(input_shapes={"x": np.array([1, 3])}))
    assert checked.input_shapes == {"x": (1, 3)}
