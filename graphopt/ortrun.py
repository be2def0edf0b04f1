"""Running an ORT session on numpy feeds, including dtypes numpy holds only via ml_dtypes,
and building one whose large initializers ORT reads from graphopt's own arrays.

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
import mmap
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import io

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


# Initializer types whose numpy arrays ORT takes as they are (ml_dtypes ones are serialized).
_LENDABLE = frozenset(
    getattr(ir.DataType, name)
    for name in (
        *("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64"),
        *("UINT8", "UINT16", "UINT32", "UINT64", "BOOL"),
    )
)
# The file the stand-ins of lent initializers name (ORT checks that it exists; never read).
_STUB_NAME = "lent-initializers.stub"


def shareable_initializers(model: ir.Model, min_bytes: int) -> dict[str, np.ndarray]:
    """The main graph's initializers of ``min_bytes`` or more that ORT can read in place, as
    arrays by name, in graph order.

    In-memory tensors give their own array. An external tensor gives a new read-only map of its
    bytes, owned by the session that reads it: the tensor's own map can then still be released
    (the int4 pass drops each float weight once quantized) while a session is alive, and the
    pages ORT read while creating the session are given back (see :func:`shared_session`).
    """
    lent: dict[str, np.ndarray] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if (
            tensor is None
            or value.is_graph_input()  # overridable by a feed: ORT must own it
            # ORT drops unread initializers before it takes external ones, then fails to find
            # them ("Failed to find existing initializer"): those stay serialized.
            or not value.uses()
            or tensor.dtype not in _LENDABLE
            or tensor.nbytes < min_bytes
        ):
            continue
        array = _lendable_array(tensor)
        if array is not None:
            lent[value.name] = array
    return lent


def _lendable_array(tensor: ir.TensorProtocol) -> np.ndarray | None:
    """The tensor's data as a C-ordered little-endian array of its own dtype, or None."""
    dtype = np.dtype(tensor.dtype.numpy())
    shape = tuple(int(d) for d in tensor.shape.numpy())
    if isinstance(tensor, ir.ExternalTensor):
        if sys.byteorder != "little":
            return None
        return _map_file(tensor.path, tensor.offset or 0, dtype, shape)
    array = tensor.numpy()
    if (
        not isinstance(array, np.ndarray)
        or array.dtype != dtype
        or array.shape != shape
        or not array.flags.c_contiguous
        or array.dtype.byteorder == ">"
        or (array.dtype.byteorder == "=" and sys.byteorder != "little")
    ):
        return None
    return array


def _map_file(path: str | os.PathLike, offset: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A read-only array over ``path``'s bytes from ``offset``, in a map of its own."""
    count = int(np.prod(shape, dtype=np.int64))
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        mapped = mmap.mmap(
            handle.fileno(),
            count * dtype.itemsize + offset - start,
            access=mmap.ACCESS_READ,
            offset=start,
        )
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start).reshape(shape)


def file_map(array: np.ndarray) -> mmap.mmap | None:
    """The file map under ``array`` (one of :func:`_map_file`'s), else None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer's view of the map
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def shared_session(
    model: ir.Model,
    lent: dict[str, np.ndarray],
    options: ort.SessionOptions,
    providers: list[str],
    optimize: bool,
) -> ort.InferenceSession:
    """An ORT session for ``model`` whose initializers named in ``lent`` are not serialized.

    The proto carries stand-ins (external data in a sparse stub file) and ORT gets the arrays:
    without its graph optimizations, as shared initializers it reads in place (``add_initializer``:
    no copy); with them, as external initializers it takes in before optimizing
    (``add_external_initializers``: one copy, so that constant folding and fusions see the
    data). The session keeps the arrays alive for as long as it lives.
    """
    ort = import_onnxruntime()
    proto = _proto_with_stand_ins(model, lent)
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in lent.values()]
    if optimize:
        options.add_external_initializers(list(lent), values)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    else:
        for name, value in zip(lent, values, strict=True):
            options.add_initializer(name, value)
        # ORT resolves external data against the model's folder, so the model is a file.
        with tempfile.TemporaryDirectory(prefix="graphopt-session-") as tmp:
            with open(Path(tmp) / _STUB_NAME, "wb") as stub:
                stub.truncate(max(array.nbytes for array in lent.values()))  # sparse
            path = Path(tmp) / "model.onnx"
            path.write_bytes(proto.SerializeToString())
            del proto
            session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    session._graphopt_lent = values  # ORT reads these buffers for the session's whole life
    for array in lent.values():
        mapped = file_map(array)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            # ORT has prepacked what it packs (MatMul weights) into buffers of its own: the
            # file's pages it read need not stay in this process. Dropped pages of a read-only
            # file map are read again from the file if touched (a Gather's rows).
            mapped.madvise(mmap.MADV_DONTNEED)
    return session


def _proto_with_stand_ins(model: ir.Model, lent: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model``'s proto with the ``lent`` initializers as external-data stand-ins."""
    swapped = []
    try:
        for value in model.graph.initializers.values():
            if value.name in lent:
                swapped.append((value, value.const_value))
                empty = np.zeros(0, dtype=lent[value.name].dtype)
                value.const_value = ir.Tensor(empty, name=value.name)
        proto = io.to_proto(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    for initializer in proto.graph.initializer:
        array = lent.get(initializer.name)
        if array is None:
            continue
        initializer.ClearField("raw_data")
        del initializer.dims[:]
        initializer.dims.extend(array.shape)
        initializer.data_location = onnx.TensorProto.EXTERNAL
        del initializer.external_data[:]
        for key, value in (("location", _STUB_NAME), ("offset", "0"), ("length", array.nbytes)):
            entry = initializer.external_data.add()
            entry.key, entry.value = key, str(value)
    return proto


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
