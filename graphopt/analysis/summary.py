"""``graphopt inspect``: what a model is made of, read from metadata (weights are never read).

Op histogram, parameter count and bytes, FLOPs at the given or default input shapes (If:
the larger branch, Loop/Scan: body × iterations when known, with notes), opsets, IR version,
producer, inputs and outputs with dtypes and (symbolic) shapes, and whether the model has
subgraphs, functions or external data.

Symbolic dims print as their names (``batch``, ``N``, ``unk__12``, ``s0``). A dim an exporter
stated as an expression (``2*s0 + 1``, or a sympy printout spanning lines) prints as a short
name ``expr0``, ``expr1``... and :attr:`ModelSummary.symbols` maps it back to the expression.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import onnx_ir as ir
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt import io
from graphopt.analysis.flops import ControlFlow, flops_of_inferred
from graphopt.analysis.shapes import infer_shapes, shape_text
from graphopt.analysis.stats import count_nodes, has_subgraphs, op_histogram, parameter_count
from graphopt.input_dims import graph_inputs


@dataclass
class TensorInfo:
    """A graph input or output: name, dtype and shape (ints, symbolic names, None)."""

    name: str
    dtype: str | None
    shape: list[int | str | None] | None


@dataclass
class ModelSummary:
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: int
    ops: dict[str, int]
    parameters: int
    parameter_bytes: int
    initializers: int
    # Shapes FLOPs were computed at (bound from --input-shape or the defaults).
    flops_shapes: dict[str, list[int]]
    flops: int
    # Multiply-adds (Conv, MatMul, Gemm, attention): not flops / 2 when other ops count too.
    macs: int
    flops_by_op: dict[str, int]
    flops_not_counted: dict[str, int]
    flops_unknown_shape: dict[str, int]
    has_subgraphs: bool
    functions: list[str]
    external_data: bool
    external_data_files: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    # Each If/Loop/Scan: FLOPs of each body once, what entered the total, iterations, note.
    flops_control_flow: list[ControlFlow] = field(default_factory=list)
    # Short name shown in a shape → the symbolic expression it stands for (one line).
    symbols: dict[str, str] = field(default_factory=dict)


def summarize(
    model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> ModelSummary:
    """Summarize ``model`` without changing it or reading its weights."""
    inferred, bound = infer_shapes(model, input_shapes)
    flops = flops_of_inferred(inferred)
    params, param_bytes = parameter_count(model)
    initializers = sum(len(graph.initializers) for graph in (model.graph, *model.graph.subgraphs()))
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    data_files = io.external_data_files(model)
    names = SymbolNames([*graph_inputs(model), *model.graph.outputs])
    return ModelSummary(
        ir_version=model.ir_version,
        producer=producer,
        opsets={domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
        inputs=[_info(v, names) for v in graph_inputs(model)],
        outputs=[_info(v, names) for v in model.graph.outputs],
        nodes=count_nodes(model),
        ops=dict(sorted(op_histogram(model).items(), key=lambda kv: (-kv[1], kv[0]))),
        parameters=params,
        parameter_bytes=param_bytes,
        initializers=initializers,
        flops_shapes={name: list(shape) for name, shape in bound.items()},
        flops=flops.total,
        macs=flops.macs,
        flops_by_op=dict(flops.by_op.most_common()),
        flops_not_counted=dict(sorted(flops.not_counted.items())),
        flops_unknown_shape=dict(sorted(flops.unknown_shape.items())),
        has_subgraphs=has_subgraphs(model),
        functions=[
            f"{f.domain}::{f.name}" if f.domain else f.name for f in model.functions.values()
        ],
        external_data=bool(data_files),
        external_data_files=sorted({p.name for p in data_files}),
        metadata=dict(model.metadata_props),
        flops_control_flow=flops.control_flow,
        symbols=names.symbols,
    )


# A dim name shown as it is: an identifier (batch, N, unk__12, s0, sequence_length).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_MAX_NAME = 40


class SymbolNames:
    """Short names for the symbolic dims of ``values``' shapes.

    A name that is a plain identifier (up to 40 characters) is kept. Anything else (an
    expression exporters and symbolic shape inference write, e.g. ``floor((s0 - 1)/2) + 1``,
    sometimes multi-line) becomes ``expr0``, ``expr1``... in first-seen order, one name per
    distinct expression, never one the model already uses.
    """

    def __init__(self, values: list[ir.Value]) -> None:
        self.symbols: dict[str, str] = {}
        self._by_text: dict[str, str] = {}
        self._taken = {
            str(d.value)
            for v in values
            if v.shape is not None
            for d in v.shape
            if not isinstance(d, int) and d.value is not None
        }

    def name(self, text: str) -> str:
        text = " ".join(text.split())  # one line, single spaces
        if _NAME.fullmatch(text) and len(text) <= _MAX_NAME:
            return text
        if text not in self._by_text:
            i = len(self.symbols)
            while f"expr{i}" in self._taken:
                i += 1
            short = f"expr{i}"
            self._taken.add(short)
            self._by_text[text] = short
            self.symbols[short] = text
        return self._by_text[text]

    def shape(self, shape: ir.Shape | None) -> list[int | str | None] | None:
        """A JSON-friendly shape: ints, short symbolic names, None for unknown dims."""
        return shape_text(shape, self.name)


def _info(value: ir.Value, names: SymbolNames) -> TensorInfo:
    dtype = value.dtype.name.lower() if value.dtype is not None else None
    return TensorInfo(value.name or "", dtype, names.shape(value.shape))


def summary_json(summary: ModelSummary) -> str:
    """The summary as stable, indented JSON (keys in a fixed order)."""
    return json.dumps(asdict(summary), indent=2)


def human_count(n: float, unit: str = "") -> str:
    """1234567 → '1.23 M'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def human_bytes(n: int) -> str:
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}"
    return f"{n} B"


