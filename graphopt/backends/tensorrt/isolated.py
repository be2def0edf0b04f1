"""TensorRT's native parser and builder, run in a child process.

TensorRT's native code can die with a segmentation fault (its ONNX parser did on
torchvision's Faster R-CNN, when lint parsed again while the previous parse's network was
alive). In graphopt's own process that ends it with no word (exit 139), so every call into
TensorRT's parser or builder runs in a child started as ``python -m
graphopt.backends.tensorrt.child`` (a fresh interpreter: no forked threads or state), and a
child that dies raises :class:`NativeCrash`: one line naming TensorRT's component and the signal.

Parsing: one child per graphopt process imports TensorRT once and parses model after model
(lint parses up to 64 cut copies, the agreement bench thousands of node tests); it is
started on first use, again after a crash, and ends with graphopt. Building: a
child per engine (:func:`call`), which reports the phase it is in, so that a crash names
the parser or the builder.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from graphopt.backends.tensorrt.module import ParserError, TensorRT, parse
from graphopt.errors import CheckFailedError, UserInputError

PARSER = "parser"
BUILDER = "builder"


class NativeCrash(CheckFailedError):
    """TensorRT's parser or builder killed the child it ran in (a signal, or an exit)."""

    def __init__(self, component: str, exitcode: int | None) -> None:
        self.component = component  # PARSER or BUILDER
        self.signal = _signal_name(exitcode)
        super().__init__(f"TensorRT's {component} crashed ({self.signal})")


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


@dataclass
class ParseSummary:
    """What one parse said, as plain data: the network itself stays in the child."""

    ok: bool
    errors: list[ParserError] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)  # the captured log
    shape_inputs: list[str] = field(default_factory=list)  # inputs the network reads as shapes


def summarize(trt: TensorRT, model_bytes: bytes, path: str | None) -> ParseSummary:
    """One parse, in the child (the handler :class:`ParserChild` runs by default)."""
    parsed = parse(trt, model_bytes, path=path)
    shape_inputs = []
    if parsed.ok:
        network = parsed.network
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        shape_inputs = [str(t.name) for t in inputs if t.is_shape_tensor]
    return ParseSummary(parsed.ok, parsed.errors, parsed.logger.messages, shape_inputs)


# The child's parse handler, resolved when a child starts (tests put one that crashes here).
PARSE_HANDLER: Callable[[TensorRT, bytes, str | None], ParseSummary] = summarize


class ParserChild:
    """A child process that parses models with one TensorRT module, imported once."""

    def __init__(self, trt: TensorRT) -> None:
        self.name = trt.name
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the child now (it imports TensorRT while the caller works on)."""
        with self._lock:
            self._started()

    def parse(self, model_bytes: bytes, path: str | os.PathLike | None = None) -> ParseSummary:
        # The child lives on across calls: a relative path is made absolute here, against
        # the caller's current folder, not the one the child started in (changing the
        # child's folder instead would be os.chdir, which graphopt's code never calls).
        where = None if path is None else os.path.abspath(path)
        with self._lock:
            self._conn = self._started()
            try:
                self._conn.send((model_bytes, where))
                kind, value = self._conn.recv()
            except (EOFError, OSError):  # the child died: the pipe closed
                raise NativeCrash(PARSER, self._stop()) from None
            except BaseException:  # interrupted mid-parse: its reply must not answer the next
                self._stop(kill=True)
                raise
        if kind == "raised":
            raise CheckFailedError(f"TensorRT's parser raised {value}")
        return value

    def _started(self) -> Connection:
        if self._conn is None:
            self._process, self._conn = _start(_serve, (self.name, PARSE_HANDLER))
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._stop()

    def _stop(self, kill: bool = False) -> int | None:
        assert self._process is not None and self._conn is not None
        self._conn.close()  # the child's recv() ends: it returns
        if kill:
            self._process.kill()
        exitcode = _reap(self._process)
        self._process = self._conn = None
        return exitcode


_children: dict[str, ParserChild] = {}


def parser_child(trt: TensorRT) -> ParserChild:
    """This process's parser child for ``trt`` (started on its first parse)."""
    child = _children.get(trt.name)
    if child is None:
        if not _children:
            atexit.register(shutdown)  # reaped, not left to notice graphopt is gone
        child = _children[trt.name] = ParserChild(trt)
    return child


def parse_isolated(
    trt: TensorRT, model_bytes: bytes, path: str | os.PathLike | None = None
) -> ParseSummary:
    """Parse ``model_bytes`` (``path``: the model's file, for its external data) in this
    process's parser child. Raises :class:`NativeCrash` when the parser kills it."""
    return parser_child(trt).parse(model_bytes, path)


def shutdown() -> None:
    """End the parser children (the next parse starts a new one)."""
    for child in _children.values():
        child.close()
    _children.clear()


def _start(target: Callable[..., None], args: tuple) -> tuple[subprocess.Popen, Connection]:
    """A ``python -m graphopt.backends.tensorrt.child`` running ``target(conn, *args)``.

    Not multiprocessing: its ``spawn`` runs the caller's main script again in the child, which
    breaks (or reruns) a script without an ``if __name__ == "__main__"`` guard."""
    ours, theirs = Pipe()
    # graphopt may be importable here only through the caller's sys.path (not installed).
    root = str(Path(__file__).resolve().parents[3])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    process = subprocess.Popen(
        [sys.executable, "-m", "graphopt.backends.tensorrt.child", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        env=env,
    )
    theirs.close()
    # First where to import from (the target may live outside the installed package, as a
    # test's does), then the target: it unpickles only once that path is set.
    ours.send(list(sys.path))
    ours.send((target, args))
    return process, ours


def _reap(process: subprocess.Popen) -> int | None:
    try:
        return process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # hung: end it
        process.kill()
        return process.wait()


def _serve(conn: Connection, name: str, handler: Callable[..., ParseSummary]) -> None:
    """The parser child's loop: one parse per request until graphopt closes the pipe."""
    trt = TensorRT(importlib.import_module(name), name)
    while True:
        try:
            model_bytes, path = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", handler(trt, model_bytes, path)))
        except Exception as exc:  # a Python error from the bindings, not a crash
            conn.send(("raised", f"{type(exc).__name__}: {_first_line(exc)}"))


def call(function: Callable[..., Any], *args: Any) -> Any:
    """``function(phase, *args)`` in a child of its own: its result, or its exception raised
    here. ``phase(BUILDER)`` says the parse is over, so that a crash names the builder."""
    process, conn = _start(_call, (function, args))
    phase = PARSER
    try:
        while True:
            try:
                kind, value = conn.recv()
            except EOFError:
                raise NativeCrash(phase, _reap(process)) from None
            except BaseException:  # interrupted: the child is still at work
                process.kill()
                raise
            if kind == "phase":
                phase = value
            elif kind == "raised":
                raise value
            else:
                return value
    finally:
        conn.close()
        _reap(process)


def _call(conn: Connection, function: Callable[..., Any], args: tuple) -> None:
    def phase(name: str) -> None:
        conn.send(("phase", name))

    try:
        conn.send(("result", function(phase, *args)))
    except Exception as exc:
        if type(exc) not in (UserInputError, CheckFailedError):
            # Only graphopt's own errors cross as they are (one message, and certain to
            # unpickle in the parent); anything else as its type and first line.
            exc = CheckFailedError(f"TensorRT raised {type(exc).__name__}: {_first_line(exc)}")
        conn.send(("raised", exc))


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
