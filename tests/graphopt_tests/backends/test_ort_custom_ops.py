"""Custom-op library policy: only graphopt's own build or a path the user names explicitly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import io
from graphopt.backends import ort_custom_ops
from graphopt.backends.ort_custom_ops import (
    LIBRARY_NAME,
    active_custom_ops,
    register_custom_ops,
    resolve_custom_op_library,
    using_custom_ops,
)
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.sessions import make_session
from graphopt.verify import run_model

# The smallest valid custom-op library: ORT dlopens it, calls RegisterCustomOps, and a NULL
# OrtStatus* means success. No ORT headers needed.
_EMPTY_LIBRARY = "void *RegisterCustomOps(void *options, const void *api) { return 0; }\n"

# A library with one op, graphopt.test::AffineTest(x: float32) = 2x + 1, written against ORT's
# C ABI without its headers (the onnxruntime wheel ships none). OrtApi is a table of function
# pointers that only grows: an entry's index is fixed by the API version that added it (these
# are all version 1). OrtCustomOp is filled to its last field although `version` is 1: ORT
# 1.32 calls GetInputCharacteristic/GetOutputCharacteristic (added in version 8) regardless,
# and a NULL there is a crash, not an error.
_AFFINE_LIBRARY = r"""
#include <stddef.h>
#include <stdint.h>

typedef void *Status; /* OrtStatus*, NULL = success */
static const void *const *api; /* the OrtApi table */
#define ORT(index, type) ((type)api[index])
enum {
  CREATE_CUSTOM_OP_DOMAIN = 26, CUSTOM_OP_DOMAIN_ADD = 27, ADD_CUSTOM_OP_DOMAIN = 28,
  GET_TENSOR_MUTABLE_DATA = 51, GET_DIMENSIONS_COUNT = 61, GET_DIMENSIONS = 62,
  GET_TENSOR_SHAPE_ELEMENT_COUNT = 64, GET_TENSOR_TYPE_AND_SHAPE = 65,
  KERNEL_CONTEXT_GET_INPUT = 90, KERNEL_CONTEXT_GET_OUTPUT = 91,
  RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};
enum { TYPE_FLOAT = 1 };

typedef struct {
  uint32_t version;
  void *(*CreateKernel)(const void *op, const void *api, const void *info);
  const char *(*GetName)(const void *op);
  const char *(*GetExecutionProviderType)(const void *op);
  int (*GetInputType)(const void *op, size_t index);
  size_t (*GetInputTypeCount)(const void *op);
  int (*GetOutputType)(const void *op, size_t index);
  size_t (*GetOutputTypeCount)(const void *op);
  void (*KernelCompute)(void *kernel, void *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const void *op, size_t index);
  int (*GetOutputCharacteristic)(const void *op, size_t index);
  int (*GetInputMemoryType)(const void *op, size_t index);
  int (*GetVariadicInputMinArity)(const void *op);
  int (*GetVariadicInputHomogeneity)(const void *op);
  int (*GetVariadicOutputMinArity)(const void *op);
  int (*GetVariadicOutputHomogeneity)(const void *op);
  void *CreateKernelV2, *KernelComputeV2, *InferOutputShapeFn;
  int (*GetStartVersion)(const void *op);
  int (*GetEndVersion)(const void *op);
  size_t (*GetMayInplace)(int **inputs, int **outputs);
  void (*ReleaseMayInplace)(int *inputs, int *outputs);
  size_t (*GetAliasMap)(int **inputs, int **outputs);
  void (*ReleaseAliasMap)(int *inputs, int *outputs);
} CustomOp;

static void *create_kernel(const void *op, const void *ort, const void *info) { return (void *)1; }
static const char *name(const void *op) { return "AffineTest"; }
static const char *provider(const void *op) { return NULL; /* CPU */ }
static int float_type(const void *op, size_t index) { return TYPE_FLOAT; }
static size_t one(const void *op) { return 1; }
static void destroy_kernel(void *kernel) {}
static int zero(const void *op, size_t index) { return 0; /* required; default memory */ }
static int one_int(const void *op) { return 1; }
static int last_version(const void *op) { return 2147483647; }
static size_t no_pairs(int **inputs, int **outputs) { *inputs = 0; *outputs = 0; return 0; }
static void release_pairs(int *inputs, int *outputs) {}

