"""Fixtures shared by the backend and command tests: TensorRT forced absent, or required
(skipped, saying why, without tensorrt_rtx)."""

from __future__ import annotations

import pytest

from graphopt.backends.tensorrt.module import find_tensorrt
from graphopt_tests.helpers import import_or_skip


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
    assert found is not None, find_tensorrt().why_not()
    yield found
    find_tensorrt.cache_clear()
