"""The layers a sparsify run may touch, their weights in canonical form, and selection.

Canonical form ``W[N, K]``: one row per output, the reduction axis K along the row, ordered
so that the pattern's consecutive K elements are the ones a sparse kernel groups:

* MatMul ``x @ B``, B ``[K, N]``: ``Bᵀ``. Gemm: ``B`` with ``transB=1``, else ``Bᵀ``.
* Conv ``[O, C/g, kh, kw]``: ``[O, kh·kw·C/g]`` ordered (ky, kx, channel), so groups of M
  consecutive K elements are M consecutive input channels at one kernel position (what
  TensorRT's 2:4 kernels need), not M kernel taps of one channel.

Selection (``--sparsity-layers``): ``all``; ``ffn``: MatMul/Gemm pairs around a
transformer's feed-forward nonlinearity (the layer whose output reaches an Erf/Gelu/Relu/...
within a few elementwise steps, and the layer that reads that nonlinearity's result);
``attention``: projections whose output reaches, or whose input comes from, a MatMul of two
activations (attention scores, probabilities × values) through reshapes/transposes only;
anything else is a glob on node or weight names. By default the classifier stays dense: a
layer no other candidate reads from, unless it is part of an FFN or attention block (a
transformer's last FFN projection is not a classifier), and so do layers with a reduction
size under ``MIN_REDUCTION`` (the digits CNN's first conv, 1·3·3 inputs, has none to spare).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import attribute, constant_array, is_op, register_array, remove_if_dead
from graphopt.refusals import QUANTIZED_WEIGHT

# Layers with fewer reduction features than this stay dense by default.
MIN_REDUCTION = 16
# An FFN's nonlinearity is any elementwise subgraph between its projections with one of these
# in it: erf GELU (Erf), tanh GELU (Tanh), Swish/SiLU and gated LLaMA MLPs (Sigmoid), ...
NONLINEAR = frozenset(
    {
        "Erf",
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Mish",
        "Sigmoid",
        "HardSigmoid",
        "Tanh",
        "Softplus",
        "Softsign",
        "HardSwish",
        "Clip",
    }
)
# Ops an FFN's pieces (bias, GELU's scales, powers and sums, a gate's product) pass through
# between layers.
ELEMENTWISE = frozenset({"Add", "Mul", "Div", "Sub", "Pow", "Sqrt", "Cast", "Neg"}) | NONLINEAR
# Ops that keep the values and only change the shape (GPT-2's Gemm runs on [batch·seq,
# hidden] rows between two Reshapes): an FFN passes through them on input 0.
RESHAPES = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout"})
# Ops between an attention projection and the activation-by-activation MatMul it feeds:
# head reshapes, scaling, rotary embeddings (Slice, Neg, Concat) and a KV cache (Concat),
# grouped-query heads repeated for the queries (Unsqueeze, Expand).
RESHAPING = frozenset(
    {
        "Reshape",
        "Transpose",
        "Add",
        "Mul",
        "Div",
        "Split",
        "Slice",
        "Squeeze",
        "Unsqueeze",
        "Expand",
        "Concat",
        "Neg",
    }
)
REACH = 8
# LLaMA's key projection is 9 ops from the scores' MatMul (RoPE and the heads repeated).
ATTENTION_REACH = 12


@dataclass
class Layer:
    node: ir.Node
    op: str
    weight: ir.Value
    shape: tuple[int, ...]  # the stored weight's shape
    groups: int = 1
    kind: str = ""  # "ffn", "attention" or ""

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or ""

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    def canonical(self) -> np.ndarray:
        """The weight as ``W[N, K]`` float32 (see the module docstring)."""
        w = constant_array(self.weight)
        assert w is not None
        w = np.asarray(w, dtype=np.float32)
        if self.op == "Conv":
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        if self.op == "Gemm" and attribute(self.node, "transB", 0):
            return w
        return w.T

    def stored(self, canonical: np.ndarray) -> np.ndarray:
        """:meth:`canonical`'s inverse: ``W[N, K]`` back in the stored layout and dtype."""
        dtype = self.weight.dtype.numpy() if self.weight.dtype is not None else np.float32
        if self.op == "Conv":
            o, cin = self.shape[:2]
            w = np.moveaxis(canonical.reshape(o, *self.shape[2:], cin), -1, 1)
        elif self.op == "Gemm" and attribute(self.node, "transB", 0):
            w = canonical
        else:
            w = canonical.T
        return np.ascontiguousarray(w, dtype=dtype)

    @property
    def reduction(self) -> int:
        return int(np.prod(self.shape[1:])) if self.op == "Conv" else self.canonical_k

    @property
    def canonical_k(self) -> int:
        if self.op == "Conv":
            return int(np.prod(self.shape[1:]))
        trans = self.op == "Gemm" and attribute(self.node, "transB", 0)
        return self.shape[1] if trans else self.shape[0]

    @property
    def outputs(self) -> int:
        if self.op == "Conv":
            return self.shape[0]
        trans = self.op == "Gemm" and attribute(self.node, "transB", 0)
        return self.shape[0] if trans else self.shape[1]


