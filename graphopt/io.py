"""Loading and saving models on onnx-ir: lazy external data, safety checks, atomic writes.

Loading never materializes weights: external tensors stay memory-mapped until a pass reads
them. Every external-data reference is checked before anything else happens: the location
must be relative, stay inside the model's folder (symlinks resolved) and the file must hold
``offset + length`` bytes.

Loading also refuses text that is not UTF-8 and attributes without a type: protobuf lets
them through, and they would otherwise fail much later (in a pass, or onnx-ir's serializer).

Saving is atomic: everything is written into a temporary folder next to the target, data
before model, then renamed into place. An interrupted save leaves the previous output or no
output, never a model that fails to load. A save killed outright (SIGKILL) leaves its
temporary folder behind; the next save to the same path removes it. Only regular files are
replaced: a target that is a device, FIFO, socket, folder or symbolic link is refused.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphopt.errors import UserInputError
from graphopt.model_checks import (
    check_attributes,
    check_external_data,
    check_no_external_data,
    check_proto_shape,
    check_scopes,
    check_strings,
    check_tensor_sizes,
)

# Protobuf refuses messages of 2 GiB and more; leave room for the graph itself.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_MARGIN_BYTES = 64 * 2**20
# Tensors smaller than this stay inline when external data is written.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model


@dataclass
class LoadedModel:
    """A model in memory plus where it came from."""

    model: ir.Model
    path: Path | None
    uses_external_data: bool


def load(source: ModelSource, *, untype_maps: bool = False) -> LoadedModel:
    """Load a model from a path, bytes, an ``onnx.ModelProto`` or an ``ir.Model``.

    ``untype_maps`` (a path only): clear the declared type of every graph output and
    value_info holding a map (skl2onnx's ZipMap), which onnx-ir cannot represent yet. For
    commands that only run the model (``compare``, ``bench``): ONNX Runtime infers the type
    again; a model saved from the result would lose those declarations."""
    if isinstance(source, ir.Model):
        return LoadedModel(source, None, _has_external_tensors(source))
    if isinstance(source, onnx.ModelProto):
        check_strings(source, "<model>")
        check_attributes(source, "<model>")
        check_tensor_sizes(source, "<model>")
        check_no_external_data(source, "<model>")
        model = _deserialize_proto(source)
        check_scopes(model, "<model>")
        return LoadedModel(model, None, False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(source))
        except DecodeError as exc:
            raise UserInputError(
                f"cannot parse model bytes: not a valid ONNX protobuf ({exc})"
            ) from None
        check_strings(proto, "<bytes>")
        check_attributes(proto, "<bytes>")
        check_proto_shape(proto, "<bytes>")
        check_tensor_sizes(proto, "<bytes>")
        check_no_external_data(proto, "<bytes>")
        model = _deserialize_proto(proto)
        check_scopes(model, "<bytes>")
        return LoadedModel(model, None, False)
    return _load_path(Path(os.fspath(source)), untype_maps)


def _load_path(path: Path, untype_maps: bool = False) -> LoadedModel:
    if not path.exists():
        raise UserInputError(f"{path}: no such file")
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder, expected an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror})") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        raise UserInputError(
            f"{path}: not a valid ONNX protobuf (truncated or corrupt file)"
        ) from None
    del data
    check_strings(proto, str(path))
    check_attributes(proto, str(path))
    check_proto_shape(proto, str(path))
    check_tensor_sizes(proto, str(path))
    check_external_data(proto, path.parent, str(path))
    if untype_maps:
        _clear_map_types(proto.graph)
    model = _deserialize_proto(proto, base_dir=path.parent, where=str(path))
    check_scopes(model, str(path))
    return LoadedModel(model, path, _has_external_tensors(model))


def _clear_map_types(graph: onnx.GraphProto) -> None:
    """Clear map-holding types of ``graph``'s outputs and value_info (subgraphs too)."""
    for value in (*graph.output, *graph.value_info):
        if _holds_map(value.type):
            value.ClearField("type")
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                _clear_map_types(sub)


def _holds_map(type_: onnx.TypeProto) -> bool:
    """Whether ``type_`` is a map or holds one (a sequence or optional of maps)."""
    kind = type_.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _holds_map(getattr(type_, kind).elem_type)
    return False


def _deserialize_proto(
    proto: onnx.ModelProto, base_dir: Path | None = None, where: str = ""
) -> ir.Model:
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises many types on malformed graphs
        # onnx-ir wraps the real reason ("Output 'i' is redeclared...") in SerdeErrors that
        # only name the function: report the innermost cause.
        while exc.__cause__ is not None:
            exc = exc.__cause__
        # Named when known: the commands that read two models left the user guessing.
        prefix = f"{where}: " if where else ""
        raise UserInputError(f"{prefix}cannot read model: {_one_line(exc)}") from None
    _keep_input_declarations(proto.graph, model.graph)
    if base_dir is not None:
        _set_external_base_dir(model, base_dir)
    return model


def _keep_input_declarations(graph_proto: onnx.GraphProto, graph: ir.Graph) -> None:
    """Give back an input's declared type and shape that a bare output entry erased.

    An input listed among the outputs too is one value, and onnx-ir applies the output
    entry last: an entry without a shape left the input with none ("input 'x' has no
    declared shape" for an input declared ``[N, 4]``)."""
    bare = {
        o.name
        for o in graph_proto.output
        if not (o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape"))
    }
    if not bare:
        return
    values = {v.name: v for v in graph.inputs}
    for declared in graph_proto.input:
        value = values.get(declared.name)
        if value is None or declared.name not in bare or value.shape is not None:
            continue
        if declared.type.HasField("tensor_type"):
            if value.type is None:
                value.type = ir.serde.deserialize_type_proto_for_type(declared.type)
            value.shape = ir.serde.deserialize_type_proto_for_shape(declared.type)


def explain_failure(path: str | os.PathLike, exc: BaseException) -> str | None:
    """One line blaming the model file for ``exc`` if ONNX's full checker rejects it; else None.

    Called after an unexpected exception. The load-time checks refuse what is known to
    break graphopt, but a corrupt file can still hold something only a later stage trips
    over (a Conv ``pads`` of the wrong length, an attribute name a pass does not expect).
    A crash on a file the checker rejects is the file's fault, not a bug.
    """
    if not os.path.isfile(path):
        return None  # a pipe or FIFO was consumed by the load: reading it again would block
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as defect:
        reason = " ".join(str(defect).split())
        if len(reason) > 300:
            reason = reason[:300] + "..."
        return (
            f"{path}: not a valid ONNX model (onnx checker: {reason}); "
            f"graphopt failed on it with {_one_line(exc)}"
        )
    except Exception:  # the checker itself cannot tell: keep it an internal error
        return None
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _iter_all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every stored tensor: initializers, and attribute tensors of the graph, its subgraphs
    and the model's local functions (whose external data resolves like the graph's)."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    bodies = (model.graph, *model.functions.values())
    for node in (n for body in bodies for n in ir.traversal.RecursiveGraphIterator(body)):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value


def _has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(t, ir.ExternalTensor) for t in _iter_all_tensors(model))


