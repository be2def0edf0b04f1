"""What the engine checks need from an ONNX file before the pipeline loads it, read from the
protobuf wire format without parsing the model: the main graph's input names, its initializer
names and the files its external initializers point to.

A full parse would copy every weight (up to 2 GB) only to refuse a typo in ``--shapes``; this
walks the message headers and skips each field by its length, so the weights are never read.
Anything unexpected (a truncated or corrupt file) gives None: the loader then reports it.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx


def _number(message: type, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


_MODEL_GRAPH = _number(onnx.ModelProto, "graph")
_GRAPH_INPUT = _number(onnx.GraphProto, "input")
_GRAPH_INITIALIZER = _number(onnx.GraphProto, "initializer")
_VALUE_NAME = _number(onnx.ValueInfoProto, "name")
_TENSOR_NAME = _number(onnx.TensorProto, "name")
_TENSOR_EXTERNAL = _number(onnx.TensorProto, "external_data")
_ENTRY_KEY = _number(onnx.StringStringEntryProto, "key")
_ENTRY_VALUE = _number(onnx.StringStringEntryProto, "value")
_LENGTH_DELIMITED = 2


class _Malformed(Exception):
    pass


@dataclass
class GraphHeader:
    """The main graph's input and initializer names, and its external-data locations."""

    inputs: list[str] = field(default_factory=list)
    initializers: set[str] = field(default_factory=set)
    locations: set[str] = field(default_factory=set)

    @property
    def fed_inputs(self) -> list[str]:
        """The inputs a caller feeds (an input that is also an initializer is a weight)."""
        return [name for name in self.inputs if name not in self.initializers]


def scan_model(path: str | os.PathLike) -> GraphHeader | None:
    """The main graph's header of the model file at ``path``; None when it cannot be read."""
    path = Path(os.fspath(path))
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        with (
            open(path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        ):
            return _scan(buf)
    except (OSError, ValueError, _Malformed, UnicodeDecodeError):
        return None


def _scan(buf: mmap.mmap | bytes) -> GraphHeader:
    header = GraphHeader()
    # A message field that occurs more than once is merged: every graph piece counts.
    for number, start, end in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            continue
        for inner, s, e in _fields(buf, start, end):
            if inner == _GRAPH_INPUT:
                header.inputs += [
                    _text(buf, a, b) for n, a, b in _fields(buf, s, e) if n == _VALUE_NAME
                ]
            elif inner == _GRAPH_INITIALIZER:
                _initializer(buf, s, e, header)
    return header


def _initializer(buf: mmap.mmap | bytes, start: int, end: int, header: GraphHeader) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _TENSOR_NAME:
            header.initializers.add(_text(buf, s, e))
        elif number == _TENSOR_EXTERNAL:
            entry = {n: _text(buf, a, b) for n, a, b in _fields(buf, s, e)}
            if entry.get(_ENTRY_KEY) == "location" and _ENTRY_VALUE in entry:
                header.locations.add(entry[_ENTRY_VALUE])


def _text(buf: mmap.mmap | bytes, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8")


def _fields(buf: mmap.mmap | bytes, start: int, end: int):
    """(field number, start, end) of each length-delimited field in ``buf[start:end]``; other
    wire types are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed
            yield number, pos, pos + length
            pos += length
        else:  # groups (3, 4) are not used by ONNX; 6, 7 do not exist
            raise _Malformed
    if pos != end:
        raise _Malformed


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
