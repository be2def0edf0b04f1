"""ONNX Runtime sessions for in-memory models: what verification, calibration and the lossy
passes' fidelity checks run on.

A model under :data:`IN_MEMORY_LIMIT_BYTES` goes to ORT in memory, its initializers of
:data:`SHARE_MIN_BYTES` or more lent from graphopt's own arrays (no serialized copy); a larger
one is read from a temporary external-data file, which ORT maps (the limit is
:data:`graphopt.backends.ort.IN_MEMORY_LIMIT_BYTES`, one for every session graphopt
builds). Sessions use the run's providers (``--provider``) and register its custom-op
libraries (``--custom-ops``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from graphopt import io
from graphopt.backends.ort import IN_MEMORY_LIMIT_BYTES, active_providers, check_providers
from graphopt.backends.ort_custom_ops import check_domain_conflict, register_active_custom_ops
from graphopt.ortrun import import_onnxruntime, shareable_initializers, shared_session

# Below IN_MEMORY_LIMIT_BYTES, initializers from this size on are lent to ORT rather than
# serialized: the proto, its bytes and ORT's parse were three copies of every weight (a
# quantized 2 GB decoder's sessions peaked at ~1.5 GB over the model for a 0.5 GB model).
SHARE_MIN_BYTES = 1 << 20


def make_session(
    model: ir.Model,
    threads: int = 0,
    optimize: bool = False,
    custom_ops: Sequence[str | os.PathLike] | None = None,
):
    """An ORT session for an in-memory model, on the run's providers (the CPU unless
    ``--provider`` named others; :func:`graphopt.backends.ort.using_providers`).

    Below :data:`IN_MEMORY_LIMIT_BYTES` the model goes to ORT in memory; its initializers of
    :data:`SHARE_MIN_BYTES` or more are not serialized but lent to ORT (see
    :func:`graphopt.ortrun.shared_session`): a session then costs ORT's own buffers (prepacked
    weights), not copies of every weight. Above it ORT reads a temporary file with external
    data (which it maps).

    ``custom_ops``: custom-op libraries to register; by default those the run made active
    (``--custom-ops``; see :mod:`graphopt.backends.ort_custom_ops`).
    """
    ort = import_onnxruntime()  # imported here: --no-verify runs never pay for it

    options = ort.SessionOptions()
    register_active_custom_ops(options, custom_ops, model=model)
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # Fatal only: a model ORT cannot run is reported by graphopt in one line, not by ORT's
    # multi-line error log on the user's stderr.
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    providers = list(active_providers())
    try:
        session = _session(ort, model, options, providers, optimize)
    except Exception as exc:
        check_domain_conflict(exc)
        raise
    check_providers(session, providers)
    return session


def _session(ort, model: ir.Model, options, providers: list[str], optimize: bool):
    if io.total_tensor_bytes(model) >= IN_MEMORY_LIMIT_BYTES:
        with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
            path = Path(tmp) / "model.onnx"
            io.save(model, path, external_data=True)
            session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    elif shared := shareable_initializers(model, SHARE_MIN_BYTES):
        session = shared_session(model, shared, options, providers, optimize)
    else:
        data = io.to_proto(model).SerializeToString()
        session = ort.InferenceSession(data, options, providers=providers)
    return session
