"""Random valid ONNX graphs over the ops graphopt's exact passes rewrite (hypothesis).

A graph is a chain of blocks applied to one running 4-D tensor (``[N, C, H, W]`` at first);
each block keeps track of the shape so that every constant it adds fits. Blocks are the
patterns the passes look for (identities, dropouts, neutral arithmetic, transpose/reshape
chains, Conv+BN, Pad+Conv, MatMul+Add, duplicated subexpressions, duplicate initializers,
constant subgraphs, If/Loop subgraphs...) mixed with plain ops that must survive untouched.
Some intermediate values also become graph outputs, so passes must keep them.

Dimensions drawn per model (each can be pinned, see :func:`models`):

* opset in ``OPSETS`` (7..18): every block emits the form valid at that opset (Squeeze /
  Unsqueeze / Split / Slice / Pad / Clip / Dropout attributes before they became inputs) and
  blocks whose ops or types do not exist yet at that opset are not drawn;
* element type of the running tensor in ``DTYPES``: float32, float16, bfloat16, int8, uint8,
  int32, int64; bool appears through comparison -> Not/And -> Where blocks (and bool outputs).
  ORT 1.32's CPU provider has no bfloat16 kernels beyond data movement and Cast (probed:
  Relu, Add, MatMul, Conv, Clip, Greater... all NOT_IMPLEMENTED), so a bfloat16 model runs
  data-movement blocks in bfloat16 and wraps every arithmetic block in Cast(float) ... Cast
  (bfloat16). Integer types get only integer-valid blocks (no Conv/MatMul/Sigmoid/Dropout);
* symbolic dims: ``N`` (batch) and/or ``S`` (axis 2) on the graph input; blocks that need a
  static size on an axis are not drawn while it is symbolic, reshapes go through Shape.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import reject
from hypothesis import strategies as st
from onnx import TensorProto, helper

F = TensorProto.FLOAT
F16 = TensorProto.FLOAT16
BF16 = TensorProto.BFLOAT16
I8, U8, I32, I64 = TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64
BOOL = TensorProto.BOOL
OPSET = 18
OPSETS = (7, 9, 11, 13, 17, 18)
DTYPES = (F, F16, BF16, I8, U8, I32, I64)
INTS = (I8, U8, I32, I64)
NUMPY = {F: np.float32, F16: np.float16, I8: np.int8, U8: np.uint8, I32: np.int32, I64: np.int64}
# Relative tolerance per output type (graphopt.verify's defaults); integer / bool: exact.
TOLERANCES = {"float32": 1e-4, "float16": 8 * 2.0**-10, "bfloat16": 8 * 2.0**-7}

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
    "compare_where",
    "gather",
    "if_branch",
    "loop",
    "extra_output",
)
# Blocks that move data only: they run natively in every type (also bfloat16).
DATA_BLOCKS = {
    "identity",
    "transpose_chain",
    "reshape_chain",
    "squeeze_unsqueeze",
    "split_concat",
    "slice",
    "shape_gather_reshape",
    "gather",
    "extra_output",
    "cast",
    "if_branch",
    "loop",
}
FLOAT_ONLY = {"dropout", "conv_bn", "pad_conv", "matmul_add"}
# Blocks allowed inside If branches and Loop bodies: they keep the shape.
SHAPE_KEEPING = (
    "identity",
    "dropout",
    "arith_const",
    "relu",
    "clip",
    "reshape_chain",
    "squeeze_unsqueeze",
    "split_concat",
    "cast",
    "duplicate_subexpr",
    "duplicate_initializers",
    "constant_subgraph",
    "compare_where",
)


@dataclass
class Builder:
    """Accumulates nodes and initializers while tracking the running value and its shape
    (ints, or the names of symbolic dims) and element type."""

    rng: np.random.Generator
    shape: list
    dtype: int = F
    opset: int = OPSET
    current: str = "x"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    outputs: list[tuple[str, list, int]] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)
    depth: int = 0

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def static(self, axis: int) -> bool:
        return isinstance(self.shape[axis], int)

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

    @property
    def np(self):
        return NUMPY[self.dtype]

    def value(self, v) -> np.ndarray:
        return np.asarray(v).astype(self.np)

    def weights(self, shape: list[int], scale: float = 0.5) -> np.ndarray:
        if self.dtype in INTS:
            return self.rng.integers(1, 4, size=shape).astype(self.np)
        return (self.rng.standard_normal(shape) * scale).astype(self.np)

    def sub(self, current: str) -> Builder:
        return Builder(
            self.rng,
            list(self.shape),
            self.dtype,
            self.opset,
            current,
            counter=self.counter,
            depth=self.depth + 1,
        )


def available(b: Builder) -> list[str]:
    """The blocks valid for the builder's type, opset and shape."""
    out = []
    integer = b.dtype in INTS
    for block in BLOCKS if b.depth == 0 else SHAPE_KEEPING:
        if integer and block in FLOAT_ONLY:
            continue
        # Relu on integers: opset 14; ORT 1.32 CPU runs it for int8 and int32 only.
        relu_ok = b.opset >= 14 and b.dtype in (I8, I32)
        if integer and block in ("relu", "constant_subgraph") and not relu_ok:
            continue
        if integer and block == "clip" and b.opset < 12:
            continue
        if block == "compare_where" and b.opset < 9:  # Where
            continue
        # ORT 1.32 fails running If-1 (opset < 11) whose branch is an Identity of an outer
        # value ("Trying to get a TensorSeq, but got: (null)"), on the original model.
        if block == "if_branch" and b.opset < 11:
            continue
        if block in ("if_branch", "loop") and b.depth > 0:
            continue
        channel = ("conv_bn", "pad_conv", "duplicate_initializers", "constant_subgraph")
        if block in channel and not b.static(1):
            continue
        if block == "matmul_add" and not b.static(3):
            continue
        if (
            block == "split_concat"
            and b.depth > 0
            and not any(b.static(i) and b.shape[i] >= 2 for i in range(4))
        ):
            continue
        out.append(block)
    return out


