"""Dead-code removal: nodes whose outputs nobody uses, and initializers nobody reads.

Liveness is computed from the graph outputs, not from ``Value.uses()`` alone: onnx-ir keeps
a use for every node that still names a value as input, also for nodes that are no longer
in any graph. Such *stale* uses appear whenever a node holding subgraphs leaves the model:
onnxscript's folder inlines the taken branch of an If with a constant condition and drops
the If, whose other branch still reads outer values; removing an If with ``safe=True``
detaches the If's own inputs but not those of the nodes in its branches. A value read only
by such orphans looks used, so the Constants and initializers it names survived a run and
vanished only on the next load: ``optimize`` of its own output shrank it (silero-vad's 16k
branch kept the 0.5 MB of LSTM weights its folded inner If no longer read).

Subgraphs read outer-scope values by reference (onnx-ir resolves the names when loading),
so a value read only inside a live If/Loop/Scan body is live; one read only inside a dead
node's body is not.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.analysis.stats import node_bodies
from graphopt.registry import GraphPass, Stage, register

GraphLike = ir.Graph | ir.Function


def _graph_likes(model: ir.Model) -> Iterator[GraphLike]:
    """The main graph, every function, and every subgraph inside them (any depth)."""
    stack: list[GraphLike] = [model.graph, *model.functions.values()]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph:
            stack.extend(node_bodies(node))


def _nodes_in_model(model: ir.Model) -> set[int]:
    return {id(node) for graph in _graph_likes(model) for node in graph}


def drop_stale_uses(model: ir.Model) -> int:
    """Detach every use of a model value by a node that is in no graph of the model.

    Afterwards ``Value.uses()`` lists live readers only, which the passes that test "is this
    read elsewhere?" rely on. Returns the number of uses dropped (no serialized change).
    """
    present = _nodes_in_model(model)
    dropped = 0
    for graph in _graph_likes(model):
        values: list[ir.Value] = list(graph.inputs)
        if isinstance(graph, ir.Graph):
            values.extend(graph.initializers.values())
        values += [out for node in graph for out in node.outputs]
        for value in values:
            for use in list(value.uses()):
                if id(use.node) not in present:
                    use.node.replace_input_with(use.idx, None)
                    dropped += 1
    return dropped


def live_nodes(model: ir.Model) -> set[int]:
    """id() of the nodes that some graph output of the model (or of a function) depends on.

    A live node's subgraph outputs are live, and through them whatever those bodies read,
    in their own scope or any outer one.
    """
    live: set[int] = set()
    seen: set[int] = set()
    work: list[ir.Value] = list(model.graph.outputs)
    for function in model.functions.values():
        work.extend(function.outputs)
    while work:
        value = work.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        work += [v for v in node.inputs if v is not None]
        for graph in node_bodies(node):
            work.extend(graph.outputs)
    return live


def _detach(node: ir.Node) -> None:
    """Drop the uses ``node`` and every node in its subgraphs hold on any value."""
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    for graph in node_bodies(node):
        for inner in graph:
            _detach(inner)


def _sweep(graph: GraphLike, live: set[int]) -> int:
    """Remove the dead nodes of ``graph`` (and of its live nodes' bodies); nodes removed,
    counting those inside removed bodies."""
    removed = 0
    for node in list(graph):
        if id(node) in live:
            for sub in node_bodies(node):
                removed += _sweep(sub, live)
            continue
        removed += _size(node)
        _detach(node)
        graph.remove(node)  # already detached; `safe` would trip on other dead readers
    return removed


def _size(node: ir.Node) -> int:
    """``node`` plus the nodes of its subgraphs, at any depth."""
    return 1 + sum(_size(inner) for graph in node_bodies(node) for inner in graph)


def remove_dead_nodes(model: ir.Model) -> int:
    """Remove every node no graph output depends on, in all graphs; nodes removed."""
    drop_stale_uses(model)
    live = live_nodes(model)
    removed = _sweep(model.graph, live)
    for function in model.functions.values():
        removed += _sweep(function, live)
    return removed


@register
class DeadCodePass(GraphPass):
    """Remove nodes whose outputs are neither used nor graph outputs (subgraphs included)."""

    name = "dead-code"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        removed = remove_dead_nodes(model)
        initializers = len(model.graph.initializers)
        # onnx-ir's pass finds no dead node left; it still trims unused optional outputs and
        # trailing empty inputs, and drops unused main-graph initializers (counted: a change
        # the fixed-point loop must see).
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return removed + initializers - len(model.graph.initializers)


@register
class UnusedInitializersPass(GraphPass):
    """Remove initializers (subgraphs included) that no node reads; inputs/outputs are kept."""

    name = "unused-initializers"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        # A reader that left the model (e.g. in the untaken branch of a folded If) would
        # otherwise keep its initializer until the model is saved and loaded again.
        drop_stale_uses(model)
        removed = 0
        for graph in model.graphs():
            for name, value in list(graph.initializers.items()):
                if value.uses() or value.is_graph_input() or value.is_graph_output():
                    continue
                del graph.initializers[name]
                removed += 1
        return removed
