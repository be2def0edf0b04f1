"""Timing models in ONNX Runtime side by side: what ``graphopt bench`` runs and reports.

Inputs come from graphopt's input generator (:mod:`graphopt.inputs`: seeded, shaped and
valued the way the model uses them), bound at each requested batch size; a model whose
inputs match the first's gets the very same arrays. Sessions come from
:mod:`graphopt.backends.ort`; rounds from :func:`graphopt.timing.interleaved`.

An ``.ort`` file (ORT's own format, e.g. from ``optimize --save-ort-optimized``) has no ONNX
graph to read, so its inputs are generated from what the session declares; its op domains are
read from the file (a flatbuffer), so that graphopt's kernel library is registered when it
uses graphopt's ops, as for an ``.onnx`` model.

Each row counts its own model's batch (items per run). When the models' batches differ, the
ratio to the first compares time per item, and says so (``ratio_basis``): time per run would
compare unequal work.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.backends.ort import SessionConfig, create_session, resolve_providers
from graphopt.errors import UserInputError
from graphopt.input_dims import (
    batch_dims,
    dims_of,
    graph_inputs,
    non_tensor_kind,
    parse_input_shapes,
)
from graphopt.inputs import bind_dims, describe_shapes, input_shapes, make_inputs
from graphopt.timing import WARMUP, Spread, interleaved, pair_ratios

DEFAULT_ROUNDS = 20


@dataclass
class BenchRequest:
    """What to time and how."""

    models: list[str]
    # None: the generated inputs' own batch.
    batches: list[int | None] = field(default_factory=lambda: [None])
    config: SessionConfig = field(default_factory=lambda: SessionConfig(threads=1))
    rounds: int = DEFAULT_ROUNDS
    warmup: int = WARMUP
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> BenchRequest:
        """From ``graphopt bench``'s arguments, each checked (a bad one: exit 2)."""
        if args.runs < 1:
            raise UserInputError("--runs: must be at least 1")
        if args.warmup < 0:
            raise UserInputError("--warmup: must be 0 or more")
        if args.threads < 0:
            raise UserInputError("--threads: must be 0 (ORT's default) or more")
        batches: list[int | None] = [None]
        if args.batch:
            if any(b < 1 for b in args.batch):
                raise UserInputError("--batch: sizes must be 1 or more")
            batches = list(dict.fromkeys(args.batch))
        config = SessionConfig(
            providers=resolve_providers(args.provider),
            threads=args.threads,
            # One inter-op thread and sequential execution: --threads is the whole budget.
            inter_threads=1,
            opt_level=args.opt_level,
        )
        return cls(
            models=list(args.models),
            batches=batches,
            config=config,
            rounds=args.runs,
            warmup=args.warmup,
            input_shapes=parse_input_shapes(args.input_shape),
            seed=args.seed,
        )


@dataclass
class BenchRow:
    """One model at one batch size."""

    path: str
    latency: Spread  # seconds per run
    # Items (batch rows) per second at the median latency; None when a run holds no items
    # (a batch of 0: empty tensors, where a rate would be meaningless).
    throughput: float | None
    # time(first model) / time(this one), per round; None for the first model. Per item
    # (see ``per_item``) when the two run different batches.
    ratio: Spread | None
    items: int = 1  # items per run: this model's own batch
    shapes: str = ""  # this model's inputs, described
    per_item: bool = False  # the ratio compares time per item (the batches differ)


@dataclass
class BatchResult:
    batch: int | None
    # The models' inputs, described: one text when they agree, else each model's ("#1 ...;
    # #2 ...").
    shapes: str
    rows: list[BenchRow]


@dataclass
class BenchResult:
    config: SessionConfig
    ort_version: str
    seed: int
    rounds: int
    warmup: int
    batches: list[BatchResult]


