"""graphopt.backends.ort: providers, session options, sessions, ORT's saved optimized model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.backends import ort as backend
from graphopt.errors import UserInputError
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT


def _model():
    """y = Relu(x @ w + b), symbolic batch; a MatMul+Add ORT fuses at level extended."""
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        [tensor_info("x", F, ["batch", 8])],
        [tensor_info("y", F, ["batch", 4])],
        {
            "w": rng.standard_normal((8, 4)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
        },
    )


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    io.save(_model(), path)
    return path


def test_providers_resolve_short_and_full_names_with_cpu_fallback() -> None:
    assert backend.resolve_providers(None) == (backend.CPU,)
    assert backend.resolve_providers("cpu") == (backend.CPU,)
    assert backend.resolve_providers(["CPUExecutionProvider", "cpu"]) == (backend.CPU,)
    assert backend.resolve_providers(" cpu ") == (backend.CPU,)


@pytest.mark.parametrize("spec", [",", "", " , cpu", ["cpu", ""]])
def test_an_empty_provider_name_is_refused(spec) -> None:
    """``--provider "$EP,cpu"`` with EP unset ran optimize's verification on the CPU, exit 0."""
    with pytest.raises(UserInputError, match="an empty provider name"):
        backend.resolve_providers(spec)


def test_optimize_refuses_an_empty_provider_name(tmp_path: Path, capsys) -> None:
    from graphopt.cli import main

    code = main(
        ["optimize", str(_saved(tmp_path)), "-o", str(tmp_path / "o.onnx"), "--provider", ","]
    )
    assert code == 2 and "an empty provider name" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_or_unavailable_provider_is_a_one_line_user_error() -> None:
    with pytest.raises(UserInputError, match="is not a provider") as bad:
        backend.resolve_providers("warp-drive")
    assert "\n" not in str(bad.value) and "CPUExecutionProvider" in str(bad.value)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the unavailable-provider message cannot show")
    with pytest.raises(UserInputError, match="not available in this onnxruntime"):
        backend.resolve_providers("cuda,cpu")


def test_session_options_carry_threads_level_and_mode() -> None:
    config = backend.SessionConfig(threads=2, inter_threads=1, opt_level="basic")
    options = backend.session_options(config)
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    with pytest.raises(UserInputError, match="optimization level 'fast'"):
        backend.session_options(backend.SessionConfig(opt_level="fast"))
    # ORT starts every thread up front: 100000 exhausted memory without a message.
    with pytest.raises(UserInputError, match="--threads: at most 1024"):
        backend.session_options(backend.SessionConfig(threads=100_000))


