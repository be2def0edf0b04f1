"""Model inputs for verification and measurement: seeded, dtype-aware, bounded, and shaped the
way the model declares and uses them.

**Shapes.** Every symbolic dim takes one value across all inputs: dims with the same name
(``batch`` in ``input_ids`` and ``attention_mask``) are one dim, and an unnamed dim is its
own, except that unnamed batch dims are joined to the batch
(:func:`~graphopt.input_dims.dim_keys`: the first dim of every input of rank 2 or more, and
``B`` of a recurrent state ``[2, B, 128]``).
``--input-shape name:1x3x224x224`` binds the dims of that input for every input that shares
them; the rest take documented defaults: 1 for a batch dim or a dim first seen on axis 0, 32
on other axes of rank-4 inputs (image height/width), 16 otherwise (sequence length), raised
to what the graph demands of the input directly (a Conv/Pool window, a reflect Pad, an STFT
frame) and capped by what it allows (positions: rows of the table that position ids index).
Where the demand is not direct (a reflect Pad behind a Reshape or inside an If branch) and
ONNX Runtime rejects the defaults, :func:`enlarged_dims` gives larger bindings to retry at.

**Values.** Floats are standard normal. Integers that index a constant table through
Gather/GatherElements (directly or through Cast/Reshape/Unsqueeze...) are in ``[0, n)``, ``n``
the rows of the smallest table they index: token ids span the vocabulary, token-type ids
stay in ``[0, 2)`` (:func:`int_high`). Other integers are in ``[0, 10)``, narrowed to
``[0, n)`` when they index a computed tensor of ``n`` rows;
integer ``*mask*`` inputs are ones, except that with a batch of 2 or more the second row is
left-padded to its last position (:func:`_mask_array`); position ids count ``0, 1, 2, ...``
along their last axis; length inputs (``lengths``, ``*_lens``, ``seq_len``...) are in
``[1, L]`` with ``L`` the longest symbolic dim of the other inputs, and an RNN/GRU/LSTM's
``sequence_lens`` (whatever its name) at most that RNN's sequence dim; sample rates are 16000.
Booleans are random.

**A second shape** (:func:`second_shape_candidates`) moves every symbolic dim to another
value the graph allows, distinct dims to distinct values (:func:`distinct_second_dims`), so
that verification catches a rewrite that baked one value of a dim into the graph, or took
one dim for another. **User data** (``--verify-inputs FILE.npz``) is checked against the
model's inputs by :func:`check_feeds`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.dim_expressions import follow_expressions
from graphopt.errors import UserInputError
from graphopt.input_dims import (
    POSITION_NAME,
    VALUE_PRESERVING,
    batch_dims,
    dim_key,
    dim_keys,
    dim_limits,
    dims_of,
    given_dims,
    graph_inputs,
    index_bound,
    lookup_rows,
    symbolic_dims,
)

DEFAULT_BATCH = 1
DEFAULT_IMAGE_DIM = 32
DEFAULT_SEQUENCE_DIM = 16
# Refuse to generate inputs past this many bytes in total (dims are user or model supplied).
MAX_INPUT_BYTES = 512 * 2**20
INT_HIGH = 10
# A second-shape dim moves up by its largest power-of-two factor, at most this: 32 = five
# stride-2 stages, the most a CNN/FPN (PP-OCR det needs multiples of 32) asks of its input.
MAX_STEP = 32
SAMPLE_RATE = 16000
# When ORT rejects the original on the default inputs, the dims the user left free (batch dims
# aside) are retried at ENLARGE_FACTOR, ENLARGE_FACTOR**2... times their default, at most
# ENLARGE_TRIES times: a sequence of 16 becomes 64, 256... 65536, a rank-1 signal defaulted to
# 1 reaches 4096; enough for a window or a reflect Pad the analysis cannot see (silero-vad's
# STFT needs 192 to 1023 samples, behind an If). A failing try usually stops at the first
# node ORT rejects, so a model that fails for another reason (its values) costs a few quick
# runs.
ENLARGE_FACTOR = 4
ENLARGE_TRIES = 6
# ... and only while the inputs stay under this share of MAX_INPUT_BYTES: random calibration
# generates 32 samples at the size found, and the second verification shape may double it.
ENLARGE_MAX_BYTES = MAX_INPUT_BYTES // 32

Shapes = dict[str, tuple[int, ...]]


def bind_dims(
    model: ir.Model | ir.Graph, given: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, int]:
    """One value per symbolic dim: from ``given`` shapes first, else the defaults.

    A shape given for one input binds its dims for every input sharing them: the declared
    names say the dims are equal, and ORT fails on ``input_ids`` 2x64 beside an
    ``attention_mask`` left at the default 1x16 (and on a state whose batch is not the
    input's: :func:`dim_keys`). A batch dim defaults to 1 wherever it is first seen (a state
    ``[2, batch, 128]`` listed before ``x[batch, T]``).
    """
    given = given or {}
    places = symbolic_dims(model)
    dims = given_dims(model, given)
    batches = batch_dims(model)
    lower, upper = dim_limits(model)
    for key, occurrences in places.items():
        if key in dims:
            continue
        value, axis = occurrences[0]
        rank = len(value.shape) if value.shape is not None else 0
        size = (
            DEFAULT_BATCH
            if axis == 0 or key in batches
            else DEFAULT_IMAGE_DIM
            if rank == 4
            else DEFAULT_SEQUENCE_DIM
        )
        if key in upper:
            size = min(size, upper[key])
        # A window the input must fill wins over a cap: the cap is a guess about the
        # model's intent, the window a hard error in ORT.
        dims[key] = max(size, lower.get(key, 0))
    # "past_sequence_length + sequence_length" is no dim of its own: it follows its terms.
    return follow_expressions(model, dims, fixed=given_dims(model, given))


def enlarged_dims(
    model: ir.Model | ir.Graph,
    given: Mapping[str, tuple[int, ...]] | None,
    dims: Mapping[str, int],
) -> list[dict[str, int]]:
    """Larger bindings to retry at, in order, when ORT rejects the original at ``dims``.

    Each multiplies every dim the user did not bind (``given``), batch dims aside
    (:func:`batch_dims`), by :data:`ENLARGE_FACTOR` once more: at most
    :data:`ENLARGE_TRIES` bindings, each kept under :data:`ENLARGE_MAX_BYTES` of inputs and
    under the largest size the graph allows (position tables). Dims move together, so
    equal-named dims stay equal and a batch stays one size across inputs. Empty when there is
    nothing to enlarge.

    Windows the analysis cannot see need this: silero-vad's signal passes a reflect Pad and
    an STFT Conv inside an If branch, and 16 samples are far too few; 256 run.
    """
    bound = given_dims(model, given or {})
    batches = batch_dims(model)
    _, upper = dim_limits(model)
    free = [
        k
        for k, size in dims.items()
        if k not in bound and k not in batches and size < upper.get(k, size + 1)
    ]
    inputs = {v.name: v for v in graph_inputs(model)}
    bindings: list[dict[str, int]] = []
    for step in range(1, ENLARGE_TRIES + 1 if free else 1):
        trial = dict(dims)
        for key in free:
            trial[key] = min(max(dims[key], 1) * ENLARGE_FACTOR**step, upper.get(key, math.inf))
        if bindings and trial == bindings[-1]:
            break  # every free dim is at its limit
        shapes = input_shapes(model, given, trial)
        size = 0
        for name, shape in shapes.items():
            try:
                size += math.prod(shape) * _numpy_dtype(inputs[name]).itemsize
            except UserInputError:
                size += math.prod(shape)  # a dtype make_inputs refuses: it says so itself
        if size > ENLARGE_MAX_BYTES:
            break
        bindings.append(trial)
    return bindings


def input_shapes(
    model: ir.Model | ir.Graph,
    given: Mapping[str, tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> Shapes:
    """{input: shape} with symbolic dims bound; given shapes are used as given.

    With ``dims`` (e.g. a second shape), every symbolic axis takes its value from ``dims``
    and given shapes only fill the fixed axes (and inputs without a declared shape).
    """
    given = given or {}
    if dims is None:
        bound = bind_dims(model, given)
        return {v.name: concrete_shape(v, given, bound) for v in graph_inputs(model)}
    # A binding moves every dim (the second shape, enlarged tries): expression-named dims
    # follow the terms' new values.
    dims = follow_expressions(model, dims)
    keys = dim_keys(model)
    shapes: Shapes = {}
    for value in graph_inputs(model):
        declared = value.shape
        shape = given.get(value.name)
        if declared is None or (shape is not None and len(shape) != len(declared)):
            shapes[value.name] = concrete_shape(value, given, dims)
            continue
        sizes = []
        for axis in range(len(declared)):
            key = keys.get((value.name, axis))
            if key is not None and key in dims:
                sizes.append(dims[key])
            elif shape is not None:
                sizes.append(shape[axis])
            else:
                sizes.append(concrete_shape(value, {}, dims)[axis])
        shapes[value.name] = tuple(sizes)
    return shapes


# A sequence/optional/map input: graphopt generates (and .npz files hold) tensors only.
_NOT_A_TENSOR = (
    "input {name!r} is not a tensor (a sequence, optional or map): graphopt cannot generate "
    "data for it, nor read it from a .npz; run with --no-verify"
)


def concrete_shape(
    value: ir.Value,
    given: Mapping[str, tuple[int, ...]],
    dims: Mapping[str, int] | None = None,
) -> tuple[int, ...]:
    """The shape to generate for ``value``, with symbolic dims bound.

    Without ``dims`` they are bound over the graph ``value`` is an input of, so that FLOPs
    counted per input (analysis) and the inputs verification feeds agree.
    """
    if value.name in given:
        return tuple(given[value.name])
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        raise UserInputError(_NOT_A_TENSOR.format(name=value.name))
    if value.shape is None:
        raise UserInputError(
            f"input {value.name!r} has no declared shape; pass --input-shape {value.name}:DxD..."
        )
    if dims is None:
        dims = bind_dims(value.graph, given) if value.graph is not None else {}
    keys = dim_keys(value.graph) if value.graph is not None else {}
    rank = len(value.shape)
    sizes: list[int] = []
    for axis, dim in enumerate(value.shape):
        key = dim_key(value, axis)
        key = keys.get((value.name, axis), key) if key is not None else None
        if key is None:
            sizes.append(int(dim))
        elif key in dims:
            sizes.append(dims[key])
        elif axis == 0:
            sizes.append(DEFAULT_BATCH)
        else:
            sizes.append(DEFAULT_IMAGE_DIM if rank == 4 else DEFAULT_SEQUENCE_DIM)
    return tuple(sizes)


def make_inputs(
    model: ir.Model,
    given: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """One seeded input per graph input, respecting dtype, bound shapes and how it is used.

    ``shapes`` (from :func:`input_shapes`) overrides the binding of ``given``.
    """
    given = given or {}
    unknown = set(given) - {v.name for v in graph_inputs(model)}
    if unknown:
        raise UserInputError(f"--input-shape names unknown input(s): {', '.join(sorted(unknown))}")
    shapes = dict(shapes) if shapes is not None else input_shapes(model, given)
    if seed < 0:  # numpy's own refusal would be an internal error
        raise UserInputError(f"--seed {seed}: expected a whole number >= 0")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    total = 0
    for value in graph_inputs(model):
        shape = shapes[value.name]
        dtype = _numpy_dtype(value)
        # Python ints: numpy's int64 product wraps around for dims like 2**62.
        total += math.prod(shape) * dtype.itemsize
        if total > MAX_INPUT_BYTES:
            raise UserInputError(
                f"generated inputs would exceed {MAX_INPUT_BYTES >> 20} MiB at input "
                f"{value.name!r} shape {shape}; bind smaller dims with --input-shape"
            )
        feeds[value.name] = _generate(rng, model, value, shape, dtype, shapes)
    return feeds


def describe_shapes(
    model: ir.Model | ir.Graph, shapes: Mapping[str, tuple[int, ...]], limit: int = 6
) -> str:
    """``N=2: x 2x4, mask 2x16``: the symbolic dims' values, then each input's shape (the
    first ``limit``: a decoder with 48 cache inputs is described by its dims)."""
    items = list(shapes.items())
    text = ", ".join(f"{name} {_dims_text(shape)}" for name, shape in items[:limit])
    if len(items) > limit:
        text += f" and {len(items) - limit} more"
    bound = dims_of(model, shapes)
    if not bound:
        return text
    return ", ".join(f"{k}={v}" for k, v in bound.items()) + ": " + text


def second_shape_candidates(
    model: ir.Model | ir.Graph, dims: Mapping[str, int]
) -> dict[str, list[int]]:
    """Per symbolic dim, other values to verify at, best first (possibly none).

    ``step`` is the largest power of two dividing ``size``, at most 32: the divisibility
    strided models need (five stride-2 stages) survives a move by it. First ``size - step``
    where that is positive (224→192, 48→32: cheaper than the first shape, so the second
    check costs little more than the first), else ``size + step`` (1→2, 16→32, 32→64); then
    ``2 * size`` (keeps every divisor, e.g. the 7 of 224) and ``size / 2``. Values outside
    what the graph allows (windows, position tables) are left out.
    """
    lower, upper = dim_limits(model)
    candidates: dict[str, list[int]] = {}
    for key, size in dims.items():
        step = _step(size)
        options = [size - step, size + step, 2 * size, size // 2 if size % 2 == 0 else 0]
        low, high = max(1, lower.get(key, 1)), upper.get(key)
        candidates[key] = [
            c
            for c in dict.fromkeys(options)
            if c != size and c >= low and (high is None or c <= high)
        ]
    return candidates


def distinct_second_dims(
    model: ir.Model | ir.Graph,
    dims: Mapping[str, int],
    candidates: Mapping[str, list[int]],
) -> list[dict[str, int]]:
    """Second values for the dims that have candidates, distinct dims at distinct values:
    one or two bindings to try in order.

    Moving every dim by its own step keeps equal dims equal (S = T = 16 at the first shape,
    32 both at the second), so a rewrite that mistakes one symbol for another (a Reshape
    target copying S where the model reads T) would pass at both shapes. Here each dim, in
    order, takes the first value no other dim holds at the second shape (a dim without
    candidates holds its first value). The first binding tries the candidates that keep the
    divisibility by the dim's step, then the next multiples of the step (16 → 48, 64…;
    batch 1 → 3…) within what the graph allows, then the other candidates (½×): a strided
    model's height and width at 32 go to 64 and 96, both still multiples of 32. The second
    tries the candidates in their order first (16 → 32 and 8), for a model whose dims must
    divide one another (a Reshape of S×8 elements into rows of T). Deterministic; the first
    dim of a group of equal ones moves as before, the next ones cost at most about 1.5×.
    """
    bindings = [
        _distinct(model, dims, candidates, keep_divisibility=True),
        _distinct(model, dims, candidates, keep_divisibility=False),
    ]
    return [b for i, b in enumerate(bindings) if b not in bindings[:i]]


def _distinct(
    model: ir.Model | ir.Graph,
    dims: Mapping[str, int],
    candidates: Mapping[str, list[int]],
    keep_divisibility: bool,
) -> dict[str, int]:
    """One binding of :func:`distinct_second_dims`."""
    _, upper = dim_limits(model)
    taken = {size for key, size in dims.items() if not candidates.get(key)}
    chosen: dict[str, int] = {}
    for key, size in dims.items():
        options = candidates.get(key)
        if not options:
            continue
        further = _further_steps(size, upper.get(key), len(dims))
        if keep_divisibility:
            step = _step(size)
            keeping = [c for c in options if c % step == 0]
            order = keeping + further + [c for c in options if c % step != 0]
        else:
            order = options + further
        free = [c for c in order if c not in taken]
        chosen[key] = free[0] if free else options[0]
        taken.add(chosen[key])
    return chosen


def _step(size: int) -> int:
    """How far a dim moves for the second shape: its largest power-of-two factor, at most
    :data:`MAX_STEP` (the divisibility a strided model needs survives the move)."""
    return min(size & -size, MAX_STEP) if size > 0 else 1


def _further_steps(size: int, high: int | None, count: int) -> list[int]:
    """``size + k * step`` for k = 2… (:func:`_step`), up to ``count`` values under ``high``:
    enough to give ``count`` dims distinct values."""
    step = _step(size)
    values = (size + k * step for k in range(2, count + 2))
    return [v for v in values if high is None or v <= high]


def check_feeds(
    model: ir.Model,
    arrays: Mapping[str, np.ndarray],
    source: str,
    given: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """User-supplied inputs (``--verify-inputs``), checked: one array per input, of the
    input's dtype and declared rank and fixed dims, one value per named dim. In model order."""
    inputs = graph_inputs(model)
    names = [v.name for v in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserInputError(f"{source}: no array for model input(s) {', '.join(missing)}")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise UserInputError(
            f"{source}: array(s) {', '.join(extra)} are not model inputs ({', '.join(names)})"
        )
    seen: dict[str, tuple[str, int]] = {}
    for value in inputs:
        array = arrays[value.name]
        expected = _numpy_dtype(value)
        if array.dtype != expected:
            raise UserInputError(
                f"{source}: input {value.name!r} is {array.dtype}, the model expects {expected}"
            )
        wanted = (given or {}).get(value.name)
        if wanted is not None and tuple(wanted) != array.shape:
            raise UserInputError(
                f"{source}: input {value.name!r} has shape {_dims_text(array.shape)}, "
                f"--input-shape says {_dims_text(wanted)}"
            )
        if value.shape is None:
            continue
        if len(value.shape) != array.ndim or any(
            isinstance(d, int) and d >= 0 and d != n
            for d, n in zip(value.shape, array.shape, strict=False)
        ):
            raise UserInputError(
                f"{source}: input {value.name!r} has shape {_dims_text(array.shape)}, "
                f"the model expects {_declared_text(value.shape)}"
            )
        for axis, size in enumerate(array.shape):
            key = dim_key(value, axis)
            if key is None or key == f"{value.name}[{axis}]":  # fixed, or unnamed: its own
                continue
            first = seen.setdefault(key, (value.name, size))
            if first[1] != size:
                raise UserInputError(
                    f"{source}: dim {key!r} is {first[1]} in input {first[0]!r} but {size} in "
                    f"{value.name!r}; the model declares them equal"
                )
    return {n: np.ascontiguousarray(arrays[n]) for n in names}


def resize_feeds(
    feeds: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """``feeds`` cut or tiled (wrapping around) to ``shapes``, axis by axis.

    A second shape for the user's data keeps the user's values (valid token ids, real
    images), where generated ones might not run at all.
    """
    resized = {}
    for name, array in feeds.items():
        for axis, size in enumerate(shapes[name]):
            if array.shape[axis] != size:
                array = np.take(array, np.arange(size) % array.shape[axis], axis=axis)
        resized[name] = np.ascontiguousarray(array)
    return resized


def repeated_axes(
    feeds: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Where :func:`resize_feeds` tiles ``feeds`` up to ``shapes``: ``x axis 0: 1 row
    repeated (rows identical)``, ``x axis 0: 3 -> 6, repeated``. Along such an axis the second
    shape holds no value the first did not, and with one given row, none that differs from
    another row: a rewrite that mixes rows (across the batch) is not checked there."""
    found = []
    for name, array in feeds.items():
        for axis, size in enumerate(shapes.get(name, array.shape)):
            have = array.shape[axis] if axis < array.ndim else size
            if size > have:
                found.append(
                    f"{name} axis {axis}: 1 row repeated {size}x (rows identical)"
                    if have == 1
                    else f"{name} axis {axis}: {have} -> {size}, repeated"
                )
    return found


def describe_feeds(feeds: Mapping[str, np.ndarray], limit: int = 6) -> str:
    """``x 1x3x32x32 float32, ids 1x16 int64 in [0, 9]``: what ORT was fed."""
    parts = []
    for name, array in list(feeds.items())[:limit]:
        # Names are the model's: escape what would break a one-line message.
        shown = name if name.isprintable() else ascii(name)
        text = f"{shown} {_dims_text(array.shape)} {array.dtype}"
        if array.dtype.kind in "iu" and array.size:
            text += f" in [{array.min()}, {array.max()}]"
        parts.append(text)
    if len(feeds) > limit:
        parts.append(f"and {len(feeds) - limit} more")
    return ", ".join(parts)


def _dims_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _declared_text(shape: ir.Shape) -> str:
    return (
        "[" + ",".join(str(d) if isinstance(d, int) else str(d.value or "?") for d in shape) + "]"
    )


# ---- what the graph says about its inputs ------------------------------------------------

_MASK_NAME = re.compile(r"mask", re.IGNORECASE)
_LENGTH_NAME = re.compile(r"(^|_)(len|lens|length|lengths)$|seq_?lens?", re.IGNORECASE)
_SAMPLE_RATE_NAME = re.compile(r"sample_?rate|sampling_?rate|(^|_)sr$", re.IGNORECASE)


def _length_limit(model: ir.Model, value: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Longest symbolic non-leading dim of the other inputs: what a length input measures."""
    longest = 0
    for places in symbolic_dims(model).values():
        for other, axis in places:
            shape = shapes.get(other.name)
            if other is value or axis == 0 or shape is None or len(shape) <= axis:
                continue
            longest = max(longest, int(shape[axis]))
    return longest or INT_HIGH


_RECURRENT = ("RNN", "GRU", "LSTM")


def _recurrent_steps(value: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The shortest sequence dim of the RNN/GRU/LSTMs whose ``sequence_lens`` ``value`` is
    (directly or through Cast/Reshape...), at ``shapes`` (a graph input's) or as declared;
    None when it feeds none, or no such dim is known."""
    steps: list[int] = []
    pending, seen = [value], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for use in current.uses():
            node = use.node
            if node.op_type in VALUE_PRESERVING and node.domain in ("", "ai.onnx") and use.idx == 0:
                pending.extend(node.outputs)
                continue
            if node.op_type not in _RECURRENT or node.domain not in ("", "ai.onnx"):
                continue
            if use.idx != 4 or node.inputs[0] is None:
                continue
            layout = node.attributes.get("layout")
            axis = 1 if layout is not None and layout.as_int() == 1 else 0
            x = node.inputs[0]
            dims = shapes.get(x.name) if x.name else None
            if dims is None and x.shape is not None:
                dims = tuple(d if isinstance(d, int) else -1 for d in x.shape)
            if dims is not None and len(dims) > axis and int(dims[axis]) > 0:
                steps.append(int(dims[axis]))
    return min(steps) if steps else None


def _numpy_dtype(value: ir.Value) -> np.dtype:
    if value.type is None or not isinstance(value.type, ir.TensorType):
        raise UserInputError(_NOT_A_TENSOR.format(name=value.name))
    try:
        return np.dtype(value.dtype.numpy())
    except Exception:
        raise UserInputError(
            f"input {value.name!r} has dtype {value.dtype}, which graphopt cannot generate"
        ) from None


def _generate(
    rng: np.random.Generator,
    model: ir.Model,
    value: ir.Value,
    shape: tuple[int, ...],
    dtype: np.dtype,
    shapes: Mapping[str, tuple[int, ...]],
) -> np.ndarray:
    """Data for one input: its role (mask, positions, lengths, rate, index) read from its
    name and its uses, else plain random."""
    name = value.name
    numeric = np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    if numeric and _SAMPLE_RATE_NAME.search(name):
        return np.full(shape, SAMPLE_RATE, dtype=dtype)
    if np.issubdtype(dtype, np.integer) and dtype != np.bool_:
        if _MASK_NAME.search(name):
            return _mask_array(shape, dtype)
        rows = index_bound(value)
        if POSITION_NAME.search(name) and shape:
            # What a tokenizer feeds: 0, 1, 2... along the sequence (wrapped into the table).
            positions = np.arange(shape[-1]) % (rows or max(shape[-1], 1))
            return np.broadcast_to(positions, shape).astype(dtype)
        steps = _recurrent_steps(value, shapes)
        if _LENGTH_NAME.search(name) or steps is not None:
            high = _length_limit(model, value, shapes)
            high = min(high, rows) if rows else high
            # An RNN/GRU/LSTM's sequence_lens may not exceed its sequence (ONNX Runtime
            # refuses): bounded by that dim at the shape being generated.
            high = min(high, steps) if steps else high
            return rng.integers(1, high + 1, size=shape).astype(dtype)
        return _random_array(rng, name, shape, dtype, int_high(value))
    return _random_array(rng, name, shape, dtype)


def _mask_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An attention-style 0/1 mask: ones, and with a batch (axis 0) of 2 or more the second
    row left-padded: 0 everywhere along the last axis but the last position.

    All ones never masks a whole query row, so a rewrite wrong only there (an attention
    fusion on a left-padded prompt's padding positions) would verify. A decoder's query i
    sees keys 0..past+i, so only padding that reaches past the cache masks it entirely:
    keeping just the last position does that for every query but the last of a prefill or
    a multi-token step, whatever the cache length, while the last query keeps one key (the
    partly masked case) and the other rows stay unpadded. Fixed, not drawn from the seed's
    stream, so the other inputs' values do not move. Booleans are not masks here: their
    polarity is unknown (PyTorch's key_padding_mask is True where padded).
    """
    mask = np.ones(shape, dtype=dtype)
    if len(shape) >= 2 and shape[0] >= 2 and shape[-1] >= 2:
        mask[1, ..., :-1] = 0
    return mask


def int_high(value: ir.Value) -> int:
    """The exclusive upper end of a generated integer (index-like) input's values.

    Ids that index an embedding (a constant table) span all its rows: drawn from ``[0, 10)``
    they would never read row 10 on, and a rewrite that broke the rest of the table would
    verify, compare and calibrate as if exact. Other integers stay small (``[0, 10)``: counts,
    steps, indices into computed tensors), narrowed to the rows of any table they index.
    """
    rows = lookup_rows(value)
    if rows is not None:
        return rows
    return min(INT_HIGH, index_bound(value) or INT_HIGH)


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
            return _mask_array(shape, dtype)
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