def find_layers(graph: ir.Graph) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Every MatMul/Gemm/Conv with a constant float weight (graph order), and the others
    of those types with why they cannot be sparsified."""
    layers: list[Layer] = []
    refused: list[tuple[str, str]] = []
    for node in graph:
        if not is_op(node, ("MatMul", "Gemm", "Conv")) or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.is_graph_input():
            continue
        # As Layer.name: an unnamed node is reported by its weight ("left dense: : ...").
        name = node.name or weight.name or ""
        if dequantized_weight(weight):
            # Integer codes behind a DequantizeLinear: zeroing or factorizing them would
            # need their scales kept in step, and rounds on rounding. Said, not skipped
            # silently as an activation (a quantized model read "0 layers sparsified").
            refused.append((name, QUANTIZED_WEIGHT))
            continue
        tensor = ir.convenience.get_const_tensor(weight)
        if tensor is None:
            continue  # activation × activation (attention scores): nothing to sparsify
        shape = tuple(int(d) for d in tensor.shape)
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            refused.append((name, f"weight is {tensor.dtype.name.lower()}, not float"))
        elif node.op_type != "Conv" and len(shape) != 2:
            refused.append((name, f"weight of rank {len(shape)}"))
        elif node.op_type == "Conv" and len(shape) < 3:
            refused.append((name, "Conv weight of rank < 3"))
        elif node.op_type == "Gemm" and attribute(node, "transA", 0):
            refused.append((name, "Gemm with transA"))
        elif len(weight.uses()) > 1:
            refused.append((name, "weight shared with another node"))
        elif weight.is_graph_output():
            # The model hands the weight out as it is: sparsifying or factorizing it would
            # change that output (and the old value was deleted under it: exit 3).
            refused.append((name, "weight is also a graph output"))
        else:
            groups = int(attribute(node, "group", 1)) if node.op_type == "Conv" else 1
            layers.append(Layer(node, node.op_type, weight, shape, groups))
    _classify(layers)
    return layers, refused


def dequantized_weight(value: ir.Value | None) -> bool:
    """Whether ``value`` is a DequantizeLinear of a constant: a quantized layer's weight."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or not producer.inputs:
        return False
    return ir.convenience.get_const_tensor(producer.inputs[0]) is not None


def _classify(layers: list[Layer]) -> None:
    """Mark FFN and attention projections (see the module docstring)."""
    by_node = {id(layer.node): layer for layer in layers}
    for layer in layers:
        if layer.op == "Conv":
            continue
        down = _ffn_partner(layer.node, by_node)
        if down is not None:
            layer.kind = down.kind = "ffn"
            # The other projections the nonlinearity's subgraph reads: a gated MLP's up
            # projection (down(silu(gate(x)) * up(x))).
            for other in _feeding(down.node, by_node):
                if other.op != "Conv":
                    other.kind = "ffn"
    for layer in layers:
        if layer.op != "Conv" and not layer.kind and _near_attention(layer.node):
            layer.kind = "attention"


def _passes(node: ir.Node, index: int) -> bool:
    """Whether an FFN's values go through ``node`` on its input ``index``."""
    return node.op_type in ELEMENTWISE or (node.op_type in RESHAPES and index == 0)


def _ffn_partner(node: ir.Node, by_node: dict[int, Layer]) -> Layer | None:
    """The layer that reads ``node``'s output through an elementwise subgraph with a
    nonlinearity in it (an FFN's second projection), at most REACH ops away.

    Each path carries whether it went through a nonlinearity: tanh GELU's ``x * 0.5`` branch
    reaches the final product before its Tanh branch does, and a layer reached on another
    path with none (a residual into the next block's projections) is no partner."""
    frontier, seen = [(node, False)], {(id(node), False)}
    for _ in range(REACH):
        following = []
        for current, nonlinear in frontier:
            for out in current.outputs:
                for use in out.uses():
                    user = use.node
                    if nonlinear and id(user) in by_node and use.idx == 0:
                        return by_node[id(user)]
                    if not _passes(user, use.idx):
                        continue
                    state = (user, nonlinear or user.op_type in NONLINEAR)
                    if (id(user), state[1]) not in seen:
                        seen.add((id(user), state[1]))
                        following.append(state)
        frontier = following
    return None


def _feeding(node: ir.Node, by_node: dict[int, Layer]) -> list[Layer]:
    """The layers whose outputs reach ``node``'s input 0 through FFN-like ops only."""
    found: list[Layer] = []
    value = node.inputs[0] if node.inputs else None
    frontier = [value.producer()] if value is not None and value.producer() is not None else []
    seen: set[int] = set()
    for _ in range(REACH):
        following = []
        for current in frontier:
            if id(current) in seen:
                continue
            seen.add(id(current))
            if id(current) in by_node:
                found.append(by_node[id(current)])
                continue
            for index, value in enumerate(current.inputs):
                producer = value.producer() if value is not None else None
                if producer is not None and _passes(current, index):
                    following.append(producer)
        frontier = following
    return found