def test_session_from_path_and_from_memory_agree(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    from_file = backend.create_session(path, backend.SessionConfig(threads=1))
    in_memory = backend.create_session(_model(), backend.SessionConfig(opt_level="disable"))
    assert from_file.get_providers() == [backend.CPU]
    a, b = from_file.run(None, {"x": x})[0], in_memory.run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (3, 4) and (a >= 0).all()


def test_bad_custom_op_library_is_refused_before_the_session(tmp_path: Path) -> None:
    fake = tmp_path / "libnot.so"
    fake.write_bytes(b"not a library")
    config = backend.SessionConfig(custom_ops=(str(fake),))
    with pytest.raises(UserInputError, match="cannot register custom-op library"):
        backend.create_session(_saved(tmp_path), config)


def test_provider_ort_fell_back_from_is_an_error() -> None:
    class FellBack:
        def get_providers(self) -> list[str]:
            return [backend.CPU]

    with pytest.raises(UserInputError, match="could not initialize it"):
        backend._check_providers(FellBack(), ["CUDAExecutionProvider", backend.CPU])
    backend._check_providers(FellBack(), [backend.CPU])  # what was asked: no error


@pytest.mark.parametrize("name", ["m.opt.onnx", "m.ort"])
def test_save_optimized_writes_a_model_ort_runs_alike(tmp_path: Path, name: str) -> None:
    source = _saved(tmp_path)
    out = backend.save_optimized(source, tmp_path / name)
    assert out == tmp_path / name and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    if name.endswith(".ort"):
        assert out.read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    else:
        # ORT's level extended fuses MatMul+Add into a Gemm-like FusedMatMul/Gemm node.
        ops = {n.op_type for n in io.load(out).model.graph}
        assert "Add" not in ops, ops
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    want = backend.create_session(source).run(None, {"x": x})[0]
    got = backend.create_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_save_optimized_refuses_bad_targets(tmp_path: Path) -> None:
    source = _saved(tmp_path)
    with pytest.raises(UserInputError, match="overwrite the model"):
        backend.save_optimized(source, source)
    with pytest.raises(UserInputError, match="does not exist"):
        backend.save_optimized(source, tmp_path / "missing" / "m.ort")
    with pytest.raises(UserInputError, match="no such file"):
        backend.save_optimized(tmp_path / "absent.onnx", tmp_path / "m.ort")


def test_save_optimized_failing_write_is_a_user_error_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch
) -> None:
    source = _saved(tmp_path)
    target = tmp_path / "m.ort"
    target.write_bytes(b"previous")
    real_replace = os.replace

    def full_disk(src, dst) -> None:
        if Path(dst) == target:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(backend.os, "replace", full_disk)
    with pytest.raises(UserInputError, match=r"m\.ort: cannot be written \(No space left"):
        backend.save_optimized(source, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_optimize_saves_ort_optimized_model_beside_its_output(tmp_path: Path, capsys) -> None:
    from graphopt.cli import main

    source = _saved(tmp_path)
    out, edge = tmp_path / "out.onnx", tmp_path / "edge.ort"
    code = main(["optimize", str(source), "-o", str(out), "--save-ort-optimized", str(edge)])
    assert code == 0, capsys.readouterr().err
    assert f"wrote {edge} (ONNX Runtime's optimized model)" in capsys.readouterr().out
    x = np.ones((1, 8), dtype=np.float32)
    want = backend.create_session(source).run(None, {"x": x})[0]
    np.testing.assert_allclose(backend.create_session(edge).run(None, {"x": x})[0], want, 1e-5)


def test_optimize_refuses_an_ort_optimized_path_over_its_input_or_output(
    tmp_path: Path, capsys
) -> None:
    from graphopt.cli import main

    source = _saved(tmp_path)
    before = source.read_bytes()
    out = tmp_path / "out.onnx"
    # Before: written last, over the input model itself, with exit 0.
    for target, what in ((source, "the input model"), (out, "the output")):
        code = main(["optimize", str(source), "-o", str(out), "--save-ort-optimized", str(target)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"is {what}; give another path" in err, err
    assert source.read_bytes() == before and not out.exists()


def test_model_of_graphopt_domain_asks_for_graphopt_kernels(monkeypatch) -> None:
    """Sessions for a model using graphopt's own op domain register its kernel library; where
    it is not built the error says how to build it (one line)."""
    import onnx_ir as ir

    from graphopt.backends import ort_custom_ops

    model = _model()
    node = ir.node("SparseMatMul", [model.graph.inputs[0]], domain=ort_custom_ops.OWN_DOMAIN)
    model.graph.append(node)
    model.opset_imports[ort_custom_ops.OWN_DOMAIN] = ort_custom_ops.OWN_DOMAIN_VERSION
    monkeypatch.setattr(ort_custom_ops, "resolve_custom_op_library", lambda path: None)
    with pytest.raises(UserInputError, match=ort_custom_ops.BUILD_COMMAND) as missing:
        backend.session_options(backend.SessionConfig(), model)
    assert "\n" not in str(missing.value)
    backend.session_options(backend.SessionConfig(), _model())  # no such op: nothing needed


# --- the run's providers: verification and lossy-pass sessions (optimize --provider) ---

AZURE = "AzureExecutionProvider"  # in every onnxruntime wheel: a non-CPU provider to pass


def test_verification_sessions_use_the_runs_providers() -> None:
    from graphopt import sessions

    assert sessions.make_session(io.load(_model()).model).get_providers() == [backend.CPU]
    if AZURE not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime offers no {AZURE} to pass through")
    with backend.using_providers(AZURE) as providers:
        assert providers == (AZURE, backend.CPU)
        session = sessions.make_session(io.load(_model()).model)
        assert session.get_providers() == [AZURE, backend.CPU]
    assert backend.active_providers() == (backend.CPU,)


def test_a_provider_ort_dropped_is_an_error() -> None:
    class FellBack:
        def get_providers(self):
            return [backend.CPU]

    with pytest.raises(UserInputError, match="could not initialize it"):
        backend.check_providers(FellBack(), ["CUDAExecutionProvider", backend.CPU])
    backend.check_providers(FellBack(), [backend.CPU])


def test_optimize_provider_flag(tmp_path: Path, capsys) -> None:
    from graphopt.cli import main

    source = _saved(tmp_path)
    plain, on_cpu = tmp_path / "plain.onnx", tmp_path / "cpu.onnx"
    assert main(["optimize", str(source), "-o", str(plain)]) == 0
    assert main(["optimize", str(source), "-o", str(on_cpu), "--provider", "cpu"]) == 0
    assert plain.read_bytes() == on_cpu.read_bytes()  # the CPU is the default: same bytes
    capsys.readouterr()
    missing = tmp_path / "cuda.onnx"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(["optimize", str(source), "-o", str(missing), "--provider", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--provider CUDAExecutionProvider: is not available" in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not missing.exists()
    if AZURE in ort.get_available_providers():
        other = tmp_path / "azure.onnx"
        assert main(["optimize", str(source), "-o", str(other), "--provider", AZURE]) == 0
        props = [p.value for p in onnx.load(other).metadata_props]
        assert any(AZURE in value for value in props)  # recorded with the run's options
