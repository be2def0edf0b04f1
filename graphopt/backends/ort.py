"""ONNX Runtime as a deployment backend: sessions built the way a user deploys a model.

Verification (:func:`graphopt.sessions.make_session`) runs with ORT's own graph optimizations
off, so that it compares graphopt's rewrite and nothing else, on the CPU unless the run names
other providers (``graphopt optimize --provider``, :func:`using_providers`). Measuring
and comparing for deployment (``graphopt bench``, ``graphopt compare``) and producing an
edge artefact need the other knobs: execution providers, intra/inter-op threads, ORT's graph
optimization level, and the custom-op libraries a model needs. They are chosen here, once.

- :class:`SessionConfig` and :func:`create_session`: a session for a path or an in-memory
  model; a requested provider that ORT silently replaced by the CPU (a CUDA build whose
  libraries are missing) is an error, not a number measured on the wrong device.
- :func:`resolve_providers`: ``cpu``, ``cuda,cpu`` or ORT's full names, checked against
  what the installed onnxruntime offers.
- :func:`save_optimized`: ORT's own optimized model, as ONNX or in the ``.ort`` format that
  ORT Mobile/minimal builds load, for ``graphopt optimize --save-ort-optimized PATH``.

onnxruntime, numpy and onnx are imported inside the functions: ``graphopt --help`` and the
subcommands' parsers import this module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.backends.ort_custom_ops import check_domain_conflict, register_active_custom_ops
from graphopt.errors import UserInputError

if TYPE_CHECKING:
    import onnx_ir as ir

CPU = "CPUExecutionProvider"
# Short names users type; anything else must be ORT's full provider name.
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
# --opt-level names -> ORT's GraphOptimizationLevel members.
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
# Serialize an in-memory model below this; above it ORT reads a temporary file (protobuf's
# 2 GB limit, with room for the graph).
IN_MEMORY_LIMIT_BYTES = 1 << 30
# Below IN_MEMORY_LIMIT_BYTES, initializers from this size on are lent to ORT rather than
# serialized: the proto, its bytes and ORT's parse were three copies of every weight (a
# quantized 2 GB decoder's sessions peaked at ~1.5 GB over the model for a 0.5 GB model).
SHARE_MIN_BYTES = 1 << 20

# More threads than any machine graphopt runs on has cores (ORT starts them all at once).
MAX_THREADS = 1024


@dataclass(frozen=True)
class SessionConfig:
    """How to build an ORT session. ``threads``/``inter_threads`` 0: ORT's default (all
    cores); ``custom_ops`` None: the libraries the run made active (``--custom-ops``)."""

    providers: tuple[str, ...] = (CPU,)
    threads: int = 0
    inter_threads: int = 0
    opt_level: str = "all"
    sequential: bool = True
    custom_ops: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "providers": list(self.providers),
            "threads": self.threads,
            "inter_threads": self.inter_threads,
            "opt_level": self.opt_level,
            "execution_mode": "sequential" if self.sequential else "parallel",
        }


def resolve_providers(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """ORT provider names for ``spec`` (``"cuda,cpu"``, ``["cpu"]``, None: the CPU).

    Each must be offered by the installed onnxruntime (a CPU wheel offers the CPU only): a
    benchmark of "CUDA" that ran on the CPU would be a wrong number. The CPU is appended as
    the fallback for nodes an accelerator does not take, as ORT itself does. An empty name
    is refused: ``--provider "$EP,cpu"`` with ``EP`` unset must not quietly mean the CPU.
    """
    words = [spec] if isinstance(spec, str) else list(spec or [])
    names: list[str] = []
    for word in words:
        for part in word.split(","):
            part = part.strip()
            if not part:
                raise UserInputError(
                    f"--provider {word!r}: an empty provider name; give names such as cpu or "
                    "cuda,cpu"
                )
            name = PROVIDER_ALIASES.get(part.lower(), part)
            if name not in names:
                names.append(name)
    if not names:
        return (CPU,)
    from graphopt.ortrun import import_onnxruntime

    available = import_onnxruntime().get_available_providers()
    for name in names:
        if name not in available:
            known = name in PROVIDER_ALIASES.values() or name.endswith("ExecutionProvider")
            what = "is not available in this onnxruntime" if known else "is not a provider"
            raise UserInputError(
                f"--provider {name}: {what} (available: {', '.join(available)}; short names: "
                f"{', '.join(sorted(PROVIDER_ALIASES))})"
            )
    if CPU not in names:
        names.append(CPU)
    return tuple(names)


def optimization_level(name: str):
    """ORT's ``GraphOptimizationLevel`` for a name of :data:`OPT_LEVELS`."""
    if name not in OPT_LEVELS:
        choices = ", ".join(OPT_LEVELS)
        raise UserInputError(f"optimization level {name!r}: expected one of {choices}")
    from graphopt.ortrun import import_onnxruntime

    return getattr(import_onnxruntime().GraphOptimizationLevel, OPT_LEVELS[name])