static void compute(void *kernel, void *context) {
  const void *input;
  void *output, *info;
  size_t rank, count, i;
  int64_t dims[16];
  float *x, *y;
  ORT(KERNEL_CONTEXT_GET_INPUT, Status (*)(void *, size_t, const void **))(context, 0, &input);
  ORT(GET_TENSOR_TYPE_AND_SHAPE, Status (*)(const void *, void **))(input, &info);
  ORT(GET_DIMENSIONS_COUNT, Status (*)(const void *, size_t *))(info, &rank);
  ORT(GET_DIMENSIONS, Status (*)(const void *, int64_t *, size_t))(info, dims, rank);
  ORT(GET_TENSOR_SHAPE_ELEMENT_COUNT, Status (*)(const void *, size_t *))(info, &count);
  ORT(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void (*)(void *))(info);
  ORT(KERNEL_CONTEXT_GET_OUTPUT, Status (*)(void *, size_t, const int64_t *, size_t, void **))(
      context, 0, dims, rank, &output);
  ORT(GET_TENSOR_MUTABLE_DATA, Status (*)(const void *, void **))(input, (void **)&x);
  ORT(GET_TENSOR_MUTABLE_DATA, Status (*)(const void *, void **))(output, (void **)&y);
  for (i = 0; i < count; i++) y[i] = 2.0f * x[i] + 1.0f;
}

static CustomOp affine = {
    1, create_kernel, name, provider, float_type, one, float_type, one, compute,
    destroy_kernel, zero, zero, zero, one_int, one_int, one_int, one_int, 0, 0, 0,
    one_int, last_version, no_pairs, release_pairs, no_pairs, release_pairs,
};

typedef struct { const void *(*GetApi)(uint32_t version); } ApiBase;

Status RegisterCustomOps(void *options, const ApiBase *base) {
  void *domain;
  Status status;
  api = (const void *const *)base->GetApi(1);
  status = ORT(CREATE_CUSTOM_OP_DOMAIN, Status (*)(const char *, void **))(
      "graphopt.test", &domain);
  if (status) return status;
  status = ORT(CUSTOM_OP_DOMAIN_ADD, Status (*)(void *, const void *))(domain, &affine);
  if (status) return status;
  return ORT(ADD_CUSTOM_OP_DOMAIN, Status (*)(void *, void *))(options, domain);
}
"""


class _RecordingOptions:
    """Stands in for ort.SessionOptions: records what would be loaded."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def register_custom_ops_library(self, path: str) -> None:
        self.loaded.append(path)


@pytest.fixture
def own_build(tmp_path: Path, monkeypatch) -> Path:
    """graphopt's build folder, redirected into tmp so tests never touch the real one."""
    folder = (tmp_path / "pkg" / "_build").resolve()
    folder.mkdir(parents=True)
    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: folder)
    return folder


def _compile(folder: Path, name: str, source: str) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a minimal custom-op library")
    source_file = folder / f"{name}.c"
    source_file.write_text(source)
    library = folder / f"lib{name}.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, source_file], check=True)
    return library


@pytest.fixture(scope="module")
def real_library(tmp_path_factory) -> Path:
    return _compile(tmp_path_factory.mktemp("lib"), "empty_ops", _EMPTY_LIBRARY)


@pytest.fixture(scope="module")
def affine_library(tmp_path_factory) -> Path:
    return _compile(tmp_path_factory.mktemp("lib"), "affine_ops", _AFFINE_LIBRARY)


def test_default_build_dir_is_inside_the_kernels_package() -> None:
    import graphopt.kernels

    folder = ort_custom_ops.build_dir()
    assert folder.name == "_build"
    assert folder.parent == Path(graphopt.kernels.__file__).resolve().parent