def _set_external_base_dir(model: ir.Model, base_dir: Path) -> None:
    for tensor in _iter_all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base_dir)


def external_data_files(model: ir.Model) -> set[Path]:
    """The files the model's external tensors are read from."""
    return {
        Path(t.base_dir) / t.location
        for t in _iter_all_tensors(model)
        if isinstance(t, ir.ExternalTensor)
    }


def total_tensor_bytes(model: ir.Model) -> int:
    """Bytes of all stored tensors, read from metadata only (nothing is materialized)."""
    return sum(t.nbytes for t in _iter_all_tensors(model))


def needs_external_data(model: ir.Model) -> bool:
    """True when an inline save would pass protobuf's 2 GB limit."""
    return total_tensor_bytes(model) + EXTERNAL_DATA_MARGIN_BYTES >= PROTOBUF_LIMIT_BYTES


def data_file_name(path: Path) -> str:
    """Name of the external-data file written beside ``path``."""
    return path.name + ".data"


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; external data when asked or past 2 GB.

    ``external_data=None`` chooses automatically. Returns the path written.
    """
    target = Path(os.fspath(path))
    folder = target.parent if str(target.parent) else Path(".")
    use_external = needs_external_data(model) if external_data is None else external_data
    check_output_target(target, data=use_external)
    data_name = data_file_name(target)
    _remove_stale_temp_folders(folder, target.name)
    try:
        _write_atomically(model, target, folder, data_name, use_external)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        raise UserInputError(f"{target}: cannot be written ({os_error_reason(exc)})") from None
    return target


def _write_atomically(
    model: ir.Model, target: Path, folder: Path, data_name: str, use_external: bool
) -> None:
    with temporary_folder(folder, target.name) as tmp_dir:
        tmp_model = tmp_dir / target.name
        if use_external:
            with external_attributes_in_memory(model):
                ir.save(
                    model,
                    tmp_model,
                    external_data=data_name,
                    size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES,
                )
        else:
            _save_inline(model, tmp_model)
        _fsync(tmp_model)
        tmp_data = tmp_dir / data_name
        if tmp_data.exists() and tmp_data.stat().st_size == 0:
            tmp_data.unlink()  # every tensor stayed inline; no empty data file
        if tmp_data.exists():
            _fsync(tmp_data)
            # Take the old model away first: a kill between the two renames then leaves no
            # model (allowed) rather than the old model pointing at the new data (torn).
            _check_replaceable(folder / data_name)  # again: it may have changed meanwhile
            _check_replaceable(target)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            os.replace(tmp_data, folder / data_name)
        _check_replaceable(target)
        os.replace(tmp_model, target)
        _fsync_dir(folder)


def write_file_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write one file at ``path`` through ``write(handle)``, atomically; return the path.

    The same route as :func:`save`: the target is checked first (a regular file or nothing,
    in a writable folder), the bytes go to a temporary folder beside it, are synced and
    renamed over it, so an interrupted write leaves the previous file or none. An
    ``OSError`` (a full disk, a folder made read-only meanwhile) is a one-line user error.
    """
    target = Path(os.fspath(path))
    folder = target.parent if str(target.parent) else Path(".")
    check_output_target(target)
    _remove_stale_temp_folders(folder, target.name)
    try:
        with temporary_folder(folder, target.name) as tmp_dir:
            tmp_file = tmp_dir / target.name
            with open(tmp_file, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            _check_replaceable(target)  # again: it may have changed meanwhile
            os.replace(tmp_file, target)
            _fsync_dir(folder)
    except OSError as exc:
        raise UserInputError(f"{target}: cannot be written ({os_error_reason(exc)})") from None
    return target


@contextlib.contextmanager
def temporary_folder(folder: Path, name: str) -> Iterator[Path]:
    """A new temporary folder in ``folder`` for writing ``name``, removed on exit.

    Its name carries host and pid, so a later write of ``name`` can remove a killed run's
    leftovers (:func:`_remove_stale_temp_folders`). Interrupts are held back while it is
    created and removed: one landing in between would leave a folder that may hold a full
    copy of the weights."""
    tmp_dir: Path | None = None
    try:
        with _signals_deferred():  # no interrupt between creating the folder and naming it
            tmp_dir = Path(tempfile.mkdtemp(prefix=_temp_prefix(name), suffix=".tmp", dir=folder))
        yield tmp_dir
    finally:
        if tmp_dir is not None:
            try:
                with _signals_deferred():  # an interrupt inside rmtree would leave half of it
                    shutil.rmtree(tmp_dir, ignore_errors=True)
            finally:
                # An interrupt that landed before the removal was deferred (Python runs a
                # handler at its next instruction) skipped it: remove the folder now.
                if tmp_dir.exists():
                    shutil.rmtree(tmp_dir, ignore_errors=True)


def os_error_reason(exc: OSError) -> str:
    """An OSError's reason in one line ("No space left on device"), for user errors."""
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered on exit) on a process's main thread: the CLI
    turns them into KeyboardInterrupt, which must not land between creating a temporary folder
    and the ``try`` that removes it, nor inside the removal.

    The handlers are swapped rather than the signals masked: a mask is per thread, and in a
    process with other threads (ORT's pools, a test runner's I/O thread) the kernel hands a
    process-directed signal to a thread that does not block it, after which Python still runs
    the handler on the main thread at its next instruction."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers, and only it runs them
        return
    received: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        received.append(signum)

    previous: dict[int, Any] = {}
    # signal.signal runs pending handlers first: a signal that arrived just before the swap
    # raises (KeyboardInterrupt) from the swap itself. Raised there, it skipped the block: the
    # removal of a finished run's temporary folder (a SIGTERM then left 24 MB behind). It is
    # kept and raised after the block instead, which then runs whole.
    pending: BaseException | None = None
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) is None:  # None: set outside Python, unrestorable
                continue
            try:
                previous[signum] = signal.signal(signum, hold)
            except BaseException as exc:  # the handler's own exception: raised after the block
                pending = pending or exc
                previous[signum] = signal.signal(signum, hold)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # SIGTERM first: its handler may end the process (SIG_DFL), which must not be lost
        # to a KeyboardInterrupt raised by SIGINT's.
        for signum in sorted(set(received), key=lambda s: s != signal.SIGTERM):
            signal.raise_signal(signum)  # now with the caller's handler
        if pending is not None:
            raise pending


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: the same inode when both exist (hard and
    symbolic links included), else the same resolved path."""
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_target(target: Path, *, data: bool = False) -> None:
    """Refuse an output (and with ``data``, its OUT.data) that exists and is no regular file.

    Saving renames a new file over the target: over /dev/null (as root) that would replace
    the device with a regular file, over a FIFO or socket it would silently remove it, and
    over a symbolic link it would turn the link into a file and leave what it points to
    stale. Following the link instead would let a link planted in a shared folder redirect
    the write onto any file the user may replace. So only regular files are replaced.
    """
    folder = target.parent if str(target.parent) else Path(".")
    if not target.name or target.name in (".", ".."):
        raise UserInputError(f"output path {str(target)!r} names no file")
    if not folder.is_dir():
        raise UserInputError(f"{target}: output folder {folder} does not exist")
    _check_replaceable(target)
    if data:
        _check_replaceable(folder / data_file_name(target))
    _check_writable(folder, target)


def _check_writable(folder: Path, target: Path) -> None:
    """Refuse a folder a file cannot be created in, before the work that would be written:
    a temporary file is created and removed there (``os.access`` misses read-only mounts
    and immutable folders, and says yes to root)."""
    try:
        handle, probe = tempfile.mkstemp(prefix=_temp_prefix(target.name), dir=folder)
    except OSError as exc:
        raise UserInputError(f"{target}: cannot write in {folder} ({exc.strerror})") from None
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(probe)


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_replaceable(path: Path) -> None:
    """Refuse ``path`` unless it is absent or a regular file (symbolic links not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserInputError(f"{path}: cannot be written ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise UserInputError(
            f"{path}: is a symbolic link; outputs only replace regular files "
            "(give the path it points to)"
        )
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "an unknown kind of file")
    raise UserInputError(
        f"{path}: is {kind}, not a regular file; outputs are written to regular files only"
    )


