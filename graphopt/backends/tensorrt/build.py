"""Build and serialize a TensorRT engine from an ONNX model (``graphopt optimize --engine``).

TensorRT-RTX: the network is strongly typed (precision comes from the graph's types and its
Q/DQ nodes; the builder has no FP16/INT8 flags) and the build is ahead of time for chosen
compute capabilities, so it runs on a machine without a GPU. Enterprise TensorRT: a weakly
typed network whose precision flags follow what the graph holds; it needs a GPU to build.
Either way: SPARSE_WEIGHTS when weights are 2:4 sparse (also behind DequantizeLinear), an
optimization profile with one range per dynamic dim (:mod:`.profiles`), the builder
optimization level asked for, and a timing cache only where a GPU is present (on a CPU-only
build it would query a GPU that is not there). The report lists each precision the engine
holds otherwise than the ONNX (float64 I/O, bound as float32).

What can be refused before the passes is (:func:`check_options` before the model is loaded,
:func:`check_model` once it is); a parser or builder failure after them reaches the caller
as :class:`EngineBuildError`, carrying the run's result so that its report is printed.
"""

from __future__ import annotations

import importlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt.backends.tensorrt import isolated
from graphopt.backends.tensorrt.cli_options import COMPUTE_CAPABILITIES as CLI_CAPABILITIES
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.backends.tensorrt.engine_file import (
    check_engine_target,
    protected_files,
    write_engine,
)
from graphopt.backends.tensorrt.findings import ERROR
from graphopt.backends.tensorrt.hints import describe_rejection
from graphopt.backends.tensorrt.model_scan import scan_model
from graphopt.backends.tensorrt.module import TensorRT, find_tensorrt, parse
from graphopt.backends.tensorrt.precision import PRECISION_NAMES, graph_precisions
from graphopt.backends.tensorrt.profiles import (
    InputProfile,
    ProfileInput,
    check_given,
    check_input_shapes,
    check_shape_tensors,
    model_inputs,
    parse_shapes,
    plan,
)
from graphopt.errors import CheckFailedError, GraphoptError, UserInputError
from graphopt.input_dims import dim_keys, dim_limits, graph_inputs

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
    # What the engine holds in another precision than the ONNX (float64 I/O as float32).
    precision_changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def precision_counts(self) -> Counter[str]:
        return Counter(p for layer in self.layers for p in layer.precisions[:1])


class EngineBuildError(CheckFailedError):
    """The engine did not build (TensorRT's parser or builder refused the model) once the
    passes had run: ``result`` is the run's :class:`graphopt.api.OptimizeResult`, so that its
    report is still printed; ``result.output_path`` is None when nothing was written (with
    ``--in-place`` the input is replaced only once the engine builds). The exit code is the
    cause's: 1 for a parser or builder failure, 2 for a profile TensorRT refuses."""

    def __init__(self, cause: GraphoptError, result: Any) -> None:
        super().__init__(str(cause))
        self.exit_code = cause.exit_code
        self.result = result


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


