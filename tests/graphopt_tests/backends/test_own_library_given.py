"""Without graphopt's own build, a ``--custom-ops`` library that provides graphopt's ops (a
build of another checkout) runs models of domain ``graphopt``; one that does not is named in
the one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import io
from graphopt.backends import ort_custom_ops
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt_tests.backends.test_own_kernels import sparse_model
from graphopt_tests.helpers import import_or_skip


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the built library outside graphopt's build folder, which is made absent."""
    import graphopt.kernels

    import_or_skip("onnxruntime", "the library is loaded by ONNX Runtime")
    built = graphopt.kernels.library_path()
    if built is None:
        pytest.skip(graphopt.kernels.unavailable_reason())
    copy = tmp_path / "other" / ort_custom_ops.LIBRARY_NAME
    copy.parent.mkdir()
    shutil.copyfile(built, copy)
    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: tmp_path / "absent")
    assert ort_custom_ops.resolve_custom_op_library(None) is None
    return copy.resolve()


def test_a_given_library_with_graphopts_ops_is_the_own_library(elsewhere: Path) -> None:
    with pytest.raises(UserInputError, match="library is not built"):
        ort_custom_ops.own_library()
    with ort_custom_ops.using_custom_ops([elsewhere]):
        assert ort_custom_ops.own_library() == elsewhere
        from graphopt.sessions import make_session

        session = make_session(io.load(sparse_model()).model)
        x = np.array([[1.5], [-3.0]], np.float32)
        (y,) = session.run(None, {"x": x})
        np.testing.assert_array_equal(y, 2.0 * x)


def test_a_given_library_without_graphopts_ops_is_named(elsewhere: Path, tmp_path: Path) -> None:
    other = tmp_path / "libnot_graphopt.so"
    other.write_bytes(b"no shared object")
    assert not ort_custom_ops.provides_own_ops(other)
    with ort_custom_ops.using_custom_ops([other]), pytest.raises(UserInputError) as info:
        ort_custom_ops.own_library()
    message = str(info.value)
    assert "\n" not in message and "--custom-ops" in message
    assert f"does not provide them ({other.resolve()})" in message


def test_optimize_and_bench_use_the_given_library(elsewhere: Path, tmp_path: Path, capsys):
    source = tmp_path / "sparse.onnx"
    onnx.save(sparse_model(), source)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(out)]) == 2
    assert "library is not built" in capsys.readouterr().err
    code = main(["optimize", str(source), "-o", str(out), "--custom-ops", str(elsewhere)])
    assert code == 0, capsys.readouterr().err
    code = main(["bench", str(out), "--custom-ops", str(elsewhere), "--runs", "2"])
    assert code == 0, capsys.readouterr().err


def test_compare_names_the_model_that_needs_the_library(
    elsewhere: Path, tmp_path: Path, capsys
) -> None:
    """Of compare's two models, the message names the one of domain graphopt."""
    sparse = tmp_path / "sparse.onnx"
    proto = sparse_model()
    onnx.save(proto, str(sparse))
    dense = tmp_path / "dense.onnx"
    proto.graph.ClearField("node")
    del proto.opset_import[1:]
    proto.graph.node.append(onnx.helper.make_node("Identity", ["x"], ["y"]))
    onnx.save(proto, str(dense))
    code = main(["compare", str(dense), str(sparse)])
    err = capsys.readouterr().err
    assert code == 2 and f"{sparse}: " in err and "library is not built" in err, err
    assert str(dense) not in err
