"""The three custom ops through ONNX Runtime, against numpy on random shapes and sparsities.

Needs the built library (``python -m graphopt.kernels build``; scripts/test builds it first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphopt.kernels
from graphopt.kernels.packing import pack_24, pack_bsr, pack_bsr_s8
from graphopt_tests.kernels import ort_models as om
from graphopt_tests.kernels.test_packing import BLOCKS, block_sparse, two_four

ort = pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[3]
ACTS = ["", "none", "relu", "gelu"]
CASES_PER_OP = 100  # x 3 ops: 300 random ORT sessions, ~2 s in all


@pytest.fixture(scope="module", autouse=True)
def library() -> Path:
    path = graphopt.kernels.library_path()
    if path is None:
        pytest.skip(graphopt.kernels.unavailable_reason())
    return path


def _activation_shape(rng: np.random.Generator, K: int) -> tuple[int, ...]:
    """A's shape: [M, K] with M = 0, 1 or more, a 1-D [K], or leading batch dims."""
    kind = rng.integers(0, 5)
    if kind == 0:
        return (int(rng.choice([0, 1])), K)
    if kind == 1:
        return (K,)
    if kind == 2:
        return (int(rng.integers(1, 4)), int(rng.integers(0, 4)), K)
    return (int(rng.integers(2, 20)), K)


def _case(rng: np.random.Generator, k_multiple: int = 1):
    K = int(rng.integers(1, 48))
    K = -(-K // k_multiple) * k_multiple
    N = int(rng.integers(1, 40))
    shape = _activation_shape(rng, K)
    bias = rng.standard_normal(N).astype(np.float32) if rng.random() < 0.5 else None
    act = str(rng.choice(ACTS))
    threads = int(rng.choice([1, 2]))
    return K, N, shape, bias, act, threads


def _expected(y: np.ndarray, bias: np.ndarray | None, act: str) -> np.ndarray:
    if bias is not None:
        y = y + bias
    return om.activate(y, act)


def test_sparse_matmul_matches_numpy() -> None:
    rng = np.random.default_rng(15)
    for case in range(CASES_PER_OP):
        K, N, shape, bias, act, threads = _case(rng)
        R, C = BLOCKS[case % len(BLOCKS)]
        w = block_sparse(rng, K, N, R, C, float(rng.choice([0.0, 0.5, 0.8, 0.95, 1.0])))
        a = rng.standard_normal(shape).astype(np.float32)
        y = om.run(om.sparse_matmul(a, pack_bsr(w, R, C), bias, act), a, threads)
        want = _expected(a.astype(np.float64) @ w.astype(np.float64), bias, act)
        assert y.shape == (*shape[:-1], N), (case, shape, y.shape)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4, err_msg=f"case {case}")


def test_sparse_matmul_24_matches_numpy() -> None:
    rng = np.random.default_rng(24)
    for case in range(CASES_PER_OP):
        K, N, shape, bias, act, threads = _case(rng, k_multiple=4)
        w = two_four(rng, K, N)
        a = rng.standard_normal(shape).astype(np.float32)
        y = om.run(om.sparse_matmul_24(a, pack_24(w), bias, act), a, threads)
        want = _expected(a.astype(np.float64) @ w.astype(np.float64), bias, act)
        assert y.shape == (*shape[:-1], N)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4, err_msg=f"case {case}")


def _s8_reference(a, a_scale, a_zero, w, w_scale, bias, act):
    acc = (a.astype(np.int64) - a_zero) @ w.astype(np.int64)
    y = np.float64(np.float32(a_scale)) * w_scale.astype(np.float64) * acc
    return _expected(y, bias, act)


