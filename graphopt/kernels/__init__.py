"""graphopt's own ONNX Runtime custom-op library: sparse MatMul kernels (domain ``graphopt``).

The C++ sources live in ``src/`` (interface: ``src/kernels.h``; layouts: ``LAYOUTS.md``;
Python packers: :mod:`graphopt.kernels.packing`). The library is built on the user's machine
with ``python -m graphopt.kernels build`` (:mod:`graphopt.kernels.build`) and loaded only
through :mod:`graphopt.backends.ort_custom_ops`, whose policy decides which file is trusted.

Without a compiler or headers the library is simply absent: everything dense keeps working,
:func:`available` is False and :func:`unavailable_reason` says why (printed once per process
by :func:`available`).
"""

from __future__ import annotations

import sys
from pathlib import Path

_reported = False


def library_path() -> Path | None:
    """The built library graphopt would load (per the load policy), or None."""
    from graphopt.backends.ort_custom_ops import resolve_custom_op_library

    return resolve_custom_op_library(None)


def unavailable_reason() -> str:
    """Why the library cannot be used: "" when it is built, else one line saying what to do."""
    if library_path() is not None:
        return ""
    from graphopt.backends.ort_custom_ops import build_dir
    from graphopt.kernels.build import unavailable_reason as build_blocker

    blocker = build_blocker()
    if blocker:
        return f"graphopt's sparse kernels are not built and {blocker}; dense ops are used"
    return (
        f"graphopt's sparse kernels are not built (expected in {build_dir()}): "
        "run `python -m graphopt.kernels build`; dense ops are used"
    )


def available(quiet: bool = False) -> bool:
    """Whether the library is built and loadable by policy; the first False prints why."""
    global _reported
    reason = unavailable_reason()
    if reason and not quiet and not _reported:
        _reported = True
        print(f"graphopt: {reason}", file=sys.stderr)
    return not reason


def session_options():
    """A new ``onnxruntime.SessionOptions`` with graphopt's library registered: what a plain
    ONNX Runtime user needs to run a model lowered with ``--sparse-kernels``. Raises a one-line
    :class:`~graphopt.errors.UserInputError` when the library is not built."""
    from graphopt.backends.ort_custom_ops import own_session_options

    return own_session_options()
