"""NaN and +-Inf through the custom ops, on every tier, against ONNX Runtime's own dense ops.

The lowering replaces MatMul [+ Add] [+ Relu | Gelu] by one op and claims the same numbers, so
on non-finite inputs the op must answer as ORT's MatMul, Relu and Gelu do: NaN stays NaN through
Relu (ORT's Relu is max(x, 0) taking x when it is NaN), Gelu(-Inf) is NaN, Gelu(+Inf) is +Inf.

A's non-finite entries sit where every output stores its weight (W[k, :] all non-zero), so the
dense product and the sparse one multiply the same terms: first block column, a middle one and
the last, partial one (K = 37: past K the 1xC blocks read padding), in rows that end in every
tail of the vector loops (N = 21). That is where the AVX2 M < 8 loop once multiplied padding
slots (zero weights) by A quads of other columns, turning an Inf into NaN. Where no output
stores a weight of A's column (a dropped block, a position 2:4 did not keep) that entry adds
nothing, as a packed zero is never multiplied: ORT's answer for A with that column zeroed.

Needs the built library (``python -m graphopt.kernels build``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.backends.ort_custom_ops
import graphopt.kernels
from graphopt.kernels.packing import pack_24, pack_bsr, pack_bsr_s8
from graphopt_tests.kernels import ort_models as om
from graphopt_tests.kernels.test_packing import block_sparse, two_four

ort = pytest.importorskip("onnxruntime")

F32_TIERS = ["scalar", "avx2", "avx512"]  # a cap above the CPU's is no cap
ALL_TIERS = [*F32_TIERS, "avx512vnni"]
MS = [1, 2, 3, 4, 8, 17]  # the row path (M < 8), the M-vectorized one and a partial tile
ACTS = ["none", "relu", "gelu"]
BLOCKS = [(1, 4), (4, 1), (16, 1), (4, 4), (1, 1), (2, 2), (3, 2)]
NAN, INF = np.float32(np.nan), np.float32(np.inf)


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    if graphopt.kernels.library_path() is None:
        pytest.skip(graphopt.kernels.unavailable_reason())


def _session(model: bytes, custom: bool) -> ort.InferenceSession:
    """A session of ``model`` with its first input's shape cleared (any M)."""
    proto = onnx.load_from_string(model)
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if custom:
        assert graphopt.backends.ort_custom_ops.register_custom_ops(options) is not None
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _dense(w: np.ndarray, bias: np.ndarray | None, act: str) -> ort.InferenceSession:
    """ORT's own ops: MatMul(A, W) [+ bias] [-> Relu | Gelu (opset 20, erf form)]."""
    nodes, last = [helper.make_node("MatMul", ["A", "W"], ["H0"])], "H0"
    inits = [numpy_helper.from_array(w, "W")]
    if bias is not None:
        nodes.append(helper.make_node("Add", [last, "B"], ["H1"]))
        inits.append(numpy_helper.from_array(bias, "B"))
        last = "H1"
    if act != "none":
        nodes.append(helper.make_node(act.capitalize(), [last], ["H2"]))
        last = "H2"
    nodes.append(helper.make_node("Identity", [last], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, w.shape[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return _session(model.SerializeToString(), custom=False)


def _activation(act: str) -> ort.InferenceSession:
    """ORT's own Relu or Gelu alone, applied to an op's un-activated output."""
    node = helper.make_node(act.capitalize(), ["A"], ["Y"])
    graph = helper.make_graph(
        [node],
        act,
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return _session(model.SerializeToString(), custom=False)


def assert_same_classes(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """NaN, +Inf and -Inf exactly where ``want`` has them; finite outputs within tolerance."""
    assert got.shape == want.shape, what
    for name, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        differ = test(got) != test(want)
        if differ.any():
            at = [tuple(int(i) for i in p) for p in np.argwhere(differ)[:4]]
            got_values = [float(got[p]) for p in at]
            want_values = [float(want[p]) for p in at]
            raise AssertionError(
                f"{what}: {name} differs at {int(differ.sum())} outputs, e.g. {at}: "
                f"got {got_values}, ORT {want_values}"
            )
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4, err_msg=what)


# Non-finite entries per row of A, at slots 0 (first k), 1 (a middle k), 2 (the last k):
# one per row, both infinities in a row (NaN where W's signs differ, else an Inf), NaN beside
# an Inf, and a finite row.
PATTERNS = [
    {2: INF},
    {0: NAN},
    {0: -INF},
    {1: INF, 2: -INF},
    {0: INF, 1: NAN},
    {1: -INF},
    {},
]


def _activations(rng: np.random.Generator, M: int, K: int, ks: list[int], run: int) -> np.ndarray:
    """A [M, K] whose row m carries PATTERNS[(run + m) % len] at the columns ks."""
    a = rng.standard_normal((M, K)).astype(np.float32)
    for m in range(M):
        for slot, value in PATTERNS[(run + m) % len(PATTERNS)].items():
            a[m, ks[slot]] = value
    return a


def _check_against_dense(model_of, w: np.ndarray, ks: list[int], tier: str, seed: int) -> None:
    """model_of(bias, act) -> the packed op's model; every act, with and without bias, every M,
    every pattern in every row position, against ORT's dense ops on the same A."""
    rng = np.random.default_rng(seed)
    K, N = w.shape
    for act in ACTS:
        for bias in (None, rng.standard_normal(N).astype(np.float32)):
            sparse = _session(model_of(bias, act), custom=True)
            dense = _dense(w, bias, act)
            for M in MS:
                for run in range(len(PATTERNS)):
                    a = _activations(rng, M, K, ks, run)
                    want = dense.run(None, {"A": a})[0]
                    got = sparse.run(None, {"A": a})[0]
                    what = f"{tier} M={M} act={act} bias={bias is not None} run={run}"
                    assert_same_classes(got, want, what)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("tier", F32_TIERS)
def test_sparse_matmul_nonfinite_a_matches_dense_ort(monkeypatch, tier: str, block) -> None:
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", tier)  # read by the kernels while they run
    K, N = 37, 21
    rng = np.random.default_rng(block[0] * 10 + block[1])
    w = block_sparse(rng, K, N, *block, 0.6)
    ks = [0, 18, K - 1]
    w[ks, :] = rng.uniform(0.5, 1.5, (len(ks), N)) * rng.choice([-1, 1], (len(ks), N))
    packed = pack_bsr(w, *block)
    a0 = np.zeros((1, K), np.float32)
    _check_against_dense(
        lambda bias, act: om.sparse_matmul(a0, packed, bias, act), w, ks, tier, seed=K + N
    )


def _two_four_keeping(rng: np.random.Generator, K: int, N: int, ks: list[int]) -> np.ndarray:
    """A 2:4 weight that keeps every k in ks (non-zero) for every output."""
    w = two_four(rng, K, N)
    for k in ks:
        g = k // 4 * 4
        for n in range(N):
            group = w[g : g + 4, n]
            others = [p for p in range(4) if p != k % 4 and g + p not in ks]
            keep = {k % 4, *(p for p in range(4) if g + p in ks)}
            if len(keep) < 2:
                keep.add(int(rng.choice(others)))
            group[[p for p in range(4) if p not in keep]] = 0.0
            for p in keep:
                if group[p] == 0.0:
                    group[p] = rng.uniform(0.5, 1.5) * rng.choice([-1, 1])
    return w


@pytest.mark.parametrize("tier", F32_TIERS)
def test_sparse_matmul_24_nonfinite_a_matches_dense_ort(monkeypatch, tier: str) -> None:
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", tier)
    K, N = 36, 21  # 9 groups: 16-wide steps, then a last group on its own
    rng = np.random.default_rng(24)
    ks = [1, 18, K - 1]
    w = _two_four_keeping(rng, K, N, ks)
    packed = pack_24(w)
    a0 = np.zeros((1, K), np.float32)
    _check_against_dense(
        lambda bias, act: om.sparse_matmul_24(a0, packed, bias, act), w, ks, tier, seed=K
    )


@pytest.mark.parametrize("tier", F32_TIERS)
def test_nonfinite_a_where_no_weight_is_stored_adds_nothing(monkeypatch, tier: str) -> None:
    """A block column no output stores (BSR), a position no output keeps (2:4): their A entries
    are never multiplied, so an Inf or NaN there changes nothing (ORT on A with them zeroed)."""
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", tier)
    rng = np.random.default_rng(7)
    K, N = 36, 21
    bsr = block_sparse(rng, K, N, 1, 4, 0.3)
    bsr[8:12, :] = 0.0  # block column 2: no output stores it
    # 2:4 groups 2 and 7 keep positions 0 and 3 for every output, never 1 or 2 (a group with
    # fewer than two non-zeros would keep a zero there, which is stored and multiplied).
    w24 = _two_four_keeping(rng, K, N, [8, 11, 28, 31])
    cases = [
        (
            "SparseMatMul 1x4",
            bsr,
            [8, 9, 11],
            lambda a, b, act: om.sparse_matmul(a, pack_bsr(bsr, 1, 4), b, act),
        ),
        (
            "SparseMatMul24",
            w24,
            [9, 10, 30],
            lambda a, b, act: om.sparse_matmul_24(a, pack_24(w24), b, act),
        ),
    ]
    for name, w, unstored, model_of in cases:
        assert not np.any(w[unstored, :])
        for act in ACTS:
            bias = rng.standard_normal(N).astype(np.float32)
            sparse = _session(model_of(np.zeros((1, K), np.float32), bias, act), custom=True)
            dense = _dense(w, bias, act)
            for M in MS:
                a = rng.standard_normal((M, K)).astype(np.float32)
                for m in range(M):
                    a[m, unstored[m % 3]] = [INF, -INF, NAN][m % 3]
                zeroed = a.copy()
                zeroed[:, unstored] = 0.0
                want = dense.run(None, {"A": zeroed})[0]
                assert np.isfinite(want).all()
                got = sparse.run(None, {"A": a})[0]
                assert_same_classes(got, want, f"{name} {tier} M={M} act={act}")


@pytest.mark.parametrize("tier", ALL_TIERS)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fused_activation_is_orts_on_nonfinite_bias(monkeypatch, tier: str, act: str) -> None:
    """The fused epilogue of all three ops (the int8 one's A cannot hold a NaN; its bias can)
    against ORT's Relu/Gelu applied to the same op run without activation: NaN, +-Inf and -0 in
    the bias, in the vector loops' tails (N = 37) and their full steps."""
    monkeypatch.setenv("GRAPHOPT_KERNELS_ISA", tier)
    rng = np.random.default_rng(3)
    K, N = 40, 37
    bias = rng.standard_normal(N).astype(np.float32)
    bias[[0, 9, 17, 33, 34, 35, 36]] = [NAN, INF, -INF, NAN, -INF, INF, -0.0]
    w = block_sparse(rng, K, N, 1, 4, 0.5)
    w8 = (block_sparse(rng, K, N, 1, 4, 0.5) * 50).round().clip(-127, 127).astype(np.int8)
    p, p24, p8 = pack_bsr(w, 1, 4), pack_24(two_four(rng, K, N)), pack_bsr_s8(w8, 0.01, 1, 4)
    activate = _activation(act)
    a0, q0 = np.zeros((1, K), np.float32), np.zeros((1, K), np.uint8)
    ops = [
        ("SparseMatMul", False, lambda b, x: om.sparse_matmul(a0, p, b, x)),
        ("SparseMatMul24", False, lambda b, x: om.sparse_matmul_24(a0, p24, b, x)),
        ("SparseQMatMul", True, lambda b, x: om.sparse_qmatmul(q0, 0.02, 7, p8, b, x)),
    ]
    for name, quantized, model_of in ops:
        fused = _session(model_of(bias, act), custom=True)
        plain = _session(model_of(bias, "none"), custom=True)
        for M in MS:
            if quantized:
                a = rng.integers(0, 256, (M, K)).astype(np.uint8)
            else:
                a = rng.standard_normal((M, K)).astype(np.float32)
            # Twice at M = 1: the int8 op derives its row-lane layout (AVX-512 VNNI) on the
            # first such run and keeps it for the next.
            for _ in range(2 if M == 1 else 1):
                got = fused.run(None, {"A": a})[0]
                want = activate.run(None, {"A": plain.run(None, {"A": a})[0]})[0]
                assert_same_classes(got, want, f"{name} {tier} act={act} M={M}")
                if act == "relu":  # exact: the same bits, the sign of a zero included
                    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
