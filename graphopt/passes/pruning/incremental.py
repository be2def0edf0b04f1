"""Observe a model's values stage by stage, running each node once per sample.

Compensation fits layers in stages, each on activations of the model as the earlier stages
left it. Running the model prefix from its inputs for every stage costs (stages × model);
here the values that cross from the part already run into the rest (the *frontier*) are
kept per batch, and each stage runs only the nodes it adds, fed from that store: one pass
over the model in all. This is sound because a stage only ever rewrites layers downstream
of everything observed before it (see ``compensation._stages``): the nodes already run
never change afterwards.

Models with control flow (If/Loop/Scan bodies read outer-scope values that are not node
inputs) fall back to running the prefix from the inputs for every stage.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphopt.analysis.stats import has_subgraphs
from graphopt.passes.calibration.activations import (
    observation_session,
    run_observation,
    with_outputs,
)


class IncrementalObserver:
    """Stage-by-stage observation of ``model`` on fixed feed batches.

    ``model`` may be edited between calls to :meth:`advance`, but only in nodes not run yet.
    """

    def __init__(self, model: ir.Model, batches: list[dict[str, np.ndarray]], source: str):
        self.model = model
        self.batches = batches
        self.source = source
        # Per batch: every value computed (or fed) so far that a node not yet run reads.
        self.store: list[dict[str, np.ndarray]] = [dict(feeds) for feeds in batches]
        self.done: set[str] = set(batches[0]) if batches else set()
        self.ran: set[int] = set()  # id() of the nodes already run
        self.stepwise = not has_subgraphs(model)

    def advance(
        self, names: list[str], volatile: set[int] | frozenset[int] = frozenset()
    ) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        """Per batch: (feeds, {name: value}) for ``names``; consume the whole iterator.

        ``volatile``: id() of nodes that may still be edited (layers not refitted yet). They
        and what they feed run for this observation but are not kept: a later stage runs
        them again as they are then.
        """
        if not self.stepwise:
            yield from self._from_inputs(names)
            return
        nodes = self._nodes_for(names)
        fresh = [name for name in names if name not in self.done]
        if not nodes:
            for feeds, kept in zip(self.batches, self.store, strict=True):
                yield feeds, {name: kept[name] for name in names}
            return
        final = _not_downstream(nodes, volatile)
        finals = {id(n) for n in final}
        later = [v.name for n in final for v in n.outputs if self._read_later(v, finals)]
        outputs = list(dict.fromkeys(fresh + later))
        session = self._session(nodes, outputs)
        for feeds, kept in zip(self.batches, self.store, strict=True):
            values = run_observation(session, outputs, kept, self.source)
            values = dict(zip(outputs, values, strict=True))
            kept.update((name, values[name]) for name in later)
            yield feeds, {name: values[name] if name in values else kept[name] for name in names}
        self.ran.update(id(n) for n in final)
        self.done.update(v.name for n in final for v in n.outputs)
        self._forget()

    def _nodes_for(self, names: list[str]) -> list[ir.Node]:
        """The nodes not run yet that ``names`` need, in graph order."""
        producer = {v.name: node for node in self.model.graph for v in node.outputs}
        needed: set[int] = set()
        stack = [name for name in names if name not in self.done]
        while stack:
            node = producer.get(stack.pop())
            if node is None or id(node) in needed:
                continue  # an initializer, or a node already taken
            if id(node) in self.ran:
                raise RuntimeError(f"{node.name}: ran before but its output was not kept")
            needed.add(id(node))
            for value in node.inputs:
                if value is not None and value.name not in self.done:
                    stack.append(value.name)
        return [node for node in self.model.graph if id(node) in needed]

    def _read_later(self, value: ir.Value, batch: set[int]) -> bool:
        """Whether a node outside the ones run so far (and ``batch``) reads ``value``."""
        return any(
            id(use.node) not in self.ran and id(use.node) not in batch for use in value.uses()
        )

    def _session(self, nodes: list[ir.Node], outputs: list[str]):
        """An ORT session over a copy of ``nodes`` alone, fed from the store."""
        clone = self.model.clone()
        positions = {id(n) for n in nodes}
        chosen = [
            c for o, c in zip(self.model.graph, clone.graph, strict=True) if id(o) in positions
        ]
        by_name: dict[str, ir.Value] = {v.name: v for v in clone.graph.inputs}
        for node in clone.graph:
            for v in node.outputs:
                by_name[v.name] = v
        sample = self.store[0]
        fed: dict[str, ir.Value] = {}
        for node in chosen:
            for index, value in enumerate(node.inputs):
                if value is None or value.name not in self.done:
                    continue
                if value.name not in fed:
                    array = sample[value.name]
                    fed[value.name] = ir.Value(
                        name=value.name,
                        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                        shape=ir.Shape([None] * array.ndim),
                    )
                node.replace_input_with(index, fed[value.name])
        clone.graph.outputs.clear()
        for name in outputs:
            value = by_name[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            clone.graph.outputs.append(value)
        clone.graph.inputs.clear()
        clone.graph.inputs.extend(fed.values())
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(clone)
        return observation_session(clone)

    def _forget(self) -> None:
        """Drop stored values that no node left to run reads."""
        live: set[str] = set()
        for node in self.model.graph:
            if id(node) not in self.ran:
                live.update(v.name for v in node.inputs if v is not None)
        for kept in self.store:
            for name in [k for k in kept if k not in live]:
                del kept[name]

    def _from_inputs(self, names: list[str]) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        session = observation_session(with_outputs(self.model, names, only=True))
        for feeds in self.batches:
            values = run_observation(session, names, feeds, self.source)
            yield feeds, dict(zip(names, values, strict=True))


def _not_downstream(nodes: list[ir.Node], volatile: set[int] | frozenset[int]) -> list[ir.Node]:
    """``nodes`` (graph order) less the volatile ones and every one they feed."""
    tainted: set[int] = set()
    kept: list[ir.Node] = []
    for node in nodes:
        if id(node) in volatile or any(
            v is not None and v.producer() is not None and id(v.producer()) in tainted
            for v in node.inputs
        ):
            tainted.add(id(node))
        else:
            kept.append(node)
    return kept