def test_nothing_built_means_no_library(own_build: Path) -> None:
    assert resolve_custom_op_library(None) is None
    options = _RecordingOptions()
    assert register_custom_ops(options, None) is None
    assert options.loaded == []


def test_own_build_is_used(own_build: Path) -> None:
    (own_build / LIBRARY_NAME).write_bytes(b"\x7fELF")
    assert resolve_custom_op_library(None) == own_build / LIBRARY_NAME
    options = _RecordingOptions()
    assert register_custom_ops(options) == own_build / LIBRARY_NAME
    assert options.loaded == [str(own_build / LIBRARY_NAME)]


def test_own_build_symlink_escaping_the_folder_is_refused(own_build: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "evil.so"
    elsewhere.write_bytes(b"\x7fELF")
    (own_build / LIBRARY_NAME).symlink_to(elsewhere)
    assert resolve_custom_op_library(None) is None
    options = _RecordingOptions()
    assert register_custom_ops(options) is None and options.loaded == []


def test_current_directory_is_never_searched(own_build: Path, tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in (LIBRARY_NAME, "custom_op_library.so", "libcustom_ops.so"):
        (cwd / name).write_bytes(b"\x7fELF")
    monkeypatch.chdir(cwd)
    assert resolve_custom_op_library(None) is None


def test_environment_variables_are_not_a_source(own_build: Path, tmp_path: Path, monkeypatch):
    library = tmp_path / LIBRARY_NAME
    library.write_bytes(b"\x7fELF")
    for variable in ("GRAPHOPT_KERNELS_DIR", "GRAPHOPT_CUSTOM_OPS", "LD_LIBRARY_PATH"):
        monkeypatch.setenv(variable, str(tmp_path))
    assert resolve_custom_op_library(None) is None


def test_explicit_path_is_resolved(tmp_path: Path, monkeypatch) -> None:
    library = tmp_path / "libmine.so"
    library.write_bytes(b"\x7fELF")
    link = tmp_path / "link.so"
    link.symlink_to(library)
    assert resolve_custom_op_library(str(library)) == library.resolve()
    assert resolve_custom_op_library(link) == library.resolve()
    monkeypatch.chdir(tmp_path)  # a relative path is fine when the user typed it
    assert resolve_custom_op_library("libmine.so") == library.resolve()


@pytest.mark.parametrize("case", ["missing", "folder", "suffix", "link-to-text", "loop", "empty"])
def test_bad_explicit_paths_are_user_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "lib.so"
    if case == "folder":
        path.mkdir()
    elif case == "suffix":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"\x7fELF")
    elif case == "link-to-text":
        target = tmp_path / "notes.txt"
        target.write_text("x")
        path.symlink_to(target)
    elif case == "loop":
        path.symlink_to(tmp_path / "other.so")
        (tmp_path / "other.so").symlink_to(path)
    elif case == "empty":
        path = ""
    options = _RecordingOptions()
    with pytest.raises(UserInputError) as info:
        register_custom_ops(options, path)
    assert "\n" not in str(info.value)
    assert options.loaded == []


def test_model_metadata_naming_a_library_is_ignored(own_build: Path, tmp_path: Path) -> None:
    """The policy has no model argument at all; a model asking for a library gets nothing."""
    import inspect

    from onnx import TensorProto, helper

    from graphopt.sessions import make_session
    from graphopt_tests.helpers import make_model, tensor_info

    evil = tmp_path / "libevil.so"
    evil.write_bytes(b"\x7fELF")
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor_info("x", TensorProto.FLOAT, [2])],
        [tensor_info("y", TensorProto.FLOAT, [2])],
    )
    model.metadata_props["custom_op_library"] = str(evil)
    model.metadata_props["ort_custom_ops"] = str(evil)
    assert list(inspect.signature(resolve_custom_op_library).parameters) == ["path"]
    make_session(model)  # runs without loading anything (the file is not a valid library)
    assert resolve_custom_op_library(None) is None


