"""Residual blocks of a graph: what ``erase-blocks`` may remove (analysis only, no edits).

A *residual unit* is an Add (or Sum) one of whose inputs ``x`` is an ancestor of the others
(the residual branch ``f(x)``), or a Gemm ``A·B + C`` (beta 1, constant B) whose C is such
an ``x`` and A is computed from it: a residual MatMul + Add fused into one Gemm (ORT's
MatMulAddFusion writes those; graphopt's fuse-matmul-add no longer does). Its input is
``x``, its output the Add (Gemm), or the op that closes the unit: a Relu right after the
Add (ResNet), or the normalization after it when ``x`` is itself a normalization's output
(post-LN transformers: a LayerNormalization, or the decomposed ReduceMean/Sub/Pow/... form
when the graph was not fused). The closing norm of a
pre-norm model (GPT-2's final ``ln_f`` after the last Add) is not taken: its ``x`` is an Add.

A *block* is one unit, except that an attention unit (its branch multiplies two activations)
and the unit right after it (its input is the attention unit's output) form one transformer
layer, so "drop one layer of six" removes a whole encoder layer.

Adds whose inputs both pass through a weighted op (Conv/MatMul/Gemm) and neither of which is
an ancestor of the other are reported as refused (a projection shortcut: the skip path is
transformed), as are units that contain another unit. A branch without a weighted op is
arithmetic (GELU's ``x + 0.044715·x³``), not a unit; an input broadcast into the sum (an
attention mask) is not a skip path.
Side inputs entering a branch from elsewhere (attention masks, rotary caches) are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.editing import is_constant, is_op

NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
WEIGHTED = ("Conv", "MatMul", "Gemm", "ConvTranspose")
# Ops of a decomposed LayerNorm (x - mean) / sqrt(var + eps) * gamma + beta.
NORM_PIECES = ("ReduceMean", "Sub", "Pow", "Mul", "Add", "Sqrt", "Div", "Reciprocal", "Cast")
DECOMPOSED_LIMIT = 12  # most nodes a decomposed LayerNorm takes


@dataclass
class Unit:
    add: ir.Node
    input: ir.Value  # x, the skip path
    output: ir.Value  # the Add's output, or the closing op's
    nodes: list[ir.Node]  # branch, Add and closing ops, in graph order
    attention: bool  # the branch multiplies two activations

    @property
    def kind(self) -> str:
        return "attention" if self.attention else "residual"


@dataclass
class Block:
    """One erasable block: a unit, or an attention unit and the unit after it."""

    index: int
    name: str  # the first node of the block
    kind: str  # "residual", "attention" or "transformer layer"
    input: str  # value names: stable across clones of the model
    output: str
    nodes: list[str] = field(default_factory=list)
    channel_axis: int = -1  # 1 for NCHW convolutional blocks, else the last axis


def find_blocks(graph: ir.Graph) -> tuple[list[Block], list[tuple[str, str]]]:
    """The erasable blocks of ``graph`` in graph order, and the refused candidates (name, why)."""
    order = {id(node): i for i, node in enumerate(graph)}
    units: list[Unit] = []
    refused: list[tuple[str, str]] = []
    for node in graph:
        if not is_op(node, ("Add", "Sum")) and not _residual_gemm(node):
            continue
        unit, why = _unit(node, order)
        if unit is not None:
            units.append(unit)
        elif why:
            refused.append((node.name or node.outputs[0].name or "", why))
    units, nested = _outermost_refused(units)
    refused.extend(nested)
    return _pair(units, order), refused


def _residual_gemm(node: ir.Node) -> bool:
    """A Gemm adding an activation C to its product with a constant B, C unscaled (beta 1):
    ``C + A·B``, a residual sum whose branch ends in the Gemm's product."""
    if not is_op(node, "Gemm") or len(node.inputs) < 3:
        return False
    b, c = node.inputs[1], node.inputs[2]
    beta = node.attributes.get("beta")
    return (
        is_constant(b)
        and c is not None
        and not is_constant(c)
        and (beta is None or beta.value == 1.0)
    )


