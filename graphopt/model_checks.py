"""What a model file must satisfy before graphopt works on it; read-only checks of its proto.

Protobuf lets through text that is not UTF-8, attributes without a type, tensors whose data
does not match their dims, external-data references that leave the model's folder, and
graphs that read names no scope defines. Each would fail much later (in a pass, in ORT or in
onnx-ir's serializer) as an internal error; checked at load, each is a one-line
:class:`~graphopt.errors.UserInputError`. Nothing here changes a model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from graphopt.errors import UserInputError


def check_proto_shape(proto: onnx.ModelProto, name: str) -> None:
    """Reject protobufs that parsed but cannot be an ONNX model (empty or truncated)."""
    if not proto.HasField("graph"):
        raise UserInputError(f"{name}: not an ONNX model (no graph; truncated or corrupt file)")
    if proto.ir_version <= 0:
        raise UserInputError(f"{name}: not an ONNX model (missing ir_version)")
    if not proto.graph.output:
        raise UserInputError(f"{name}: graph has no outputs (truncated or corrupt file)")
    if any(not tensor.name for tensor in proto.graph.initializer):
        # onnx-ir drops such an initializer, which would silently turn its uses into
        # omitted inputs.
        raise UserInputError(f"{name}: an initializer has an empty name")


def check_strings(proto: onnx.ModelProto, name: str) -> None:
    """Refuse string fields (names, doc strings, domains, metadata...) that are not UTF-8.

    Protobuf's C parsers accept such proto2 strings and hand them to Python as ``bytes``;
    left in, they become value names that match nothing or make onnx-ir's serializer fail
    at save time, long after the load that should have refused the file.
    """
    bad = _first_non_utf8(proto)
    if bad is not None:
        field, value = bad
        shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
        raise UserInputError(
            f"{name}: {field} {shown} is not valid UTF-8 (corrupt file: protobuf strings "
            "must be UTF-8)"
        )


# Per message type: its string fields and its message fields, each as (name, repeated).
_FieldPlan = tuple[tuple[tuple[str, bool], ...], tuple[tuple[str, bool], ...]]
_FIELD_PLANS: dict[str, _FieldPlan] = {}


def _is_repeated(field: FieldDescriptor) -> bool:
    # ``label`` is gone in protobuf 7; ``is_repeated`` is missing before 5.29.
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        return field.label == FieldDescriptor.LABEL_REPEATED
    return bool(repeated)


def _field_plan(descriptor: Descriptor) -> _FieldPlan:
    plan = _FIELD_PLANS.get(descriptor.full_name)
    if plan is None:
        strings = tuple(
            (f.name, _is_repeated(f))
            for f in descriptor.fields
            if f.type == FieldDescriptor.TYPE_STRING
        )
        messages = tuple(
            (f.name, _is_repeated(f))
            for f in descriptor.fields
            if f.type == FieldDescriptor.TYPE_MESSAGE
        )
        plan = _FIELD_PLANS[descriptor.full_name] = (strings, messages)
    return plan


def _first_non_utf8(message: Message) -> tuple[str, bytes] | None:
    """The first string field holding bytes that are not UTF-8: (Type.field, bytes), or None.

    Reads only string and message fields, so tensor data (raw_data, float_data...) is never
    copied out of the protobuf.
    """
    stack = [message]
    while stack:
        current = stack.pop()
        descriptor = current.DESCRIPTOR
        strings, messages = _field_plan(descriptor)
        for field, repeated in strings:
            # upb and the C++ backend return a field that does not decode as bytes (the pure
            # Python backend refuses it at parse time instead).
            values = getattr(current, field) if repeated else (getattr(current, field),)
            for value in values:
                if not isinstance(value, str):
                    return f"{descriptor.name}.{field}", bytes(value)
        for field, repeated in messages:
            if repeated:
                stack.extend(getattr(current, field))
            elif current.HasField(field):
                stack.append(getattr(current, field))
    return None


# Domains whose ops' string attributes are text by schema (auto_pad, mode, equation...).
# Custom domains may keep arbitrary bytes there (ORT's EPContext embeds a binary blob), which
# onnx-ir reads and writes back unchanged.
_TEXT_ATTRIBUTE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})


def check_attributes(proto: onnx.ModelProto, name: str) -> None:
    """Refuse attributes without a type, and standard ops' string attributes that are not UTF-8.

    onnx-ir reads an untyped attribute as a value-less one that its serializer cannot write
    back, and graphopt's passes read standard ops' string attributes as text.
    """
    for node in _iter_node_protos(proto):
        for attr in node.attribute:
            label = f"{name}: node {node.name or node.op_type!r} attribute {attr.name!r}"
            if attr.type == onnx.AttributeProto.UNDEFINED:
                raise UserInputError(f"{label} has no type (corrupt file)")
            if node.domain not in _TEXT_ATTRIBUTE_DOMAINS:
                continue
            if attr.type == onnx.AttributeProto.STRING:
                texts: Iterable[bytes] = (attr.s,)
            elif attr.type == onnx.AttributeProto.STRINGS:
                texts = attr.strings
            else:
                continue
            for text in texts:
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserInputError(
                        f"{label}: string value {text[:40]!r} is not valid UTF-8 (corrupt file)"
                    ) from None


def _iter_node_protos(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: main graph, subgraphs (any depth), function bodies."""
    stack: list[Iterable[onnx.NodeProto]] = [proto.graph.node]
    stack.extend(function.node for function in proto.functions)
    while stack:
        for node in stack.pop():
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g.node)
                stack.extend(sub.node for sub in attr.graphs)


