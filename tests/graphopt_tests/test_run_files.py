"""run_files.check_overwrites: no file the run writes (the output and its data file, the engine,
--save-ort-optimized) may be a file it reads (the model and its weights, the recipe, data
files, custom-op libraries, files pass options replay), whatever the spelling."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.api import OptimizeOptions
from graphopt.errors import UserInputError
from graphopt.run_files import check_overwrites
from graphopt_tests.test_cli import run
from graphopt_tests.test_option_checks import conv_bn_relu_file

F = TensorProto.FLOAT


def mlp_file(folder: Path, name: str = "mlp.onnx", external: bool = False) -> Path:
    """MatMul + Add + Relu + MatMul, x [N, 16]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, ["N", 16])],
        [helper.make_tensor_value_info("y", F, ["N", 8])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
            onnx.numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
            onnx.numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / name
    if external:
        onnx.save_model(proto, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    else:
        onnx.save_model(proto, path)
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


def _refused(args: list[str], capsys, what: str) -> None:
    code, _, err = run(["optimize", *args], capsys)
    assert code == 2, err
    assert f"is {what}; give another path (the run would overwrite it)" in err, err
    assert "\n" not in err.strip()


def test_the_output_never_replaces_a_file_the_run_reads(tmp_path: Path, capsys) -> None:
    conv, mlp = conv_bn_relu_file(tmp_path), mlp_file(tmp_path)
    recipe = tmp_path / "self.yaml"
    recipe.write_text("verify: true\n")
    (tmp_path / "lib.so").write_bytes(b"not a library")
    (tmp_path / "d.json").write_text("{}")
    np.savez(tmp_path / "c.npz", x=np.ones((4, 16), np.float32))
    (tmp_path / "sub").mkdir()
    before = _digests(tmp_path)
    decisions, speed, calib = (str(tmp_path / n) for n in ("d.json", "f.onnx", "c.npz"))
    sparse = ["--target", "ort", "--sparsity", "unstructured=0.9", "--sparse-kernels"]
    cases = [
        ([str(conv), "-o", str(recipe), "--recipe", str(recipe)], "the --recipe file"),
        # Another spelling of the same file.
        (
            [str(conv), "-o", str(tmp_path / "sub" / ".." / "self.yaml"), "--recipe", str(recipe)],
            "the --recipe file",
        ),
        (
            [str(conv), "-o", str(tmp_path / "lib.so"), "--custom-ops", str(tmp_path / "lib.so")],
            "the --custom-ops library",
        ),
        (
            [str(mlp), *sparse, "--sparse-kernels-decisions", decisions, "-o", decisions],
            "the --sparse-kernels-decisions file",
        ),
        (
            [str(mlp), "--factorize", "rank=8", "--factorize-speed-check", speed, "-o", speed],
            "the --factorize-speed-check file",
        ),
        ([str(mlp), "--prune", "flops=0.3", "--calib", calib, "-o", calib], "the --calib file"),
        ([str(mlp), "--verify-inputs", calib, "-o", calib], "the --verify-inputs file"),
    ]
    for args, what in cases:
        _refused(args, capsys, what)
    assert _digests(tmp_path) == before  # nothing written, nothing replaced


def test_save_ort_optimized_never_replaces_a_file_the_run_reads(tmp_path: Path, capsys) -> None:
    """It was checked against the input, the output and the engine only."""
    conv = conv_bn_relu_file(tmp_path)
    out = tmp_path / "o.onnx"
    recipe = tmp_path / "s.yaml"
    recipe.write_text("verify: true\n")
    np.savez(tmp_path / "c.npz", x=np.ones((1, 3, 16, 16), np.float32))
    before = _digests(tmp_path)
    ort = ["-o", str(out), "--save-ort-optimized"]
    cases = [
        ([str(conv), *ort, str(recipe), "--recipe", str(recipe)], "the --recipe file"),
        (
            [str(conv), *ort, str(tmp_path / "c.npz"), "--verify-inputs", str(tmp_path / "c.npz")],
            "the --verify-inputs file",
        ),
        ([str(conv), *ort, str(conv)], "the input model"),
        ([str(conv), *ort, str(out)], "the output"),
        ([str(conv), *ort, str(tmp_path / "o.onnx.data")], "the output's data file"),
    ]
    for args, what in cases:
        _refused(args, capsys, what)
    assert _digests(tmp_path) == before


def test_nothing_written_replaces_the_inputs_external_data(tmp_path: Path, capsys) -> None:
    source = mlp_file(tmp_path, external=True)
    weights = tmp_path / "w.bin"
    before = _digests(tmp_path)
    _refused(
        [str(source), "-o", str(tmp_path / "o.onnx"), "--save-ort-optimized", str(weights)],
        capsys,
        "the input's external-data file",
    )
    _refused([str(source), "-o", str(weights)], capsys, "the input's external-data file")
    assert _digests(tmp_path) == before
    # --in-place replaces the model and its weights: that is what it asks for.
    code, _, err = run(["optimize", str(source), "--in-place", "--no-verify"], capsys)
    assert code == 0, err


def test_the_api_checks_its_own_files(tmp_path: Path) -> None:
    conv = conv_bn_relu_file(tmp_path)
    library = tmp_path / "lib.so"
    library.write_bytes(b"not a library")
    # Refused before the library is loaded to check it (it is not one).
    for custom_ops in ([library], str(library)):
        with pytest.raises(UserInputError, match="is the --custom-ops library"):
            graphopt.optimize(conv, library, OptimizeOptions(custom_ops=custom_ops))
    assert library.read_bytes() == b"not a library"
    data = tmp_path / "c.npz"
    np.savez(data, x=np.ones((1, 3, 16, 16), np.float32))
    os.link(data, tmp_path / "hard.npz")
    with pytest.raises(UserInputError, match="is the --verify-inputs file"):
        graphopt.optimize(conv, tmp_path / "hard.npz", OptimizeOptions(verify_inputs=data))
    # What a caller writes or reads besides: the CLI's --recipe and --save-ort-optimized.
    with pytest.raises(UserInputError, match=r"^--save-ort-optimized .*: is the --recipe file"):
        check_overwrites(
            conv,
            tmp_path / "o.onnx",
            OptimizeOptions(),
            also_read=[("the --recipe file", tmp_path / "r.yaml")],
            also_written=[("--save-ort-optimized", tmp_path / "r.yaml")],
        )