def test_real_library_registers_with_onnxruntime(real_library: Path) -> None:
    options = ort.SessionOptions()
    assert register_custom_ops(options, real_library) == real_library.resolve()


def test_a_shared_object_that_is_not_a_custom_op_library_is_a_user_error(
    real_library: Path, tmp_path: Path
) -> None:
    not_ops = tmp_path / "libnot_ops.so"
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = tmp_path / "f.c"
    source.write_text("int f(void) { return 1; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", not_ops, source], check=True)
    with pytest.raises(UserInputError, match="cannot register"):
        register_custom_ops(ort.SessionOptions(), not_ops)
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(UserInputError, match="cannot register"):
        register_custom_ops(ort.SessionOptions(), garbage)


# ---- --custom-ops: every ORT session graphopt creates registers the user's libraries ------


def _affine_model(folder: Path) -> Path:
    """y = graphopt.test::AffineTest(Identity(x)), x: [batch, 3]: the Identity is removed."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["i"]),
            helper.make_node("AffineTest", ["i"], ["y"], domain="graphopt.test"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("graphopt.test", 1)],
        ir_version=8,
    )
    path = folder / "custom.onnx"
    onnx.save_model(proto, path)
    return path


def test_custom_op_model_is_verified_with_custom_ops(
    affine_library: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    source, target = _affine_model(tmp_path), tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-o", str(target), "--custom-ops", str(affine_library)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "verification passed" in captured.out and captured.err == ""
    written = io.load(target).model
    assert [n.op_type for n in written.graph] == ["AffineTest"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with using_custom_ops([affine_library]):
        (y,) = run_model(written, {"x": x})
    np.testing.assert_array_equal(y, 2 * x + 1)


def test_custom_op_model_without_the_library_is_written_but_exit_4(tmp_path: Path, capsys) -> None:
    source, target = _affine_model(tmp_path), tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-o", str(target)])
    err = capsys.readouterr().err
    assert code == 4
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: written but not verified:")
    assert "graphopt.test" in err and "--custom-ops LIB.so" in err
    assert target.is_file()


def test_api_custom_ops_apply_to_the_run_only(affine_library: Path, tmp_path: Path) -> None:
    import graphopt
    from graphopt.api import OptimizeOptions

    source = _affine_model(tmp_path)
    result = graphopt.optimize(source, options=OptimizeOptions(custom_ops=[affine_library]))
    assert result.report.verified and result.report.verification.ok
    assert active_custom_ops() == ()  # the run's libraries do not outlive it
    without = graphopt.optimize(source)
    assert without.report.verified is False
    assert "--custom-ops" in without.report.verification_skipped


def test_every_session_registers_the_active_libraries(affine_library: Path, tmp_path: Path):
    model = io.load(_affine_model(tmp_path)).model
    feeds = {"x": np.ones((1, 3), np.float32)}
    with pytest.raises(Exception, match="AffineTest"):
        make_session(model)
    with using_custom_ops([affine_library, affine_library]) as libraries:
        assert libraries == (affine_library.resolve(),)  # registered once
        # Verification's sessions, and the ORT-optimized ones pruning measures with.
        assert make_session(model) is not None
        assert make_session(model, optimize=True) is not None
        np.testing.assert_array_equal(run_model(model, feeds)[0], np.full((1, 3), 3.0))
    with pytest.raises(Exception, match="AffineTest"):
        run_model(model, feeds)


@pytest.mark.parametrize("case", ["not-a-library", "missing"])
def test_bad_custom_ops_library_is_exit_2_and_writes_nothing(
    tmp_path: Path, capsys, case: str
) -> None:
    library = tmp_path / "libbad.so"
    if case == "not-a-library":
        library.write_bytes(os.urandom(64))
    code = main(["optimize", str(_affine_model(tmp_path)), "--custom-ops", str(library)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("cannot register" if case == "not-a-library" else "not found") in err
    assert not (tmp_path / "custom.opt.onnx").exists()