def _summands(add: ir.Node) -> list[ir.Value]:
    """What ``add`` sums: an Add's or Sum's non-constant inputs; a residual Gemm's A (the
    branch, through the Gemm's own product) and C (the skip)."""
    if is_op(add, "Gemm"):
        return [v for v in (add.inputs[0], add.inputs[2]) if v is not None]
    return [v for v in add.inputs if v is not None and not is_constant(v)]


def _unit(add: ir.Node, order: dict[int, int]) -> tuple[Unit | None, str]:
    inputs = _summands(add)
    gemm = is_op(add, "Gemm")
    if len(inputs) < 2 or (not gemm and len({id(v) for v in inputs}) < len(inputs)):
        return None, ""  # (Gemm(x, W, x) is x + x·W: a unit of the Gemm alone)
    out = add.outputs[0]
    # A residual Gemm's skip is its C: its A passes through the product (not an identity).
    for skip in inputs[1:] if gemm else inputs:
        others = [v for v in inputs if v is not skip]
        ancestry = [_ancestors(v) for v in others]
        if not all(skip in values for _, values in ancestry):
            continue
        if not _same_shape(skip, out):
            # Broadcast into the sum (an attention mask added to scores): not a skip path.
            return None, ""
        below = _descendants(skip)
        branch = {id(n): n for nodes, _ in ancestry for n in nodes if id(n) in below}
        if not gemm and not any(is_op(n, WEIGHTED) for n in branch.values()):
            # x + g(x) without weights (GELU's x + 0.044715·x³): arithmetic, not a block.
            return None, ""
        members = [*branch.values(), add]
        closer, output = _closer(out, skip)
        members.extend(closer)
        members.sort(key=lambda n: order[id(n)])
        attention = any(
            is_op(n, "MatMul") and not any(is_constant(v) for v in n.inputs if v is not None)
            for n in branch.values()
        )
        return Unit(add, skip, output, members, attention), ""
    if all(_weighted_between(v, inputs) for v in inputs):
        return None, "the skip path is transformed (projection shortcut): not an identity"
    return None, ""


def _ancestors(value: ir.Value) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes and values ``value`` is computed from (itself included among the values)."""
    nodes: dict[int, ir.Node] = {}
    values = {value}
    stack = [value]
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in nodes:
            continue
        nodes[id(producer)] = producer
        for v in producer.inputs:
            if v is not None and v not in values:
                values.add(v)
                stack.append(v)
    return list(nodes.values()), values


def _descendants(value: ir.Value) -> set[int]:
    """Ids of the nodes computed from ``value``."""
    seen: set[int] = set()
    stack = [use.node for use in value.uses()]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.outputs:
            stack.extend(use.node for use in out.uses())
    return seen


def _weighted_between(value: ir.Value, inputs: list[ir.Value]) -> bool:
    """Whether ``value`` goes through a weighted op the other inputs do not go through."""
    mine = {id(n): n for n in _ancestors(value)[0] if is_op(n, WEIGHTED)}
    for other in inputs:
        if other is not value:
            for node in _ancestors(other)[0]:
                mine.pop(id(node), None)
    return bool(mine)


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None:
        return True  # not inferred: assumed (a broadcast mask is refused as nested anyway)
    return len(a.shape) == len(b.shape) and all(
        x == y for x, y in zip(a.shape.dims, b.shape.dims, strict=True)
    )


def _closer(out: ir.Value, skip: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """The ops that close the unit after its Add, and the unit's output."""
    users = [use.node for use in out.uses()]
    if out.is_graph_output() or not users:
        return [], out
    if len(users) == 1 and is_op(users[0], "Relu"):
        return [users[0]], users[0].outputs[0]
    if not _is_norm_output(skip):
        return [], out
    if len(users) == 1 and is_op(users[0], NORMS):
        return [users[0]], users[0].outputs[0]
    region = _decomposed_norm(out)
    if region:
        return region, region[-1].outputs[0]
    return [], out


