"""``graphopt inspect``: what a model is made of, read from metadata (weights are never read).

Op histogram, parameter count and bytes, FLOPs at the given or default input shapes, opsets,
IR version, producer, inputs and outputs with dtypes and (symbolic) shapes, and whether the
model has subgraphs, functions or external data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import onnx_ir as ir
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt import io
from graphopt.analysis.flops import flops_of_inferred
from graphopt.analysis.shapes import infer_shapes, shape_text
from graphopt.analysis.stats import count_nodes, has_subgraphs, op_histogram, parameter_count
from graphopt.inputs import graph_inputs


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
    flops_by_op: dict[str, int]
    flops_not_counted: dict[str, int]
    flops_unknown_shape: dict[str, int]
    has_subgraphs: bool
    functions: list[str]
    external_data: bool
    external_data_files: list[str]
    metadata: dict[str, str] = field(default_factory=dict)


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
    return ModelSummary(
        ir_version=model.ir_version,
        producer=producer,
        opsets={domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
        inputs=[_info(v) for v in graph_inputs(model)],
        outputs=[_info(v) for v in model.graph.outputs],
        nodes=count_nodes(model),
        ops=dict(sorted(op_histogram(model).items(), key=lambda kv: (-kv[1], kv[0]))),
        parameters=params,
        parameter_bytes=param_bytes,
        initializers=initializers,
        flops_shapes={name: list(shape) for name, shape in bound.items()},
        flops=flops.total,
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
    )


def _info(value: ir.Value) -> TensorInfo:
    dtype = value.dtype.name.lower() if value.dtype is not None else None
    return TensorInfo(value.name or "", dtype, shape_text(value.shape))


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
            f"({human_count(summary.flops / 2, 'MACs')}; multiply-add = 2 FLOPs)",
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