def test_sparse_qmatmul_matches_numpy() -> None:
    rng = np.random.default_rng(8)
    blocks = [(1, 4), (4, 4), (2, 8), (16, 4), (8, 4)]
    for case in range(CASES_PER_OP):
        K, N, shape, bias, act, threads = _case(rng)
        R, C = blocks[case % len(blocks)]
        p = float(rng.choice([0.0, 0.5, 0.9, 1.0]))
        w = (block_sparse(rng, K, N, R, C, p) * 50).round().clip(-127, 127).astype(np.int8)
        w_scale = rng.uniform(0.001, 0.02, N if rng.random() < 0.5 else 1).astype(np.float32)
        a = rng.integers(0, 256, shape).astype(np.uint8)
        a_scale, a_zero = float(rng.uniform(0.005, 0.05)), int(rng.integers(0, 256))
        packed = pack_bsr_s8(w, w_scale, R, C)
        y = om.run(om.sparse_qmatmul(a, a_scale, a_zero, packed, bias, act), a, threads)
        want = _s8_reference(a, a_scale, a_zero, w, w_scale, bias, act)
        assert y.shape == (*shape[:-1], N)
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * scale, err_msg=f"case {case}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("M", "K", "block"),
    [(70, 1100, (1, 4)), (130, 2060, (1, 4)), (1, 1100, (1, 4)), (70, 1100, (2, 4))],
)
def test_sparse_qmatmul_long_k_and_many_rows(threads: int, M: int, K: int, block) -> None:
    """Shapes the random sweep is too small for: K split into several L1 panels (1x4 tile
    path, more than 512 k), 64-row tiles plus a partial one, and M = 1 past the register
    table (K > 1024)."""
    rng = np.random.default_rng(K + M)
    N = 75
    w = (block_sparse(rng, K, N, *block, 0.8) * 50).round().clip(-127, 127).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.02, N).astype(np.float32)
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    bias = rng.standard_normal(N).astype(np.float32)
    packed = pack_bsr_s8(w, w_scale, *block)
    y = om.run(om.sparse_qmatmul(a, 0.02, 131, packed, bias, "gelu"), a, threads)
    want = _s8_reference(a, 0.02, 131, w, w_scale, bias, "gelu")
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("threads", [1, 2])
def test_larger_problem_same_result_for_one_and_two_threads(threads: int) -> None:
    """Enough rows and outputs that the kernels split the work over the pool."""
    rng = np.random.default_rng(1)
    w = block_sparse(rng, 96, 80, 4, 1, 0.6)
    a = rng.standard_normal((64, 96)).astype(np.float32)
    bias = rng.standard_normal(80).astype(np.float32)
    model = om.sparse_matmul(a, pack_bsr(w, 4, 1), bias, "gelu")
    y = om.run(model, a, threads)
    np.testing.assert_allclose(y, _expected(a @ w.astype(np.float64), bias, "gelu"), atol=1e-4)
    np.testing.assert_array_equal(y, om.run(model, a, 1))  # the split never changes a bit


def test_empty_bias_counts_as_none_and_m_zero_gives_empty_output() -> None:
    rng = np.random.default_rng(2)
    w = block_sparse(rng, 8, 5, 1, 4, 0.3)
    a = rng.standard_normal((3, 8)).astype(np.float32)
    y = om.run(om.sparse_matmul(a, pack_bsr(w, 1, 4), np.zeros(0, np.float32), ""), a)
    np.testing.assert_allclose(y, a @ w, atol=1e-5)
    empty = np.zeros((0, 8), np.float32)
    assert om.run(om.sparse_matmul(empty, pack_bsr(w, 1, 4), None, "relu"), empty).shape == (0, 5)


def test_k_zero_gives_the_epilogue_of_the_bias() -> None:
    bias = np.arange(5, dtype=np.float32) - 2
    a, w = np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32)
    want = np.broadcast_to(np.maximum(bias, 0), (3, 5))
    np.testing.assert_array_equal(
        om.run(om.sparse_matmul(a, pack_bsr(w, 4, 1), bias, "relu"), a), want
    )
    np.testing.assert_array_equal(om.run(om.sparse_matmul_24(a, pack_24(w), bias, "relu"), a), want)
    q = np.zeros((3, 0), np.uint8)
    packed = pack_bsr_s8(w.astype(np.int8), 0.1, 1, 4)
    y = om.run(om.sparse_qmatmul(q, 0.1, 3, packed, bias, ""), q)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (3, 5)))


_FORCED = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from graphopt.kernels.packing import pack_bsr, pack_24, pack_bsr_s8
from graphopt_tests.kernels import ort_models as om
from graphopt_tests.kernels.test_packing import block_sparse, two_four
rng = np.random.default_rng(5)
a = rng.standard_normal((9, 40)).astype(np.float32)
w = block_sparse(rng, 40, 24, 4, 4, 0.5)
np.testing.assert_allclose(om.run(om.sparse_matmul(a, pack_bsr(w, 4, 4), None, ""), a), a @ w,
                           rtol=1e-4, atol=1e-4)
w24 = two_four(rng, 40, 24)
np.testing.assert_allclose(om.run(om.sparse_matmul_24(a, pack_24(w24), None, ""), a), a @ w24,
                           rtol=1e-4, atol=1e-4)
q = rng.integers(0, 256, (9, 40)).astype(np.uint8)
w8 = rng.integers(-127, 128, (40, 24)).astype(np.int8)
y = om.run(om.sparse_qmatmul(q, 0.01, 7, pack_bsr_s8(w8, 0.02, 4, 4), None, ""), q)
want = 0.01 * 0.02 * ((q.astype(np.int64) - 7) @ w8.astype(np.int64))
np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
print("forced ok")
"""


def test_forced_scalar_fallback_in_a_subprocess(library: Path) -> None:
    env = {**os.environ, "GRAPHOPT_KERNELS_ISA": "scalar"}
    done = subprocess.run(
        [sys.executable, "-c", _FORCED, str(ROOT / "tests")],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "forced ok" in done.stdout
    # The same variable caps what the library's cpu_features selects.
    binary = library.parent / "graphopt_kernel_tests"
    if binary.is_file():
        info = subprocess.run([binary, "--info"], env=env, capture_output=True, text=True)
        assert "selected isa: scalar" in info.stdout
