"""The one extra place graphopt's load policy trusts: the per-user build folder, and only for
an installation whose package folder is read-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graphopt.backends import ort_custom_ops
from graphopt.backends.ort_custom_ops import LIBRARY_NAME, resolve_custom_op_library

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the user build folder is POSIX-only")


@pytest.fixture
def read_only_install(tmp_path: Path, monkeypatch) -> Path:
    """An empty package build folder that cannot be written; the user cache under tmp."""
    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: tmp_path / "pkg" / "_build")
    monkeypatch.setattr(ort_custom_ops, "package_build_writable", lambda: False)
    cache = tmp_path / "home" / ".cache" / "graphopt" / "kernels" / "build-0123456789abcdef"
    monkeypatch.setattr(ort_custom_ops, "user_build_dir", lambda: cache)
    cache.mkdir(parents=True)
    for folder in [cache, *cache.parents[:2]]:
        folder.chmod(0o755)
    return cache


def test_user_build_is_used_for_a_read_only_install(read_only_install: Path) -> None:
    library = read_only_install / LIBRARY_NAME
    library.write_bytes(b"\x7fELF")
    library.chmod(0o644)
    assert resolve_custom_op_library(None) == library.resolve()


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_a_folder_or_file_others_can_write_is_refused(read_only_install: Path, which) -> None:
    library = read_only_install / LIBRARY_NAME
    library.write_bytes(b"\x7fELF")
    library.chmod(0o644)
    [library, read_only_install, *read_only_install.parents[:2]][which].chmod(0o777)
    assert resolve_custom_op_library(None) is None


def test_user_build_is_ignored_while_the_package_folder_is_writable(
    read_only_install: Path, monkeypatch
) -> None:
    (read_only_install / LIBRARY_NAME).write_bytes(b"\x7fELF")
    monkeypatch.setattr(ort_custom_ops, "package_build_writable", lambda: True)
    assert resolve_custom_op_library(None) is None


def test_user_build_link_leaving_the_folder_is_refused(
    read_only_install: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "evil.so"
    elsewhere.write_bytes(b"\x7fELF")
    (read_only_install / LIBRARY_NAME).symlink_to(elsewhere)
    assert resolve_custom_op_library(None) is None


def test_user_build_dir_is_keyed_by_the_kernel_sources() -> None:
    folder = ort_custom_ops.user_build_dir()
    assert folder is not None and folder.parent.name == "kernels"
    assert folder.name == f"build-{ort_custom_ops.kernel_source_digest()}"
    assert folder.parents[1].name == "graphopt" and folder.parents[2].name == ".cache"
