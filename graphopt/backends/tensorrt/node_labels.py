"""Node labels shared by the static rule table and the real parser (:func:`prepare`).

Every node gets one label, shared with the parser's findings: by its name when that is
unique, else by its op, the graph it sits in and its index there. A node inside a local
function is labelled for the call that runs it (each call gets its own copy of the function).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx

from graphopt.backends.tensorrt.onnx_nodes import all_graphs, attribute_graphs

_SUBGRAPH_PARTS = {"then_branch": "then-branch", "else_branch": "else-branch", "body": "body"}


@dataclass(frozen=True)
class NodeRef:
    """Where a node of the linted model is, as both checkers name it."""

    label: str  # "node 'conv1' (Conv)", "If 'cond' then-branch node 3 (Add)", ...
    key: str  # its name in the prepared copy (unique)
    name: str  # its name in the file ("" when unnamed)
    op_type: str
    domain: str
    cut: str  # the prepared name of the node to remove to parse past it (a call, for a body)
    nested: str  # "" in the main graph, else what holds it ("an If/Loop body", ...)


@dataclass
class Prepared:
    """A copy of the model whose every node has a unique name (its label where its own name
    is missing or shared), and whose every call of a local function calls its own copy of the
    function, so that a node inside one is named for that call."""

    model: onnx.ModelProto
    refs: dict[str, NodeRef] = field(default_factory=dict)

    def ref(self, name: str) -> NodeRef | None:
        """The node a prepared name (or an inlined copy's ``name__N``) stands for."""
        found = self.refs.get(name)
        while found is None and re.search(r"__\d+$", name):
            name = re.sub(r"__\d+$", "", name)
            found = self.refs.get(name)
        return found


def prepare(model: onnx.ModelProto) -> Prepared:
    """Name every node of a copy of ``model`` uniquely, labelled for the user."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    functions = {(f.domain, f.name): f for f in copy.functions}
    names: dict[str, int] = {}
    for graph in all_graphs(copy.graph):
        for node in graph.node:
            names[node.name] = names.get(node.name, 0) + 1
    prepared = Prepared(copy)
    labeller = _Labeller(prepared, functions, {n for n in names if n}, names)
    labeller.graph(copy.graph, prefix="", suffix="", cut=None, nested="")
    if functions:
        del copy.functions[:]
        copy.functions.extend(labeller.specialized)
    return prepared


class _Labeller:
    def __init__(
        self,
        prepared: Prepared,
        functions: dict[tuple[str, str], onnx.FunctionProto],
        used: set[str],
        counts: dict[str, int],
    ) -> None:
        self.prepared = prepared
        self.functions = functions
        self.used = used
        self.counts = counts
        self.specialized: list[onnx.FunctionProto] = []
        self.active: set[tuple[str, str]] = set()

    def graph(
        self, graph: onnx.GraphProto, prefix: str, suffix: str, cut: str | None, nested: str
    ) -> None:
        for index, node in enumerate(graph.node):
            self.node(node, index, prefix, suffix, cut, nested, in_function=False)

    def node(
        self,
        node: onnx.NodeProto,
        index: int,
        prefix: str,
        suffix: str,
        cut: str | None,
        nested: str,
        in_function: bool,
    ) -> None:
        own, op = node.name, node.op_type
        if own and self.counts.get(own) == 1 and not in_function:
            label, owner = f"node {own!r} ({op})", f"{op} {own!r}"
            name = own
        else:
            # Unnamed, a name shared with another node, or a function body's (shared by
            # every call): by position. The file's name, if any, is kept in the label.
            owner = f"{prefix}node {index}{f' {own!r}' if own else ''} ({op})"
            label = owner + suffix
            name = self._unique(label)
        node.name = name
        cut_here = cut or name
        self.prepared.refs[name] = NodeRef(label, name, own, op, node.domain, cut_here, nested)
        for attr in node.attribute:
            part = _SUBGRAPH_PARTS.get(attr.name, attr.name)
            inner = nested or f"{'an' if op[:1] in 'AEIOU' else 'a'} {op} body"
            for body in attribute_graphs(attr):
                for i, inner_node in enumerate(body.node):
                    self.node(inner_node, i, f"{owner} {part} ", suffix, cut, inner, in_function)
        function = self.functions.get((node.domain, op))
        if function is not None and (node.domain, op) not in self.active:
            self.active.add((node.domain, op))  # a function calling itself is invalid ONNX
            self._call(node, function, label, cut_here)
            self.active.discard((node.domain, op))

    def _call(
        self, node: onnx.NodeProto, function: onnx.FunctionProto, caller: str, cut: str
    ) -> None:
        """Give this call its own copy of the function, its nodes labelled for the call."""
        copy = onnx.FunctionProto()
        copy.CopyFrom(function)
        copy.name = self._unique(f"{function.name}__call{len(self.specialized)}")
        node.op_type = copy.name
        self.specialized.append(copy)
        prefix = f"function {function.domain}::{function.name} "
        for index, inner in enumerate(copy.node):
            self.node(
                inner,
                index,
                prefix,
                f", called by {caller}",
                cut,
                "a local function",
                in_function=True,
            )

    def _unique(self, name: str) -> str:
        unique, count = name, 1
        while unique in self.used:
            count += 1
            unique = f"{name} #{count}"
        self.used.add(unique)
        return unique
