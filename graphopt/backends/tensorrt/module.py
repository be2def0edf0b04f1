"""Which TensorRT Python module is installed, and one parse of an ONNX model with its parser.

Either ``tensorrt_rtx`` (TensorRT for RTX: strongly typed networks only, ahead-of-time builds
for chosen compute capabilities without a GPU) or ``tensorrt`` (enterprise TensorRT 10/11:
precision flags, needs a GPU to build). The first one that imports wins; the reason each
failed is kept so that a skipped build can say exactly why.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

# Tried in this order: TensorRT-RTX first, the module this project's extra installs.
MODULE_NAMES = ("tensorrt_rtx", "tensorrt")


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT module and what kind it is."""

    module: ModuleType
    name: str  # "tensorrt_rtx" or "tensorrt"

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "?"))

    def describe(self) -> str:
        return f"{'TensorRT-RTX' if self.rtx else 'TensorRT'} {self.version} ({self.name})"


@dataclass(frozen=True)
class Availability:
    """The module found, or why none was: one line per module tried."""

    found: TensorRT | None
    reasons: tuple[str, ...] = ()

    def why_not(self) -> str:
        return "; ".join(self.reasons) or "no TensorRT module"


@cache
def find_tensorrt() -> Availability:
    """The first TensorRT module that imports (``GRAPHOPT_TENSORRT=none`` forces none, e.g. to
    exercise the static rules and the skipped-build path on a machine that has one)."""
    if os.environ.get("GRAPHOPT_TENSORRT", "").lower() == "none":
        return Availability(None, ("GRAPHOPT_TENSORRT=none",))
    reasons = []
    for name in MODULE_NAMES:
        try:
            module = importlib.import_module(name)
            # The enterprise index's stub package imports but has no builder.
            module.Builder  # noqa: B018
        except Exception as exc:  # ImportError, a missing CUDA library, a stub package
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reasons.append(f"{name}: {text}")
            continue
        return Availability(TensorRT(module, name), tuple(reasons))
    return Availability(None, tuple(reasons))


def capture_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps messages instead of printing them (the parser prints each
    error with a multi-line node dump; graphopt reports them its own way)."""

    class _Captured(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((str(severity), msg))

    return _Captured()


@dataclass
class ParserError:
    """One node the parser rejected (node index -1: not a node, e.g. a graph input's type)."""

    node_index: int
    node_name: str
    op_type: str
    reason: str
    desc: str = ""  # the parser's own words, as it gave them


@dataclass
class Parsed:
    """A network definition and what the parser said."""

    builder: Any
    network: Any
    parser: Any
    logger: Any
    ok: bool
    errors: list[ParserError] = field(default_factory=list)


def parse(
    trt: TensorRT,
    model_bytes: bytes,
    strongly_typed: bool | None = None,
    path: str | os.PathLike | None = None,
) -> Parsed:
    """Parse an ONNX model's bytes into a new network, in this process (graphopt calls it in
    a child, :mod:`.isolated`: the parser can crash on a model). ``strongly_typed`` None: what
    the module does best (always for TensorRT-RTX, whose networks are strongly typed; never
    for enterprise TensorRT, whose builder flags then follow the graph's precisions).

    ``path``: the model's file, whose folder the parser reads external data from (without
    it, TensorRT resolves the locations against the current directory). The caller checks
    the locations stay inside that folder first (:func:`graphopt.io.load` does)."""
    m = trt.module
    logger = capture_logger(m)
    builder = m.Builder(logger)
    typed = trt.rtx if strongly_typed is None else strongly_typed
    flags = 0
    if typed and hasattr(m.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = m.OnnxParser(network, logger)
    if path is None:
        ok = bool(parser.parse(model_bytes))
    else:
        ok = bool(parser.parse(model_bytes, os.fspath(path)))
    errors = [_error(parser.get_error(i)) for i in range(parser.num_errors)]
    return Parsed(builder, network, parser, logger, ok and not errors, errors)


def _error(error: Any) -> ParserError:
    reason = str(error.desc()).strip()
    # "Assertion failed: cond: message" -> the message, which is what a user can act on.
    if reason.startswith("Assertion failed:"):
        reason = reason.split(":", 2)[-1].strip() or reason
    op = str(error.node_operator())
    if reason == "false":  # what the parser says for an op it has no importer for
        reason = f"TensorRT's parser has no importer for {op or 'this node'}"
    return ParserError(int(error.node()), str(error.node_name()), op, reason, str(error.desc()))