def run_bench(request: BenchRequest, tick: Callable[[], None] | None = None) -> BenchResult:
    """Time ``request.models``; ``tick`` is called after every round (a progress bar)."""
    from graphopt.ortrun import import_onnxruntime

    ort = import_onnxruntime()
    models = [_open(path, request.config) for path in request.models]
    _check_input_shapes(models, request.input_shapes)
    results = []
    for batch in request.batches:
        feeds_per_model = _feeds(models, request, batch)
        calls = [
            _call(session, feeds)
            for (_, _, session), feeds in zip(models, feeds_per_model, strict=True)
        ]
        for (path, model, _), call, feeds in zip(models, calls, feeds_per_model, strict=True):
            try:
                call()  # one run first: a model that fails says so before any timing
            except Exception as exc:
                shapes = describe_shapes(model, {k: v.shape for k, v in feeds.items()})
                raise UserInputError(
                    f"{path}: ONNX Runtime fails on the generated inputs ({shapes}): "
                    f"{_first_line(exc)}{_shape_hint(exc)}"
                ) from None
        times = interleaved(calls, request.rounds, request.warmup, tick)
        rows = _rows(models, feeds_per_model, times, batch)
        results.append(BatchResult(batch, joint_shapes([row.shapes for row in rows]), rows))
    return BenchResult(
        request.config, ort.__version__, request.seed, request.rounds, request.warmup, results
    )


def _rows(
    models: list[tuple[str, ir.Model, Any]],
    feeds_per_model: list[dict[str, np.ndarray]],
    times: list[list[float]],
    batch: int | None,
) -> list[BenchRow]:
    """One row per model, each counting its own run's items: the first model's batch used
    to count for every row, so a model at batch 8 next to one at batch 1 showed 1/8 of its
    throughput, and its ratio compared a run of 8 items with a run of 1 as like for like."""
    rows: list[BenchRow] = []
    for (path, model, _), feeds, seconds in zip(models, feeds_per_model, times, strict=True):
        items = batch if batch is not None else _batch_of(model, feeds)
        latency = Spread.of(seconds)
        throughput = items / latency.median if items else None
        shapes = describe_shapes(model, {k: v.shape for k, v in feeds.items()})
        rows.append(BenchRow(path, latency, throughput, None, items, shapes))
    first = rows[0]
    for row, seconds in zip(rows[1:], times[1:], strict=True):
        ratios = pair_ratios(times[0], seconds)
        # Per item when the batches differ (and both hold items): (t1 / n1) / (t / n).
        row.per_item = row.items != first.items and bool(row.items) and bool(first.items)
        if row.per_item:
            ratios = [r * row.items / first.items for r in ratios]
        row.ratio = Spread.of(ratios)
    return rows


def joint_shapes(shapes: Sequence[str]) -> str:
    """The models' inputs in one text: once when they agree, else each model's by number."""
    if len(set(shapes)) <= 1:
        return shapes[0] if shapes else ""
    return "; ".join(f"#{index} {text}" for index, text in enumerate(shapes, 1))


def shapes_at(
    model: ir.Model, given: Mapping[str, tuple[int, ...]], batch: int | None
) -> dict[str, tuple[int, ...]]:
    """The input shapes at ``batch`` (None: as generated): the model's symbolic batch dim
    (:func:`~graphopt.input_dims.batch_dims`) set to it, everything else bound as usual."""
    if batch is None:
        return input_shapes(model, given)
    dims = bind_dims(model, given)
    keys = sorted(batch_dims(model) & set(dims))
    if not keys:
        shapes = input_shapes(model, given)
        leading = {s[0] for s in shapes.values() if len(s) >= 2}
        if leading == {batch}:
            return shapes  # a fixed batch of that size: nothing to bind
        raise UserInputError(
            f"--batch {batch}: the model has no symbolic batch dim "
            f"({describe_shapes(model, shapes)}); leave --batch out or give --input-shape"
        )
    _check_batch_agrees(model, given, batch, keys)
    for key in keys:
        dims[key] = batch
    return input_shapes(model, given, dims)


def _check_batch_agrees(
    model: ir.Model, given: Mapping[str, tuple[int, ...]], batch: int, keys: Sequence[str]
) -> None:
    """Refuse an ``--input-shape`` that binds the batch dim to another size than ``--batch``:
    ``--batch 2 --input-shape x:3x8`` used to time 2x8 without a word. Refused rather than
    one overriding the other: either reading is a guess at what the user meant."""
    from_given = dims_of(model, given)
    for key in keys:
        if key in from_given and from_given[key] != batch:
            raise UserInputError(
                f"--batch {batch}: --input-shape sets the batch dim {key!r} to "
                f"{from_given[key]}; give the batch once (--batch, or --input-shape alone)"
            )


