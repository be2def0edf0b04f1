"""Corrupting the string fields of a serialized model: names, doc strings, attribute strings.

A random bit flip mostly lands in weights (harmless) or breaks the protobuf framing (refused
at parse). Flips inside string fields survive parsing and reach every later stage, so they
are aimed at on purpose: ``string_spans`` walks the protobuf wire format with ONNX's message
descriptors and returns where each string (and attribute ``s``/``strings`` byte string) lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Byte fields that hold text in practice (attribute strings): corrupt them too. Tensor data
# (raw_data, string_data) is left alone: its bytes are arbitrary by design.
_TEXT_BYTES_FIELDS = {("AttributeProto", "s"), ("AttributeProto", "strings")}


@dataclass(frozen=True)
class Span:
    """One string field's payload in the serialized bytes: ``data[start:end]``."""

    start: int
    end: int
    field: str  # e.g. "NodeProto.name", "AttributeProto.s"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def string_spans(data: bytes, descriptor: Descriptor = onnx.ModelProto.DESCRIPTOR) -> list[Span]:
    """Every non-empty string payload in ``data`` (a serialized ``descriptor`` message)."""
    spans: list[Span] = []
    _walk(data, 0, len(data), descriptor, spans)
    return spans


def _walk(data: bytes, pos: int, end: int, descriptor: Descriptor, spans: list[Span]) -> None:
    fields = descriptor.fields_by_number
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            field = fields.get(number)
            if field is not None and length:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    _walk(data, pos, pos + length, field.message_type, spans)
                elif field.type == FieldDescriptor.TYPE_STRING or (
                    (descriptor.name, field.name) in _TEXT_BYTES_FIELDS
                ):
                    spans.append(Span(pos, pos + length, f"{descriptor.name}.{field.name}"))
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire} at byte {pos}")


def flip_in_strings(
    data: bytes, seed: int, flips: int = 1, field: str | None = None, mode: str = "any"
) -> bytes:
    """``data`` with ``flips`` bytes inside string fields (of ``field`` only, if given) changed.

    ``mode`` "invalid": the byte becomes 0xFF (never valid in UTF-8). "text": an ASCII byte
    gets one of its low bits flipped, so the string stays valid UTF-8 and the file loads with
    a renamed value, an unknown op type or attribute, a stray control character or NUL (a
    non-ASCII byte gets its top bit flipped). "any": any of those, chosen per byte.
    """
    spans = [s for s in string_spans(data) if field is None or s.field == field]
    if not spans:
        raise ValueError(f"no string field {field or ''} in the model")
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for _ in range(flips):
        span = spans[int(rng.integers(len(spans)))]
        pos = int(rng.integers(span.start, span.end))
        how = {"invalid": 0, "text": 2}.get(mode, int(rng.integers(3)))
        if how == 0:
            out[pos] = 0xFF
        elif how == 1 or out[pos] >= 0x80:
            out[pos] ^= 0x80
        else:
            out[pos] ^= 1 << int(rng.integers(7))
    return bytes(out)
