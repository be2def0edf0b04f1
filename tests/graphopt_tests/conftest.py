"""Fixtures shared by the tests: the session's own timing cache (every test), TensorRT forced
absent, or required (skipped, saying why, without tensorrt_rtx)."""

from __future__ import annotations

import os

import pytest

from graphopt.backends.tensorrt.module import find_tensorrt
from graphopt_tests.helpers import import_or_skip


@pytest.fixture(scope="session", autouse=True)
def private_timing_cache(tmp_path_factory):
    """Timings the suite measures (sparse-kernel crossovers, --autotune, factorize's speed
    check; cached under $XDG_CACHE_HOME/graphopt) go to a folder of the test session: taken
    on a loaded machine, they would otherwise steer the user's later runs. The model cache
    ($GRAPHOPT_CACHE) stays shared. Subprocesses inherit the variable."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture
def no_tensorrt(monkeypatch):
    """graphopt sees no TensorRT module (the checks before any TensorRT call run alone)."""
    monkeypatch.setenv("GRAPHOPT_TENSORRT", "none")
    find_tensorrt.cache_clear()
    yield
    monkeypatch.delenv("GRAPHOPT_TENSORRT")
    find_tensorrt.cache_clear()


@pytest.fixture
def trt():
    """The TensorRT module graphopt finds (TensorRT-RTX here)."""
    import_or_skip("tensorrt_rtx", "pip install 'graphopt[tensorrt]' (TensorRT-RTX)")
    find_tensorrt.cache_clear()
    found = find_tensorrt().found
    if found is None and os.environ.get("GRAPHOPT_TENSORRT", "").lower() == "none":
        # The run asked for no TensorRT (the static table's path): a counted skip, not an
        # error, for the tests that need the real parser.
        pytest.skip("GRAPHOPT_TENSORRT=none: these tests need TensorRT's own parser")
    assert found is not None, find_tensorrt().why_not()
    yield found
    find_tensorrt.cache_clear()
