"""Hand-built graphs, one per coupling family, for the dependency / ZIG / self-check tests."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt_tests.helpers import make_model, tensor_info

F = TensorProto.FLOAT
_rng = np.random.default_rng(0)


def w(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape).astype(np.float32)


def _conv(name: str, x: str, c_in: int, c_out: int, inits: dict, group: int = 1, k: int = 3):
    inits[f"{name}.w"] = w(c_out, c_in // group, k, k)
    inits[f"{name}.b"] = w(c_out)
    return helper.make_node(
        "Conv", [x, f"{name}.w", f"{name}.b"], [name], group=group, pads=[k // 2] * 4
    )


def residual() -> ir.Model:
    """conv1 → relu → conv2 → add(relu, conv2) → conv3: one 8-channel group across the add."""
    inits: dict = {}
    nodes = [
        _conv("c1", "x", 3, 8, inits),
        helper.make_node("Relu", ["c1"], ["r1"]),
        _conv("c2", "r1", 8, 8, inits),
        helper.make_node("Add", ["r1", "c2"], ["sum"]),
        _conv("c3", "sum", 8, 4, inits),
    ]
    return make_model(
        nodes, [tensor_info("x", F, [1, 3, 8, 8])], [tensor_info("c3", F, [1, 4, 8, 8])], inits
    )


def concat(repeat: bool = False) -> ir.Model:
    """conv_a (4) and conv_b (6) → Concat → BN → conv_c; with ``repeat``: Concat(a, b, a)."""
    inits: dict = {}
    parts = ["a", "b", "a"] if repeat else ["a", "b"]
    total = 14 if repeat else 10
    inits.update(bn_s=w(total), bn_b=w(total), bn_m=w(total), bn_v=np.abs(w(total)) + 0.5)
    nodes = [
        _conv("a", "x", 3, 4, inits),
        _conv("b", "x", 3, 6, inits),
        helper.make_node("Concat", parts, ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        _conv("c", "bn", total, 5, inits),
    ]
    return make_model(
        nodes, [tensor_info("x", F, [1, 3, 8, 8])], [tensor_info("c", F, [1, 5, 8, 8])], inits
    )


def grouped() -> ir.Model:
    """conv (3→8) → depthwise (group 8) → grouped (group 2) → conv (8→4)."""
    inits: dict = {}
    nodes = [
        _conv("c1", "x", 3, 8, inits),
        _conv("dw", "c1", 8, 8, inits, group=8),
        helper.make_node("Relu", ["dw"], ["r"]),
        _conv("g2", "r", 8, 8, inits, group=2),
        _conv("c3", "g2", 8, 4, inits, k=1),
    ]
    return make_model(
        nodes, [tensor_info("x", F, [1, 3, 8, 8])], [tensor_info("c3", F, [1, 4, 8, 8])], inits
    )


def channel_slice() -> ir.Model:
    """conv (3→8) → Slice channels [2, 6) → conv (4→3), and conv → Split [3, 5] → Concat
    (reversed) → conv: offsets on both paths."""
    inits: dict = {
        "starts": np.array([2], np.int64),
        "ends": np.array([6], np.int64),
        "axes": np.array([1], np.int64),
        "sizes": np.array([3, 5], np.int64),
    }
    nodes = [
        _conv("c1", "x", 3, 8, inits),
        helper.make_node("Slice", ["c1", "starts", "ends", "axes"], ["s"]),
        _conv("c2", "s", 4, 3, inits),
        helper.make_node("Split", ["c1", "sizes"], ["p0", "p1"], axis=1),
        helper.make_node("Concat", ["p1", "p0"], ["cat"], axis=1),
        _conv("c3", "cat", 8, 3, inits),
        helper.make_node("Add", ["c2", "c3"], ["y"]),
    ]
    return make_model(
        nodes, [tensor_info("x", F, [1, 3, 8, 8])], [tensor_info("y", F, [1, 3, 8, 8])], inits
    )


def group_norm() -> ir.Model:
    """conv (3→8) → GroupNormalization (4 groups) → relu → conv (8→4): units are groups."""
    inits: dict = {"gn_s": w(8), "gn_b": w(8)}
    nodes = [
        _conv("c1", "x", 3, 8, inits),
        helper.make_node("GroupNormalization", ["c1", "gn_s", "gn_b"], ["gn"], num_groups=4),
        helper.make_node("Relu", ["gn"], ["r"]),
        _conv("c2", "r", 8, 4, inits),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, [1, 3, 8, 8])],
        [tensor_info("c2", F, [1, 4, 8, 8])],
        inits,
        opset=21,
        ir_version=10,
    )


def conv_flatten_gemm() -> ir.Model:
    """conv (3→4) on 2×2 → Flatten → Gemm (16 → 5, transB): channel c ↔ features 4c..4c+3."""
    inits: dict = {"fc.w": w(5, 16), "fc.b": w(5)}
    nodes = [
        _conv("c1", "x", 3, 4, inits),
        helper.make_node("Flatten", ["c1"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    return make_model(
        nodes, [tensor_info("x", F, [1, 3, 2, 2])], [tensor_info("y", F, [1, 5])], inits
    )


def attention(kv_heads: int = 4, heads: int = 4, head_dim: int = 4, seq: int = 6) -> ir.Model:
    """Self-attention from MatMuls; with kv_heads < heads, K/V heads repeat (GQA) through
    Unsqueeze → Expand → Reshape as exporters write ``repeat_kv``."""
    hidden = heads * head_dim
    kv = kv_heads * head_dim
    rep = heads // kv_heads
    inits: dict = {
        "wq": w(hidden, hidden),
        "bq": w(hidden),
        "wk": w(hidden, kv),
        "bk": w(kv),
        "wv": w(hidden, kv),
        "bv": w(kv),
        "wo": w(hidden, hidden),
        "bo": w(hidden),
        "shape_q": np.array([1, seq, heads, head_dim], np.int64),
        "shape_kv": np.array([1, seq, kv_heads, head_dim], np.int64),
        "shape_out": np.array([1, seq, hidden], np.int64),
        "scale": np.array(1 / np.sqrt(head_dim), np.float32),
        "ax2": np.array([2], np.int64),
        "expand_to": np.array([1, kv_heads, rep, seq, head_dim], np.int64),
        "shape_rep": np.array([1, heads, seq, head_dim], np.int64),
    }
    nodes = []
    for p in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}_mm"]),
            helper.make_node("Add", [f"{p}_mm", f"b{p}"], [f"{p}_lin"]),
            helper.make_node(
                "Reshape", [f"{p}_lin", "shape_q" if p == "q" else "shape_kv"], [f"{p}_4d"]
            ),
            helper.make_node("Transpose", [f"{p}_4d"], [f"{p}_h"], perm=[0, 2, 1, 3]),
        ]
        if p != "q" and rep > 1:
            nodes += [
                helper.make_node("Unsqueeze", [f"{p}_h", "ax2"], [f"{p}_u"]),
                helper.make_node("Expand", [f"{p}_u", "expand_to"], [f"{p}_e"]),
                helper.make_node("Reshape", [f"{p}_e", "shape_rep"], [f"{p}_r"]),
            ]
        elif p != "q":
            nodes.append(helper.make_node("Identity", [f"{p}_h"], [f"{p}_r"]))
    nodes += [
        helper.make_node("Transpose", ["k_r"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_h", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_r"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "shape_out"], ["merged"]),
        helper.make_node("MatMul", ["merged", "wo"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "bo"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, [1, seq, hidden])],
        [tensor_info("y", F, [1, seq, hidden])],
        inits,
    )


def mlp_with_norm(kind: str) -> ir.Model:
    """x → fc1 → norm over the hidden axis (LayerNormalization, or a decomposed RMSNorm) → fc2,
    or ``kind='custom'``: an op from an unknown domain between fc1 and fc2."""
    inits: dict = {
        "w1": w(8, 12),
        "w2": w(12, 8),
        "g": w(12),
        "beta": w(12),
        "eps": np.array(1e-5, np.float32),
        "two": np.array(2.0, np.float32),
    }
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"])]
    if kind == "layernorm":
        nodes.append(helper.make_node("LayerNormalization", ["h", "g", "beta"], ["n"], axis=-1))
    elif kind == "rmsnorm":
        inits["axes"] = np.array([-1], np.int64)
        nodes += [
            helper.make_node("Pow", ["h", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
            helper.make_node("Add", ["ms", "eps"], ["mse"]),
            helper.make_node("Sqrt", ["mse"], ["rms"]),
            helper.make_node("Div", ["h", "rms"], ["hn"]),
            helper.make_node("Mul", ["hn", "g"], ["n"]),
        ]
    elif kind == "custom":
        nodes.append(helper.make_node("Mystery", ["h"], ["n"], domain="custom.ops"))
    elif kind in ("Reciprocal", "Log", "Acosh"):  # not finite at 0
        nodes.append(helper.make_node(kind, ["h"], ["n"]))
    elif kind == "divide-by-channel":  # 2 / h: a zeroed channel divides by 0
        nodes.append(helper.make_node("Div", ["two", "h"], ["n"]))
    elif kind == "divide-by-channel-plus-eps":  # 2 / sqrt(|h| + eps): never 0
        nodes += [
            helper.make_node("Abs", ["h"], ["a"]),
            helper.make_node("Add", ["a", "eps"], ["ae"]),
            helper.make_node("Sqrt", ["ae"], ["r"]),
            helper.make_node("Div", ["two", "r"], ["n"]),
        ]
    elif kind == "negative-power":  # h ** -2
        inits["minus_two"] = np.array(-2.0, np.float32)
        nodes.append(helper.make_node("Pow", ["h", "minus_two"], ["n"]))
    nodes.append(helper.make_node("MatMul", ["n", "w2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "t",
        [tensor_info("x", F, [1, 5, 8])],
        [tensor_info("y", F, [1, 5, 8])],
        [
            helper.make_tensor(
                k,
                TensorProto.FLOAT if v.dtype == np.float32 else TensorProto.INT64,
                v.shape,
                v.reshape(-1).tolist(),
            )
            for k, v in inits.items()
        ],
    )
    opsets = [helper.make_opsetid("", 18)] + (
        [helper.make_opsetid("custom.ops", 1)] if kind == "custom" else []
    )
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    if kind == "custom":
        # A custom op has no shape inference: give its output a declared shape.
        proto.graph.value_info.append(tensor_info("n", F, [1, 5, 12]))
    return ir.serde.deserialize_model(proto)


def attention_shape_targets(
    heads: int = 4, head_dim: int = 4, head_entry: int = -1, computed_head_dim: bool = False
) -> ir.Model:
    """GPT-2 as the TorchScript exporter writes it: batch and sequence symbolic, a packed qkv
    Gemm (Conv1D) split along the last axis, and every Reshape target built at run time from
    ``Shape`` — ``x.view(*x.size()[:-1], n_head, head_dim)`` with ``head_entry`` for n_head
    (-1, or the constant ``heads``), ``x.view(*x.size()[:-2], -1)`` for the head merge, and
    ``x.view(-1, x.size(-1))`` before the output projection. With ``computed_head_dim``,
    head_dim is ``x.size(-1) // n_head`` computed at run time (arithmetic on a channel count,
    which the analysis must refuse)."""
    hidden = heads * head_dim
    inits: dict = {
        "w_qkv": w(hidden, 3 * hidden),
        "b_qkv": w(3 * hidden),
        "wo": w(hidden, hidden),
        "bo": w(hidden),
        "qkv_sizes": np.array([hidden] * 3, np.int64),
        "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64),
        "ax0": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
        "last": np.array([-1], np.int64),
        "end": np.array([np.iinfo(np.int64).max], np.int64),
        "n_head": np.array([head_entry], np.int64),
        "head_dim": np.array([head_dim], np.int64),
        "three_h": np.array([3 * hidden], np.int64),
        "hidden_out": np.array([hidden], np.int64),
        "scale": np.array(1 / np.sqrt(head_dim), np.float32),
    }
    nodes: list = []

    def leading(x: str) -> list[str]:
        """Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)): batch, sequence."""
        names = []
        for i in (0, 1):
            n = f"{x}_{len(nodes)}"  # unique: x's dims are read for several targets
            nodes.extend(
                [
                    helper.make_node("Shape", [x], [f"{n}_shape"]),
                    helper.make_node("Gather", [f"{n}_shape", f"i{i}"], [f"{n}_d"]),
                    helper.make_node("Unsqueeze", [f"{n}_d", "ax0"], [f"{n}_u"]),
                ]
            )
            names.append(f"{n}_u")
        return names

    def flatten_rows(x: str) -> str:
        """Reshape(x, [-1, Shape(x)[-1:]]) through Slice → Squeeze → Unsqueeze → Concat."""
        nodes.extend(
            [
                helper.make_node("Shape", [x], [f"{x}_shape"]),
                helper.make_node("Slice", [f"{x}_shape", "last", "end", "ax0"], [f"{x}_sl"]),
                helper.make_node("Squeeze", [f"{x}_sl", "ax0"], [f"{x}_c"]),
                helper.make_node("Unsqueeze", [f"{x}_c", "ax0"], [f"{x}_cu"]),
                helper.make_node("Concat", ["minus1", f"{x}_cu"], [f"{x}_rows_t"], axis=0),
                helper.make_node("Reshape", [x, f"{x}_rows_t"], [f"{x}_rows"]),
            ]
        )
        return f"{x}_rows"

    rows = flatten_rows("x")
    nodes.append(helper.make_node("Gemm", [rows, "w_qkv", "b_qkv"], ["qkv2d"]))
    nodes.append(helper.make_node("Concat", [*leading("x"), "three_h"], ["qkv_t"], axis=0))
    nodes.append(helper.make_node("Reshape", ["qkv2d", "qkv_t"], ["qkv"]))
    nodes.append(helper.make_node("Split", ["qkv", "qkv_sizes"], ["q", "k", "v"], axis=2))
    if computed_head_dim:
        inits["heads"] = np.array([heads], np.int64)
        nodes += [
            helper.make_node("Shape", ["q"], ["q_shape_c"], start=-1),
            helper.make_node("Div", ["q_shape_c", "heads"], ["head_dim_c"]),
        ]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        target = [*leading(p), "n_head", "head_dim_c" if computed_head_dim else "head_dim"]
        nodes.append(helper.make_node("Concat", target, [f"{p}_t"], axis=0))
        nodes.append(helper.make_node("Reshape", [p, f"{p}_t"], [f"{p}_4d"]))
        nodes.append(helper.make_node("Transpose", [f"{p}_4d"], [f"{p}_h"], perm=perm))
    nodes += [
        helper.make_node("MatMul", ["q_h", "k_h"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_h"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
    ]
    nodes.append(helper.make_node("Concat", [*leading("ctx_t"), "minus1"], ["merge_t"], axis=0))
    nodes.append(helper.make_node("Reshape", ["ctx_t", "merge_t"], ["merged"]))
    rows = flatten_rows("merged")
    nodes.append(helper.make_node("Gemm", [rows, "wo", "bo"], ["o2d"]))
    nodes.append(helper.make_node("Concat", [*leading("x"), "hidden_out"], ["out_t"], axis=0))
    nodes.append(helper.make_node("Reshape", ["o2d", "out_t"], ["y"]))
    shape = ["batch", "sequence", hidden]
    return make_model(nodes, [tensor_info("x", F, shape)], [tensor_info("y", F, shape)], inits)


def reshape_zero_entry() -> ir.Model:
    """conv (3→8) → Reshape [0, 0, -1] (the channel entry 0 copies the input's dim) →
    Transpose → MatMul (8 → 5): channel c of the conv ↔ row c of the MatMul weight."""
    inits: dict = {"target": np.array([0, 0, -1], np.int64), "wm": w(8, 5)}
    nodes = [
        _conv("c1", "x", 3, 8, inits),
        helper.make_node("Reshape", ["c1", "target"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tokens", "wm"], ["y"]),
    ]
    return make_model(
        nodes, [tensor_info("x", F, [1, 3, 4, 4])], [tensor_info("y", F, [1, 16, 5])], inits
    )


def gqa_shape_targets(heads: int = 4, kv_heads: int = 2, head_dim: int = 4, seq: int = 6):
    """LLaMA as TorchScript writes it: rotate_half slices head_dim at the run-time bound
    ``Shape(x)[3] // 2``; repeat_kv expands K/V to a target built from ``Shape(kv)`` behind the
    exporter's ``Where(Equal(t, -1), 1, t)`` guard, then reshapes to ``Shape(kv)[1] * n_rep``
    heads. Per kv head, its query group: units as with constant targets."""
    hidden, kv, rep = heads * head_dim, kv_heads * head_dim, heads // kv_heads
    inits: dict = {
        "wq": w(hidden, hidden),
        "wk": w(hidden, kv),
        "wv": w(hidden, kv),
        "wo": w(hidden, hidden),
        "shape_q": np.array([1, seq, heads, head_dim], np.int64),
        "shape_kv": np.array([1, seq, kv_heads, head_dim], np.int64),
        "shape_out": np.array([1, seq, hidden], np.int64),
        "cos": w(1, 1, seq, head_dim),
        "sin": w(1, 1, seq, head_dim),
        "two": np.array(2, np.int64),
        "minus_one": np.array(-1, np.int64),
        "rep": np.array(rep, np.int64),
        "rep_1d": np.array([rep], np.int64),
        "zero": np.array([0], np.int64),
        "end": np.array([np.iinfo(np.int64).max], np.int64),
        "ax0": np.array([0], np.int64),
        "ax2": np.array([2], np.int64),
        "ax3": np.array([3], np.int64),
        **{f"i{i}": np.array(i, np.int64) for i in range(4)},
    }
    nodes: list = []

    def dims(x: str) -> list[str]:
        """Unsqueeze(Gather(Shape(x), i)) for every axis i of a 4-D x."""
        nodes.append(helper.make_node("Shape", [x], [f"{x}_shape"]))
        for i in range(4):
            nodes.append(helper.make_node("Gather", [f"{x}_shape", f"i{i}"], [f"{x}_g{i}"]))
            nodes.append(helper.make_node("Unsqueeze", [f"{x}_g{i}", "ax0"], [f"{x}_d{i}"]))
        return [f"{x}_d{i}" for i in range(4)]

    for p in "qkv":
        shape = "shape_q" if p == "q" else "shape_kv"
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}_mm"]),
            helper.make_node("Reshape", [f"{p}_mm", shape], [f"{p}_4d"]),
            helper.make_node("Transpose", [f"{p}_4d"], [f"{p}_h"], perm=[0, 2, 1, 3]),
        ]
    for p in "qk":  # rotary: x * cos + rotate_half(x) * sin
        nodes += [
            helper.make_node("Shape", [f"{p}_h"], [f"{p}_rs"]),
            helper.make_node("Gather", [f"{p}_rs", "i3"], [f"{p}_hd"]),
            helper.make_node("Div", [f"{p}_hd", "two"], [f"{p}_half"]),
            helper.make_node("Unsqueeze", [f"{p}_half", "ax0"], [f"{p}_half1"]),
            helper.make_node("Slice", [f"{p}_h", "zero", f"{p}_half1", "ax3"], [f"{p}_x1"]),
            helper.make_node("Slice", [f"{p}_h", f"{p}_half1", "end", "ax3"], [f"{p}_x2"]),
            helper.make_node("Neg", [f"{p}_x2"], [f"{p}_nx2"]),
            helper.make_node("Concat", [f"{p}_nx2", f"{p}_x1"], [f"{p}_rot"], axis=-1),
            helper.make_node("Mul", [f"{p}_h", "cos"], [f"{p}_c"]),
            helper.make_node("Mul", [f"{p}_rot", "sin"], [f"{p}_s"]),
            helper.make_node("Add", [f"{p}_c", f"{p}_s"], [f"{p}_r"]),
        ]
    nodes.append(helper.make_node("Identity", ["v_h"], ["v_r"]))
    one = helper.make_tensor("value", TensorProto.INT64, [1], [1])
    for p in "kv":  # repeat_kv
        d = dims(f"{p}_r")
        t = f"{p}_target"
        nodes += [
            helper.make_node("Concat", [d[0], d[1], "rep_1d", d[2], d[3]], [t], axis=0),
            helper.make_node("Shape", [t], [f"{t}_len"]),
            helper.make_node("ConstantOfShape", [f"{t}_len"], [f"{t}_ones"], value=one),
            helper.make_node("Mul", [f"{t}_ones", "minus_one"], [f"{t}_neg"]),
            helper.make_node("Equal", [t, f"{t}_neg"], [f"{t}_is_neg"]),
            helper.make_node("Where", [f"{t}_is_neg", f"{t}_ones", t], [f"{t}_guarded"]),
            helper.make_node("Unsqueeze", [f"{p}_r", "ax2"], [f"{p}_u"]),
            helper.make_node("Expand", [f"{p}_u", f"{t}_guarded"], [f"{p}_e"]),
            helper.make_node("Mul", [f"{p}_r_g1", "rep"], [f"{p}_heads"]),
            helper.make_node("Unsqueeze", [f"{p}_heads", "ax0"], [f"{p}_heads1"]),
            helper.make_node("Concat", [d[0], f"{p}_heads1", d[2], d[3]], [f"{p}_mt"], axis=0),
            helper.make_node("Reshape", [f"{p}_e", f"{p}_mt"], [f"{p}_rep"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k_rep"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_r", "k_t"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_rep"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "shape_out"], ["merged"]),
        helper.make_node("MatMul", ["merged", "wo"], ["y"]),
    ]
    return make_model(
        nodes,
        [tensor_info("x", F, [1, seq, hidden])],
        [tensor_info("y", F, [1, seq, hidden])],
        inits,
    )
