"""``--autotune``: time the int8 candidates on this machine and keep the fastest.

The rule table (:mod:`.cpu_rules`) gives the usual best activation type per CPU family from
measurements and ORT's sources; a user's CPU, ORT version and model may disagree. With
``--autotune`` (``--target ort``, static int8) every candidate of {QDQ, QOperator} x {u8, s8}
(less those the user fixed with ``--quant-format`` / ``--activation-type``) is built and
timed in ONNX Runtime on this machine: 1 thread, graph optimizations on, warm-up, then paired
interleaved rounds on the first calibration batch, median of each candidate's time relative
to the first. The fastest is kept; the measured choice goes into the output's metadata
(``graphopt.autotune``: the settings chosen, and the relative times rounded to 2 digits) and
the report, so a rerun with ``--quant-format X --activation-type Y`` reproduces the file's
quantization without measuring.

The relative times are cached per user (``~/.cache/graphopt/autotune/times-<cpu>.json``,
keyed by the CPU signature, ONNX Runtime's version and a digest of the input model, the
settings and the timed batch), as factorize's and the sparse kernels' timings are: the same
run again on this machine reuses them, so it gives the same file (timings of near-equal
candidates would otherwise flip the choice between runs). Deleting the file measures again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.record import QuantRecord
from graphopt.passes.quantization.settings import ACTIVATION_TYPES, QUANT_FORMATS, QuantSettings
from graphopt.registry import PassContext

METADATA_KEY = "graphopt.autotune"
WARMUP = 2
ROUNDS = 10

ModeFunction = Callable[
    [ir.Model, QuantSettings, "CalibrationSet | None", PassContext], QuantRecord
]


@dataclasses.dataclass
class Candidate:
    settings: QuantSettings
    model: ir.Model
    record: QuantRecord
    context: PassContext
    relative_time: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.settings.quant_format}/{self.settings.activation_type}"


def candidate_settings(settings: QuantSettings) -> list[QuantSettings]:
    """The settings to try: every format and activation type the user left to defaults."""
    formats = QUANT_FORMATS if "quant_format" in settings.defaulted else (settings.quant_format,)
    types = (
        ACTIVATION_TYPES if "activation_type" in settings.defaulted else (settings.activation_type,)
    )
    return [
        dataclasses.replace(settings, quant_format=f, activation_type=a, autotune=False)
        for f in formats
        for a in types
    ]


def autotune(
    model: ir.Model,
    settings: QuantSettings,
    calib: CalibrationSet,
    context: PassContext,
    quantize: ModeFunction,
) -> QuantRecord:
    """Build every candidate, time them, and leave the fastest in ``model``; its record
    (with the measurement in its notes) is returned."""
    candidates = []
    for option in candidate_settings(settings):
        trial_context = dataclasses.replace(context, notes=[], details={})
        trial = model.clone()
        record = quantize(trial, option, calib, trial_context)
        candidates.append(Candidate(option, trial, record, trial_context))
    if len(candidates) > 1:
        feeds = next(calib.batches())
        key = _cache_key(model, settings, feeds)
        cached = _cached_times(key, [c.label for c in candidates])
        if cached is None:
            _time(candidates, feeds)
            _store_times(key, {c.label: c.relative_time for c in candidates})
        else:
            for candidate in candidates:
                candidate.relative_time = cached[candidate.label]
            context.note("--autotune: candidate times from this machine's cache (autotune/)")
    best = min(candidates, key=lambda c: c.relative_time)
    model.graph = best.model.graph
    for note in best.context.notes:
        context.note(note)
    measured = ", ".join(f"{c.label} {c.relative_time:.2f}" for c in candidates)
    best.record.notes.append(
        f"--autotune: time relative to {candidates[0].label} on this machine (ORT, 1 thread): "
        f"{measured}; kept {best.label} (rerun with --quant-format "
        f"{best.settings.quant_format} --activation-type {best.settings.activation_type} to "
        "reproduce without measuring)"
    )
    model.metadata_props[METADATA_KEY] = json.dumps(
        {
            "quant_format": best.settings.quant_format,
            "activation_type": best.settings.activation_type,
            "relative_times": {c.label: round(c.relative_time, 2) for c in candidates},
        },
        sort_keys=True,
    )
    return best.record


def _time(candidates: list[Candidate], feeds: dict[str, np.ndarray]) -> None:
    from graphopt.sessions import make_session

    sessions = [make_session(c.model, threads=1, optimize=True) for c in candidates]
    names = [[o.name for o in s.get_outputs()] for s in sessions]
    wanted = [{i.name for i in s.get_inputs()} for s in sessions]
    runs = [
        (lambda s=s, n=n, w=w: s.run(n, {k: v for k, v in feeds.items() if k in w}))
        for s, n, w in zip(sessions, names, wanted, strict=True)
    ]
    for run in runs:
        for _ in range(WARMUP):
            run()
    ratios: list[list[float]] = [[] for _ in runs]
    for _ in range(ROUNDS):
        times = []
        for run in runs:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        for i, t in enumerate(times):
            ratios[i].append(t / times[0])
    for candidate, r in zip(candidates, ratios, strict=True):
        candidate.relative_time = statistics.median(r)


def _cache_file() -> Path:
    from graphopt.passes.sparsity.crossover import cpu_cache_file

    return cpu_cache_file("autotune", "times")


def _cache_key(model: ir.Model, settings: QuantSettings, feeds: dict[str, np.ndarray]) -> str:
    """What decides the candidates and their times: this runtime, the input model's
    content, the settings (the calibration file by its data, not its path) and the batch."""
    from graphopt.ortrun import import_onnxruntime

    digest = hashlib.sha256()
    digest.update(f"ort-{import_onnxruntime().__version__}|".encode())
    shown = {k: v for k, v in settings.to_json().items() if k != "calib"}
    digest.update(json.dumps(shown, sort_keys=True, default=repr).encode())
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"|{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    _digest_model(model, digest)
    return digest.hexdigest()


def _digest_model(model: ir.Model, digest) -> None:
    """The model's content: every graph's nodes (with attributes) and initializers."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            inputs = [v.name if v is not None else "" for v in node.inputs]
            outputs = [v.name for v in node.outputs]
            digest.update(f"|{node.domain}:{node.op_type}:{inputs}:{outputs}".encode())
            for name, attribute in sorted(node.attributes.items()):
                value = attribute.value
                if isinstance(value, ir.TensorProtocol):
                    digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
                    digest.update(value.tobytes())
                elif not isinstance(value, ir.Graph):  # subgraphs are walked themselves
                    digest.update(f"{name}={value!r}".encode())
        for name, value in graph.initializers.items():
            tensor = value.const_value
            digest.update(f"|{name}".encode())
            if tensor is not None:
                digest.update(f"{tensor.dtype}:{tensor.shape}".encode())
                digest.update(tensor.tobytes())


def _cached_times(key: str, labels: list[str]) -> dict[str, float] | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        entry = json.loads(_cache_file().read_text())["entries"][key]
        times = {label: float(entry[label]) for label in labels}
        if all(t > 0 for t in times.values()):
            return times
    return None


def _store_times(key: str, times: dict[str, float]) -> None:
    """Add an entry; the cache is a convenience, so a failure to write it is ignored."""
    from graphopt import io
    from graphopt.errors import UserInputError

    path = _cache_file()
    entries: dict = {}
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        entries = dict(json.loads(path.read_text())["entries"])
    entries[key] = times
    text = json.dumps({"entries": dict(sorted(entries.items()))}, indent=1, sort_keys=True)
    with contextlib.suppress(OSError, UserInputError):
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_file_atomically(path, lambda handle: handle.write(text.encode()))
