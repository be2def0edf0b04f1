"""A corrupted packed weight or a bad attribute is an ORT error naming the problem, never an
out-of-bounds read: the binding checks every index array and size before a kernel runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import graphopt.backends.ort_custom_ops
import graphopt.kernels
from graphopt.kernels.packing import pack_24, pack_bsr, pack_bsr_s8
from graphopt_tests.kernels import ort_models as om

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", autouse=True)
def library() -> Path:
    path = graphopt.kernels.library_path()
    if path is None:
        pytest.skip(graphopt.kernels.unavailable_reason())
    return path


RNG = np.random.default_rng(0)
W = (RNG.standard_normal((10, 9)) * (RNG.random((10, 9)) < 0.6)).astype(np.float32)
W[:, 0] = 1.0  # every block row holds a block
A = RNG.standard_normal((3, 10)).astype(np.float32)
P = pack_bsr(W, 2, 4)  # 5 block rows, 3 block columns


def _fails(model: bytes, a: np.ndarray, *needles: str) -> None:
    with pytest.raises(Exception) as error:  # ORT raises its own types
        om.run(model, a)
    message = str(error.value)
    for needle in needles:
        assert needle in message, message


def test_the_valid_weight_runs() -> None:
    np.testing.assert_allclose(om.run(om.sparse_matmul(A, P, None, ""), A), A @ W, atol=1e-5)


@pytest.mark.parametrize(
    ("col_idx", "needles"),
    [
        (lambda c: np.where(np.arange(c.size) == c.size - 1, 3, c), ["col_idx[", "outside [0, 3)"]),
        (lambda c: np.where(np.arange(c.size) == 0, -1, c), ["col_idx[0]=-1"]),
        (lambda c: np.where(np.arange(c.size) == 0, 1 << 30, c), ["outside"]),
        (lambda c: c[::-1].copy(), ["must increase"]),
        (lambda c: c[:-1].copy(), ["col_idx", "expected"]),
    ],
)
def test_bad_col_idx_is_refused(col_idx, needles) -> None:
    bad = col_idx(P.col_idx).astype(np.int32)
    _fails(om.sparse_matmul(A, P, None, "", col_idx=bad), A, "SparseMatMul", *needles)


@pytest.mark.parametrize(
    ("row_ptr", "needles"),
    [
        (lambda r: r + 1, ["row_ptr must start at 0"]),
        (lambda r: np.concatenate([r[:-1], [r[-1] + 5]]), ["end at nnzb"]),
        (lambda r: np.concatenate([[0, r[-1]], r[2:-1], [r[-1]]]), ["decreases"]),
        (lambda r: r[:-1].copy(), ["row_ptr", "expected [6]"]),
    ],
)
def test_bad_row_ptr_is_refused(row_ptr, needles) -> None:
    bad = row_ptr(P.row_ptr).astype(np.int32)
    _fails(om.sparse_matmul(A, P, None, "", row_ptr=bad), A, "SparseMatMul", *needles)


def test_bad_sizes_are_refused() -> None:
    _fails(om.sparse_matmul(A, P, None, "", values=P.values[:, :1]), A, "'values'", "[nnzb,2,4]")
    big = np.zeros((P.nnzb + 100, 2, 4), np.float32)
    _fails(om.sparse_matmul(A, P, None, "", values=big), A, "exceeds")
    _fails(om.sparse_matmul(A, P, np.ones(4, np.float32), ""), A, "'bias'", "expected [9]")
    short = np.ones((3, 7), np.float32)
    _fails(om.sparse_matmul(short, P, None, ""), short, "'A'", "K=10")
    _fails(om.sparse_matmul(A, P, None, "", N=11), A, "row_ptr", "expected [7]")


def test_wrong_element_types_are_refused_by_the_op_schema() -> None:
    _fails(om.sparse_matmul(A, P, None, "", col_idx=P.col_idx.astype(np.int64)), A, "col_idx")
    _fails(om.sparse_matmul(A, P, None, "", values=P.values.astype(np.float16)), A, "values")


def test_bad_attributes_are_refused_when_the_session_is_made() -> None:
    _fails(om.sparse_matmul(A, P, None, "tanh"), A, "activation")
    _fails(om.sparse_matmul(A, P, None, "", block_r=0), A, "block_r")
    _fails(om.sparse_matmul(A, P, None, "", K=-1), A, "K and N")


def test_two_four_bad_indices_and_shapes() -> None:
    w = np.zeros((8, 3), np.float32)
    w[[0, 5], :] = 1.0
    packed = pack_24(w)
    a = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(om.run(om.sparse_matmul_24(a, packed, None, ""), a), a @ w)
    swapped = packed.indices.copy()
    swapped[1, 0] = (swapped[1, 0] & 0xF0) | 0b0010  # p0=2 > p1=0
    _fails(om.sparse_matmul_24(a, packed, None, "", indices=swapped), a, "p0 < p1", "row 1")
    _fails(om.sparse_matmul_24(a, packed, None, "", indices=packed.indices[:2]), a, "'indices'")
    _fails(om.sparse_matmul_24(a, packed, None, "", values=packed.values[:, :3]), a, "'values'")
    a6 = np.ones((2, 6), np.float32)
    _fails(om.sparse_matmul_24(a6, packed, None, "", K=6), a6, "multiple of 4")


def test_qmatmul_bad_inputs() -> None:
    w = RNG.integers(-127, 128, (12, 5)).astype(np.int8)
    packed = pack_bsr_s8(w, 0.05, 1, 4)
    a = RNG.integers(0, 256, (2, 12)).astype(np.uint8)
    good = om.sparse_qmatmul(a, 0.1, 3, packed, None, "")
    want = 0.1 * 0.05 * ((a.astype(np.int64) - 3) @ w.astype(np.int64))
    np.testing.assert_allclose(om.run(good, a), want, rtol=1e-5, atol=1e-4)
    bad_col = packed.col_idx.copy()
    bad_col[-1] = 7
    _fails(om.sparse_qmatmul(a, 0.1, 3, packed, None, "", col_idx=bad_col), a, "SparseQMatMul")
    _fails(
        om.sparse_qmatmul(a, 0.1, 3, packed, None, "", w_rowsum=packed.w_rowsum[:4]),
        a,
        "'w_rowsum'",
    )
    _fails(
        om.sparse_qmatmul(a, 0.1, 3, packed, None, "", w_scale=np.ones(3, np.float32)),
        a,
        "'w_scale'",
    )
    _fails(
        om.sparse_qmatmul(a, 0.1, 3, packed, None, "", a_scale=np.ones(2, np.float32)),
        a,
        "'a_scale'",
    )
    p2 = pack_bsr_s8(w, 0.05, 1, 4)
    _fails(om.sparse_qmatmul(a, 0.1, 3, p2, None, "", block_c=2), a, "multiple of 4")


def test_weights_computed_at_run_time_are_checked_on_every_run() -> None:
    # Constant packed weights are index-checked once (on the first run); a weight that is a
    # graph input may change between runs, so a good first run must not vouch for a bad second.
    import onnx

    proto = onnx.load_from_string(om.sparse_matmul(A, P, None, ""))
    graph = proto.graph
    col = next(t for t in graph.initializer if t.name == "col_idx")
    graph.initializer.remove(col)
    graph.input.append(onnx.helper.make_tensor_value_info("col_idx", onnx.TensorProto.INT32, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    graphopt.backends.ort_custom_ops.register_custom_ops(options)
    session = ort.InferenceSession(proto.SerializeToString(), options)
    good = session.run(None, {"A": A, "col_idx": P.col_idx})[0]
    np.testing.assert_allclose(good, A @ W, atol=1e-5)
    bad = P.col_idx.copy()
    bad[-1] = 1 << 30
    with pytest.raises(Exception, match="outside"):
        session.run(None, {"A": A, "col_idx": bad})


def test_a_constant_weight_checked_once_still_gives_the_same_result_on_later_runs() -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    graphopt.backends.ort_custom_ops.register_custom_ops(options)
    session = ort.InferenceSession(om.sparse_matmul(A, P, None, ""), options)
    first, second = (session.run(None, {"A": A})[0] for _ in range(2))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, A @ W, atol=1e-5)
