"""Custom-op library policy: only graphopt's own build or a path the user names explicitly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

from graphopt.backends import ort_custom_ops
from graphopt.backends.ort_custom_ops import (
    LIBRARY_NAME,
    register_custom_ops,
    resolve_custom_op_library,
)
from graphopt.errors import UserInputError

# The smallest valid custom-op library: ORT dlopens it, calls RegisterCustomOps, and a NULL
# OrtStatus* means success. No ORT headers needed.
_EMPTY_LIBRARY = "void *RegisterCustomOps(void *options, const void *api) { return 0; }\n"


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


@pytest.fixture(scope="module")
def real_library(tmp_path_factory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a minimal custom-op library")
    folder = tmp_path_factory.mktemp("lib")
    source = folder / "empty.c"
    source.write_text(_EMPTY_LIBRARY)
    library = folder / "libempty_ops.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, source], check=True)
    return library


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

    from graphopt.verify import make_session
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
