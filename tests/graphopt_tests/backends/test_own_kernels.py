"""graphopt's own kernels in ORT sessions: registered when a model uses domain ``graphopt``
(and only then), from graphopt's build folder only, with a one-line error when not built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.backends import ort_custom_ops
from graphopt.errors import UserInputError
from graphopt_tests.helpers import import_or_skip


class RecordingOptions:
    """Stands in for ``onnxruntime.SessionOptions``: records what would be loaded."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def register_custom_ops_library(self, path: str) -> None:
        self.loaded.append(path)


def sparse_model(in_subgraph: bool = False) -> onnx.ModelProto:
    """y = SparseMatMul(x, one 1x1 block) of domain graphopt, optionally inside an If."""
    node = helper.make_node(
        "SparseMatMul",
        ["x", "v", "c", "r"],
        ["y"],
        domain="graphopt",
        K=1,
        N=1,
        activation="none",
        block_r=1,
        block_c=1,
    )
    inits = [
        onnx.numpy_helper.from_array(np.array([[[2.0]]], np.float32), "v"),
        onnx.numpy_helper.from_array(np.array([0], np.int32), "c"),
        onnx.numpy_helper.from_array(np.array([0, 1], np.int32), "r"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    nodes = [node]
    if in_subgraph:
        branch = helper.make_graph([node], "b", [], [y])
        cond = onnx.numpy_helper.from_array(np.array(True), "cond")
        inits.append(cond)
        nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("graphopt", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def dense_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A build folder holding a (fake) library file: the policy only checks the file."""
    folder = tmp_path / "_build"
    folder.mkdir()
    library = folder / ort_custom_ops.LIBRARY_NAME
    library.write_bytes(b"not loaded: the session options are a recorder")
    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: folder)
    return library.resolve()


def test_uses_own_kernels_sees_nodes_in_subgraphs() -> None:
    assert ort_custom_ops.uses_own_kernels(sparse_model())
    assert ort_custom_ops.uses_own_kernels(sparse_model(in_subgraph=True))
    assert ort_custom_ops.uses_own_kernels(io.load(sparse_model(in_subgraph=True)).model)
    assert not ort_custom_ops.uses_own_kernels(dense_model())
    assert not ort_custom_ops.uses_own_kernels(io.load(dense_model()).model)


def test_own_library_registered_only_for_its_domain(fake_build: Path) -> None:
    options = RecordingOptions()
    ort_custom_ops.register_active_custom_ops(options, (), model=dense_model())
    assert options.loaded == []
    registered = ort_custom_ops.register_active_custom_ops(options, (), model=sparse_model())
    assert registered == [fake_build] and options.loaded == [str(fake_build)]


def test_own_library_not_registered_twice(fake_build: Path) -> None:
    """The user's --custom-ops naming the same library: ORT would refuse it twice."""
    options = RecordingOptions()
    ort_custom_ops.register_active_custom_ops(options, [fake_build], model=sparse_model())
    assert options.loaded == [str(fake_build)]


def test_a_copy_of_the_own_library_is_not_registered_twice(fake_build: Path, tmp_path) -> None:
    """--custom-ops naming a copy of graphopt's build (same bytes, another path) registered
    domain graphopt twice: ORT refused the session ("Domain already set in registry")."""
    copy = tmp_path / "elsewhere" / "copy.so"
    copy.parent.mkdir()
    copy.write_bytes(fake_build.read_bytes())
    options = RecordingOptions()
    ort_custom_ops.register_active_custom_ops(options, [copy], model=sparse_model())
    assert options.loaded == [str(fake_build)]


def test_two_libraries_claiming_one_domain_is_a_user_error(monkeypatch) -> None:
    """Another build of the kernels given with --custom-ops: ORT refuses the session; the
    message says which flag to drop, and verification does not turn it into exit 4."""
    import_or_skip("onnxruntime", "verification sessions are ONNX Runtime sessions")
    from graphopt.backends import ort as ort_backend
    from graphopt.verify import Verifier

    def refused(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Domain already set in registry")

    monkeypatch.setattr(ort_backend, "_session", refused)
    with pytest.raises(UserInputError, match="drop the --custom-ops library that repeats it"):
        Verifier(io.load(dense_model()).model, {}, 1e-4, 0)


def test_bench_and_compare_sessions_report_the_domain_conflict_too(monkeypatch) -> None:
    """bench/compare build their sessions with backends.ort.create_session: the same one-line
    message as verification, not ORT's raw error (exit 3)."""
    import_or_skip("onnxruntime", "bench and compare sessions are ONNX Runtime sessions")
    from graphopt.backends import ort as ort_backend

    def refused(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Domain already set in registry")

    monkeypatch.setattr(ort_backend, "_session", refused)
    with pytest.raises(UserInputError, match="drop the --custom-ops library that repeats it"):
        ort_backend.create_session(io.load(dense_model()).model)


def test_the_custom_ops_hint_never_names_graphopts_own_domain() -> None:
    assert ort_custom_ops.missing_library_hint(io.load(sparse_model()).model) == ""


def test_missing_library_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: tmp_path / "absent")
    options = RecordingOptions()
    with pytest.raises(UserInputError) as info:
        ort_custom_ops.register_active_custom_ops(options, (), model=sparse_model())
    message = str(info.value)
    assert "\n" not in message and "domain 'graphopt'" in message
    assert "graphopt.kernels.library_path()" in message
    assert "python -m graphopt.kernels build" in message
    assert options.loaded == []
    # A dense model needs no library: nothing to say.
    ort_custom_ops.register_active_custom_ops(options, (), model=dense_model())


def test_verify_sessions_refuse_without_library(tmp_path: Path, monkeypatch) -> None:
    import_or_skip("onnxruntime", "verification sessions are ONNX Runtime sessions")
    from graphopt.sessions import make_session

    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: tmp_path / "absent")
    with pytest.raises(UserInputError, match=r"python -m graphopt\.kernels build"):
        make_session(io.load(sparse_model()).model)


def test_plain_ort_session_options_run_the_model() -> None:
    """What a plain ORT user does: ``own_session_options()`` and ``InferenceSession``."""
    import graphopt.kernels

    ort = import_or_skip("onnxruntime", "the custom op runs in ONNX Runtime")
    if not graphopt.kernels.available(quiet=True):
        pytest.skip(graphopt.kernels.unavailable_reason())
    data = sparse_model().SerializeToString()
    options = ort_custom_ops.own_session_options()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    x = np.array([[1.5], [-3.0]], np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, 2.0 * x)
    # Without it, ORT itself refuses the unknown domain (its message cannot be changed).
    with pytest.raises(Exception, match="graphopt"):
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