def _temp_prefix(name: str, pid: int | None = None) -> str:
    # Host and pid in the name: a later save can tell a dead run's leftovers from a live one.
    return f".{name}.{socket.gethostname()}.{os.getpid() if pid is None else pid}."


def _remove_stale_temp_folders(folder: Path, name: str) -> None:
    """Delete temporary folders a killed save (SIGKILL, power loss) of ``name`` left behind.

    Only folders of this host whose process is gone: they can hold a full copy of the weights.
    """
    stem = f".{name}.{socket.gethostname()}."
    for entry in folder.glob(f"{glob.escape(stem)}*.tmp"):
        pid_text = entry.name[len(stem) :].split(".", 1)[0]
        if not pid_text.isdigit() or not entry.is_dir() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours (EPERM): keep its folder
    return True


def _save_inline(model: ir.Model, path: Path) -> None:
    """One .onnx file. Large initializers are written straight from their buffers.

    Building one protobuf message and serializing it copies every weight twice (~0.3 s per
    100 MB each), so large initializers are left out of the message (a zero-size stand-in
    keeps their place in the IR) and appended to the graph field as protobuf bytes written
    by hand: a repeated field may come in any number of pieces, and a message field that
    occurs twice is merged, so the file parses as one model.
    """
    streamed = _stand_in_large_initializers(model.graph)
    try:
        with _external_tensors_in_memory(model):
            proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in streamed:
            value.const_value = tensor
    if streamed:
        names = {value.name for value, _ in streamed}
        kept = [t for t in proto.graph.initializer if t.name not in names]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    pieces = [(_initializer_head(value.name, tensor), tensor) for value, tensor in streamed]
    streamed_size = sum(len(head) + tensor.nbytes for head, tensor in pieces)
    try:
        model_bytes = proto.SerializeToString()
    except ValueError as exc:  # protobuf's size limit
        raise UserInputError(f"model too large for one file ({exc}); use --external-data") from None
    if len(model_bytes) + streamed_size + 16 > PROTOBUF_LIMIT_BYTES:
        raise UserInputError("model too large for one file (over 2 GB); use --external-data")
    with open(path, "wb") as handle:
        handle.write(model_bytes)
        if streamed:
            handle.write(_GRAPH_TAG + _varint(streamed_size))
            for head, tensor in pieces:
                handle.write(head)
                handle.write(_tensor_buffer(tensor))