def _is_norm_output(value: ir.Value) -> bool:
    producer = value.producer()
    if producer is None:
        return False
    if is_op(producer, NORMS):
        return True
    # The end of a decomposed LayerNorm: a ReduceMean a few elementwise ops upstream.
    seen, stack = 0, [producer]
    while stack and seen < DECOMPOSED_LIMIT:
        node = stack.pop()
        seen += 1
        if is_op(node, "ReduceMean"):
            return True
        if not is_op(node, NORM_PIECES):
            continue
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer())
    return False


def _decomposed_norm(value: ir.Value) -> list[ir.Node]:
    """The nodes of a decomposed LayerNorm of ``value`` (one value leaves them), or []."""
    region: dict[int, ir.Node] = {}
    made = {value}
    changed = True
    while changed and len(region) <= DECOMPOSED_LIMIT:
        changed = False
        for v in list(made):
            for use in v.uses():
                node = use.node
                if id(node) in region or not is_op(node, NORM_PIECES):
                    continue
                if all(i is None or i in made or is_constant(i) for i in node.inputs):
                    region[id(node)] = node
                    made.update(node.outputs)
                    changed = True
    if not any(is_op(n, "ReduceMean") for n in region.values()) or len(region) > DECOMPOSED_LIMIT:
        return []
    inside = set(region)
    leaving = [
        o
        for n in region.values()
        for o in n.outputs
        if o.is_graph_output() or any(id(u.node) not in inside for u in o.uses())
    ]
    if len(leaving) != 1 or value.is_graph_output():
        return []
    if any(id(u.node) not in inside for u in value.uses()):
        return []
    graph_order = {id(n): i for i, n in enumerate(leaving[0].producer().graph)}
    return sorted(region.values(), key=lambda n: graph_order[id(n)])


def _outermost_refused(units: list[Unit]) -> tuple[list[Unit], list[tuple[str, str]]]:
    """Units that contain a kept unit's Add are refused: the inner units are erasable.

    In graph order, so an inner unit is judged before the units around it; a refused unit
    does not refuse others (an attention mask added to the next layer's scores reaches back
    over the earlier layers and is refused, the layer around it is not)."""
    kept: list[Unit] = []
    kept_adds: dict[int, Unit] = {}
    refused = []
    for unit in units:
        inner = [kept_adds[id(n)] for n in unit.nodes if id(n) in kept_adds]
        if inner:
            name = inner[0].add.name or inner[0].output.name
            refused.append((unit.add.name or "", f"contains the residual unit {name}"))
        else:
            kept.append(unit)
            kept_adds[id(unit.add)] = unit
    return kept, refused


def _pair(units: list[Unit], order: dict[int, int]) -> list[Block]:
    """Attention units with the unit right after them as transformer layers; others alone."""
    blocks: list[Block] = []
    i = 0
    while i < len(units):
        unit = units[i]
        group = [unit]
        following = units[i + 1] if i + 1 < len(units) else None
        if (
            unit.attention
            and following
            and following.input is unit.output
            and not following.attention
        ):
            group.append(following)
        i += len(group)
        nodes = sorted(
            {id(n): n for u in group for n in u.nodes}.values(), key=lambda n: order[id(n)]
        )
        kind = "transformer layer" if len(group) == 2 else unit.kind
        conv = any(is_op(n, ("Conv", "ConvTranspose")) for n in nodes)
        blocks.append(
            Block(
                index=len(blocks),
                name=nodes[0].name or nodes[0].outputs[0].name or f"block{len(blocks)}",
                kind=kind,
                input=group[0].input.name or "",
                output=group[-1].output.name or "",
                nodes=[n.name or "" for n in nodes],
                channel_axis=1 if conv else -1,
            )
        )
    return blocks
