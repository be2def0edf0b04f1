"""Which nodes of the model a run was given each node of the graph it has now stands for.

A pass that names the user's nodes (quantization's ``--exclude``) runs after the exact
passes: a ``fc1`` MatMul and its ``fc1_bias`` Add arrive fused into one Gemm named
``fc1_bias``. The pass manager snapshots the input model's main graph before any pass
(:func:`snapshot`, kept as ``PassContext.original_nodes``); a node of the later graph stands
for the recorded nodes whose outputs it computes, and, when it is a fusion (none of those has
its op type), for the recorded nodes behind the values it absorbed (inputs of those that the
graph no longer has).

An unnamed node is listed as ``OpType_index``, its position among the input model's nodes.
Reads only: nothing here edits a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass(frozen=True)
class OriginalNode:
    op_type: str
    name: str  # as listed: the node's name, or OpType_index when it has none
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class OriginalNodes:
    """The main graph's nodes of the model as the user gave it."""

    nodes: list[OriginalNode]
    producer: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, node in enumerate(self.nodes):
            for name in node.outputs:
                if name:
                    self.producer.setdefault(name, index)

    @property
    def op_types(self) -> set[str]:
        return {node.op_type for node in self.nodes}

    @property
    def names(self) -> set[str]:
        return {node.name for node in self.nodes}

    def origins(
        self, node: ir.Node, present: set[str], constants: frozenset[str] = frozenset()
    ) -> list[OriginalNode]:
        """The input model's nodes ``node`` stands for (empty: none known, a node the exact
        passes made from nothing recorded). ``present``: the value names the graph has now;
        ``constants``: its initializers' names.

        Found by the values it computes; a fusion may name its output anew (``val_0``), so
        else by the recorded node whose name it took and those that read the same stored
        weights (the MatMul's ``w``, the Add's bias)."""
        found = [self.producer[v.name] for v in node.outputs if v.name in self.producer]
        if not found:
            weights = {v.name for v in node.inputs if v is not None and v.name in constants}
            found = [
                index
                for index, original in enumerate(self.nodes)
                if (node.name and original.name == node.name)
                or weights.intersection(original.inputs)
            ]
        if not found:
            return []
        chosen = list(dict.fromkeys(found))
        if all(self.nodes[i].op_type != node.op_type for i in chosen):
            # A fusion: the recorded nodes behind the values it absorbed are in it too.
            queue = list(chosen)
            while queue:
                for name in self.nodes[queue.pop()].inputs:
                    index = self.producer.get(name)
                    if name and name not in present and index is not None and index not in chosen:
                        chosen.append(index)
                        queue.append(index)
        return [self.nodes[i] for i in sorted(chosen)]


def snapshot(model: ir.Model) -> OriginalNodes:
    """The main graph's nodes of ``model`` as they are now."""
    nodes = [
        OriginalNode(
            node.op_type,
            node.name or f"{node.op_type}_{index}",
            tuple(v.name if v is not None else "" for v in node.inputs),
            tuple(v.name or "" for v in node.outputs),
        )
        for index, node in enumerate(model.graph)
    ]
    return OriginalNodes(nodes)


def present_values(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def origin_map(model: ir.Model, original: OriginalNodes) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per node of ``model``'s main graph with known origins, keyed by its first output's name
    (kept through clones and renames): the (op type, listed name) of each node it stands for."""
    present = present_values(model.graph)
    constants = frozenset(model.graph.initializers)
    result = {}
    for node in model.graph:
        if not node.outputs or not node.outputs[0].name:
            continue
        found = original.origins(node, present, constants)
        if found:
            result[node.outputs[0].name] = tuple((o.op_type, o.name) for o in found)
    return result
