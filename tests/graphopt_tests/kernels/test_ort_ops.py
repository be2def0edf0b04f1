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

import graphopt.backends.ort_custom_ops
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


def _s8_session(model: bytes, threads: int):
    """A session of ``model`` whose input A may take any shape (the helper fixes A's)."""
    import onnx

    proto = onnx.load_from_string(model)
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    model = proto.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    assert graphopt.backends.ort_custom_ops.register_custom_ops(options) is not None
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_qmatmul_m1_row_lanes_on_repeated_runs(threads: int) -> None:
    """M = 1 with 1x4 blocks and constant weights: the kernel derives its row-lane layout on
    the first M = 1 run and uses it from then on (AVX-512 VNNI). Random sizes around its
    groups of 16 outputs and K panels (up to 3 panels of 256 dwords, K past the old register
    table), sparsity from dense to all-zero, one row with every block; each session runs
    M = 1, M = 3 (the BSR path), M = 1 again and a 1-D A, all against numpy."""
    rng = np.random.default_rng(41 + threads)
    for case in range(24):
        K = int(rng.choice([1, 5, 127, 129, 513, 1030, 2100, 3072]))
        N = int(rng.choice([1, 15, 17, 33, 100, 131]))
        sparsity = float(rng.choice([0.0, 0.5, 0.8, 0.95, 1.0]))
        w = (block_sparse(rng, K, N, 1, 4, sparsity) * 50).round().clip(-127, 127)
        w = w.astype(np.int8)
        if case % 3 == 0:
            n = int(rng.integers(0, N))
            w[:, n] = np.where(w[:, n] == 0, 1, w[:, n])  # a row with every block
        w_scale = rng.uniform(0.001, 0.02, N if case % 2 else 1).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32) if case % 4 else None
        act = ACTS[case % len(ACTS)]
        a_scale, a_zero = float(rng.uniform(0.005, 0.05)), int(rng.integers(0, 256))
        packed = pack_bsr_s8(w, w_scale, 1, 4)
        a1 = rng.integers(0, 256, (1, K)).astype(np.uint8)
        session = _s8_session(om.sparse_qmatmul(a1, a_scale, a_zero, packed, bias, act), threads)
        for a in (a1, rng.integers(0, 256, (3, K)).astype(np.uint8), a1, a1[0]):
            y = session.run(None, {"A": a})[0]
            want = _s8_reference(a, a_scale, a_zero, w, w_scale, bias, act)
            scale = max(1.0, float(np.abs(want).max(initial=0.0)))
            np.testing.assert_allclose(
                y, want, rtol=1e-5, atol=1e-5 * scale, err_msg=f"case {case} M={a.shape}"
            )


def test_sparse_qmatmul_m1_weight_computed_at_run_time() -> None:
    """A weight that is a graph input is no constant: the M = 1 row-lane layout must not be
    derived from it (a layout kept from the first run would answer for the old weight)."""
    import onnx

    rng = np.random.default_rng(77)
    K, N = 300, 37
    w1 = (block_sparse(rng, K, N, 1, 4, 0.7) * 50).round().clip(-127, 127).astype(np.int8)
    w2 = w1.copy()
    w2[w2 != 0] = -w2[w2 != 0]  # same blocks, other values (so col_idx/row_ptr stay valid)
    p1, p2 = pack_bsr_s8(w1, 0.01, 1, 4), pack_bsr_s8(w2, 0.01, 1, 4)
    np.testing.assert_array_equal(p1.col_idx, p2.col_idx)
    a = rng.integers(0, 256, (1, K)).astype(np.uint8)
    proto = onnx.load_from_string(om.sparse_qmatmul(a, 0.02, 9, p1, None, "relu"))
    graph = proto.graph
    for name, kind in (("values", onnx.TensorProto.INT8), ("w_rowsum", onnx.TensorProto.INT32)):
        graph.initializer.remove(next(t for t in graph.initializer if t.name == name))
        graph.input.append(onnx.helper.make_tensor_value_info(name, kind, None))
    session = _s8_session(proto.SerializeToString(), 1)
    # The same buffers each run, rewritten in between: ORT reads numpy inputs in place, so the
    # weight's addresses stay the same and only its constness tells the kernel apart.
    values, rowsum = p1.values.copy(), p1.w_rowsum.copy()
    for p, w in ((p1, w1), (p2, w2), (p1, w1)):
        values[...], rowsum[...] = p.values, p.w_rowsum
        y = session.run(None, {"A": a, "values": values, "w_rowsum": rowsum})[0]
        want = _s8_reference(a, 0.02, 9, w, np.float32([0.01]), None, "relu")
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


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


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512vnni"])
@pytest.mark.parametrize("M", [3, 9, 64])
def test_k_zero_gives_the_epilogue_of_the_bias(monkeypatch, isa: str, M: int) -> None:
    """K = 0 on every tier (a cap above the CPU's is no cap) and on both the row path (M < 8)
    and the M-vectorized one, which once left Y unwritten (the allocator's bytes)."""
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", isa)  # read when the session creates a kernel
    bias = np.arange(37, dtype=np.float32) - 2
    a, w = np.zeros((M, 0), np.float32), np.zeros((0, 37), np.float32)
    want = np.broadcast_to(np.maximum(bias, 0), (M, 37))
    for block in [(4, 1), (1, 4), (1, 1)]:
        y = om.run(om.sparse_matmul(a, pack_bsr(w, *block), bias, "relu"), a)
        np.testing.assert_array_equal(y, want, err_msg=f"block {block}")
        y = om.run(om.sparse_matmul(a, pack_bsr(w, *block), None, ""), a)
        np.testing.assert_array_equal(y, np.zeros((M, 37), np.float32), err_msg=f"block {block}")
    np.testing.assert_array_equal(om.run(om.sparse_matmul_24(a, pack_24(w), bias, "relu"), a), want)
    q = np.zeros((M, 0), np.uint8)
    packed = pack_bsr_s8(w.astype(np.int8), 0.1, 1, 4)
    y = om.run(om.sparse_qmatmul(q, 0.1, 3, packed, bias, ""), q)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (M, 37)))


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
q1 = q[:1]  # M = 1, 1x4 blocks: the row-lane layout is for AVX-512 VNNI only
for _ in range(2):
    y = om.run(om.sparse_qmatmul(q1, 0.01, 7, pack_bsr_s8(w8, 0.02, 1, 4), None, ""), q1)
    want = 0.01 * 0.02 * ((q1.astype(np.int64) - 7) @ w8.astype(np.int64))
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
