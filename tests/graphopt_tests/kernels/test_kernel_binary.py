"""The standalone C++ test binary: every ISA tier against the reference, plain and sanitized.

The sanitized run (ASan + UBSan, -fno-sanitize-recover) is marked ``kernels_sanitize``; it
builds the binary in its own folder first (incremental: scripts/test has built it already).
"""

from __future__ import annotations

import subprocess

import pytest

import graphopt.kernels
from graphopt.kernels import build


def _run(binary, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)


def test_plain_binary_beside_the_library() -> None:
    library = graphopt.kernels.library_path()
    if library is None:
        pytest.skip(graphopt.kernels.unavailable_reason())
    binary = library.parent / build.TEST_BINARY
    assert binary.is_file(), f"{binary} is built with the library"
    done = _run(binary, "--cases", "60", "--seed", "7")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ", 0 failures" in done.stdout
    info = _run(binary, "--info")
    assert info.returncode == 0 and "detected isa:" in info.stdout


@pytest.mark.kernels_sanitize
def test_sanitized_binary() -> None:
    reason = build.unavailable_reason()
    if reason and build.missing_tools():
        pytest.skip(reason)
    binary = build.build_sanitized_tests(progress=lambda message: None)
    # Small sizes: ASan + UBSan at -O1 is ~10x slower than the plain build.
    done = _run(binary, "--cases", "40", "--max-dim", "40", "--seed", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ", 0 failures" in done.stdout
    assert "runtime error" not in done.stderr  # UBSan's report line
