"""A corrupted packed weight or a bad attribute is an ORT error naming the problem, never an
out-of-bounds read: the binding checks every index array and size before a kernel runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import graphopt.backends.ort_custom_ops
import graphopt.kernels
from graphopt.kernels.packing import S8_MAX_K, pack_24, pack_bsr, pack_bsr_s8
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


def _with_attribute(model: bytes, name: str, value, node_name: str = "") -> bytes:
    """``model`` with its node's attribute ``name`` replaced (removed when value is None)."""
    import onnx

    proto = onnx.load_from_string(model)
    node = proto.graph.node[0]
    node.name = node_name
    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)
    if value is not None:
        node.attribute.append(onnx.helper.make_attribute(name, value))
    return proto.SerializeToString()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (1, "must be a string"),  # once taken as "no activation"
        (["relu"], "must be a string"),
        (1.5, "must be a string"),
        (b"relu\0tanh", "NUL byte"),  # once read as "relu"
    ],
)
def test_activation_of_another_type_or_with_a_nul_is_refused(value, needle) -> None:
    model = _with_attribute(om.sparse_matmul(A, P, None, "relu"), "activation", value, "fc1")
    _fails(model, A, "SparseMatMul node 'fc1'", "'activation'", needle)


def test_absent_activation_is_none() -> None:
    model = _with_attribute(om.sparse_matmul(A, P, None, "relu"), "activation", None)
    np.testing.assert_allclose(om.run(model, A), A @ W, atol=1e-5)


@pytest.mark.parametrize("cap", ["bogus", "AVX2", "avx2 "])
def test_unknown_isa_cap_is_refused(monkeypatch, cap: str) -> None:
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", cap)
    _fails(om.sparse_matmul(A, P, None, ""), A, f'GRAPHOPT_KERNELS_ISA="{cap}"', "avx512vnni")


def test_empty_isa_cap_caps_nothing(monkeypatch) -> None:
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", "")
    np.testing.assert_allclose(om.run(om.sparse_matmul(A, P, None, ""), A), A @ W, atol=1e-5)


def test_another_version_of_the_domain_is_refused_by_graphopt() -> None:
    """ORT runs these version-1 kernels for any version a model imports (one schema per op,
    from its first version on), so graphopt's own sessions check the import."""
    import onnx

    from graphopt.errors import UserInputError

    proto = onnx.load_from_string(om.sparse_matmul(A, P, None, ""))
    ort_custom_ops = graphopt.backends.ort_custom_ops
    assert ort_custom_ops.own_domain_version(proto) == 1
    assert ort_custom_ops.register_active_custom_ops(ort.SessionOptions(), (), model=proto)
    next(o for o in proto.opset_import if o.domain == "graphopt").version = 2
    with pytest.raises(UserInputError, match=r"'graphopt' version 2.*version 1 only") as error:
        ort_custom_ops.register_active_custom_ops(ort.SessionOptions(), (), model=proto)
    assert "\n" not in str(error.value)
    import onnx_ir as ir

    assert ort_custom_ops.own_domain_version(ir.serde.deserialize_model(proto)) == 2


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


def test_qmatmul_k_whose_int32_sum_could_overflow_is_refused() -> None:
    """Past S8_MAX_K a sum of K products 255 * 128 may not fit the int32 accumulator every tier
    uses (K = 70000 of 255 * 127 gave -2.03e9 for 2.27e9): refused when the session is made,
    naming the node and the limit."""
    w = RNG.integers(-127, 128, (12, 5)).astype(np.int8)
    a = RNG.integers(0, 256, (2, 12)).astype(np.uint8)
    model = om.sparse_qmatmul(a, 0.1, 3, pack_bsr_s8(w, 0.05, 1, 4), None, "", K=S8_MAX_K + 1)
    model = _with_attribute(model, "K", S8_MAX_K + 1, "ffn.up")
    _fails(model, a, "SparseQMatMul node 'ffn.up'", f"K={S8_MAX_K + 1} exceeds {S8_MAX_K}")


@pytest.mark.parametrize("weight", [127, -128])
def test_qmatmul_at_the_largest_k_is_exact(weight: int) -> None:
    K, N = S8_MAX_K, 8
    w = np.full((K, N), weight, np.int8)
    a = np.full((3, K), 255, np.uint8)
    y = om.run(om.sparse_qmatmul(a, 1.0, 0, pack_bsr_s8(w, 1.0, 1, 4), None, ""), a)
    np.testing.assert_array_equal(y, np.full((3, N), np.float32(255 * weight * K)))


def test_qmatmul_w_rowsum_outside_its_range_is_refused() -> None:
    w = RNG.integers(-127, 128, (8, 4)).astype(np.int8)
    packed = pack_bsr_s8(w, 1.0, 1, 4)
    a = np.full((1, 8), 1, np.uint8)
    for bad in (127 * 8 + 1, -128 * 8 - 1, np.iinfo(np.int32).max):
        rowsum = packed.w_rowsum.copy()
        rowsum[2] = bad
        model = om.sparse_qmatmul(a, 1.0, 255, packed, None, "", w_rowsum=rowsum)
        _fails(model, a, f"w_rowsum[2]={bad} is outside [-1024, 1016]")
    edge = packed.w_rowsum.copy()
    edge[:] = [127 * 8, -128 * 8, 0, 1]  # inside the range: runs (wrong numbers, defined)
    om.run(om.sparse_qmatmul(a, 1.0, 255, packed, None, "", w_rowsum=edge), a)


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