def ratio_text(ratio: Spread) -> str:
    """``1.23x (1.18-1.27)``: median and p10-p90 of the per-round ratios."""
    return f"{ratio.median:.2f}x ({ratio.p10:.2f}-{ratio.p90:.2f})"


RATIO_TEXT = "median over rounds of time(first model) / time(model); >1: faster"
PER_ITEM_TEXT = (
    "where the batches differ (ratio_basis 'per item'): of the time per item, "
    "(time(first) / items(first)) / (time(model) / items(model))"
)


def to_json(result: BenchResult) -> dict[str, Any]:
    """The result as strict JSON-ready data (times in milliseconds; :func:`json_safe`)."""

    def spread(s: Spread, scale: float) -> dict[str, float]:
        return {"median": s.median * scale, "p10": s.p10 * scale, "p90": s.p90 * scale}

    return json_safe(
        {
            "onnxruntime": result.ort_version,
            "session": result.config.to_json(),
            "seed": result.seed,
            "warmup": result.warmup,
            "rounds": result.rounds,
            "ratio": f"{RATIO_TEXT}; {PER_ITEM_TEXT}",
            "batches": [
                {
                    "batch": b.batch,
                    "shapes": b.shapes,
                    "models": [
                        {
                            "path": row.path,
                            "shapes": row.shapes,
                            "items_per_run": row.items,
                            "latency_ms": spread(row.latency, 1e3),
                            "throughput_per_s": row.throughput,  # null: no items per run
                            "ratio_to_first": None if row.ratio is None else spread(row.ratio, 1.0),
                            "ratio_basis": None
                            if row.ratio is None
                            else ("per item" if row.per_item else "per run"),
                        }
                        for row in b.rows
                    ],
                }
                for b in result.batches
            ],
        }
    )


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float as text (``"inf"``, ``"-inf"``, ``"nan"``):
    JSON has no such numbers, and ``json.dumps`` wrote ``Infinity``/``NaN``, which strict
    parsers refuse. The commands print it with ``allow_nan=False`` as a guard."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def refuse_unfeedable_inputs(path: str, model: ir.Model, command: str) -> None:
    """A one-line error for an input of a type packed several per byte (int4, float4...):
    ONNX Runtime's Python API cannot feed them, generated or from a file, so no flag helps
    (the advice used to be a shape or input file)."""
    from graphopt.ortrun import SUB_BYTE_TYPES

    for value in graph_inputs(model):
        if value.dtype is not None and value.dtype in SUB_BYTE_TYPES:
            dtype = value.dtype.name.lower()
            raise UserInputError(
                f"{path}: input {value.name!r} is {dtype}: ONNX Runtime's Python API cannot "
                f"feed {dtype} tensors (packed several per byte), so {command} cannot run "
                "this model"
            )


def _open(path: str, config: SessionConfig) -> tuple[str, ir.Model, Any]:
    """(path, the model or a stand-in holding its inputs, a session)."""
    from graphopt import io

    source = Path(os.fspath(path))
    model: ir.Model | None = None
    # What the session's custom-op registration reads: the model, or for an .ort file a
    # stand-in naming graphopt's op domain when the file uses it.
    domains: ir.Model | None = None
    if source.suffix.lower() != ".ort":
        # Map outputs (ZipMap) untyped: onnx-ir cannot hold their type; bench only runs it.
        model = domains = io.load(source, untype_maps=True).model
        refuse_unfeedable_inputs(path, model, "bench")
    elif source.is_dir():
        raise UserInputError(f"{source}: is a folder, expected an .ort file")
    elif not source.is_file():
        raise UserInputError(f"{source}: no such file")
    else:
        domains = _own_domain_stand_in(source)
    try:
        session = create_session(source, config, domains)
    except UserInputError as exc:
        # graphopt's kernels not built, say: which of the models needs them.
        message = str(exc)
        raise UserInputError(message if path in message else f"{path}: {message}") from None
    except Exception as exc:
        raise UserInputError(f"{path}: ONNX Runtime cannot load it: {_first_line(exc)}") from None
    return path, model if model is not None else _stand_in(session), session


