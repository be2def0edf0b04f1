"""Random valid ONNX graphs over the ops graphopt's exact passes rewrite (hypothesis).

A graph is a chain of blocks applied to one running 4-D float tensor ``[1, C, H, W]``; each
block keeps track of the static shape so that every constant it adds fits. Blocks are the
patterns the passes look for (identities, dropouts, neutral arithmetic, transpose/reshape
chains, Conv+BN, Pad+Conv, MatMul+Add, duplicated subexpressions, duplicate initializers,
constant subgraphs...) mixed with plain ops that must survive untouched. Some intermediate
values also become graph outputs, so passes must keep them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper

F = TensorProto.FLOAT
OPSET = 18

BLOCKS = (
    "identity",
    "dropout",
    "arith_const",
    "relu",
    "clip",
    "transpose_chain",
    "reshape_chain",
    "squeeze_unsqueeze",
    "split_concat",
    "slice",
    "cast",
    "shape_gather_reshape",
    "conv_bn",
    "pad_conv",
    "matmul_add",
    "duplicate_subexpr",
    "duplicate_initializers",
    "constant_subgraph",
    "extra_output",
)


@dataclass
class Builder:
    """Accumulates nodes and initializers while tracking the running value and its shape."""

    rng: np.random.Generator
    shape: list[int]
    current: str = "x"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    outputs: list[tuple[str, list[int]]] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs

    def step(self, op: str, inputs: list[str] | None = None, **attrs) -> str:
        (out,) = self.node(op, inputs if inputs is not None else [self.current], **attrs)
        self.current = out
        return out

    def weights(self, shape: list[int], scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def _arith(b: Builder, op: str, kind: str, left: bool) -> None:
    c = b.shape[1]
    if kind == "zero":
        value = np.zeros((), np.float32) if op != "Div" else np.ones((), np.float32)
    elif kind == "one":
        value = np.ones((), np.float32)
    elif kind == "channel":
        value = b.weights([1, c, 1, 1]) + (2.0 if op == "Div" else 0.0)
    else:
        value = np.array(1.5 if op == "Div" else 0.75, np.float32)
    const = b.const(value)
    # x / c and c - x are not commutative: only put the constant first for Add/Mul/Sub.
    inputs = [const, b.current] if left and op != "Div" else [b.current, const]
    b.step(op, inputs)


def _apply(b: Builder, block: str, draw) -> None:
    n, c, h, w = b.shape
    if block == "identity":
        for _ in range(draw(st.integers(1, 3))):
            b.step("Identity")
    elif block == "dropout":
        if draw(st.booleans()):
            b.step("Dropout")
        else:
            ratio = b.const(np.array(draw(st.sampled_from([0.0, 0.5])), np.float32), "r")
            b.step("Dropout", [b.current, ratio])
    elif block == "arith_const":
        op = draw(st.sampled_from(["Add", "Mul", "Sub", "Div"]))
        _arith(
            b, op, draw(st.sampled_from(["zero", "one", "channel", "scalar"])), draw(st.booleans())
        )
    elif block == "relu":
        b.step("Relu")
    elif block == "clip":
        lo = b.const(np.array(draw(st.sampled_from([-1.0, 0.0])), np.float32))
        hi = b.const(np.array(draw(st.sampled_from([0.5, 6.0])), np.float32))
        b.step("Clip", [b.current, lo, hi] if draw(st.booleans()) else [b.current, lo])
    elif block == "transpose_chain":
        perms = list(itertools.permutations(range(4)))
        first = draw(st.sampled_from(perms))
        second = draw(st.sampled_from(perms))
        if draw(st.booleans()):
            second = tuple(int(i) for i in np.argsort(first))  # inverse: cancels out
        shape = b.shape
        for perm in (first, second):
            b.step("Transpose", perm=list(perm))
            shape = [shape[i] for i in perm]
        b.shape = shape
    elif block == "reshape_chain":
        flat = b.const(np.array([n, -1], np.int64), "s")
        mid = b.const(np.array([n, c, h * w], np.int64), "s")
        back = b.const(np.array(b.shape, np.int64), "s")
        b.step("Reshape", [b.current, flat])
        if draw(st.booleans()):
            b.step("Reshape", [b.current, mid])
        b.step("Reshape", [b.current, back])
    elif block == "squeeze_unsqueeze":
        axis = draw(st.integers(0, 4))
        axes = b.const(np.array([axis], np.int64), "ax")
        b.step("Unsqueeze", [b.current, axes])
        b.step("Squeeze", [b.current, axes])
    elif block == "split_concat":
        axis = draw(st.sampled_from([i for i in range(4) if b.shape[i] >= 2] or [None]))
        if axis is None:
            b.step("Concat", [b.current], axis=0)
            return
        first = draw(st.integers(1, b.shape[axis] - 1))
        sizes = b.const(np.array([first, b.shape[axis] - first], np.int64), "sp")
        parts = b.node("Split", [b.current, sizes], n_out=2, axis=axis)
        b.step("Concat", parts, axis=axis)
    elif block == "slice":
        axis = draw(st.integers(0, 3))
        if draw(st.booleans()):
            starts, ends = [0], [2**62]  # a no-op slice
        else:
            # Concat with itself, then take the first half back.
            doubled = b.node("Concat", [b.current, b.current], axis=axis)[0]
            b.current = doubled
            starts, ends = [0], [b.shape[axis]]
        args = [b.const(np.array(v, np.int64), "sl") for v in (starts, ends, [axis])]
        b.step("Slice", [b.current, *args])
    elif block == "cast":
        if draw(st.booleans()):
            b.step("Cast", to=F)
        else:
            b.step("Cast", to=TensorProto.DOUBLE)
            b.step("Cast", to=F)
    elif block == "shape_gather_reshape":
        (shape,) = b.node("Shape", [b.current])
        idx = b.const(np.array([0, 1], np.int64), "gi")
        (head,) = b.node("Gather", [shape, idx], axis=0)
        rest = b.const(np.array([-1], np.int64), "m1")
        (target,) = b.node("Concat", [head, rest], axis=0)
        b.step("Reshape", [b.current, target])
        back = b.const(np.array(b.shape, np.int64), "s")
        b.step("Reshape", [b.current, back])
    elif block == "conv_bn":
        out_c = draw(st.integers(1, 4))
        k = draw(st.sampled_from([1, 3]))
        weight = b.const(b.weights([out_c, c, k, k]), "cw")
        inputs = [b.current, weight]
        if draw(st.booleans()):
            inputs.append(b.const(b.weights([out_c]), "cb"))
        b.step("Conv", inputs, pads=[k // 2] * 4)
        scale, bias, mean = (b.const(b.weights([out_c]) + off, "bn") for off in (1.0, 0.0, 0.0))
        var = b.const(np.abs(b.weights([out_c])) + 0.5, "bn")
        b.step("BatchNormalization", [b.current, scale, bias, mean, var], epsilon=1e-5)
        b.shape = [n, out_c, h, w]
    elif block == "pad_conv":
        pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pd")
        b.step("Pad", [b.current, pads], mode="constant")
        weight = b.const(b.weights([c, c, 3, 3]), "cw")
        b.step("Conv", [b.current, weight])
    elif block == "matmul_add":
        weight = b.const(b.weights([w, w]), "mw")
        bias = b.const(b.weights([w]), "mb")
        b.step("MatMul", [b.current, weight])
        b.step("Add", [b.current, bias] if draw(st.booleans()) else [bias, b.current])
    elif block == "duplicate_subexpr":
        op = draw(st.sampled_from(["Relu", "Neg", "Sigmoid"]))
        (first,) = b.node(op, [b.current])
        (second,) = b.node(op, [b.current])
        b.step(draw(st.sampled_from(["Add", "Mul"])), [first, second])
    elif block == "duplicate_initializers":
        value = b.weights([1, c, 1, 1])
        one, two = b.const(value.copy(), "dup"), b.const(value.copy(), "dup")
        b.step("Add", [b.current, one])
        b.step("Mul", [b.current, two])
    elif block == "constant_subgraph":
        a = b.const(b.weights([1, c, 1, 1]), "k")
        k = b.const(np.array(2.0, np.float32), "k")
        (s,) = b.node("Add", [a, a])
        (m,) = b.node("Mul", [s, k])
        (r,) = b.node("Relu", [m])
        b.step("Add", [b.current, r])
    elif block == "extra_output":
        b.outputs.append((b.current, list(b.shape)))


@st.composite
def models(draw, max_blocks: int = 8) -> onnx.ModelProto:
    """A checked, valid ModelProto (opset 18) built from random blocks."""
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 5))
    w = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    b = Builder(np.random.default_rng(seed), [1, c, h, w])
    blocks = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=max_blocks))
    for block in blocks:
        _apply(b, block, draw)
    if b.current == "x":
        b.step("Identity")
    extra = {o: shape for o, shape in b.outputs if o not in ("x", b.current)}
    outputs = [*extra.items(), (b.current, b.shape)]
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", F, [1, c, h, w])],
        [helper.make_tensor_value_info(o, F, shape) for o, shape in outputs],
        b.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_optimize_preserves(proto: onnx.ModelProto, tolerance: float = 1e-4) -> None:
    """The default pipeline keeps output names, shapes and ORT values (relative tolerance)."""
    from graphopt import io
    from graphopt.api import OptimizeOptions, optimize
    from graphopt.inputs import make_inputs
    from graphopt.verify import compare, run_model

    original = io.load(proto).model
    feeds = make_inputs(original, seed=3)
    reference = run_model(original, feeds)
    result = optimize(io.load(proto).model, None, OptimizeOptions(verify=False)).model
    names = [v.name for v in result.graph.outputs]
    assert names == [v.name for v in original.graph.outputs], names
    onnx.checker.check_model(io.to_proto(result))
    got = run_model(result, feeds)
    for name, ref, new in zip(names, reference, got, strict=True):
        err = compare(name, ref, new)
        assert err.shape_ok, f"{name}: {err.detail}"
        assert not err.detail, f"{name}: {err.detail}"
        assert err.max_rel <= tolerance, f"{name}: relative error {err.max_rel:.3g}"