def _two_activation_matmul(node: ir.Node) -> bool:
    """A MatMul of two activations (attention scores, probabilities × values)."""
    return is_op(node, "MatMul") and all(
        v is not None and ir.convenience.get_const_tensor(v) is None for v in node.inputs
    )


def _near_attention(node: ir.Node) -> bool:
    """Output reaches, or input comes from, a MatMul of two activations via reshapes only."""
    frontier = [node]
    for _ in range(ATTENTION_REACH):
        following = []
        for current in frontier:
            for out in current.outputs:
                for use in out.uses():
                    if _two_activation_matmul(use.node):
                        return True
                    if use.node.op_type in RESHAPING:
                        following.append(use.node)
        frontier = following
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    for _ in range(ATTENTION_REACH):
        if producer is None:
            return False
        if _two_activation_matmul(producer):
            return True
        if producer.op_type not in RESHAPING or producer.inputs[0] is None:
            return False
        producer = producer.inputs[0].producer()
    return False


def terminal(layers: list[Layer]) -> set[int]:
    """id() of the layers no other layer reads from, directly or through other nodes."""
    ids = {id(layer.node) for layer in layers}
    result = set()
    for layer in layers:
        stack, seen, found = [layer.node], set(), False
        while stack and not found:
            current = stack.pop()
            for out in current.outputs:
                for use in out.uses():
                    user = use.node
                    if id(user) in ids and user is not layer.node:
                        found = True
                        break
                    if id(user) not in seen:
                        seen.add(id(user))
                        stack.append(user)
                if found:
                    break
        if not found:
            result.add(id(layer.node))
    return result


def select(
    layers: list[Layer], terms: tuple[str, ...], keep_last: bool, flag_prefix: str = "--sparsity-"
) -> tuple[list[Layer], list[tuple[str, str]]]:
    """The layers ``terms`` name, and the others with why they are left as they are
    (naming the calling pass's flags: ``--sparsity-layers``, ``--factorize-layers``)."""
    last = terminal(layers) if keep_last else set()
    outputs = _output_feeders(layers[0].node.graph) if last and layers else set()
    chosen, left = [], []
    for layer in layers:
        named = any(
            term == "all"
            or (term in ("ffn", "attention") and layer.kind == term)
            or fnmatch.fnmatchcase(layer.node.name or "", term)
            or fnmatch.fnmatchcase(layer.weight.name or "", term)
            for term in terms
        )
        if not named:
            left.append((layer.name, f"not in {flag_prefix}layers {','.join(terms)}"))
        elif id(layer.node) in last and _is_head(layer, outputs):
            left.append((layer.name, f"the last layer (classifier): {flag_prefix}keep-last false"))
        elif layer.reduction < MIN_REDUCTION:
            left.append((layer.name, f"reduction size {layer.reduction} < {MIN_REDUCTION}"))
        else:
            chosen.append(layer)
    return chosen, left


def _is_head(layer: Layer, outputs: set[int]) -> bool:
    """Whether a last layer is a model's final classifier, which keep-last leaves dense: a
    layer whose output reaches a graph output through no other MatMul/Gemm/Conv (GPT-2's last
    FFN projection feeds the tied-embedding classifier, a MatMul, and is no classifier); of
    those, any that is no FFN or attention projection, and an FFN's second layer on
    [N, features] rows (a CNN's MLP head: VGG's, MobileNetV3's Linear-Hardswish-Linear). A
    transformer's last FFN projection works on [batch, seq, hidden] rows and is sparsified
    as the others."""
    if id(layer.node) not in outputs:
        return False
    if not layer.kind:
        return True
    shape = layer.node.inputs[0].shape if layer.node.inputs[0] is not None else None
    return shape is not None and len(shape) == 2


def _output_feeders(graph: ir.Graph | None) -> set[int]:
    """id() of the nodes whose outputs reach a graph output through no MatMul, Gemm or Conv
    (those themselves included, their own output reaching one so)."""
    if graph is None:
        return set()
    found: set[int] = set()
    stack = [v.producer() for v in graph.outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in found:
            continue
        found.add(id(node))
        if is_op(node, ("MatMul", "Gemm", "Conv")):
            continue  # the head itself; what feeds it reaches the output through it
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                stack.append(value.producer())
    return found


def replace_weight(graph: ir.Graph, layer: Layer, canonical: np.ndarray) -> None:
    """Give ``layer`` a new weight tensor from ``canonical`` (the old one is never edited),
    under the old initializer's name when nothing else reads it and it is no graph output."""
    array = layer.stored(canonical)
    old = layer.weight
    name = old.name or "sparse_weight"
    producer = old.producer()
    # A weight the graph also outputs keeps its value for that output (find_layers refuses
    # such layers; a caller with its own list may not have).
    if (
        old.is_initializer()
        and graph.initializers.get(name) is old
        and len(old.uses()) == 1
        and not old.is_graph_output()
    ):
        del graph.initializers[name]
        new = register_array(graph, name, array)
    else:
        from graphopt.editing import add_initializer

        new = add_initializer(graph, name + "_sparse", array)
    layer.node.replace_input_with(1, new)
    if producer is not None:
        remove_if_dead(producer)
    layer.weight = new
