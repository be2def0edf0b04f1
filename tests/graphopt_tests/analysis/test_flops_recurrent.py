"""FLOPs of LSTM / GRU / RNN and Einsum against a direct count: the same computation spelled
in ops whose FLOPs are already counted (MatMul, Add, Sigmoid, ...), checked to compute the
same as the fused op in ONNX Runtime where outputs are concerned."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.flops import model_flops
from graphopt.verify import run_model
from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT
S, B, D, H = 3, 2, 4, 5  # steps, batch, input size, hidden size
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _weights(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = GATES[kind]
    return {
        "W": rng.standard_normal((1, g * H, D)).astype(np.float32) * 0.5,
        "R": rng.standard_normal((1, g * H, H)).astype(np.float32) * 0.5,
        "B": rng.standard_normal((1, 2 * g * H)).astype(np.float32) * 0.1,
        "P": rng.standard_normal((1, 3 * H)).astype(np.float32) * 0.3,
    }


def _fused(kind: str, bias=True, peephole=False, lbr=0, **attrs) -> onnx.ModelProto:
    """One LSTM / GRU / RNN node on x [S, B, D]; output Yh [1, B, H]."""
    w = _weights(kind)
    inputs = ["x", "W", "R", "B" if bias else ""]
    if peephole:
        inputs += ["", "", "", "P"]
    if kind == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(kind, inputs, ["", "yh"], hidden_size=H, **attrs)
    inits = {k: w[k] for k in inputs if k in w}
    x_shape = [B, S, D] if attrs.get("layout") else [S, B, D]
    return _proto([node], [tensor_info("x", F, x_shape)], [tensor_info("yh", F, [None] * 3)], inits)


def _proto(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    tensors = [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class _Unrolled:
    """The recurrence spelled step by step in plain ops, as ONNX's operator spec writes it."""

    def __init__(self, kind: str) -> None:
        self.w = _weights(kind)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {"zero_state": np.zeros((B, H), np.float32)}
        self.count = 0

    def op(self, op: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"v{self.count}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits[name] = np.asarray(value)
        return name

    def gates(self, x: str, h: str, w: np.ndarray, r: np.ndarray, name: str) -> str:
        """[x, h] · [W; R]ᵀ: one MatMul of inner size D + H."""
        cat = self.op("Concat", x, h, axis=1)
        return self.op("MatMul", cat, self.const(name, np.concatenate([w, r], axis=1).T))

    def split(self, value: str, parts: int) -> list[str]:
        sizes = self.const(f"split{parts}", np.full(parts, H, np.int64))
        outs = [f"{value}_{i}" for i in range(parts)]
        self.nodes.append(helper.make_node("Split", [value, sizes], outs, axis=1))
        return outs

    def model(self, kind: str, bias=True, peephole=False, lbr=0) -> onnx.ModelProto:
        w, r = self.w["W"][0], self.w["R"][0]
        wb, rb = np.split(self.w["B"][0], 2)
        h = c = "zero_state"
        for t in range(S):
            x = self.op("Gather", "x", self.const(f"t{t}", np.array(t, np.int64)), axis=0)
            if kind == "LSTM":
                h, c = self.lstm_step(x, h, c, w, r, wb + rb, bias, peephole)
            elif kind == "GRU":
                h = self.gru_step(x, h, w, r, wb, rb, bias, lbr)
            else:
                g = self.gates(x, h, w, r, "WR")
                h = self.op("Tanh", self.op("Add", g, self.const("b", wb + rb)) if bias else g)
        self.nodes.append(helper.make_node("Unsqueeze", [h, self.const("ax0", [0])], ["yh"]))
        inputs, out = [tensor_info("x", F, [S, B, D])], [tensor_info("yh", F, [1, B, H])]
        return _proto(self.nodes, inputs, out, self.inits)

    def lstm_step(self, x, h, c, w, r, b, bias, peephole) -> tuple[str, str]:
        g = self.gates(x, h, w, r, "WR")  # gate order i, o, f, c
        if bias:
            g = self.op("Add", g, self.const("b", b))
        gi, go, gf, gc = self.split(g, 4)
        if peephole:
            pi, po, pf = (
                self.const(f"p{k}", p)
                for k, p in zip("iof", np.split(self.w["P"][0], 3), strict=True)
            )
            gi = self.op("Add", gi, self.op("Mul", pi, c))
            gf = self.op("Add", gf, self.op("Mul", pf, c))
        i, f = self.op("Sigmoid", gi), self.op("Sigmoid", gf)
        c = self.op("Add", self.op("Mul", f, c), self.op("Mul", i, self.op("Tanh", gc)))
        if peephole:
            go = self.op("Add", go, self.op("Mul", po, c))
        return self.op("Mul", self.op("Sigmoid", go), self.op("Tanh", c)), c

    def gru_step(self, x, h, w, r, wb, rb, bias, lbr) -> str:
        zr = self.gates(x, h, w[: 2 * H], r[: 2 * H], "WRzr")  # gate order z, r, h
        if bias:
            zr = self.op("Add", zr, self.const("bzr", wb[: 2 * H] + rb[: 2 * H]))
        z, rg = self.split(self.op("Sigmoid", zr), 2)
        if lbr:
            xw = self.op("MatMul", x, self.const("Wh", w[2 * H :].T))
            hr = self.op("MatMul", h, self.const("Rh", r[2 * H :].T))
            if bias:
                xw = self.op("Add", xw, self.const("Wbh", wb[2 * H :]))
                hr = self.op("Add", hr, self.const("Rbh", rb[2 * H :]))
            pre = self.op("Add", xw, self.op("Mul", rg, hr))
        else:
            pre = self.gates(x, self.op("Mul", rg, h), w[2 * H :], r[2 * H :], "WRh")
            if bias:
                pre = self.op("Add", pre, self.const("bh", wb[2 * H :] + rb[2 * H :]))
        candidate = self.op("Tanh", pre)
        keep = self.op("Sub", self.const("one", np.float32(1.0)), z)
        return self.op("Add", self.op("Mul", keep, candidate), self.op("Mul", z, h))


CASES = [
    ("LSTM", {}),
    ("LSTM", {"bias": False}),
    ("LSTM", {"peephole": True}),
    ("GRU", {}),
    ("GRU", {"bias": False}),
    ("GRU", {"lbr": 1}),
    ("GRU", {"lbr": 1, "bias": False}),
    ("RNN", {}),
    ("RNN", {"bias": False}),
]


@pytest.mark.parametrize(("kind", "options"), CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_recurrent_ops_count_what_their_unrolled_steps_count(kind, options) -> None:
    """Before: LSTM / GRU / RNN counted 0 and were listed as not counted."""
    fused, unrolled = _fused(kind, **options), _Unrolled(kind).model(kind, **options)
    x = np.random.default_rng(1).standard_normal((S, B, D)).astype(np.float32)
    # The unrolled graph is the op's computation (so its count is the op's direct count).
    (got,), (want,) = run_model(_load(fused), {"x": x}), run_model(_load(unrolled), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    report, direct = model_flops(_load(fused)), model_flops(_load(unrolled))
    assert not report.not_counted and not direct.not_counted
    assert (report.total, report.macs) == (direct.total, direct.macs)
    assert report.macs == S * B * GATES[kind] * H * (D + H)


def _load(proto: onnx.ModelProto):
    from graphopt.io import load

    return load(proto).model


def test_directions_layout_sequence_lens_and_clip() -> None:
    forward = model_flops(_load(_fused("LSTM"))).total
    assert model_flops(_load(_fused("LSTM", direction="reverse"))).total == forward
    assert model_flops(_load(_fused("LSTM", layout=1))).total == forward
    # sequence_lens can end items earlier: the count stays the full length (an upper bound).
    with_lens = _fused("LSTM")
    with_lens.graph.node[0].input.insert(4, "lens")
    with_lens.graph.input.append(tensor_info("lens", TensorProto.INT32, [B]))
    assert model_flops(_load(with_lens)).total == forward
    # clip applies to the input of each of the 5 activations.
    assert model_flops(_load(_fused("LSTM", clip=3.0))).total == forward + 5 * S * B * H
    # Two directions: twice the weights ([2, gates·H, ...]), twice the count.
    both = _fused("RNN", direction="bidirectional")
    for tensor in both.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.concatenate([array, array]), tensor.name))
    assert model_flops(_load(both)).total == 2 * model_flops(_load(_fused("RNN"))).total


def _einsum(equation: str, shapes: list[list[int]], rank: int) -> tuple[int, int]:
    names = [f"in{i}" for i in range(len(shapes))]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    inputs = [tensor_info(n, F, s) for n, s in zip(names, shapes, strict=True)]
    report = model_flops(make_model([node], inputs, [tensor_info("y", F, [None] * rank)]))
    assert not report.not_counted and not report.unknown_shape
    return report.total, report.macs


def _plain(nodes, shapes: list[list[int]], rank: int) -> tuple[int, int]:
    inputs = [tensor_info(f"in{i}", F, s) for i, s in enumerate(shapes)]
    report = model_flops(make_model(nodes, inputs, [tensor_info("y", F, [None] * rank)]))
    return report.total, report.macs


def _matmul(a: str = "in0", b: str = "in1", out: str = "y") -> onnx.NodeProto:
    return helper.make_node("MatMul", [a, b], [out])


@pytest.mark.parametrize(
    ("equation", "shapes", "direct"),
    [
        # The probe's attention-like product: a batched MatMul against a transposed operand.
        (
            "bsd,btd->bst",
            [[2, 16, 8], [2, 16, 8]],
            [helper.make_node("Transpose", ["in1"], ["t"], perm=[0, 2, 1]), _matmul(b="t")],
        ),
        ("ij,jk", [[3, 4], [4, 5]], [_matmul()]),  # implicit output: ik
        ("...ij,...jk->...ik", [[2, 1, 3, 4], [5, 4, 6]], [_matmul()]),  # broadcast batch
        ("ij,jk,kl->il", [[3, 4], [4, 5], [5, 2]], [_matmul(out="t"), _matmul("t", "in2")]),
        ("ij,ij->ij", [[3, 4], [3, 4]], [helper.make_node("Mul", ["in0", "in1"], ["y"])]),
        ("i,j->ij", [[3], [4]], [helper.make_node("Mul", ["in0", "in1"], ["y"])]),
        ("ij->i", [[3, 4]], [helper.make_node("ReduceSum", ["in0"], ["y"])]),
        ("ij->ji", [[3, 4]], [helper.make_node("Transpose", ["in0"], ["y"])]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_einsum_counts_what_the_ops_it_stands_for_count(equation, shapes, direct) -> None:
    """Before: Einsum counted 0 and was listed as not counted."""
    # An outer product is a Mul of [i, 1] by [j].
    shapes_direct = [[3, 1], [4]] if equation == "i,j->ij" else shapes
    rank = len(_output_labels(equation))
    assert _einsum(equation, shapes, rank) == _plain(direct, shapes_direct, rank)


def _output_labels(equation: str) -> str:
    """The output's labels (``...`` stands for 2 broadcast dims in the cases here)."""
    return {"ij,jk": "ik"}.get(equation) or equation.split("->")[1].replace("...", "bb")


def test_einsum_trace_diagonal_and_macs_as_a_plain_loop_counts() -> None:
    assert _einsum("ii->", [[5, 5]], 0) == (5, 0)  # a sum over the diagonal's 5 elements
    assert _einsum("ii->i", [[5, 5]], 1) == (0, 0)  # the diagonal: data movement
    # A contraction: one multiply-add per combination of every distinct index (b, s, t, d).
    assert _einsum("bsd,btd->bst", [[1, 16, 8], [1, 16, 8]], 3) == (
        2 * 16 * 16 * 8,
        16 * 16 * 8,
    )
