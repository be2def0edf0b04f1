"""Identical initializers merged into one, with bounded memory."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphopt.registry import GraphPass, Stage, register

CHUNK_BYTES = 16 << 20
# Distinct weights almost always differ early: compare this much before hashing everything.
HEAD_BYTES = 64 << 10
SMALL_GROUP = 8
_HEAD_KEY = "graphopt.dedup.head"
_DIGEST_KEY = "graphopt.dedup.digest"


def _external_chunks(tensor: ir.ExternalTensor, limit: int | None) -> Iterator[bytes]:
    """The tensor's bytes read from its file region in chunks (no mmap, so no RSS growth)."""
    path = tensor.path
    offset = tensor.offset or 0
    length = tensor.length if tensor.length is not None else tensor.nbytes
    length = length if limit is None else min(length, limit)
    with open(path, "rb") as handle:
        fd = handle.fileno()
        done = 0
        while done < length:
            chunk = os.pread(fd, min(CHUNK_BYTES, length - done), offset + done)
            if not chunk:
                raise OSError(f"{path}: external data ends early")
            yield chunk
            done += len(chunk)


def _chunks(tensor: ir.TensorProtocol, limit: int | None = None) -> Iterator[bytes]:
    if isinstance(tensor, ir.ExternalTensor):
        yield from _external_chunks(tensor, limit)
    elif tensor.dtype == ir.DataType.STRING:
        for item in tensor.numpy().reshape(-1):  # type: ignore[union-attr]
            data = item if isinstance(item, bytes) else str(item).encode()
            yield len(data).to_bytes(8, "little") + data
    else:
        raw = _raw_view(tensor)
        if raw is None:
            data = tensor.tobytes()
            yield data if limit is None else data[:limit]
        else:
            # A memoryview, not the array: callers compare and test chunks as bytes (an
            # array's truth value is ambiguous; an external tensor's chunks are bytes).
            yield memoryview(raw if limit is None else raw[:limit])


def _raw_view(tensor: ir.TensorProtocol) -> np.ndarray | None:
    """The bytes of an in-memory tensor without a copy (None for packed sub-byte types)."""
    if tensor.dtype.bitwidth < 8:
        return None
    array = np.ascontiguousarray(tensor.numpy())
    return array.reshape(-1).view(np.uint8)


def _digest(tensor: ir.TensorProtocol, head_only: bool = False) -> bytes:
    """A hash of the tensor's first bytes (cheap filter) or of all of them (cached)."""
    key = _HEAD_KEY if head_only else _DIGEST_KEY
    cached = tensor.meta.get(key)  # tensors are immutable, so a digest stays valid
    if cached is not None:
        return cached
    hasher = hashlib.blake2b(digest_size=32)
    for chunk in _chunks(tensor, HEAD_BYTES if head_only else None):
        hasher.update(chunk)
    digest = hasher.digest()
    tensor.meta[key] = digest
    return digest


def _equal(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Byte-wise equality, chunk by chunk (hashes only select candidates)."""
    in_memory = not isinstance(a, ir.ExternalTensor) and not isinstance(b, ir.ExternalTensor)
    if in_memory and ir.DataType.STRING not in (a.dtype, b.dtype):
        left, right = _raw_view(a), _raw_view(b)
        if left is not None and right is not None:
            return np.array_equal(left, right)  # in memory already: no copies
    left = right = b""
    it_a, it_b = _chunks(a), _chunks(b)
    while True:
        if not left:
            left = next(it_a, b"")
        if not right:
            right = next(it_b, b"")
        if not left or not right:
            return not left and not right
        size = min(len(left), len(right))
        if left[:size] != right[:size]:
            return False
        left, right = left[size:], right[size:]


def _split(values: list[ir.Value], head_only: bool) -> list[list[ir.Value]]:
    """The values grouped by digest; groups of one are dropped (nothing to merge)."""
    groups: dict[bytes, list[ir.Value]] = defaultdict(list)
    for value in values:
        try:
            groups[_digest(value.const_value, head_only)].append(value)
        except (OSError, ValueError):
            continue  # unreadable data: leave it alone
    return [group for group in groups.values() if len(group) > 1]


def _mergeable(value: ir.Value) -> bool:
    # Graph inputs are overridable by the caller; graph outputs keep their own name.
    return not (value.is_graph_input() or value.is_graph_output()) and value.const_value is not None


@register
class DedupInitializersPass(GraphPass):
    """Merge initializers with equal dtype, shape and bytes (per graph); never graph inputs."""

    name = "dedup-initializers"
    stage = Stage.CLEANUP

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        for graph in model.graphs():
            hits += self._graph(graph)
        return hits

    def _graph(self, graph: ir.Graph) -> int:
        # Group by (dtype, shape) first so that unique tensors are never read.
        groups: dict[tuple, list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            if _mergeable(value):
                tensor = value.const_value
                groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
        hits = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            for same_head in _split(members, head_only=True):
                # Small groups are compared byte by byte at once (one read of each tensor);
                # a full hash first only pays off when many tensors share a head.
                if len(same_head) <= SMALL_GROUP:
                    hits += self._merge(graph, same_head)
                    continue
                for candidates in _split(same_head, head_only=False):
                    hits += self._merge(graph, candidates)
        return hits

    @staticmethod
    def _merge(graph: ir.Graph, candidates: list[ir.Value]) -> int:
        kept: list[ir.Value] = []
        merged = 0
        for value in candidates:
            twin = next((k for k in kept if _equal(k.const_value, value.const_value)), None)
            if twin is None:
                kept.append(value)
                continue
            value.replace_all_uses_with(twin)
            del graph.initializers[value.name]
            merged += 1
        return merged
