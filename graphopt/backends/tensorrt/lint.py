"""Lint a model for TensorRT: the real parser where a TensorRT module imports, else the table.

The real parser stops at the first node it rejects. To report every rejected node, the
rejected node is cut out (its outputs become network inputs of the type shape inference gave
them; a node inside a local function: the call) and the rest is parsed again, up to
:data:`MAX_REJECTIONS` times. A stand-in input is not what the cut node computed (its type,
shape, constness and range are guesses), so what the parser then says of a node that reads
one, directly or through others, is not a verdict on the model: it is reported as an
unverified warning, never as a rejection. The static rule table (:mod:`.rules`) gives the
verdict with ``static=True`` or when no module imports; its warnings are added either way.

The parser runs in a child process (:mod:`.isolated`). When it crashes on the model itself,
TensorRT cannot load the model: that is an error (exit 1, as a rejection), and the static
table's findings follow it; a crash on a cut copy is an unverified warning, as any word on
one is.

Both checkers name a node the same way (:func:`.node_labels.prepare`): the parser reads a
copy of the model whose every node has a unique name, so that its errors point at one node.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from graphopt.backends.tensorrt.findings import ERROR, WARNING, Finding
from graphopt.backends.tensorrt.hints import clean_reason
from graphopt.backends.tensorrt.isolated import (
    NativeCrash,
    ParseSummary,
    parse_isolated,
    parser_child,
)
from graphopt.backends.tensorrt.module import TensorRT, find_tensorrt
from graphopt.backends.tensorrt.node_labels import NodeRef, Prepared
from graphopt.backends.tensorrt.rules import Analysis, analyze
from graphopt.backends.tensorrt.shape_tensors import shape_tensor_warning

MAX_REJECTIONS = 64
UNVERIFIED = "parser-unverified"
# Static warnings the parser's own network answers better, when its parse completes.
_PARSER_ANSWERS = ("shape-tensor-input",)
# Static rules for what the parser accepts and the engine build refuses: their errors are
# added to the real parser's findings (lint does not build an engine).
_BUILDER_ONLY = ("builder",)
# Reasons about the op itself, which no stand-in input can cause.
_OWN_REASON = re.compile(r"no importer|Plugin not found|plugin")
_PARSING = re.compile(r"^(?:Static check for parsing node|Parsing node): (.*) \[[^\]]*\]$")


@dataclass
class LintResult:
    """The findings and which checker produced the verdict."""

    checker: str  # "TensorRT-RTX 1.7.1.116 (tensorrt_rtx) parser" or "static rule table"
    findings: list[Finding] = field(default_factory=list)
    note: str = ""  # why the static table was used, when it was not asked for

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def to_json(self) -> dict:
        return {
            "checker": self.checker,
            "note": self.note,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [
                {
                    "severity": f.severity,
                    "node": f.node_name,
                    "where": f.location,
                    "op": f.op_type,
                    "reason": f.reason,
                    "rule": f.rule,
                    "fix": f.fix,
                }
                for f in self.findings
            ],
        }


def lint_tensorrt(
    model: onnx.ModelProto, static: bool = False, path: str | os.PathLike | None = None
) -> LintResult:
    """Lint ``model`` for TensorRT's ONNX parser. ``path``: the file ``model`` was loaded
    from; its external data is read from that file's folder (checked by the loader to stay
    inside it), not from the current directory."""
    available = find_tensorrt()
    if not static and available.found is not None:
        parser_child(available.found).start()  # it starts while the table runs
    analysis = analyze(model)
    if static or available.found is None:
        note = "" if static else f"no TensorRT module ({available.why_not()})"
        return LintResult("static rule table", analysis.findings, note)
    trt = available.found
    try:
        findings, completed = _parse_all(trt, analysis, path)
    except NativeCrash as crash:
        return _crashed(trt, analysis, crash)
    builder = [f for f in analysis.findings if f.rule in _BUILDER_ONLY and f.severity == ERROR]
    builder = [f for f in builder if not _rejected(findings, f)]
    findings += [
        f
        for f in analysis.findings
        if (f.severity == WARNING and not (completed and f.rule in _PARSER_ANSWERS)) or f in builder
    ]
    note = (
        f"{len(builder)} error(s) from the static builder rules: nodes the parser accepts "
        "and the engine build refuses"
        if builder
        else ""
    )
    return LintResult(f"{trt.describe()} parser", findings, note)


def _crashed(trt: TensorRT, analysis: Analysis, crash: NativeCrash) -> LintResult:
    """The parser crashed on the model itself: TensorRT cannot load it (an error, as a
    rejection is), and the static table's findings say which nodes its rules flag."""
    crashed = Finding(
        ERROR,
        "",
        "",
        f"{crash} parsing the model: TensorRT cannot load it (the static rule table's "
        "findings follow)",
        "parser-crash",
    )
    note = f"{trt.describe()} parser crashed ({crash.signal})"
    return LintResult("static rule table", [crashed, *analysis.findings], note)