def _unsqueeze(b: Builder, axis: int, op: str = "Unsqueeze") -> None:
    if b.opset < 13:
        b.step(op, axes=[axis])
    else:
        b.step(op, [b.current, b.const(np.array([axis], np.int64), "ax")])


def _arith(b: Builder, op: str, kind: str, left: bool) -> None:
    c = b.shape[1]
    if kind == "channel" and not b.static(1):
        kind = "scalar"
    if kind == "zero":
        value = b.value(0 if op != "Div" else 1)
    elif kind == "one":
        value = b.value(1)
    elif kind == "channel":
        value = b.weights([1, c, 1, 1]) + b.value(2 if op == "Div" else 0)
    elif b.dtype in INTS:
        value = b.value(2 if op == "Div" else 3)
    else:
        value = b.value(1.5 if op == "Div" else 0.75)
    const = b.const(value)
    # x / c and c - x are not commutative: only put the constant first for Add/Mul/Sub.
    inputs = [const, b.current] if left and op != "Div" else [b.current, const]
    b.step(op, inputs)


def _apply(b: Builder, block: str, draw) -> None:
    """One block; arithmetic ones on bfloat16 run in float32 between two Casts, and those on
    int8/uint8 before opset 14 (Add, Mul... on 8-bit types: opset 14) in int32."""
    wide = None
    # If/Loop outputs in bfloat16: not before opset 16 (If-16 / Loop-16); run them in float.
    if block not in DATA_BLOCKS or (b.dtype == BF16 and block in ("if_branch", "loop")):
        wide = F if b.dtype == BF16 else I32 if b.dtype in (I8, U8) and b.opset < 14 else None
    if wide is None:
        _block(b, block, draw)
        return
    narrow = b.dtype
    b.step("Cast", to=wide)
    b.dtype = wide
    _block(b, block, draw)
    b.dtype = narrow
    b.step("Cast", to=narrow)


