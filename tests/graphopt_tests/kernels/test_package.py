"""graphopt.kernels' Python surface: availability, its reason printed once, and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

import graphopt.kernels
from graphopt.backends import ort_custom_ops
from graphopt.errors import UserInputError
from graphopt.kernels import __main__ as cli
from graphopt.kernels import build


@pytest.fixture
def no_library(tmp_path: Path, monkeypatch) -> Path:
    """graphopt's build folder redirected to an empty, writable tmp folder."""
    folder = tmp_path / "_build"
    monkeypatch.setattr(ort_custom_ops, "build_dir", lambda: folder)
    monkeypatch.setattr(graphopt.kernels, "_reported", False)
    return folder


def test_absent_library_is_unavailable_with_a_reason_printed_once(no_library, capsys) -> None:
    assert graphopt.kernels.library_path() is None
    reason = graphopt.kernels.unavailable_reason()
    assert "not built" in reason and "dense ops are used" in reason
    assert "\n" not in reason
    assert graphopt.kernels.available() is False
    assert graphopt.kernels.available() is False
    err = capsys.readouterr().err
    assert err.count("sparse kernels are not built") == 1


def test_missing_compiler_is_the_reason(no_library, monkeypatch) -> None:
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    reason = graphopt.kernels.unavailable_reason()
    assert "C++17 compiler" in reason and "cmake" in reason


def test_build_without_tools_exits_2_with_one_line(no_library, monkeypatch, capsys) -> None:
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(build, "cached_headers", lambda: None)
    assert cli.main(["build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphopt.kernels: cannot build") and "\n" not in err


def test_present_library_is_available(no_library, capsys) -> None:
    no_library.mkdir()
    (no_library / ort_custom_ops.LIBRARY_NAME).write_bytes(b"\x7fELF")
    assert graphopt.kernels.available() is True
    assert graphopt.kernels.unavailable_reason() == ""
    assert capsys.readouterr().err == ""


def test_info_without_library(no_library, capsys) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "library: not built" in out and "isa (from /proc/cpuinfo):" in out


def test_info_with_the_real_build(capsys) -> None:
    if graphopt.kernels.library_path() is None:
        pytest.skip(graphopt.kernels.unavailable_reason())
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "detected isa:" in out and "selected isa:" in out


def test_isa_rule_from_cpu_flags(monkeypatch) -> None:
    every = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    assert cli._tier_from_flags(set()) == "scalar"
    assert cli._tier_from_flags({"avx", "avx2", "fma"}) == "scalar"  # no f16c
    assert cli._tier_from_flags(every - {"avx512vl"}) == "avx2"
    assert cli._tier_from_flags(every) == "avx512"
    assert cli._tier_from_flags(every | {"avx512_vnni"}) == "avx512vnni"
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", "avx2")
    assert cli._capped("avx512vnni") == "avx2"
    assert cli._capped("scalar") == "scalar"  # a cap, never a raise


@pytest.mark.parametrize("cap", ["bogus", "AVX2"])
def test_unknown_isa_cap_is_an_error_in_info(monkeypatch, capsys, cap: str) -> None:
    """As the library refuses it: a misspelt cap must not leave the tier in use silently."""
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", cap)
    with pytest.raises(UserInputError, match="names no tier"):
        cli._capped("avx512")
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert f"GRAPHOPT_KERNELS_ISA={cap!r} names no tier" in err and err.count("\n") == 1


def test_cached_headers_are_reused_without_apt(tmp_path: Path, monkeypatch) -> None:
    include = tmp_path / "ort-headers" / build.ORT_HEADERS_VERSION / "include" / "onnxruntime"
    include.mkdir(parents=True)
    for name in ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h"):
        (include / name).write_text("// header\n")
    monkeypatch.setattr(build, "cache_root", lambda: tmp_path)

    def no_tools(*args, **kwargs):
        raise AssertionError("apt-get must not run when the headers are cached")

    monkeypatch.setattr(build, "_run", no_tools)
    messages: list[str] = []
    assert build.fetch_ort_headers(messages.append) == include
    assert messages == [f"ORT headers: {include} (cached)"]


def test_read_only_package_builds_into_the_user_folder(monkeypatch, tmp_path: Path) -> None:
    user = tmp_path / "cache" / "build-0123"
    monkeypatch.setattr(ort_custom_ops, "package_build_writable", lambda: False)
    monkeypatch.setattr(ort_custom_ops, "user_build_dir", lambda: user)
    assert build.library_build_dir() == user
    assert build.sanitize_build_dir() == user.with_name("build-0123_sanitize")
    monkeypatch.setattr(ort_custom_ops, "package_build_writable", lambda: True)
    assert build.library_build_dir() == ort_custom_ops.build_dir()
