"""The layers ``sparse-kernels`` lowers: the forms of a sparse constant-weight layer that
graphopt's kernels take, found in the main graph.

- ``MatMul(A, B)``, B a 2-D float32 constant; ``Gemm`` with transA=0, alpha=1, beta=1 (or no
  C; C of N values becomes the bias), transB respected. A following bias ``Add`` (N
  values), ``Relu``, ``Gelu`` (erf) or com.microsoft ``Gelu``/``BiasGelu`` fold into the op.
- int8: ``MatMul(DequantizeLinear(x_q u8, scalar scale, scalar zp), DequantizeLinear(W s8
  constant, per-tensor or per-column scale, zero point 0))`` -> ``SparseQMatMul`` (float out).
- Not lowered: 1x1 Conv (NCHW would need a Transpose pair around the op); :func:`find_layers`
  counts the sparse ones, for the pass's note.

Each layer is named uniquely in the graph (:func:`_name_layers`): the key of its decision and
the name of its op once lowered. M, the rows a layer sees, comes from ``--input-shape``
(:func:`bound_dims`); unbound dims count as :data:`DEFAULT_ROWS` rows. A weight under
:data:`MIN_SPARSITY` zeros is too dense for the kernels to win: the pass does not time it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt import editing

MIN_SPARSITY = 0.2
DEFAULT_ROWS = 128
# An epilogue without its activation: (bias, nodes folded besides the anchor, output).
Split = tuple[np.ndarray | None, list[ir.Node], ir.Value]


@dataclass
class Layer:
    """One lowerable layer: its weight [K, N], what it reads and what it replaces."""

    name: str  # unique among the layers and the graph's other nodes (_name_layers)
    op: str  # MatMul, Gemm or QMatMul (the int8 QDQ pattern)
    anchor: ir.Node
    a: ir.Value
    w: np.ndarray
    output: ir.Value
    removed: list[ir.Node]
    bias: np.ndarray | None
    activation: str
    rows: int
    # int8 only: activation scale and zero point, weight scales ([1] or [N]).
    a_scale: np.ndarray | None = None
    a_zero: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    sources: list[ir.Node] = field(default_factory=list)  # DequantizeLinear nodes read
    # Bias, folded nodes and output with the activation left to ORT (None: no activation).
    split: Split | None = None

    def separate(self) -> Layer:
        """This layer with its activation left out of the op (an ORT node after it)."""
        assert self.split is not None
        bias, removed, output = self.split
        folded = [self.anchor, *removed]
        return dataclasses.replace(
            self, activation="none", bias=bias, removed=folded, output=output, split=None
        )

    @property
    def K(self) -> int:
        return int(self.w.shape[0])

    @property
    def N(self) -> int:
        return int(self.w.shape[1])

    @property
    def sparsity(self) -> float:
        return float(1.0 - np.count_nonzero(self.w) / max(self.w.size, 1))


def find_layers(model: ir.Model, dims: dict[str, int]) -> tuple[list[Layer], int]:
    """The lowerable layers of the main graph (any sparsity), and how many sparse 1x1 Convs
    were left alone."""
    layers: list[Layer] = []
    convs = 0
    taken: set[int] = set()
    for node in model.graph:
        if id(node) in taken:
            continue
        layer = _qdq_layer(node, dims) or float_layer(node, dims)
        if layer is not None:
            layers.append(layer)
            taken.update(id(n) for n in layer.removed)
        elif editing.is_op(node, "Conv") and _sparse_pointwise(node):
            convs += 1
    _name_layers(model.graph, layers)
    return layers, convs


def _name_layers(graph: ir.Graph, layers: list[Layer]) -> None:
    """Give each layer a name no other layer and no other node of the graph has: the key of
    its decision and the name of its op once lowered.

    A layer is called by its node's name, else its output's. Both can collide (a node named
    ``y`` and an unnamed one writing ``y``; names are optional and need not be unique in
    ONNX), and then two ops had one name, which ORT refuses, and one decision overwrote the
    other. Named nodes keep their names first (the first of duplicates), in graph order;
    the others take ``base_1``, ``base_2``, ... past every name in use: the names of all
    other nodes, the bias Adds and activations layers fold in included (a layer left dense
    keeps them). A lowered layer's op takes its name, so a rerun on the output gives the
    layers left the same names and replays their decisions; the one exception is a name
    shared with a node another, lowered, layer folded in, which is gone on the rerun.
    """
    anchors = {id(layer.anchor) for layer in layers}
    taken = {node.name for node in graph if node.name and id(node) not in anchors}
    named: dict[int, str] = {}
    for index, layer in enumerate(layers):
        own = layer.anchor.name
        if own and own not in taken:
            named[index] = own
            taken.add(own)
    for index, layer in enumerate(layers):
        name = named.get(index)
        if name is None:
            base = layer.anchor.name or layer.anchor.outputs[0].name or "matmul"
            name, suffix = base, 1
            while name in taken:
                name, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(name)
        layer.name = name


def float_layer(node: ir.Node, dims: dict[str, int]) -> Layer | None:
    bias = None
    if editing.is_op(node, "MatMul"):
        a, b = node.inputs[0], node.inputs[1]
        w = editing.constant_array(b)
    elif editing.is_op(node, "Gemm"):
        a, b = node.inputs[0], node.inputs[1]
        if editing.attribute(node, "transA", 0) or editing.attribute(node, "alpha", 1.0) != 1.0:
            return None
        w = editing.constant_array(b)
        if w is not None and w.ndim == 2 and editing.attribute(node, "transB", 0):
            w = w.T
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            if editing.attribute(node, "beta", 1.0) != 1.0:
                return None
            bias = _vector(editing.constant_array(c), None if w is None else w.shape[1], 2)
            if bias is None:
                return None
    else:
        return None
    # A's type may be unknown (no inference yet): MatMul/Gemm make it the weight's, float32.
    if a is None or a.dtype not in (None, ir.DataType.FLOAT) or w is None or w.ndim != 2:
        return None
    if w.dtype != np.float32:
        return None
    w = np.ascontiguousarray(w)
    bias, act, removed, output, split = _epilogue(node.outputs[0], w.shape[1], bias)
    rows = layer_rows(a, dims)
    layer = Layer("", node.op_type, node, a, w, output, [node, *removed], bias, act, rows)
    layer.split = split
    return layer


def _qdq_layer(node: ir.Node, dims: dict[str, int]) -> Layer | None:
    if not editing.is_op(node, "MatMul"):
        return None
    dq_a, dq_w = (v.producer() if v is not None else None for v in node.inputs[:2])
    if dq_a is None or dq_w is None:
        return None
    if not (editing.is_op(dq_a, "DequantizeLinear") and editing.is_op(dq_w, "DequantizeLinear")):
        return None
    if editing.attribute(dq_a, "block_size", 0) or editing.attribute(dq_w, "block_size", 0):
        return None
    x_q = dq_a.inputs[0]
    if x_q is None or editing.is_constant(x_q):
        return None
    dtype = x_q.dtype
    if dtype is None and x_q.producer() is not None and x_q.producer().op_type == "QuantizeLinear":
        zero = editing.constant_array(dq_a.inputs[2]) if len(dq_a.inputs) > 2 else None
        dtype = ir.DataType.UINT8 if zero is not None and zero.dtype == np.uint8 else None
    if dtype != ir.DataType.UINT8:
        return None
    a_scale = editing.constant_array(dq_a.inputs[1])
    a_zero = editing.constant_array(dq_a.inputs[2]) if len(dq_a.inputs) > 2 else None
    if a_scale is None or a_scale.size != 1 or a_scale.dtype != np.float32:
        return None
    if a_zero is None or a_zero.size != 1 or a_zero.dtype != np.uint8:
        return None
    w = editing.constant_array(dq_w.inputs[0])
    if w is None or w.dtype != np.int8 or w.ndim != 2:
        return None
    from graphopt.kernels.packing import S8_MAX_K

    if w.shape[0] > S8_MAX_K:
        return None  # its int32 sums could overflow: the kernel refuses it (kernels.h)
    w_scale = editing.constant_array(dq_w.inputs[1])
    w_zero = editing.constant_array(dq_w.inputs[2]) if len(dq_w.inputs) > 2 else None
    axis = editing.attribute(dq_w, "axis", 1)
    if w_scale is None or w_scale.dtype != np.float32:
        return None
    if not (w_scale.size == 1 or (w_scale.size == w.shape[1] and axis in (1, -1))):
        return None
    has_zero = len(dq_w.inputs) > 2 and dq_w.inputs[2] is not None
    if has_zero and (w_zero is None or np.any(w_zero)):
        return None  # asymmetric weights: the kernel's weights are symmetric
    bias, act, removed, output, split = _epilogue(node.outputs[0], w.shape[1], None)
    return Layer(
        "",  # named with the others (_name_layers)
        "QMatMul",
        node,
        x_q,
        np.ascontiguousarray(w),
        output,
        [node, *removed],
        bias,
        act,
        layer_rows(x_q, dims),
        a_scale=a_scale.reshape(()).astype(np.float32),
        a_zero=a_zero.reshape(()).astype(np.uint8),
        w_scale=w_scale.reshape(-1).astype(np.float32),
        sources=[dq_a, dq_w],
        split=split,
    )


def _epilogue(
    y: ir.Value, n: int, bias: np.ndarray | None
) -> tuple[np.ndarray | None, str, list[ir.Node], ir.Value, Split | None]:
    """What folds into the op after ``y``: a bias Add, then Relu/Gelu (or a BiasGelu); and
    the same without the activation (bias, nodes, output), which then stays an ORT node."""
    removed: list[ir.Node] = []
    user = editing.single_user(y)
    if bias is None and user is not None and editing.is_op(user, "Add"):
        other = user.inputs[1] if user.inputs[0] is y else user.inputs[0]
        vector = _vector(editing.constant_array(other), n, _rank(y))
        if vector is not None and other is not y:
            bias, y = vector, user.outputs[0]
            removed.append(user)
            user = editing.single_user(y)
    if user is None:
        return bias, "none", removed, y, None
    split = (bias, list(removed), y)
    microsoft = user.domain == "com.microsoft"
    if bias is None and microsoft and user.op_type == "BiasGelu" and user.inputs[0] is y:
        vector = _vector(editing.constant_array(user.inputs[1]), n, 1)
        if vector is not None:
            return vector, "gelu", [*removed, user], user.outputs[0], split
    if editing.is_op(user, "Relu"):
        return bias, "relu", [*removed, user], user.outputs[0], split
    erf_gelu = editing.is_op(user, "Gelu") and editing.attribute(user, "approximate", "none") in (
        "none",
        "",
    )
    if erf_gelu or (microsoft and user.op_type == "Gelu"):
        return bias, "gelu", [*removed, user], user.outputs[0], split
    return bias, "none", removed, y, None


def _vector(array: np.ndarray | None, n: int | None, rank: int | None) -> np.ndarray | None:
    """``array`` as N float32 bias values when adding it to [..., N] keeps the shape."""
    if array is None or n is None or array.dtype != np.float32:
        return None
    # A [1, N] bias would make a [N] result [1, N]: only when the rank is known to allow it.
    if array.ndim > max(rank or 1, 1) or any(d != 1 for d in array.shape[:-1]):
        return None
    if array.size == n:
        return np.ascontiguousarray(array.reshape(n))
    if array.size == 1:
        return np.full(n, array.reshape(()), dtype=np.float32)
    return None


def _sparse_pointwise(node: ir.Node) -> bool:
    w = editing.constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1):
        return False
    return 1.0 - np.count_nonzero(w) / max(w.size, 1) >= MIN_SPARSITY


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def bound_dims(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dim names bound by ``--input-shape`` (``batch`` -> 8)."""
    bound: dict[str, int] = {}
    for value in model.graph.inputs:
        given = shapes.get(value.name or "")
        if given is None or value.shape is None or len(given) != len(value.shape):
            continue
        for dim, size in zip(value.shape, given, strict=True):
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                bound[dim.value] = int(size)
    return bound


def layer_rows(a: ir.Value, dims: dict[str, int]) -> int:
    """M: the product of A's leading dims; unbound ones count as DEFAULT_ROWS in all."""
    if a.shape is None:
        return DEFAULT_ROWS
    rows, unbound = 1, False
    for dim in list(a.shape)[:-1]:
        if isinstance(dim, int):
            rows *= dim
        elif isinstance(dim, ir.SymbolicDim) and dim.value in dims:
            rows *= dims[dim.value]
        else:
            unbound = True
    return rows * DEFAULT_ROWS if unbound else rows


def zero_share(w: np.ndarray) -> float:
    """The share of ``w``'s values that are zero."""
    return float(1.0 - np.count_nonzero(w) / max(w.size, 1))
