"""Lint a model for TensorRT: the real parser where a TensorRT module imports, else the table.

The real parser stops at the first node it rejects. To report every rejected node, the
rejected node is cut out (its outputs become graph inputs of the type shape inference gave
them) and the rest is parsed again, up to :data:`MAX_REJECTIONS` times. The static rule table
(:mod:`.rules`) gives the verdict with ``static=True`` or when no module imports; its
dynamic-dim warnings are added either way (the parser accepts dynamic dims; an engine build
then needs a profile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from graphopt.backends.tensorrt.hints import fix_for
from graphopt.backends.tensorrt.module import TensorRT, find_tensorrt, parse
from graphopt.backends.tensorrt.rules import ERROR, WARNING, Finding, static_findings

MAX_REJECTIONS = 64


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
                    "op": f.op_type,
                    "reason": f.reason,
                    "rule": f.rule,
                    "fix": fix_for(f.op_type, f.reason) if f.severity == ERROR else "",
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
    table = static_findings(model)
    if static or available.found is None:
        note = "" if static else f"no TensorRT module ({available.why_not()})"
        return LintResult("static rule table", table, note)
    trt = available.found
    findings = parser_findings(trt, model, path)
    findings += [f for f in table if f.severity == WARNING]
    return LintResult(f"{trt.describe()} parser", findings)


def parser_findings(
    trt: TensorRT, model: onnx.ModelProto, path: str | os.PathLike | None = None
) -> list[Finding]:
    """Every node the real parser rejects, cutting each out to parse on past it. ``path``:
    the model's file, for its external data (see :func:`lint_tensorrt`)."""
    current = _with_types(model)
    findings: list[Finding] = []
    for _ in range(MAX_REJECTIONS):
        parsed = parse(trt, current.SerializeToString(), path=path)
        if parsed.ok:
            return findings
        error = parsed.errors[0]
        findings.append(Finding(ERROR, error.node_name, error.op_type, error.reason, "parser"))
        cut = _cut(current, error.node_name, error.node_index)
        if cut is None:  # a graph-level error (an input's type): nothing to cut past
            return findings
        current = cut
    findings.append(
        Finding(ERROR, "", "", f"stopped after {MAX_REJECTIONS} rejected nodes", "parser")
    )
    return findings


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with inferred value types, so a cut node's outputs can become typed inputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        return onnx.shape_inference.infer_shapes(copy)
    except Exception:  # inference fails on some valid models; untyped cuts become float
        return copy


def _cut(model: onnx.ModelProto, name: str, index: int) -> onnx.ModelProto | None:
    nodes = model.graph.node
    position = next((i for i, n in enumerate(nodes) if name and n.name == name), None)
    if position is None and 0 <= index < len(nodes) and nodes[index].name == name:
        position = index
    if position is None:
        return None
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    node = cut.graph.node[position]
    types = {v.name: v for v in (*cut.graph.value_info, *cut.graph.output)}
    present = {v.name for v in cut.graph.input}
    for output in node.output:
        if output and output not in present:
            info = types.get(output)
            value = onnx.ValueInfoProto()
            if info is not None and info.type.tensor_type.elem_type:
                value.CopyFrom(info)
            else:
                value.CopyFrom(
                    onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
                )
            cut.graph.input.append(value)
    del cut.graph.node[position]
    return cut


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
    errors = [f for f in static_findings(io.to_proto(model)) if f.severity == ERROR]
    if not errors:
        return []
    first = errors[0]
    named = ", ".join(sorted({f.op_type or f.rule for f in errors}))
    fix = fix_for(first.op_type, first.reason)
    return [
        f"warning: --target tensorrt: TensorRT's parser would reject {len(errors)} node(s) "
        f"({named}; first: {first.node_name}: {first.reason})"
        + (f"; fix: {fix}" if fix else "")
        + "; graphopt lint --target tensorrt lists them"
    ]
