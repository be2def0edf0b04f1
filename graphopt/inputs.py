"""Generated model inputs for verification and measurement: seeded, dtype-aware, bounded.

Symbolic or unknown dims are bound, in this order, by ``--input-shape name:1x3x224x224``,
then by these documented defaults: the first axis (batch) is 1; any other symbolic axis is
32 for rank-4 inputs (image height/width) and 16 otherwise (sequence length). Integer inputs
take values in ``[0, 10)`` — valid token ids, indices and lengths for any realistic model —
narrowed to ``[0, n)`` when the input indexes a table of ``n`` rows through Gather (e.g.
token-type ids), except inputs whose name says they are a mask, which are all ones.
Booleans are random.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx_ir as ir

from graphopt.errors import UserInputError

DEFAULT_BATCH = 1
DEFAULT_IMAGE_DIM = 32
DEFAULT_SEQUENCE_DIM = 16
# Refuse to generate inputs past this many bytes in total (dims are user or model supplied).
MAX_INPUT_BYTES = 512 * 2**20
INT_HIGH = 10


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``name:1x3x224x224`` options into {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise UserInputError(f"--input-shape {spec!r}: expected NAME:DxDxD, e.g. x:1x3x224x224")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            raise UserInputError(f"--input-shape {spec!r}: dims must be integers") from None
        if any(d < 0 for d in shape):
            raise UserInputError(f"--input-shape {spec!r}: dims must be non-negative")
        shapes[name] = shape
    return shapes


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """Inputs the caller must feed (initializers that are also inputs are not)."""
    initializers = model.graph.initializers
    return [v for v in model.graph.inputs if v.name not in initializers]


def concrete_shape(value: ir.Value, given: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape to generate for ``value``, with symbolic dims bound."""
    if value.name in given:
        return given[value.name]
    if value.shape is None:
        raise UserInputError(
            f"input {value.name!r} has no declared shape; pass --input-shape {value.name}:DxD..."
        )
    rank = len(value.shape)
    dims: list[int] = []
    for axis, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(DEFAULT_BATCH)
        else:
            dims.append(DEFAULT_IMAGE_DIM if rank == 4 else DEFAULT_SEQUENCE_DIM)
    return tuple(dims)


def make_inputs(
    model: ir.Model,
    given: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One seeded input per graph input, respecting dtype and bound shapes."""
    given = given or {}
    unknown = set(given) - {v.name for v in graph_inputs(model)}
    if unknown:
        raise UserInputError(f"--input-shape names unknown input(s): {', '.join(sorted(unknown))}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    total = 0
    for value in graph_inputs(model):
        shape = concrete_shape(value, given)
        dtype = _numpy_dtype(value)
        # Python ints: numpy's int64 product wraps around for dims like 2**62.
        total += math.prod(shape) * dtype.itemsize
        if total > MAX_INPUT_BYTES:
            raise UserInputError(
                f"generated inputs would exceed {MAX_INPUT_BYTES >> 20} MiB at input "
                f"{value.name!r} shape {shape}; bind smaller dims with --input-shape"
            )
        high = min(INT_HIGH, _index_bound(value) or INT_HIGH)
        feeds[value.name] = _random_array(rng, value.name, shape, dtype, high)
    return feeds


# Ops that pass an integer input through unchanged in value (so a Gather behind them still
# indexes with the input's values).
_VALUE_PRESERVING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def _index_bound(value: ir.Value, depth: int = 4) -> int | None:
    """The smallest table size an integer input indexes through Gather, if any.

    Token-type ids index a table of 2 rows, position ids a table of max_positions: the
    generated values must stay inside the smallest table the input reaches.
    """
    bounds: list[int] = []
    for use in value.uses():
        node, index = use.node, use.idx
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gather" and index == 1:
            data = node.inputs[0]
            axis_attr = node.attributes.get("axis")
            axis = axis_attr.value if axis_attr is not None else 0
            if data is not None and data.shape is not None and len(data.shape) > axis:
                dim = data.shape[axis]
                if isinstance(dim, int) and dim > 0:
                    bounds.append(dim)
        elif node.op_type in _VALUE_PRESERVING and index == 0 and depth > 0:
            for output in node.outputs:
                inner = _index_bound(output, depth - 1)
                if inner is not None:
                    bounds.append(inner)
    return min(bounds) if bounds else None


def _numpy_dtype(value: ir.Value) -> np.dtype:
    if value.type is None or not isinstance(value.type, ir.TensorType):
        raise UserInputError(f"input {value.name!r} is not a tensor; cannot generate data for it")
    try:
        return np.dtype(value.dtype.numpy())
    except Exception:
        raise UserInputError(
            f"input {value.name!r} has dtype {value.dtype}, which graphopt cannot generate"
        ) from None


_MASK_NAME = re.compile(r"mask", re.IGNORECASE)


def _random_array(
    rng: np.random.Generator,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    int_high: int = INT_HIGH,
) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        if _MASK_NAME.search(name):
            return np.ones(shape, dtype=dtype)
        return rng.integers(0, int_high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating) or dtype.kind == "V" or dtype.itemsize <= 2:
        return rng.standard_normal(size=shape).astype(np.float32).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape)).astype(
            dtype
        )
    if dtype.kind in ("U", "S", "O"):
        return np.array(rng.choice(["a", "bc", "def"], size=shape), dtype=object)
    raise UserInputError(f"input {name!r}: cannot generate data of dtype {dtype}")