def _shape_str(shape: list[int | str | None] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def render_summary(summary: ModelSummary, console: Console) -> None:
    """Print the summary as rich tables."""
    overview = Table(title="model", title_justify="left", show_header=False, show_edge=False)
    overview.add_column("key")
    overview.add_column("value")
    rows = [
        ("IR version", str(summary.ir_version)),
        ("producer", summary.producer or "-"),
        ("opsets", ", ".join(f"{d} {v}" for d, v in sorted(summary.opsets.items()))),
        ("nodes", f"{summary.nodes} (non-Constant, subgraphs included)"),
        ("parameters", f"{human_count(summary.parameters)} ({summary.parameters})"),
        ("size of weights", human_bytes(summary.parameter_bytes)),
        ("initializers", str(summary.initializers)),
        (
            "FLOPs",
            f"{human_count(summary.flops, 'FLOPs')} "
            f"({human_count(summary.macs, 'MACs')} of matrix products; "
            "multiply-add = 2 FLOPs)",
        ),
        (
            "FLOPs at",
            ", ".join(f"{k}={_shape_str(list(v))}" for k, v in summary.flops_shapes.items()) or "-",
        ),
        ("subgraphs", "yes" if summary.has_subgraphs else "no"),
        ("functions", ", ".join(summary.functions) or "none"),
        ("external data", ", ".join(summary.external_data_files) or "no"),
    ]
    if summary.flops_not_counted:
        rows.append(("not counted", _counts(summary.flops_not_counted)))
    if summary.flops_unknown_shape:
        rows.append(("unknown shapes", _counts(summary.flops_unknown_shape)))
    notes = [c.note for c in summary.flops_control_flow if c.note]
    for i, note in enumerate(notes):
        rows.append(("control flow" if i == 0 else "", note))
    for i, (short, text) in enumerate(summary.symbols.items()):
        shown = text if len(text) <= 60 else text[:59] + "…"
        rows.append(("symbolic dims" if i == 0 else "", f"{short} = {shown}"))
    for key, value in rows:
        overview.add_row(key, escape(value))
    console.print(overview)

    io_table = Table(title="inputs and outputs", title_justify="left", show_edge=False)
    for column in ("", "name", "dtype", "shape"):
        io_table.add_column(column)
    for kind, infos in (("input", summary.inputs), ("output", summary.outputs)):
        for info in infos:
            io_table.add_row(
                kind, escape(info.name), info.dtype or "?", escape(_shape_str(info.shape))
            )
    console.print(io_table)

    ops = Table(title="ops", title_justify="left", show_edge=False)
    for column in ("op", "count", "FLOPs", "share"):
        ops.add_column(column, justify="left" if column == "op" else "right")
    for op, count in summary.ops.items():
        flops = summary.flops_by_op.get(op, 0)
        share = f"{100 * flops / summary.flops:.1f}%" if summary.flops else "-"
        ops.add_row(escape(op), str(count), human_count(flops) if flops else "0", share)
    console.print(ops)
    if summary.metadata:
        console.print(
            "metadata: " + ", ".join(f"{k}={v}" for k, v in summary.metadata.items()), markup=False
        )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in counts.items())
