"""Running an ORT session on numpy feeds, including dtypes numpy holds only via ml_dtypes.

ORT's Python API takes and returns bfloat16/float8 only as ``OrtValue``s; graphopt's
verification and tests must still cover models with such inputs and outputs.

onnxruntime itself is imported on first use, through :func:`import_onnxruntime`, so that an
interrupt during its (seconds-long) import stays an interrupt; ``--no-verify`` runs never
pay for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import signal
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

if TYPE_CHECKING:
    import onnxruntime as ort

SUB_BYTE_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
}


def is_ml_dtype(array: np.ndarray) -> bool:
    """bfloat16, float8, int4...: numpy extension dtypes ORT's Python API cannot take as is."""
    return array.dtype.type.__module__.startswith("ml_dtypes")


def to_feed(value: Any) -> Any:
    """A feed ORT accepts: numpy as is, ml_dtypes arrays as OrtValues, lists element-wise."""
    if isinstance(value, onnx.TensorProto):
        value = onnx.numpy_helper.to_array(value)
    if isinstance(value, list):
        return [to_feed(v) for v in value]
    if value is None:
        return None
    array = np.asarray(value)
    if is_ml_dtype(array) and array.dtype.itemsize in (1, 2):
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        if onnx_type in SUB_BYTE_TYPES:
            # ORT wants them packed several per byte, which its Python API cannot build.
            raise TypeError(f"ORT's Python API cannot feed {array.dtype} inputs")
        raw = array.view(np.uint8 if array.dtype.itemsize == 1 else np.uint16)
        ort = import_onnxruntime()
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(raw), onnx_type)
    return array


def from_ort_value(value: ort.OrtValue) -> Any:
    """``OrtValue.numpy()``, or for 8/16-bit types numpy lacks, an ml_dtypes array."""
    try:
        return value.numpy()
    except RuntimeError:
        if not value.is_tensor():
            raise
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.element_type())
    if dtype.itemsize not in (1, 2):
        raise TypeError(f"cannot read an ORT output of type {value.data_type()}")
    count = int(np.prod(value.shape(), dtype=np.int64))
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(value.data_ptr())
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(value.shape())


def run_session(session: ort.InferenceSession, names: list[str], feeds: dict[str, Any]) -> list:
    """``session.run`` that also handles bfloat16/float8 inputs and outputs."""
    ort = import_onnxruntime()
    converted = {k: to_feed(v) for k, v in feeds.items()}
    if not any(isinstance(v, ort.OrtValue) for v in converted.values()):
        try:
            return session.run(names, converted)
        except RuntimeError as exc:
            if "No corresponding Numpy type" not in str(exc):
                raise
    # bfloat16/float8 only go in and out as OrtValues, and then every feed must be one.
    values = {
        k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
        for k, v in converted.items()
    }
    return [from_ort_value(v) for v in session.run_with_ort_values(names, values)]


# Inputs to give a probe node so that ORT's kernel lookup (not shape inference) decides.
_PROBE_ARITY = {"LayerNormalization": 3, "RMSNormalization": 2, "Attention": 3}


@functools.lru_cache(maxsize=256)
def has_kernel(op_type: str, opset: int, dtype: int = onnx.TensorProto.FLOAT) -> bool:
    """Whether ONNX Runtime's CPU provider has a kernel for a default-domain op at ``opset``.

    ORT lags ONNX: e.g. ORT 1.32 runs Swish at opset 24 but has no kernel registered for it
    at opset 25/26. A fusion must not create an op the runtime then refuses to load.
    """
    arity = _PROBE_ARITY.get(op_type, 1)
    names = [f"i{k}" for k in range(arity)]
    inputs = [onnx.helper.make_tensor_value_info(n, dtype, None) for n in names]
    node = onnx.helper.make_node(op_type, names, ["y"])
    graph = onnx.helper.make_graph(
        [node], "probe", inputs, [onnx.helper.make_tensor_value_info("y", dtype, None)]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 11)
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return "NOT_IMPLEMENTED" not in str(exc) and "implementation" not in str(exc)
    return True


def import_onnxruntime() -> ModuleType:
    """``import onnxruntime``, where an interrupt during the import stays an interrupt.

    onnxruntime's extension module imports numpy from C while it loads (seconds, for a
    library of ~100 MB). A KeyboardInterrupt raised there comes out as an ImportError, which
    onnxruntime's ``__init__`` keeps and re-raises or, for its optional parts, suppresses;
    callers that take any exception from ORT for "the model cannot run" then turned Ctrl-C
    into a skipped verification. So SIGINT/SIGTERM are recorded while importing, and one
    received means KeyboardInterrupt, whatever the import made of it.
    """
    module = sys.modules.get("onnxruntime")
    if module is not None and hasattr(module, "InferenceSession"):
        return module
    with _recording_interrupts() as received:
        try:
            import onnxruntime
        except ImportError:
            if received:
                raise KeyboardInterrupt from None
            raise
    if received:
        raise KeyboardInterrupt
    return onnxruntime


@contextlib.contextmanager
def _recording_interrupts() -> Iterator[list[int]]:
    """Within the block, note every SIGINT/SIGTERM, then run the handler already set."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # handlers can only be set from the main thread
        return
    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue  # ignored, or the OS default (which ends the process by itself)

        def record(number: int, frame, previous=previous) -> None:
            received.append(number)
            previous(number, frame)

        saved[signum] = previous
        signal.signal(signum, record)
    try:
        yield received
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