def _rejected(findings: list[Finding], finding: Finding) -> bool:
    """Whether the parser already rejected the node of a builder-only ``finding``."""
    return any(f.severity == ERROR and f.location == finding.location for f in findings)


def parser_findings(
    trt: TensorRT, model: onnx.ModelProto, path: str | os.PathLike | None = None
) -> list[Finding]:
    """Every node the real parser rejects, cutting each out to parse on past it. ``path``:
    the model's file, for its external data (see :func:`lint_tensorrt`)."""
    return _parse_all(trt, analyze(model), path)[0]


def _parse_all(
    trt: TensorRT, analysis: Analysis, path: str | os.PathLike | None
) -> tuple[list[Finding], bool]:
    """The parser's findings, and whether a parse ran to the end (its network then says
    which inputs are shape tensors)."""
    prepared = analysis.prepared
    values = _value_infos(prepared.model)
    uses = _uses(prepared.model)
    inputs = {v.name for v in prepared.model.graph.input}
    current = prepared.model
    cuts: list[NodeRef] = []
    taint: dict[str, str] = {}  # value -> the label of the cut node it depends on
    findings: list[Finding] = []
    for _ in range(MAX_REJECTIONS):
        try:
            parsed = parse_isolated(trt, current.SerializeToString(), path)
        except NativeCrash as crash:
            if not cuts:  # on the model itself: lint_tensorrt falls back to the table
                raise
            # On a copy with stand-in inputs: not a verdict on the model, and the rest of
            # it is unparsed.
            reason = f"{crash}; the nodes after it were not parsed"
            findings.append(_unverified(None, "", reason, cuts[-1].label))
            return findings, False
        if parsed.ok:
            findings += [
                Finding(WARNING, "", "", shape_tensor_warning(name), "parser")
                for name in parsed.shape_inputs
                if name in inputs
            ]
            return findings, True
        ref, op_type, reason = _first_error(parsed, prepared, current)
        own = _OWN_REASON.search(reason) is not None
        source = _source(ref, uses, taint) if cuts and not own else None
        if ref is None:
            # A graph-level error (an input's type): nothing to cut past. After a cut it is
            # about a stand-in input, most likely.
            if cuts:
                findings.append(_unverified(None, op_type, reason, cuts[-1].label))
            else:
                findings.append(Finding(ERROR, "", op_type, reason, "parser"))
            return findings, False
        if source is not None:
            findings.append(_unverified(ref, op_type, reason, source))
        else:
            fix = analysis.fix(ref.key, op_type, reason)
            findings.append(Finding(ERROR, ref.name, op_type, reason, "parser", ref.label, fix))
        cut_ref = prepared.refs.get(ref.cut, ref)
        cut = _cut(current, ref.cut, values) if cut_ref not in cuts else None
        if cut is None:
            return findings, False
        current, outputs = cut
        cuts.append(cut_ref)
        taint.update((o, cut_ref.label) for o in outputs if o not in taint)
        _spread(prepared.model.graph, uses, taint)
    findings.append(
        Finding(ERROR, "", "", f"stopped after {MAX_REJECTIONS} rejected nodes", "parser")
    )
    return findings, False


def _unverified(ref: NodeRef | None, op_type: str, reason: str, source: str) -> Finding:
    return Finding(
        WARNING,
        ref.name if ref else "",
        op_type,
        f"unverified, parsed only after {source} was cut out (its outputs stood in as "
        f"network inputs): {reason}",
        UNVERIFIED,
        ref.label if ref else "",
    )


def _first_error(
    parsed: ParseSummary, prepared: Prepared, current: onnx.ModelProto
) -> tuple[NodeRef | None, str, str]:
    """The node of the parse's first error (or None: the graph), its op, the reason."""
    if not parsed.errors:
        return None, "", "TensorRT's parser failed without saying why"
    error = parsed.errors[0]
    name, index, op_type = error.node_name, error.node_index, error.op_type
    ref = prepared.refs.get(name) if name else None
    if ref is None and index < 0:
        # Some importer checks name no node (the pre-opset-7 broadcast); the parser's log
        # says which node it was parsing.
        ref = prepared.refs.get(_last_parsed(parsed.messages))
    if ref is None and 0 <= index < len(current.graph.node):
        ref = prepared.refs.get(current.graph.node[index].name)
    if ref is not None:
        op_type = ref.op_type
    names = (ref.key, ref.name) if ref else ()
    return ref, op_type, clean_reason(error.desc, op_type, names)