def session_options(config: SessionConfig, model: ir.Model | None = None):
    """An ``onnxruntime.SessionOptions`` for ``config``, custom-op libraries registered.

    The user's libraries (``config.custom_ops``, by default the active ``--custom-ops``) are
    registered, and graphopt's own kernel library when ``model`` uses its op domain
    (:func:`~graphopt.backends.ort_custom_ops.register_active_custom_ops`).
    """
    from graphopt.ortrun import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    # With the model: graphopt's own kernel library too when it uses their domain (a
    # one-line error saying how to build it when it is missing).
    register_active_custom_ops(options, config.custom_ops, model=model)
    options.graph_optimization_level = optimization_level(config.opt_level)
    if config.threads < 0 or config.inter_threads < 0:
        raise UserInputError("--threads: must be 0 (ORT's default) or more")
    if max(config.threads, config.inter_threads) > MAX_THREADS:
        # ORT starts every thread up front: 100000 of them exhausted memory with no message.
        raise UserInputError(f"--threads: at most {MAX_THREADS}")
    if config.threads:
        options.intra_op_num_threads = config.threads
    if config.inter_threads:
        options.inter_op_num_threads = config.inter_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL if config.sequential else ort.ExecutionMode.ORT_PARALLEL
    )
    # Fatal only: ORT logs a failing kernel as an error besides raising it, and graphopt
    # reports the raised error in one line.
    options.log_severity_level = 4
    return options


def create_session(
    source: str | os.PathLike | ir.Model,
    config: SessionConfig = SessionConfig(),
    model: ir.Model | None = None,
    options=None,
):
    """An ``onnxruntime.InferenceSession`` for a model file or an in-memory model.

    ``model``: the loaded model when ``source`` is a path (read for the custom-op domains it
    needs; without it the file is opened by ORT alone). ``options``: a prepared
    ``SessionOptions`` to use instead of :func:`session_options`.
    """
    import onnx_ir as ir

    from graphopt.ortrun import import_onnxruntime

    ort = import_onnxruntime()
    if isinstance(source, ir.Model):
        model = source
    if options is None:
        options = session_options(config, model)
    providers = list(config.providers)
    try:
        session = _session(ort, source, options, providers)
    except Exception as exc:
        check_domain_conflict(exc)
        raise
    _check_providers(session, providers)
    return session


def _session(ort, source: str | os.PathLike | ir.Model, options, providers: list[str]):
    import onnx_ir as ir

    if not isinstance(source, ir.Model):
        return ort.InferenceSession(os.fspath(source), options, providers=providers)
    from graphopt import io
    from graphopt.ortrun import shareable_initializers, shared_session

    if io.total_tensor_bytes(source) >= IN_MEMORY_LIMIT_BYTES:
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            io.save(source, path, external_data=True)
            return ort.InferenceSession(os.fspath(path), options, providers=providers)
    if shared := shareable_initializers(source, SHARE_MIN_BYTES):
        # ORT takes the lent arrays in before its graph optimizations run, or reads them in
        # place when none run (see shared_session).
        optimize = options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return shared_session(source, shared, options, providers, optimize)
    data = io.to_proto(source).SerializeToString()
    return ort.InferenceSession(data, options, providers=providers)


# The providers of every verification/calibration session while a run is inside
# :func:`using_providers` (the CPU otherwise).
_ACTIVE_PROVIDERS: ContextVar[tuple[str, ...]] = ContextVar("graphopt_providers", default=(CPU,))