# Initializers from this size on are streamed by _save_inline (smaller ones: not worth it).
STREAM_THRESHOLD_BYTES = 1 << 20
# Protobuf keys (field number << 3 | 2, length-delimited): ModelProto.graph,
# GraphProto.initializer, TensorProto.raw_data.
_GRAPH_TAG, _INITIALIZER_TAG, _RAW_DATA_TAG = b"\x3a", b"\x2a", b"\x4a"
_PLAIN_DTYPES = frozenset(
    getattr(ir.DataType, name)
    for name in (
        *("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64"),
        *("UINT8", "UINT16", "UINT32", "UINT64", "BOOL"),
    )
)


def _stand_in_large_initializers(graph: ir.Graph) -> list[tuple[ir.Value, ir.TensorProtocol]]:
    """Swap large plain initializers of the main graph for zero-size tensors; returns them."""
    streamed = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if (
            tensor is None
            or tensor.dtype not in _PLAIN_DTYPES
            or tensor.nbytes < STREAM_THRESHOLD_BYTES
            or tensor.doc_string
            or tensor.metadata_props
        ):
            continue
        streamed.append((value, tensor))
    for value, _ in streamed:
        value.const_value = ir.Tensor(np.zeros(0, dtype=value.const_value.dtype.numpy()))
        # The file lists streamed initializers last; so must the IR, whose order value_info
        # follows: otherwise a reload orders them as the file does and its save differs
        # (optimize of its own output changed bytes).
        graph.initializers[value.name] = graph.initializers.pop(value.name)
    return streamed