def _own_domain_stand_in(source: Path) -> ir.Model | None:
    """A node-less model importing graphopt's op domain, at the version the ``.ort`` file
    imports, with one node of it, when the file's graph (subgraphs included) has ops of that
    domain; else None. What :func:`~graphopt.backends.ort_custom_ops.register_active_custom_ops`
    reads to register graphopt's own library (or say it is not built): passing no model for
    an ``.ort`` file left its graphopt ops unregistered ("graphopt:SparseMatMul(1) is not a
    registered function/op"). The format is a flatbuffer: its op domains are read in place,
    without loading the weights."""
    from graphopt.backends.ort_custom_ops import OWN_DOMAIN

    versions = _ort_file_domains(source)
    if versions is None or OWN_DOMAIN not in versions:
        return None
    node = ir.Node(OWN_DOMAIN, "OrtFormatOp", inputs=[])
    opsets = {"": 21, OWN_DOMAIN: versions[OWN_DOMAIN] or 1}
    graph = ir.Graph([], [], nodes=[node], opset_imports=opsets, name="ort_domains")
    return ir.Model(graph, ir_version=10)


def _ort_file_domains(source: Path) -> dict[str, int | None] | None:
    """{op domain used by a node: the version the file imports (None if it imports none)} of
    an ``.ort`` file, or None when it is not one graphopt can read (ORT then says why)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import (
        InferenceSession,
    )

    try:
        with (
            source.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            if not InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
                return None
            model = InferenceSession.GetRootAs(data, 0).Model()
            if model is None or model.Graph() is None:
                return None
            imported = {
                model.OpsetImport(i).Domain().decode(): model.OpsetImport(i).Version()
                for i in range(model.OpsetImportLength())
            }
            used = _node_domains(model.Graph())
    except Exception:  # a truncated or foreign file: ORT's own error names the problem
        return None
    return {domain: imported.get(domain) for domain in used}


def _node_domains(graph: Any) -> set[str]:
    """The op domains of an ORT-format graph's nodes, its subgraphs' included."""
    domains: set[str] = set()
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        domains.add((node.Domain() or b"").decode())
        for j in range(node.AttributesLength()):
            attr = node.Attributes(j)
            subgraphs = [attr.Graphs(k) for k in range(attr.GraphsLength())]
            for sub in [attr.G(), *subgraphs]:
                if sub is not None:
                    domains |= _node_domains(sub)
    return domains


def _check_input_shapes(
    models: list[tuple[str, ir.Model, Any]], given: Mapping[str, tuple[int, ...]]
) -> None:
    """``--input-shape`` checked as the other commands check it
    (:func:`graphopt.input_dims.check_input_shapes`: a wrong rank, a dim the model fixes, a
    zero-sized dim), against each model that has the input; a name no model has is an error.
    bench used to ignore an unknown name and time empty tensors ("throughput 0.0"). Inputs
    that are not tensors are refused here too: bench generates tensors only."""
    from graphopt.input_dims import check_input_shapes

    for name, shape in given.items():
        if 0 in shape:  # before verify's wording, which speaks of comparing
            raise UserInputError(
                f"--input-shape {name}:{'x'.join(map(str, shape))}: a zero-sized dim gives "
                "empty tensors, and timing them measures nothing; use dims of at least 1"
            )
    names: set[str] = set()
    for path, model, _ in models:
        inputs = graph_inputs(model)
        for value in inputs:
            kind = non_tensor_kind(value)
            if kind is not None:
                raise UserInputError(
                    f"{path}: input {value.name!r} is {kind}, not a tensor: bench generates "
                    "tensor inputs only, so it cannot time this model"
                )
        own = {v.name for v in inputs}
        names |= own
        check_input_shapes(model, {k: v for k, v in given.items() if k in own})
    unknown = sorted(set(given) - names)
    if unknown:
        raise UserInputError(f"--input-shape names unknown input(s): {', '.join(unknown)}")


def _feeds(
    models: list[tuple[str, ir.Model, Any]], request: BenchRequest, batch: int | None
) -> list[dict[str, np.ndarray]]:
    """One feed dict per model; a model with the first one's inputs gets the same arrays."""
    feeds: list[dict[str, np.ndarray]] = []
    signatures: list[tuple] = []
    for _, model, _ in models:
        shapes = shapes_at(model, request.input_shapes, batch)
        signature = tuple(
            (v.name, v.dtype, shapes[v.name]) for v in graph_inputs(model) if v.name in shapes
        )
        if signatures and signature == signatures[0]:
            feeds.append(feeds[0])
        else:
            feeds.append(make_inputs(model, seed=request.seed, shapes=shapes))
        signatures.append(signature)
    return feeds