@contextmanager
def using_providers(spec: str | Sequence[str] | None) -> Iterator[tuple[str, ...]]:
    """Make ``spec`` (checked by :func:`resolve_providers`) the providers of the sessions that
    graphopt's verification and lossy passes create inside the block."""
    token = _ACTIVE_PROVIDERS.set(resolve_providers(spec))
    try:
        yield _ACTIVE_PROVIDERS.get()
    finally:
        _ACTIVE_PROVIDERS.reset(token)


def active_providers() -> tuple[str, ...]:
    """The providers made active by the innermost :func:`using_providers` (the CPU outside)."""
    return _ACTIVE_PROVIDERS.get()


def check_providers(session, requested: Sequence[str]) -> None:
    """An error when ORT silently replaced a requested accelerator by the CPU."""
    _check_providers(session, list(requested))


def _check_providers(session, requested: list[str]) -> None:
    # ORT falls back to the CPU with a log line when an accelerator fails to initialize
    # (missing CUDA libraries); measuring that as "cuda" would mislead.
    used = session.get_providers()
    lost = [p for p in requested if p != CPU and p not in used]
    if lost:
        raise UserInputError(
            f"--provider {lost[0]}: ONNX Runtime could not initialize it and fell back to "
            f"{', '.join(used)} (check its libraries, e.g. CUDA/cuDNN, are installed)"
        )


def save_optimized(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    opt_level: str = "extended",
    ort_format: bool | None = None,
    providers: Sequence[str] = (CPU,),
    custom_ops: Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Write ORT's optimized form of the model at ``source`` to ``output``; return it.

    ``ort_format`` None: by ``output``'s suffix (``.ort``: the ORT format that ORT Mobile and
    minimal builds load, no protobuf parser needed; else ONNX). The default level is
    ``extended``: ``all`` adds layout transforms (NCHWc) tied to this machine's vector
    width, which ORT itself warns against saving for another device.
    """
    from graphopt import io

    output = Path(os.fspath(output))
    if ort_format is None:
        ort_format = output.suffix.lower() == ".ort"
    io.check_output_target(output)
    if io.same_file(output, Path(os.fspath(source))):
        raise UserInputError(f"{output}: would overwrite the model it is made from")
    loaded = io.load(source)
    config = SessionConfig(
        providers=tuple(providers),
        opt_level=opt_level,
        custom_ops=None if custom_ops is None else tuple(os.fspath(p) for p in custom_ops),
    )
    folder = output.parent if str(output.parent) else Path(".")
    # ORT writes in place: into a temporary folder beside the output first, then renamed,
    # so an interrupted or failed run leaves no half-written model under the user's name.
    try:
        with io.temporary_folder(folder, output.name) as tmp_dir:
            _save_optimized_into(tmp_dir, source, output, loaded.model, config, ort_format)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        raise UserInputError(f"{output}: cannot be written ({io.os_error_reason(exc)})") from None
    return output


def _save_optimized_into(
    tmp_dir: Path,
    source: str | os.PathLike,
    output: Path,
    model: ir.Model,
    config: SessionConfig,
    ort_format: bool,
) -> None:
    from graphopt import io

    folder = output.parent if str(output.parent) else Path(".")
    options = session_options(config, model)
    options.optimized_model_filepath = os.fspath(tmp_dir / output.name)
    data_name = io.data_file_name(output)
    if ort_format:
        options.add_session_config_entry("session.save_model_format", "ORT")
    elif io.total_tensor_bytes(model) >= IN_MEMORY_LIMIT_BYTES:
        # Past protobuf's 2 GB a single ONNX file cannot hold the weights.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_name
        )
    try:
        create_session(source, config, model, options=options)
    except UserInputError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{source}: ONNX Runtime cannot optimize it ({first})") from None
    written = tmp_dir / output.name
    if not written.is_file():
        raise UserInputError(f"{output}: ONNX Runtime wrote no optimized model")
    if (tmp_dir / data_name).is_file():
        io.check_output_target(output, data=True)
        # The old model goes first: a kill between the renames leaves no model rather than
        # the old one pointing at new weights (as io.save does).
        with suppress(FileNotFoundError):
            output.unlink()
        os.replace(tmp_dir / data_name, folder / data_name)
    os.replace(written, output)
