"""ONNX Runtime sessions for in-memory models: what verification, calibration and the lossy
passes' fidelity checks run on.

They are :func:`graphopt.backends.ort.create_session`'s sessions (the one session factory)
with ORT's graph optimizations off unless asked, on the run's providers (``--provider``) and
with its custom-op libraries (``--custom-ops``) registered. A model under
:data:`~graphopt.backends.ort.IN_MEMORY_LIMIT_BYTES` goes to ORT in memory, its initializers
of :data:`~graphopt.backends.ort.SHARE_MIN_BYTES` or more lent from graphopt's own arrays (no
serialized copy); a larger one is read from a temporary external-data file, which ORT maps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx_ir as ir

from graphopt.backends.ort import SessionConfig, active_providers, create_session


def make_session(
    model: ir.Model,
    threads: int = 0,
    optimize: bool = False,
    custom_ops: Sequence[str | os.PathLike] | None = None,
):
    """An ORT session for an in-memory model, on the run's providers (the CPU unless
    ``--provider`` named others; :func:`graphopt.backends.ort.using_providers`).

    ``optimize``: ORT's graph optimizations all on (as deployed) rather than off (what
    verification compares: graphopt's rewrite and nothing else). ``custom_ops``: custom-op
    libraries to register; by default those the run made active (``--custom-ops``; see
    :mod:`graphopt.backends.ort_custom_ops`).
    """
    config = SessionConfig(
        providers=active_providers(),
        threads=threads,
        opt_level="all" if optimize else "disable",
        custom_ops=None if custom_ops is None else tuple(os.fspath(p) for p in custom_ops),
    )
    return create_session(model, config)