def _block(b: Builder, block: str, draw) -> None:
    n, c, h, w = b.shape
    integer = b.dtype in INTS
    if block == "identity":
        for _ in range(draw(st.integers(1, 3))):
            b.step("Identity")
    elif block == "dropout":
        if b.opset < 12 or draw(st.booleans()):
            b.step("Dropout", **({"ratio": 0.5} if b.opset < 12 and draw(st.booleans()) else {}))
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
        lo_v = draw(st.sampled_from([-1.0, 0.0] if b.dtype != U8 else [0.0, 1.0]))
        hi_v = draw(st.sampled_from([0.5, 6.0] if not integer else [2.0, 6.0]))
        both = draw(st.booleans())
        if b.opset < 11:
            b.step("Clip", min=lo_v, max=hi_v) if both else b.step("Clip", min=lo_v)
        else:
            lo, hi = b.const(b.value(lo_v)), b.const(b.value(hi_v))
            b.step("Clip", [b.current, lo, hi] if both else [b.current, lo])
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
        pre = b.current
        if all(b.static(i) for i in range(4)):
            flat = b.const(np.array([n, -1], np.int64), "s")
            mid = b.const(np.array([n, c, h * w], np.int64), "s")
            b.step("Reshape", [b.current, flat])
            if draw(st.booleans()):
                b.step("Reshape", [b.current, mid])
            b.step("Reshape", [b.current, b.const(np.array(b.shape, np.int64), "s")])
        else:  # symbolic dims: flatten, then back to the shape read with Shape
            (back,) = b.node("Shape", [pre])
            b.step("Reshape", [b.current, b.const(np.array([-1], np.int64), "s")])
            b.step("Reshape", [b.current, back])
    elif block == "squeeze_unsqueeze":
        axis = draw(st.integers(0, 4))
        _unsqueeze(b, axis)
        _unsqueeze(b, axis, "Squeeze")
    elif block == "split_concat":
        axes = [i for i in range(4) if b.static(i) and b.shape[i] >= 2]
        axis = draw(st.sampled_from(axes or [None]))
        if axis is None:
            b.step("Concat", [b.current], axis=0)
            return
        first = draw(st.integers(1, b.shape[axis] - 1))
        sizes = [first, b.shape[axis] - first]
        if b.opset < 13:
            parts = b.node("Split", [b.current], n_out=2, axis=axis, split=sizes)
        else:
            sp = b.const(np.array(sizes, np.int64), "sp")
            parts = b.node("Split", [b.current, sp], n_out=2, axis=axis)
        b.step("Concat", parts, axis=axis)
    elif block == "slice":
        axis = draw(st.integers(0, 3))
        if draw(st.booleans()) or not b.static(axis):
            starts, ends = [0], [2**62]  # a no-op slice
        else:
            # Concat with itself, then take the first half back.
            b.current = b.node("Concat", [b.current, b.current], axis=axis)[0]
            starts, ends = [0], [b.shape[axis]]
        if b.opset < 10:
            b.step("Slice", starts=starts, ends=ends, axes=[axis])
        else:
            args = [b.const(np.array(v, np.int64), "sl") for v in (starts, ends, [axis])]
            b.step("Slice", [b.current, *args])
    elif block == "cast":
        if draw(st.booleans()):
            b.step("Cast", to=b.dtype)
        else:
            wide = {F: TensorProto.DOUBLE, F16: F, BF16: F, I64: F}.get(b.dtype, I64)
            b.step("Cast", to=wide)
            b.step("Cast", to=b.dtype)
    elif block == "shape_gather_reshape":
        pre = b.current
        (shape,) = b.node("Shape", [b.current])
        idx = b.const(np.array([0, 1], np.int64), "gi")
        (head,) = b.node("Gather", [shape, idx], axis=0)
        rest = b.const(np.array([-1], np.int64), "m1")
        (target,) = b.node("Concat", [head, rest], axis=0)
        b.step("Reshape", [b.current, target])
        if all(b.static(i) for i in range(4)):
            back = b.const(np.array(b.shape, np.int64), "s")
        else:
            (back,) = b.node("Shape", [pre])
        b.step("Reshape", [b.current, back])
    elif block == "gather":
        axes = [i for i in range(4) if b.static(i)]
        axis = draw(st.sampled_from(axes or [None]))
        if axis is None:
            b.step("Identity")
            return
        size = b.shape[axis]
        idx = draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=3))
        b.step("Gather", [b.current, b.const(np.array(idx, np.int64), "gi")], axis=axis)
        b.shape = [*b.shape[:axis], len(idx), *b.shape[axis + 1 :]]
    elif block == "conv_bn":
        out_c = draw(st.integers(1, 4))
        k = draw(st.sampled_from([1, 3]))
        weight = b.const(b.weights([out_c, c, k, k]), "cw")
        inputs = [b.current, weight]
        if draw(st.booleans()):
            inputs.append(b.const(b.weights([out_c]), "cb"))
        b.step("Conv", inputs, pads=[k // 2] * 4)
        scale, bias, mean = (
            b.const(b.weights([out_c]) + b.value(off), "bn") for off in (1.0, 0.0, 0.0)
        )
        var = b.const(np.abs(b.weights([out_c])) + b.value(0.5), "bn")
        b.step("BatchNormalization", [b.current, scale, bias, mean, var], epsilon=1e-5)
        b.shape = [n, out_c, h, w]
    elif block == "pad_conv":
        if b.opset < 11:
            b.step("Pad", pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant")
        else:
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
        ops = ["Relu", "Neg", "Sigmoid"]
        if integer:
            ops = ["Neg", "Abs"] + (["Relu"] if b.opset >= 14 and b.dtype in (I8, I32) else [])
            ops = ops if b.dtype != U8 else ["Abs"]
        op = draw(st.sampled_from(ops))
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
        k = b.const(b.value(2), "k")
        (s,) = b.node("Add", [a, a])
        (m,) = b.node("Mul", [s, k])
        (r,) = b.node("Relu", [m])
        b.step("Add", [b.current, r])
    elif block == "compare_where":
        zero = b.const(b.value(1 if b.dtype == U8 else 0))
        compare = ["Greater", "Less"] + (["Equal"] if b.opset >= 11 else [])  # float Equal: 11
        (cond,) = b.node(draw(st.sampled_from(compare)), [b.current, zero])
        if draw(st.booleans()):
            (cond,) = b.node("Not", [cond])
        if draw(st.booleans()):
            (other,) = b.node("Less", [b.current, b.const(b.value(3))])
            (cond,) = b.node(draw(st.sampled_from(["And", "Or", "Xor"])), [cond, other])
        if b.depth == 0 and draw(st.booleans()):
            b.outputs.append((cond, list(b.shape), BOOL))
        fill = b.const(b.value(draw(st.sampled_from([0, 2]))))
        b.step("Where", [cond, b.current, fill] if draw(st.booleans()) else [cond, fill, b.current])
    elif block == "if_branch":
        if draw(st.booleans()):
            # Input-derived: dim 0 > 1 (with a symbolic batch, the branch taken depends on it).
            (shape,) = b.node("Shape", [b.current])
            (d0,) = b.node("Gather", [shape, b.const(np.array(0, np.int64), "gi")], axis=0)
            (cond,) = b.node("Greater", [d0, b.const(np.array(1, np.int64), "one")])
        else:
            cond = b.const(np.array(draw(st.booleans())), "cond")
        branches = []
        for label in ("then", "else"):
            sub = b.sub(b.current)
            for blk in draw(st.lists(st.sampled_from(available(sub)), min_size=0, max_size=3)):
                _apply(sub, blk, draw)
            if sub.current == b.current:
                sub.step("Identity")
            out = helper.make_tensor_value_info(sub.current, b.dtype, None)
            branches.append(helper.make_graph(sub.nodes, label, [], [out], sub.initializers))
        b.step("If", [cond], then_branch=branches[0], else_branch=branches[1])
    elif block == "loop":
        trip = b.const(np.array(draw(st.integers(1, 3)), np.int64), "trip")
        it, cond_in, v_in = b.name("it"), b.name("cin"), b.name("vin")
        sub = b.sub(v_in)
        for blk in draw(st.lists(st.sampled_from(available(sub)), min_size=1, max_size=3)):
            _apply(sub, blk, draw)
        (cond_out,) = sub.node("Identity", [cond_in])
        if sub.current == v_in:
            sub.step("Identity")
        body = helper.make_graph(
            sub.nodes,
            "body",
            [
                helper.make_tensor_value_info(it, I64, []),
                helper.make_tensor_value_info(cond_in, BOOL, []),
                helper.make_tensor_value_info(v_in, b.dtype, None),
            ],
            [
                helper.make_tensor_value_info(cond_out, BOOL, []),
                helper.make_tensor_value_info(sub.current, b.dtype, None),
            ],
            sub.initializers,
        )
        b.step("Loop", [trip, "", b.current], body=body)
    elif block == "extra_output":
        b.outputs.append((b.current, list(b.shape), b.dtype))


@st.composite
def models(
    draw,
    max_blocks: int = 8,
    opsets: tuple[int, ...] = (OPSET,),
    dtypes: tuple[int, ...] = (F,),
    dynamic: tuple[str, ...] = (),
    blocks: tuple[str, ...] = BLOCKS,
) -> onnx.ModelProto:
    """A checked, valid ModelProto built from random blocks.

    ``opsets`` / ``dtypes``: drawn from; ``dynamic``: symbolic dims that may be drawn on the
    input (``"N"``: batch, ``"S"``: axis 2); ``blocks``: the blocks that may be drawn.
    """
    opset = draw(st.sampled_from(opsets))
    dtype = draw(st.sampled_from([d for d in dtypes if d != BF16 or opset >= 13] or [F]))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 5))
    w = draw(st.integers(1, 5))
    n = "N" if "N" in dynamic and draw(st.booleans()) else 1
    s = "S" if "S" in dynamic and draw(st.booleans()) else h
    seed = draw(st.integers(0, 2**16))
    b = Builder(np.random.default_rng(seed), [n, c, s, w], dtype, opset)
    in_type = F if dtype == BF16 else dtype
    if dtype == BF16:
        b.step("Cast", to=BF16)  # ORT feeds: float32 in, bfloat16 from here on
    for _ in range(draw(st.integers(1, max_blocks))):
        choices = [blk for blk in available(b) if blk in blocks] or ["identity"]
        _apply(b, draw(st.sampled_from(choices)), draw)
    if b.current == "x":
        b.step("Identity")
    extra = {o: (shape, t) for o, shape, t in b.outputs if o not in ("x", b.current)}
    outputs = [*extra.items(), (b.current, (b.shape, b.dtype))]
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", in_type, [n, c, s, w])],
        [helper.make_tensor_value_info(o, t, shape) for o, (shape, t) in outputs],
        b.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return proto


# Values each symbolic dim takes in the two runs of the property.
BINDINGS = ({"N": 1, "S": 4}, {"N": 3, "S": 2})


def check_optimize_preserves(proto: onnx.ModelProto, tolerance: float | None = None) -> None:
    """The default pipeline keeps output names, shapes and ORT values (relative tolerance: by
    output type unless given; integer and bool outputs exactly), at every binding of the
    input's symbolic dims."""
    from graphopt import io
    from graphopt.api import OptimizeOptions, optimize
    from graphopt.inputs import make_inputs
    from graphopt.output_errors import compare
    from graphopt.verify import run_model

    original = io.load(proto).model
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    symbolic = any(d.dim_param for d in dims)
    cases = []
    for binding in BINDINGS if symbolic else BINDINGS[:1]:
        shape = tuple(binding[d.dim_param] if d.dim_param else d.dim_value for d in dims)
        feeds = make_inputs(original, seed=3, shapes={"x": shape})
        try:
            reference = run_model(original, feeds)
        except Exception:
            # A valid graph ORT itself cannot run (seen: an If branch reading an outer Cast,
            # "Missing Input" in ORT 1.32 with its optimizations off) proves nothing about
            # graphopt: the example is rejected, as hypothesis counts and reports.
            reject()
        cases.append((shape, feeds, reference))
    result = optimize(io.load(proto).model, None, OptimizeOptions(verify=False)).model
    names = [v.name for v in result.graph.outputs]
    assert names == [v.name for v in original.graph.outputs], names
    onnx.checker.check_model(io.to_proto(result))
    try:
        outputs = [run_model(result, feeds) for _, feeds, _ in cases]
    except Exception:
        # An exact result ORT cannot run. Seen only as ORT 1.32's own bug: x(int8) ->
        # Cast(int32) -> Cast(int8) = c, read by Shape and inside an If branch, fails with
        # "Missing Input: c" at every optimization level (graphopt's no-op removal can leave
        # that chain). Users are covered by verification, which rolls such a pass back: the
        # property then holds for the verified result. Wrong values still fail below.
        verified = optimize(io.load(proto).model, None, OptimizeOptions(verify=True))
        assert verified.report.rolled_back, "ORT cannot run the result and nothing was rolled back"
        result = verified.model
        outputs = [run_model(result, feeds) for _, feeds, _ in cases]
    for (shape, _, reference), got in zip(cases, outputs, strict=True):
        for name, ref, new in zip(names, reference, got, strict=True):
            err = compare(name, ref, new)
            where = f"{name} at x{list(shape)}"
            assert err.shape_ok, f"{where}: {err.detail}"
            assert not err.detail, f"{where}: {err.detail}"
            tol = tolerance if tolerance is not None else TOLERANCES.get(ref.dtype.name, 1e-4)
            assert err.max_rel <= tol, f"{where}: relative error {err.max_rel:.3g} > {tol:.3g}"