def _last_parsed(messages: list[tuple[str, str]]) -> str:
    last = ""
    for _, message in messages:
        match = _PARSING.match(message)
        if match:
            last = match.group(1)
        elif message.startswith("Marking "):  # outputs are marked after the last node
            last = ""
    return last


def _source(ref: NodeRef | None, uses: dict[str, frozenset[str]], taint: dict[str, str]):
    """The cut node a node depends on (the label), or None."""
    if ref is None:
        return None
    names = uses.get(ref.key)
    if names is None:  # inside a local function: what its call reads
        names = uses.get(ref.cut, frozenset())
    return next((taint[n] for n in names if n in taint), None)


def _uses(model: onnx.ModelProto) -> dict[str, frozenset[str]]:
    """Each node's (prepared name) inputs, with those its subgraphs read."""
    uses: dict[str, frozenset[str]] = {}

    def graph(g: onnx.GraphProto) -> set[str]:
        read: set[str] = set()
        for node in g.node:
            names = {n for n in node.input if n}
            for attr in node.attribute:
                for body in _bodies(attr):
                    names |= graph(body)
            uses[node.name] = frozenset(names)
            read |= names
        return read

    graph(model.graph)
    return uses


def _spread(graph: onnx.GraphProto, uses: dict[str, frozenset[str]], taint: dict[str, str]):
    """Mark every value computed from a tainted one (subgraphs first: their owner's outputs
    depend on what they read)."""
    for node in graph.node:
        for attr in node.attribute:
            for body in _bodies(attr):
                _spread(body, uses, taint)
        source = next((taint[n] for n in uses.get(node.name, ()) if n in taint), None)
        if source is not None:
            for output in node.output:
                if output:
                    taint.setdefault(output, source)


def _bodies(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return [attr.g, *attr.graphs] if attr.HasField("g") else list(attr.graphs)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Inferred types of every value (all graphs), for a cut node's stand-in inputs."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference fails on some valid models; untyped cuts become float
        inferred = model
    found: dict[str, onnx.ValueInfoProto] = {}
    stack = [inferred.graph]
    while stack:
        g = stack.pop()
        for value in (*g.value_info, *g.output):
            found.setdefault(value.name, value)
        for node in g.node:
            for attr in node.attribute:
                stack.extend(_bodies(attr))
    return found


def _cut(
    model: onnx.ModelProto, key: str, values: dict[str, onnx.ValueInfoProto]
) -> tuple[onnx.ModelProto, list[str]] | None:
    """``model`` without the node named ``key`` (in any graph), its outputs made network
    inputs; None when there is no such node."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    stack = [cut.graph]
    while stack:
        graph = stack.pop()
        for position, node in enumerate(graph.node):
            if node.name == key:
                outputs = [o for o in node.output if o]
                del graph.node[position]
                present = {v.name for v in cut.graph.input}
                for output in outputs:
                    if output in present:
                        continue
                    info = values.get(output)
                    value = onnx.ValueInfoProto()
                    if info is not None and info.type.tensor_type.elem_type:
                        value.CopyFrom(info)
                    else:
                        value.CopyFrom(
                            onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
                        )
                    cut.graph.input.append(value)
                return cut, outputs
            for attr in node.attribute:
                stack.extend(_bodies(attr))
    return None


def rejection_notes(model: ir.Model) -> list[str]:
    """A warning naming what TensorRT's parser would reject in an optimized ``model`` (the
    static rule table: no TensorRT needed), or none. ``graphopt lint`` runs the real parser
    where TensorRT is installed."""
    from graphopt import io
    from graphopt.backends.ort import IN_MEMORY_LIMIT_BYTES

    if io.total_tensor_bytes(model) >= IN_MEMORY_LIMIT_BYTES:
        # Not copied into a protobuf for a check: `graphopt lint` reads the file.
        return [
            "--target tensorrt: not checked against TensorRT's rules (over 1 GiB of "
            "weights); graphopt lint --target tensorrt OUT checks the file"
        ]
    errors = [f for f in analyze(io.to_proto(model)).findings if f.severity == ERROR]
    if not errors:
        return []
    first = errors[0]
    named = ", ".join(sorted({f.op_type or f.rule for f in errors}))
    return [
        f"warning: --target tensorrt: TensorRT's parser would reject {len(errors)} node(s) "
        f"({named}; first: {first.location}: {first.reason})"
        + (f"; fix: {first.fix}" if first.fix else "")
        + "; graphopt lint --target tensorrt lists them"
    ]