def _iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers, Constant/attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensor_protos(sub)


def _iter_model_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _iter_tensor_protos(proto.graph)
    for function in proto.functions:
        # A function body is a list of nodes: wrap it so the graph walker can read it.
        yield from _iter_tensor_protos(onnx.GraphProto(node=function.node))


# Typed (non-raw) storage ONNX defines per data type: (field, values per element).
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.INT32: ("int32_data", 1),
    onnx.TensorProto.STRING: ("string_data", 1),
}


_TYPED_FIELD_NAMES = ("float_data", "double_data", "int32_data", "int64_data", "uint64_data")


def check_tensor_sizes(proto: onnx.ModelProto, name: str) -> None:
    """Refuse stored tensors whose data does not fit their shape and type.

    A wrong size would otherwise surface as a crash deep inside a pass, or worse, be written
    back out as a model that no longer loads.
    """
    known = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
    for tensor in _iter_model_tensor_protos(proto):
        label = f"{name}: tensor {tensor.name!r}"
        if tensor.data_type not in known:
            raise UserInputError(f"{label}: unknown or undefined data type {tensor.data_type}")
        if any(d < 0 for d in tensor.dims):
            raise UserInputError(f"{label}: negative dimension in {list(tensor.dims)}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # check_external_data compares lengths with the data file
        count = 1
        for dim in tensor.dims:
            count *= dim
        if tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:
            expected = _expected_nbytes(tensor)
            if len(tensor.raw_data) != expected:
                raise UserInputError(
                    f"{label}: raw data holds {len(tensor.raw_data)} bytes, its shape "
                    f"{list(tensor.dims)} needs {expected}"
                )
            continue
        stored = {f: len(getattr(tensor, f)) for f in (*_TYPED_FIELD_NAMES, "string_data")}
        if count > 0 and not any(stored.values()):
            raise UserInputError(
                f"{label}: holds no data, its shape {list(tensor.dims)} needs some"
            )
        field = _TYPED_FIELDS.get(tensor.data_type)
        if field is not None and stored[field[0]] != count * field[1]:
            raise UserInputError(
                f"{label}: holds {stored[field[0]]} values in {field[0]}, its shape "
                f"{list(tensor.dims)} needs {count * field[1]}"
            )


def check_scopes(model: ir.Model, name: str) -> None:
    """Refuse graphs where a node reads a value that is not defined before it (in its scope).

    Covers dangling references, unsorted nodes and cycles; such graphs cannot be cloned,
    verified or saved faithfully.
    """

    def walk(graph: ir.Graph | ir.Function, outer: list[set[ir.Value]]) -> None:
        # A chain of scopes (innermost last) rather than one merged copy per subgraph: a
        # model with many If/Loop nodes would otherwise copy the whole outer scope each time.
        scope: set[ir.Value] = set(graph.inputs)
        if isinstance(graph, ir.Graph):
            scope.update(graph.initializers.values())
        chain = [*outer, scope]

        def visible(value: ir.Value) -> bool:
            return any(value in level for level in reversed(chain))

        for node in graph:
            for value in node.inputs:
                if value is not None and not visible(value):
                    raise UserInputError(
                        f"{name}: node {node.name or node.op_type!r} reads {value.name!r}, "
                        "which is not produced before it (dangling reference, unsorted "
                        "graph or cycle)"
                    )
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    walk(attr.value, chain)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        walk(sub, chain)
            scope.update(node.outputs)
        for value in graph.outputs:
            if not visible(value):
                raise UserInputError(f"{name}: graph output {value.name!r} is never produced")

    walk(model.graph, [])
    for function in model.functions.values():
        walk(function, [])


def check_no_external_data(proto: onnx.ModelProto, name: str) -> None:
    """Refuse external-data references in a model given as bytes or a ``ModelProto``: it has
    no folder of its own, and resolving the locations against the working folder would let a
    model read any file there or (absolute, ``..``) anywhere."""
    for tensor in _iter_model_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = info.get("location", "")[:80]
            raise UserInputError(
                f"{name}: initializer {tensor.name!r} keeps its data in an external file "
                f"({location!r}), and a model given in memory has no folder to read it from: "
                "pass the model's path, or load it with onnx.load(path), which reads the data in"
            )


def check_external_data(proto: onnx.ModelProto, base_dir: Path, name: str) -> None:
    """Refuse external-data references that escape ``base_dir`` or point at short files."""
    root = base_dir.resolve()
    # Local functions too: their Constants are read (folded) like the main graph's.
    for tensor in _iter_model_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        label = f"{name}: initializer {tensor.name!r}"
        if not location:
            raise UserInputError(f"{label}: external data without a location")
        if "\0" in location:
            raise UserInputError(f"{label}: external-data location {location!r} holds a NUL byte")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
            raise UserInputError(f"{label}: external-data location {location!r} is absolute")
        target = (base_dir / location).resolve()
        if target != root and root not in target.parents:
            raise UserInputError(
                f"{label}: external-data location {location!r} leaves the model's folder"
            )
        # The literal path too: readers open it as written, and the OS walks ``sub/..``
        # through ``sub`` (resolve() drops a missing ``sub`` as text, so the check passed and
        # the read failed later, blamed on the output).
        if not target.is_file() or not (base_dir / location).is_file():
            what = "is a folder, not a file" if target.is_dir() else "is missing"
            raise UserInputError(f"{label}: external-data file {location!r} {what}")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise UserInputError(f"{label}: external-data offset/length is not a number") from None
        if offset < 0 or (length is not None and length < 0):
            raise UserInputError(f"{label}: negative external-data offset or length")
        expected = _expected_nbytes(tensor)
        if length is not None and length != expected and expected:
            # Readers disagree on such a tensor (onnx-ir reads the dims' worth of bytes past
            # the stated length, ONNX Runtime refuses it): no reading of it is the model's.
            raise UserInputError(
                f"{label}: external-data length {length} does not match the tensor's "
                f"{expected} bytes"
            )
        size = target.stat().st_size
        needed = offset + (length if length is not None else expected)
        if needed > size:
            raise UserInputError(
                f"{label}: external-data file {location!r} is too short "
                f"({size} bytes, needs {needed})"
            )


def _expected_nbytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    per_byte = {
        getattr(onnx.TensorProto, n): k
        for n, k in (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
        if hasattr(onnx.TensorProto, n)
    }
    if tensor.data_type in per_byte:
        return -(-count // per_byte[tensor.data_type])
    return count * itemsize