# ORT tensor types numpy has: session.run returns these; any other (bfloat16, float8, int4)
# only comes out as an OrtValue.
_NUMPY_TENSOR_TYPES = frozenset(
    f"tensor({name})"
    for name in (
        *("float", "float16", "double", "int8", "int16", "int32", "int64"),
        *("uint8", "uint16", "uint32", "uint64", "bool", "string", "complex64", "complex128"),
    )
)


def _call(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One timed run. Models with bfloat16/float8 inputs or outputs run on OrtValues, made
    once (not in every timed run); only ML-dtype inputs used to be seen, so a model with
    bfloat16 outputs failed ("No corresponding Numpy type for Tensor Type")."""
    from graphopt.ortrun import is_ml_dtype, to_feed

    outputs = session.get_outputs()
    ml_outputs = any(
        o.type.startswith("tensor(") and o.type not in _NUMPY_TENSOR_TYPES for o in outputs
    )
    if not ml_outputs and not any(is_ml_dtype(a) for a in feeds.values()):
        return lambda: session.run(None, feeds)
    from graphopt.ortrun import import_onnxruntime

    ort = import_onnxruntime()
    values = {}
    for name, array in feeds.items():
        value = to_feed(array)
        values[name] = (
            value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
        )
    names = [o.name for o in outputs]
    return lambda: session.run_with_ort_values(names, values)


def _batch_of(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> int:
    """Items per run for throughput: the bound symbolic batch dim; else the generated
    inputs' batch, the first dim of the inputs of rank 2 or more (the first such input's
    where they disagree); else 1 (rank-1 or scalar inputs only: one item per run).

    Only symbolic batch dims used to count, so a model fixed at batch 8 was timed as one
    item per run (8x too low a throughput next to ``--batch 8``)."""
    bound = dims_of(model, {k: v.shape for k, v in feeds.items()})
    sizes = [bound[k] for k in sorted(batch_dims(model)) if k in bound]
    if sizes:
        return sizes[0]
    leading = [int(array.shape[0]) for array in feeds.values() if array.ndim >= 2]
    return leading[0] if leading else 1


# ORT's type strings for session inputs -> ONNX data types.
_ORT_TYPES = {
    "tensor(float)": ir.DataType.FLOAT,
    "tensor(float16)": ir.DataType.FLOAT16,
    "tensor(bfloat16)": ir.DataType.BFLOAT16,
    "tensor(double)": ir.DataType.DOUBLE,
    "tensor(int8)": ir.DataType.INT8,
    "tensor(uint8)": ir.DataType.UINT8,
    "tensor(int16)": ir.DataType.INT16,
    "tensor(int32)": ir.DataType.INT32,
    "tensor(int64)": ir.DataType.INT64,
    "tensor(bool)": ir.DataType.BOOL,
}


def _stand_in(session: Any) -> ir.Model:
    """A node-less model with the session's inputs: enough to generate inputs for a file
    graphopt cannot read (the ``.ort`` format)."""
    values = []
    for arg in session.get_inputs():
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise UserInputError(f"input {arg.name!r}: cannot generate {arg.type} inputs")
        dims = [d if isinstance(d, int) else (d or None) for d in arg.shape]
        values.append(ir.Value(name=arg.name, type=ir.TensorType(dtype), shape=ir.Shape(dims)))
    graph = ir.Graph(values, [], nodes=[], opset_imports={"": 21}, name="stand_in")
    return ir.Model(graph, ir_version=10)


def _shape_hint(exc: BaseException) -> str:
    """``; bind shapes with --input-shape`` when ORT's error is about shapes; else nothing:
    the hint sent users binding shapes for a type ORT's Python API could not read."""
    text = str(exc).lower()
    words = ("shape", "dimension", "rank", "broadcast", "size", "index", "indices")
    return "; bind shapes with --input-shape" if any(w in text for w in words) else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
