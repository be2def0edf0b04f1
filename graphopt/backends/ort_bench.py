"""Timing models in ONNX Runtime side by side: what ``graphopt bench`` runs and reports.

Inputs come from graphopt's input generator (:mod:`graphopt.inputs`: seeded, shaped and
valued the way the model uses them), bound at each requested batch size; a model whose
inputs match the first's gets the very same arrays. Sessions come from
:mod:`graphopt.backends.ort`; rounds from :func:`graphopt.timing.interleaved`.

An ``.ort`` file (ORT's own format, e.g. from ``optimize --save-ort-optimized``) has no ONNX
graph to read, so its inputs are generated from what the session declares.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
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
    # time(first model) / time(this one), per round; None for the first model.
    ratio: Spread | None


@dataclass
class BatchResult:
    batch: int | None
    shapes: str  # the first model's inputs, described
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
                    f"{_first_line(exc)}; bind shapes with --input-shape"
                ) from None
        times = interleaved(calls, request.rounds, request.warmup, tick)
        first_model, first_feeds = models[0][1], feeds_per_model[0]
        items = batch if batch is not None else _batch_of(first_model, first_feeds)
        rows = []
        for index, ((path, _, _), seconds) in enumerate(zip(models, times, strict=True)):
            latency = Spread.of(seconds)
            ratio = Spread.of(pair_ratios(times[0], seconds)) if index else None
            throughput = items / latency.median if items else None
            rows.append(BenchRow(path, latency, throughput, ratio))
        shapes = describe_shapes(first_model, {k: v.shape for k, v in first_feeds.items()})
        results.append(BatchResult(batch, shapes, rows))
    return BenchResult(
        request.config, ort.__version__, request.seed, request.rounds, request.warmup, results
    )


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
    for key in keys:
        dims[key] = batch
    return input_shapes(model, given, dims)


def ratio_text(ratio: Spread) -> str:
    """``1.23x (1.18-1.27)``: median and p10-p90 of the per-round ratios."""
    return f"{ratio.median:.2f}x ({ratio.p10:.2f}-{ratio.p90:.2f})"


def to_json(result: BenchResult) -> dict[str, Any]:
    """The result as JSON-ready data (times in milliseconds)."""

    def spread(s: Spread, scale: float) -> dict[str, float]:
        return {"median": s.median * scale, "p10": s.p10 * scale, "p90": s.p90 * scale}

    return {
        "onnxruntime": result.ort_version,
        "session": result.config.to_json(),
        "seed": result.seed,
        "warmup": result.warmup,
        "rounds": result.rounds,
        "ratio": "median over rounds of time(first model) / time(model); >1: faster",
        "batches": [
            {
                "batch": b.batch,
                "shapes": b.shapes,
                "models": [
                    {
                        "path": row.path,
                        "latency_ms": spread(row.latency, 1e3),
                        "throughput_per_s": row.throughput,  # null: no items per run
                        "ratio_to_first": None if row.ratio is None else spread(row.ratio, 1.0),
                    }
                    for row in b.rows
                ],
            }
            for b in result.batches
        ],
    }


def _open(path: str, config: SessionConfig) -> tuple[str, ir.Model, Any]:
    """(path, the model or a stand-in holding its inputs, a session)."""
    from graphopt import io

    source = Path(os.fspath(path))
    model: ir.Model | None = None
    if source.suffix.lower() != ".ort":
        model = io.load(source).model
    elif not source.is_file():
        raise UserInputError(f"{source}: no such file")
    try:
        session = create_session(source, config, model)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{path}: ONNX Runtime cannot load it: {_first_line(exc)}") from None
    return path, model if model is not None else _stand_in(session), session


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


def _call(session: Any, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    from graphopt.ortrun import is_ml_dtype, run_session

    if any(is_ml_dtype(a) for a in feeds.values()):
        names = [o.name for o in session.get_outputs()]
        return lambda: run_session(session, names, feeds)
    return lambda: session.run(None, feeds)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