def check_model(
    model: ir.Model,
    options: EngineOptions,
    fp8: bool,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Refuse, once the input is loaded and before the passes run, what the build would
    refuse after minutes of work and after the ONNX output is written: ``--shapes`` of the
    wrong rank, contradicting a dim the model fixes or another ``--shapes`` on a shared dim;
    a shape-tensor input without its values' range; ``input_shapes`` (--input-shape) fixing a
    dim that --shapes ranges otherwise; FP8 (``fp8``: asked for, or held by the
    input) for a compute capability below 8.9."""
    shapes = parse_shapes(options.shapes)
    names = [v.name for v in graph_inputs(model)]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise UserInputError(
            f"--shapes: no input named {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(names) or 'none'})"
        )
    inputs = model_inputs(model)
    # An input of undeclared shape is checked on the network, before the build.
    known = {i.name for i in inputs}
    dims = check_given(inputs, {name: s for name, s in shapes.items() if name in known})
    check_input_shapes(inputs, dims, input_shapes or {})
    check_shape_tensors(inputs, shapes)
    if fp8 or _holds_fp8(model):
        _check_fp8(options.compute_capabilities)


def build_engine(
    model: onnx.ModelProto | str | os.PathLike,
    options: EngineOptions,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> EngineReport:
    """Parse ``model`` with TensorRT's parser, build, and write the engine to ``options.path``.

    No TensorRT module: nothing is written and the report says why (``skipped``). A node the
    parser rejects raises :class:`CheckFailedError` naming the node, its op, TensorRT's reason
    and the graphopt option that fixes it. The parse and the build run in a child process
    (:func:`.isolated.call`): a parser or builder that crashes raises
    :class:`.isolated.NativeCrash` (exit 1) instead of ending graphopt.
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
    # A path, not the loaded model, goes to the child: it loads the weights itself.
    source = model if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return isolated.call(_build, trt.name, source, options, input_shapes, protected, report)


def _build(
    phase: Callable[[str], None],
    name: str,
    model: onnx.ModelProto | str,
    options: EngineOptions,
    input_shapes: dict[str, tuple[int, ...]] | None,
    protected: list[tuple[Path, str]],
    report: EngineReport,
) -> EngineReport:
    """:func:`build_engine`'s parse and build, in the child (``phase``: tells the parent
    when the builder starts, for a crash's message)."""
    trt = TensorRT(importlib.import_module(name), name)
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
    loaded = ir.serde.deserialize_model(proto)
    keys = dim_keys(loaded)
    inputs = [_input(network.get_input(i), keys) for i in range(network.num_inputs)]
    lower, upper = dim_limits(loaded)
    planned = plan(
        inputs,
        parse_shapes(options.shapes),
        input_shapes or {},
        lower,
        _largest_finder(proto, inputs, upper),
    )
    report.profiles = planned.profiles
    report.notes += planned.notes
    if report.profiles:
        profile = parsed.builder.create_optimization_profile()
        for p in report.profiles:
            _set_shape(profile, p)
        config.add_optimization_profile(profile)
    report.precision_changes = _precision_changes(proto, network)
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
    phase(isolated.BUILDER)
    serialized = parsed.builder.build_serialized_network(network, config)
    report.seconds = time.perf_counter() - start
    if serialized is None:
        errors = [m for severity, m in parsed.logger.messages if "ERROR" in severity]
        raise CheckFailedError(
            "TensorRT's builder failed: "
            + ("; ".join(errors[-3:]) or "no message")
            + _builder_rule_hint(proto)
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
    """One input's profile (a shape tensor's: its values); what TensorRT refuses (a shape it
    finds inconsistent) as one line."""
    try:
        if given.values:
            profile.set_shape_input(given.name, given.min, given.opt, given.max)
        else:
            profile.set_shape(given.name, given.min, given.opt, given.max)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        reason = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
        raise UserInputError(
            f"profile {given.describe()}: TensorRT refuses it ({reason})"
        ) from None


def _builder_rule_hint(proto: onnx.ModelProto) -> str:
    """The static table's builder-only findings (what the parser accepts and the builder
    refuses), with their fix: the builder's own message names a layer, not the cause."""
    from graphopt.backends.tensorrt.rules import static_findings

    found = [f for f in static_findings(proto) if f.rule == "builder" and f.severity == ERROR]
    if not found:
        return ""
    first = found[0]
    more = f" (and {len(found) - 1} more node(s))" if len(found) > 1 else ""
    return f"; cause: {first.location}: {first.reason}{more}" + (
        f"; fix: {first.fix}" if first.fix else ""
    )


def _derived_hint(profiles: list[InputProfile]) -> str:
    """What to do when the builder fails on a profile graphopt guessed: a dynamic image side
    of 224 is wrong for a model whose height is fixed in practice (a text-line recognizer)."""
    derived = [p for p in profiles if "derived" in p.source.split(", ")]
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
        _check_fp8(chosen)
    config.num_compute_capabilities = len(chosen)
    for index, capability in enumerate(chosen):
        value = getattr(trt.module.ComputeCapability, COMPUTE_CAPABILITIES[capability])
        config.set_compute_capability(value, index)
    given = "" if asked else " (default without a GPU; --compute-capability to choose)"
    return f"compute capability {', '.join(chosen)}{given}"


def _check_fp8(capabilities: list[str]) -> None:
    old = [c for c in capabilities if float(c) < FP8_MIN_CAPABILITY]
    if old:
        raise UserInputError(
            f"--compute-capability {', '.join(old)}: the model holds FP8 tensors, which "
            f"need compute capability >= {FP8_MIN_CAPABILITY}"
        )


def _holds_fp8(model: ir.Model) -> bool:
    """Whether the input already holds FP8 tensors (a model quantized before)."""
    fp8 = {ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2}
    graph = model.graph
    if any(t.dtype in fp8 for t in graph.initializers.values()):
        return True
    return any(v.dtype in fp8 for node in graph for v in node.outputs)


def _largest_finder(
    proto: onnx.ModelProto, inputs: list[ProfileInput], upper: dict[str, int]
) -> Any:
    """The profiles' LimitFinder: a position-id input's table (``dim_limits``) and the
    lookups :mod:`.size_bounds` finds, whichever bounds the dim more."""
    from graphopt.backends.tensorrt.size_bounds import SizeBounds

    dims = {
        i.name: [i.key(axis) or d for axis, d in enumerate(i.dims)]
        for i in inputs
        if not i.shape_tensor
    }
    bounds = SizeBounds(proto, dims)
    read = bounds.read_keys()

    def largest(key: str, sizes: dict[str, int]) -> tuple[int, str] | None:
        found = bounds.largest(key, sizes) if key in read else None
        best = (found.size, found.why) if found is not None else None
        if key in upper and (best is None or upper[key] < best[0]):
            best = (upper[key], f"a position-id input indexes a table of {upper[key]} rows")
        return best

    return largest


def _precision_changes(proto: onnx.ModelProto, network: Any) -> list[str]:
    """The engine's inputs and outputs whose type differs from the ONNX's (TensorRT has no
    float64: it binds float32), and float64 computed in float32 inside the graph."""
    double = onnx.TensorProto.DOUBLE
    graph = proto.graph
    float64 = sum(t.data_type == double for t in graph.initializer)
    float64 += sum(v.type.tensor_type.elem_type == double for v in graph.value_info)
    float64 += sum(
        n.op_type == "Cast" and any(a.name == "to" and a.i == double for a in n.attribute)
        for n in graph.node
    )
    declared = {
        v.name: v.type.tensor_type.elem_type
        for v in [*proto.graph.input, *proto.graph.output]
        if v.type.HasField("tensor_type")
    }
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    changes = []
    for index, tensor in enumerate(tensors):
        kind = "input" if index < network.num_inputs else "output"
        name = str(tensor.name)
        was = _ONNX_TYPE_NAMES.get(declared.get(name, 0))
        now = _type_name(tensor.dtype)
        if was is not None and was != now:
            changes.append(
                f"{kind} {name}: {was} in the ONNX, {now} in the engine"
                + (" (TensorRT has no float64: feed and read float32)" if was == "float64" else "")
            )
    if float64:
        changes.append(
            f"{float64} float64 tensor(s) inside the graph are computed in float32 (TensorRT "
            "has no float64)"
        )
    return changes


# The ONNX element types by the names _type_name gives TensorRT's.
_ONNX_TYPE_NAMES = {
    **PRECISION_NAMES,
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


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


def _input(tensor: Any, keys: dict[tuple[str, int], str]) -> ProfileInput:
    """A network input with its dims' keys from the ONNX (the network's dims are -1, their
    names are the ONNX's)."""
    kind = str(tensor.dtype).rsplit(".", 1)[-1]
    name = str(tensor.name)
    dims = tuple(int(d) for d in tensor.shape)
    return ProfileInput(
        name,
        dims,
        kind in ("FLOAT", "HALF", "BF16"),
        tuple(keys.get((name, axis)) for axis in range(len(dims))),
        bool(getattr(tensor, "is_shape_tensor", False)),
    )


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