def _initializer_head(name: str, tensor: ir.TensorProtocol) -> bytes:
    """The bytes of one GraphProto.initializer entry up to its raw data."""
    header = onnx.TensorProto(name=name, data_type=tensor.dtype.value)
    header.dims.extend(tensor.shape.numpy())
    header_bytes = header.SerializeToString()
    raw_key = _RAW_DATA_TAG + _varint(tensor.nbytes)
    entry_size = len(header_bytes) + len(raw_key) + tensor.nbytes
    return _INITIALIZER_TAG + _varint(entry_size) + header_bytes + raw_key


def _tensor_buffer(tensor: ir.TensorProtocol) -> bytes | memoryview:
    """The tensor's little-endian bytes, without a copy when its array already is that."""
    array = tensor.numpy()
    if (
        sys.byteorder == "little"
        and array.dtype.byteorder in "=|<"
        and array.flags.c_contiguous
        and array.dtype == tensor.dtype.numpy()
        and array.nbytes == tensor.nbytes
    ):
        return memoryview(array).cast("B")
    data = tensor.tobytes()
    if len(data) != tensor.nbytes:
        raise ValueError(f"tensor {tensor.name!r}: {len(data)} bytes, expected {tensor.nbytes}")
    return data


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a self-contained ``ModelProto`` (materializes all weights: small models)."""
    with _external_tensors_in_memory(model):
        return ir.serde.serialize_model(model)


@contextlib.contextmanager
def _external_tensors_in_memory(model: ir.Model) -> Iterator[None]:
    """Temporarily swap external initializers and attribute tensors for in-memory copies,
    restoring them after."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
        with external_attributes_in_memory(model):
            yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


@contextlib.contextmanager
def external_attributes_in_memory(model: ir.Model) -> Iterator[None]:
    """Temporarily swap tensors read from external data that onnx-ir's writer would not move
    for in-memory copies:

    - attribute tensors (Constant values, in the graph, its subgraphs and local functions):
      written as they are, they would name their file relative to the output's folder, not
      the input's, and onnx-ir's external-data writer moves initializers only;
    - initializers at or under the size threshold, which the writer inlines: it reads each
      and then closes its file map, which fails (``BufferError``, exit 3) while any array
      view of the map is still alive somewhere (a BERT export's 1 KiB ``position_ids``).
    """
    swapped: list[tuple[ir.Node, str, ir.Attr]] = []
    inlined: list[tuple[ir.Value, ir.ExternalTensor]] = []
    try:
        bodies = (model.graph, *model.functions.values())
        for node in (n for body in bodies for n in ir.traversal.RecursiveGraphIterator(body)):
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and isinstance(
                    attr.value, ir.ExternalTensor
                ):
                    copy = ir.Tensor(attr.value.numpy(), name=attr.value.name)
                    swapped.append((node, name, attr))
                    node.attributes[name] = ir.AttrTensor(name, copy, doc_string=attr.doc_string)
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if (
                    isinstance(tensor, ir.ExternalTensor)
                    and tensor.nbytes <= EXTERNAL_DATA_THRESHOLD_BYTES
                ):
                    inlined.append((value, tensor))
                    value.const_value = ir.Tensor(
                        tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype
                    )
        yield
    finally:
        for node, name, attr in swapped:
            node.attributes[name] = attr
        for value, tensor in inlined:
            value.const_value = tensor


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
