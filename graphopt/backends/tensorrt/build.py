"""Build and serialize a TensorRT engine from an ONNX model (``graphopt optimize --engine``).

TensorRT-RTX: the network is strongly typed (precision comes from the graph's types and its
Q/DQ nodes; the builder has no FP16/INT8 flags) and the build is ahead of time for chosen
compute capabilities, so it runs on a machine without a GPU. Enterprise TensorRT: a weakly
typed network whose precision flags follow what the graph holds; it needs a GPU to build.
Either way: SPARSE_WEIGHTS when weights are 2:4 sparse, an optimization profile per dynamic
input (:mod:`.profiles`), the builder optimization level asked for, and a timing cache only
where a GPU is present (on a CPU-only build it would query a GPU that is not there).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graphopt.backends.tensorrt.cli_options import COMPUTE_CAPABILITIES as CLI_CAPABILITIES
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.backends.tensorrt.engine_file import (
    check_engine_target,
    protected_files,
    write_engine,
)
from graphopt.backends.tensorrt.hints import describe_rejection
from graphopt.backends.tensorrt.model_scan import scan_model
from graphopt.backends.tensorrt.module import TensorRT, find_tensorrt, parse
from graphopt.backends.tensorrt.precision import graph_precisions
from graphopt.backends.tensorrt.profiles import InputProfile, parse_shapes, plan_profiles
from graphopt.errors import CheckFailedError, UserInputError

# --compute-capability spellings -> TensorRT-RTX's ComputeCapability names ("8.9" -> SM89).
COMPUTE_CAPABILITIES = {c: "SM" + c.replace(".", "") for c in CLI_CAPABILITIES}
# Without a GPU and without --compute-capability: Ada (8.9), the oldest that runs every
# precision graphopt emits (FP8 needs 8.9).
DEFAULT_COMPUTE_CAPABILITY = "8.9"
FP8_MIN_CAPABILITY = 8.9
PER_TACTIC_NOTE = (
    "per-layer precisions are those the parsed network declares; the tactics TensorRT picks "
    "(and any precision it chooses per tactic) are only known on a GPU"
)


@dataclass
class LayerInfo:
    name: str
    kind: str  # TensorRT's layer type, e.g. CONVOLUTION
    precisions: tuple[str, ...]  # declared output types


@dataclass
class EngineReport:
    """What the build did, or why it was skipped."""

    path: Path
    built: bool = False
    skipped: str = ""  # why no engine was built (no module)
    module: str = ""
    engine_bytes: int = 0
    seconds: float = 0.0
    layers: list[LayerInfo] = field(default_factory=list)
    profiles: list[InputProfile] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # flags, capabilities, level
    notes: list[str] = field(default_factory=list)

    def precision_counts(self) -> Counter[str]:
        return Counter(p for layer in self.layers for p in layer.precisions[:1])


def check_options(options: EngineOptions) -> None:
    """Refuse bad options before the pipeline runs (not after minutes of passes, nor after
    the ONNX output is written): the engine path, --shapes (and, where the input model's file
    is known, that its names are inputs of that model), the builder level, the capabilities."""
    check_engine_target(options.path, protected_files(options.input_path, options.output_path))
    shapes = parse_shapes(options.shapes)
    if shapes and options.input_path is not None:
        _check_shape_names(shapes, options.input_path)
    if options.builder_level is not None and not 0 <= options.builder_level <= 5:
        raise UserInputError(f"--builder-level {options.builder_level}: expected 0 to 5")
    unknown = [c for c in options.compute_capabilities if c not in COMPUTE_CAPABILITIES]
    if unknown:
        raise UserInputError(
            f"--compute-capability {', '.join(unknown)}: expected one of "
            f"{', '.join(COMPUTE_CAPABILITIES)}"
        )


def build_engine(
    model: onnx.ModelProto | str | os.PathLike,
    options: EngineOptions,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> EngineReport:
    """Parse ``model`` with TensorRT's parser, build, and write the engine to ``options.path``.

    No TensorRT module: nothing is written and the report says why (``skipped``). A node the
    parser rejects raises :class:`CheckFailedError` naming the node, its op, TensorRT's reason
    and the graphopt option that fixes it.
    """
    check_options(options)
    # The model built from (the ONNX output, when it is a file) must survive the write too.
    protected = protected_files(options.input_path, options.output_path)
    if not isinstance(model, onnx.ModelProto):
        protected += protected_files(None, model)
    report = EngineReport(Path(os.fspath(options.path)))
    available = find_tensorrt()
    if available.found is None:
        report.skipped = (
            f"no TensorRT Python module imports ({available.why_not()}); "
            "pip install 'graphopt[tensorrt]' (TensorRT-RTX) or NVIDIA's tensorrt"
        )
        return report
    trt = available.found
    report.module = trt.describe()
    proto = model if isinstance(model, onnx.ModelProto) else _load(model)
    held = graph_precisions(proto)
    parsed = parse(trt, _model_bytes(proto, model))
    if not parsed.ok:
        raise CheckFailedError(
            "TensorRT's parser rejected the model: "
            + "; ".join(describe_rejection(e) for e in parsed.errors[:3])
            + (f" (and {len(parsed.errors) - 3} more)" if len(parsed.errors) > 3 else "")
        )
    network = parsed.network
    config = parsed.builder.create_builder_config()
    inputs = [_input(network.get_input(i)) for i in range(network.num_inputs)]
    report.profiles = plan_profiles(inputs, parse_shapes(options.shapes), input_shapes or {})
    if report.profiles:
        profile = parsed.builder.create_optimization_profile()
        for p in report.profiles:
            _set_shape(profile, p)
        config.add_optimization_profile(profile)
    flags = trt.module.BuilderFlag
    if held.sparse_weights:
        config.set_flag(flags.SPARSE_WEIGHTS)
        report.settings.append(f"SPARSE_WEIGHTS ({len(held.sparse_weights)} 2:4 weights)")
    if not trt.rtx:
        report.settings += _precision_flags(config, flags, held.types)
    if options.builder_level is not None:
        config.builder_optimization_level = options.builder_level
        report.settings.append(f"builder optimization level {options.builder_level}")
    gpu = _has_gpu()
    if trt.rtx:
        report.settings.append(_set_capabilities(trt, config, options, held.holds("fp8"), gpu))
    if gpu:
        config.set_timing_cache(config.create_timing_cache(b""), False)
        report.settings.append("timing cache")
    else:
        report.notes.append("no GPU here: built without a timing cache")
    report.layers = [_layer(network.get_layer(i), trt) for i in range(network.num_layers)]
    start = time.perf_counter()
    serialized = parsed.builder.build_serialized_network(network, config)
    report.seconds = time.perf_counter() - start
    if serialized is None:
        errors = [m for severity, m in parsed.logger.messages if "ERROR" in severity]
        raise CheckFailedError(
            "TensorRT's builder failed: "
            + ("; ".join(errors[-3:]) or "no message")
            + _derived_hint(report.profiles)
        )
    data = memoryview(serialized)
    write_engine(report.path, data, protected)
    report.engine_bytes = data.nbytes
    report.built = True
    report.notes.append(PER_TACTIC_NOTE)
    return report


def _check_shape_names(shapes: dict[str, object], input_path: str | os.PathLike) -> None:
    """--shapes names that are no input of the model: refused before the pipeline runs (the
    network's own inputs are checked again after it, in :func:`plan_profiles`)."""
    header = scan_model(input_path)
    if header is None:  # not a readable model: the loader says why
        return
    inputs = header.fed_inputs
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise UserInputError(
            f"--shapes: no input named {', '.join(map(repr, unknown))} in {input_path} "
            f"(inputs: {', '.join(inputs) or 'none'})"
        )


def _set_shape(profile: Any, given: InputProfile) -> None:
    """One input's profile; what TensorRT refuses (a shape it finds inconsistent) as one line."""
    try:
        profile.set_shape(given.name, given.min, given.opt, given.max)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        reason = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
        raise UserInputError(
            f"profile {given.describe()}: TensorRT refuses it ({reason})"
        ) from None


def _derived_hint(profiles: list[InputProfile]) -> str:
    """What to do when the builder fails on a profile graphopt guessed: a dynamic image side
    of 224 is wrong for a model whose height is fixed in practice (a text-line recognizer)."""
    derived = [p for p in profiles if p.source == "derived"]
    if not derived:
        return ""
    shown = "; ".join(p.describe() for p in derived)
    return (
        f" (the optimization profile was derived, not given: {shown}; give the shapes the "
        "model takes with --shapes NAME:min=DxD,opt=DxD,max=DxD or --input-shape)"
    )


def _set_capabilities(
    trt: TensorRT, config: Any, options: EngineOptions, fp8: bool, gpu: bool
) -> str:
    """TensorRT-RTX's target compute capabilities: those asked for; else this machine's GPU;
    else 8.9 (said in the report). FP8 needs 8.9 or newer."""
    asked = list(options.compute_capabilities)
    if not asked and gpu:
        return "compute capability: this machine's GPU"
    chosen = asked or [DEFAULT_COMPUTE_CAPABILITY]
    if fp8:
        old = [c for c in chosen if float(c) < FP8_MIN_CAPABILITY]
        if old:
            raise UserInputError(
                f"--compute-capability {', '.join(old)}: the model holds FP8 tensors, which "
                f"need compute capability >= {FP8_MIN_CAPABILITY}"
            )
    config.num_compute_capabilities = len(chosen)
    for index, capability in enumerate(chosen):
        value = getattr(trt.module.ComputeCapability, COMPUTE_CAPABILITIES[capability])
        config.set_compute_capability(value, index)
    given = "" if asked else " (default without a GPU; --compute-capability to choose)"
    return f"compute capability {', '.join(chosen)}{given}"


def _precision_flags(config: Any, flags: Any, types: set[str]) -> list[str]:
    """Enterprise TensorRT: allow the precisions the graph holds, and only those."""
    wanted = {"float16": "FP16", "bfloat16": "BF16", "int8": "INT8", "fp8": "FP8", "int4": "INT4"}
    used = []
    for precision, flag in sorted(wanted.items()):
        if precision in types and hasattr(flags, flag):
            config.set_flag(getattr(flags, flag))
            used.append(flag)
    return used


def _layer(layer: Any, trt: TensorRT) -> LayerInfo:
    types = tuple(_type_name(layer.get_output_type(j)) for j in range(layer.num_outputs))
    if not trt.rtx and getattr(layer, "precision_is_set", False):
        types = (_type_name(layer.precision), *types[1:])
    return LayerInfo(str(layer.name), str(layer.type).rsplit(".", 1)[-1], types)


def _type_name(dtype: Any) -> str:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "fp8"}
    text = str(dtype).rsplit(".", 1)[-1]
    return names.get(text, text.lower())


def _input(tensor: Any) -> tuple[str, tuple[int, ...], bool]:
    kind = str(tensor.dtype).rsplit(".", 1)[-1]
    return str(tensor.name), tuple(int(d) for d in tensor.shape), kind in ("FLOAT", "HALF", "BF16")


def _has_gpu() -> bool:
    # The device node NVIDIA's driver creates; no CUDA call (it would fail loudly without one).
    return os.path.exists("/dev/nvidiactl")


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    return onnx.load(os.fspath(path), load_external_data=True)


def _model_bytes(proto: onnx.ModelProto, source: Any) -> bytes:
    if not isinstance(source, onnx.ModelProto) and proto.ByteSize() >= 2**31 - 1:
        raise UserInputError(
            f"{source}: over 2 GB; TensorRT's parser reads it from a file with its weights "
            "beside it, which --engine does not support yet"
        )
    return proto.SerializeToString()
