"""Calibration samples: loaded from ``.npz`` (never pickles) or generated, split, batched.

An ``.npz`` holds one array per model input. Samples are laid end to end along the input's
batch axis (``[N, ...]`` for the usual batch-first input; sample ``i`` is ``array[i:i+1]``
there), or, for an input without a batch axis (a scalar, a state whose first dim is fixed),
stacked on a new first axis (sample ``i`` is ``array[i]``). Sequences come pre-padded, with
their masks, so every sample of an input has the same shape and samples can be fed together
in batches where the model's batch dim is free. The last ``holdout`` share of the samples is
kept apart: fitting (importance, compensation) never sees it, and the fidelity report is
measured on it only.

Which axis is an input's batch axis is read from the model (:func:`sample_axes`): the
symbolic dim the inputs share (``B`` in ``x[B, 16]`` and ``state[2, B, 8]``), else a first
dim that is 1 or unnamed; an input with neither has none.

Generated samples (``--calib random``, :func:`random_calibration`) follow the verification
inputs' rules (:mod:`graphopt.inputs`) and are run through the model once before use, so
that pruning observes data the model accepts, or stops with a one-line error (exit 2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.dim_expressions import dim_expressions
from graphopt.errors import UserInputError, is_out_of_memory
from graphopt.input_dims import (
    batch_dims,
    dim_key,
    dim_keys,
    dims_of,
    graph_inputs,
)
from graphopt.inputs import (
    DEFAULT_BATCH,
    bind_dims,
    describe_feeds,
    enlarged_dims,
    input_shapes,
    make_inputs,
)

RANDOM_SAMPLES = 32
BATCH = 8


@dataclass
class CalibrationSet:
    arrays: dict[str, np.ndarray]
    source: str  # file name or "random"
    batch: int = 1
    # Cut each batch of padded sequences to its longest real sequence (the model's sequence
    # dim is free and padding is masked): the same statistics at a fraction of the cost.
    trim: bool = False
    # Per input, the model axis its samples are laid end to end along in ``arrays`` (its
    # batch axis), or None: no batch axis, the samples are stacked on a new first axis.
    # Inputs not named here use axis 0 (the plain ``[N, ...]`` layout).
    axes: dict[str, int | None] = field(default_factory=dict)
    # What the report should say about how generated samples were shaped or fed (sizes
    # enlarged, one sample at a time), or "".
    note: str = ""

    def __post_init__(self) -> None:
        if any(axis is None for axis in self.axes.values()):
            # A stacked sample cannot share a run with another one: feed one at a time.
            self.batch = 1

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    @property
    def count(self) -> int:
        name, array = next(iter(self.arrays.items()))
        return array.shape[self.axis(name) or 0]

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one sample per input (batch 1): what FLOPs are counted at."""
        shapes = {}
        for name, array in self.arrays.items():
            axis = self.axis(name)
            if axis is None:
                shapes[name] = tuple(array.shape[1:])
            else:
                shapes[name] = tuple(1 if i == axis else d for i, d in enumerate(array.shape))
        return shapes

    def split(self, holdout: float) -> tuple[CalibrationSet, CalibrationSet | None]:
        """(fit, held-out): the last ``holdout`` share of the samples held out, at least one
        and never all (no held-out part for ``holdout`` 0 or fewer than 2 samples)."""
        n = self.count
        held = min(max(1, round(n * holdout)), n - 1) if n >= 2 and holdout > 0 else 0
        if held == 0:
            return self, None
        fit = {k: self._part(k, v, 0, n - held) for k, v in self.arrays.items()}
        rest = {k: self._part(k, v, n - held, n) for k, v in self.arrays.items()}
        return (
            CalibrationSet(fit, self.source, self.batch, self.trim, dict(self.axes)),
            CalibrationSet(rest, self.source, self.batch, self.trim, dict(self.axes)),
        )

    def first(self, count: int) -> CalibrationSet:
        """The first ``count`` samples (all of them when there are fewer)."""
        if self.count <= count:
            return self
        arrays = {name: self._part(name, a, 0, count) for name, a in self.arrays.items()}
        return CalibrationSet(arrays, self.source, self.batch, self.trim, dict(self.axes))

    def batches(self, trim: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of ``batch`` samples; ``trim=False`` keeps the padded width."""
        mask_name = _mask_name(self.arrays) if self.trim and trim else None
        for start in range(0, self.count, self.batch):
            feeds = {}
            for name, array in self.arrays.items():
                if self.axis(name) is None:
                    feeds[name] = array[start]  # batch is 1 (see __post_init__)
                else:
                    feeds[name] = self._part(name, array, start, start + self.batch)
            if mask_name is not None:
                feeds = _trimmed(feeds, mask_name)
            yield feeds

    def _part(self, name: str, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` of one input, in the same layout."""
        index = [slice(None)] * array.ndim
        index[self.axis(name) or 0] = slice(start, stop)
        return array[tuple(index)]


def _mask_name(arrays: dict[str, np.ndarray]) -> str | None:
    for name, array in arrays.items():
        if "mask" in name.lower() and array.ndim == 2:
            return name
    return None


def _trimmed(feeds: dict[str, np.ndarray], mask_name: str) -> dict[str, np.ndarray]:
    mask = feeds[mask_name]
    used = np.flatnonzero(mask.any(axis=0))
    width = int(used[-1]) + 1 if used.size else 1
    if width == mask.shape[1]:
        return feeds
    # Only right padding is cut: every [batch, seq] input loses the all-padding columns.
    return {
        k: v[:, :width] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v
        for k, v in feeds.items()
    }


def _symbol(dim) -> str | None:
    """The name of a symbolic dim; None for a fixed or an unnamed one."""
    return None if isinstance(dim, int) else getattr(dim, "value", None) or None


def _fixed(dim) -> bool:
    """A dim of known size: an int >= 0 (exporters such as Paddle2ONNX write -1 for a
    dynamic one, which ONNX Runtime reads as such)."""
    return isinstance(dim, int) and dim >= 0


def _batch_symbol(inputs: list[ir.Value]) -> str | None:
    """The symbolic dim that stands for the batch, if the inputs name one.

    A symbol first in some input's shape qualifies, as does one that several inputs share (a
    recurrent state ``[2, B, 128]`` next to ``x[B, T, F]``); among them the one the most
    inputs have, then the one most often first. A sequence length shared by all inputs
    loses to the batch on the second count.
    """
    inputs_with: Counter[str] = Counter()
    first_in: Counter[str] = Counter()
    for value in inputs:
        dims = list(value.shape) if value.shape is not None else []
        names = {s for s in map(_symbol, dims) if s}
        inputs_with.update(names)
        if dims and _symbol(dims[0]):
            first_in[_symbol(dims[0])] += 1
    candidates = [s for s in inputs_with if first_in[s] or inputs_with[s] > 1]
    if not candidates:
        return None
    return max(candidates, key=lambda s: (inputs_with[s], first_in[s]))


def sample_axes(model: ir.Model) -> dict[str, int | None]:
    """Per model input, its batch axis (samples are batched along it), or None."""
    inputs = graph_inputs(model)
    batch = _batch_symbol(inputs)
    axes: dict[str, int | None] = {}
    for value in inputs:
        if value.shape is None:
            axes[value.name] = 0  # nothing to go by: the documented batch-first default
            continue
        dims = list(value.shape)
        symbols = [_symbol(d) for d in dims]
        if batch is not None and batch in symbols:
            axes[value.name] = symbols.index(batch)
        elif dims and (dims[0] == 1 or (symbols[0] is None and not _fixed(dims[0]))):
            # A batch of one, or an unnamed first dim (Paddle's exports write it as -1).
            axes[value.name] = 0
        else:
            # A scalar, a fixed first dim other than 1 (a [2, 1, 128] state), or a first dim
            # named after something else than the batch (positions [S]).
            axes[value.name] = None
    return axes


def sample_input_shapes(
    model: ir.Model, given: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """One sample's shape per input: the verification inputs' rules
    (:func:`graphopt.inputs.input_shapes`: dims joined by name and batch, windows filled,
    position tables respected), with the batch dim 1 wherever it sits; ``given`` shapes are
    kept.

    (The batch is 1 there too, unless only this module's reading of the batch names it: a
    symbol shared by several inputs at a later axis, ``a[2, B, 8]`` beside ``b[3, B]``.)
    """
    return input_shapes(model, given, _sample_dims(model, dict(given or {})))


def _sample_dims(model: ir.Model, given: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """:func:`~graphopt.inputs.bind_dims`, with this module's batch symbol at 1 unless given."""
    dims = bind_dims(model, given)
    batch = _batch_symbol(graph_inputs(model))
    keys = dim_keys(model)
    given_keys = {
        keys.get((v.name, axis))
        for v in graph_inputs(model)
        if v.name in given
        for axis in range(len(v.shape or ()))
    }
    if batch is not None and batch in dims and batch not in given_keys:
        dims[batch] = DEFAULT_BATCH
    return dims


def load_calibration(path: str, model: ir.Model) -> CalibrationSet:
    """Calibration samples from ``path`` (an ``.npz``) checked against the model's inputs."""
    from graphopt.calibration import load_npz

    arrays = load_npz(path)
    inputs = {v.name: v for v in graph_inputs(model)}
    missing = sorted(set(inputs) - set(arrays))
    if missing:
        raise UserInputError(f"{path}: no array for model input(s) {', '.join(missing)}")
    extra = sorted(set(arrays) - set(inputs))
    if extra:
        # A misspelled name beside the right ones, or labels meant for an accuracy check
        # graphopt would not run: either way the file is not what the user thinks it is.
        raise UserInputError(
            f"{path}: array(s) {', '.join(extra)} are not model inputs ({', '.join(inputs)})"
        )
    arrays = {k: arrays[k] for k in inputs}  # in the model's order
    batch_axes = sample_axes(model)
    axes: dict[str, int | None] = {}
    for name, array in arrays.items():
        expected = _numpy_dtype(inputs[name])
        if expected is not None and array.dtype != expected:
            raise UserInputError(
                f"{path}: input {name!r} is {array.dtype}, the model expects {expected}"
            )
        axes[name] = _layout(path, name, array, inputs[name].shape, batch_axes[name])
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            # Ranges, scales and least-squares fits computed from NaN/inf are NaN: refused
            # here, in one line, rather than found as a broken model later.
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise UserInputError(f"{path}: input {name!r} holds {bad} NaN or infinite value(s)")
    counts = {a.shape[axes[k] or 0] if a.ndim else 0 for k, a in arrays.items()}
    if len(counts) != 1 or 0 in counts:
        raise UserInputError(f"{path}: every array needs the same number N ≥ 1 of samples")
    _check_named_dims(path, arrays, inputs, axes)
    _check_has_data(path, arrays, axes)
    batch = _batch_size(model, batch_axes)
    return CalibrationSet(arrays, path, batch, _free_sequence(model), axes)


def _check_has_data(path: str, arrays: dict[str, np.ndarray], axes: dict[str, int | None]):
    """Refuse samples that carry nothing to measure: every input empty (sequences of length
    0), or a sample whose sequence mask is all 0. Ranges then fell back to defaults and the
    fidelity, measured on no position, read as perfect (cosine 1, error 0)."""
    if all(array.size == 0 for array in arrays.values()):
        shapes = ", ".join(f"{k} {'x'.join(map(str, a.shape))}" for k, a in arrays.items())
        raise UserInputError(f"{path}: every input is empty ({shapes}): nothing to calibrate on")
    mask_name = _mask_name(arrays)
    if mask_name is None or axes.get(mask_name) != 0:
        return
    empty = int(np.sum(~arrays[mask_name].astype(bool).any(axis=1)))
    if empty:
        raise UserInputError(
            f"{path}: {empty} of {len(arrays[mask_name])} samples have {mask_name!r} all 0 "
            "(no position to calibrate or measure on)"
        )


def _check_named_dims(
    path: str,
    arrays: dict[str, np.ndarray],
    inputs: dict[str, ir.Value],
    axes: dict[str, int | None],
) -> None:
    """Refuse arrays that contradict a dim the model fixes, or give one named dim two sizes
    (``input_ids`` 16 tokens long and its ``attention_mask`` 8): no run takes them, and the
    passes that read shapes from the data (pruning's analysis, decomposition's heads) found
    "shapes unknown" or "no prunable group" instead."""
    seen: dict[str, tuple[int, str]] = {}
    for name, array in arrays.items():
        shape = inputs[name].shape
        if shape is None:
            continue
        axis = axes[name]
        # Per-sample dims in the input's order; the sample axis itself holds the count.
        sizes = array.shape[1:] if axis is None else array.shape
        for position, (dim, size) in enumerate(zip(shape, sizes, strict=False)):
            if position == axis:
                continue
            if _fixed(dim) and size != dim:
                dims = [d if isinstance(d, int) else str(d) for d in shape]
                raise UserInputError(
                    f"{path}: input {name!r} has size {size} on axis {position}; the model "
                    f"fixes it at {dim} ({dims})"
                )
            # dim_key: a name two dims share; anonymous ones ("?") get keys of their own.
            symbol = dim_key(inputs[name], position)
            if symbol is None:
                continue
            first = seen.setdefault(symbol, (size, name))
            if first[0] != size:
                raise UserInputError(
                    f"{path}: dim {symbol!r} is {first[0]} in input {first[1]!r} but {size} "
                    f"in input {name!r}; the arrays must agree on it"
                )


def _layout(
    path: str, name: str, array: np.ndarray, shape: ir.Shape | None, batch_axis: int | None
) -> int | None:
    """Where ``array`` holds its samples: the model's batch axis (same rank as the input)
    or a new first axis (one rank more)."""
    if shape is None:
        return 0  # unknown rank: the documented [N, ...] layout
    if array.ndim == len(shape) + 1:
        return None
    if array.ndim == len(shape) and batch_axis is not None:
        return batch_axis
    dims = [d if isinstance(d, int) else str(d) for d in shape]
    layouts = f"[N, *{dims}] (samples stacked on a new first axis)"
    if batch_axis is not None:
        layouts = f"rank {len(shape)} with the N samples along axis {batch_axis}, or " + layouts
    raise UserInputError(
        f"{path}: input {name!r} has shape {list(array.shape)}; the model expects {dims}: "
        f"give {layouts}"
    )


def random_calibration(
    model: ir.Model,
    shapes: dict[str, tuple[int, ...]],
    count: int = RANDOM_SAMPLES,
    owner: str = "",
) -> CalibrationSet:
    """Generated samples (``--calib random``): seeded, dtype-aware, shaped and valued as the
    verification inputs are (scalars stay scalars, a batch axis that is not the first is
    batched along, integers in valid ranges: see :func:`_counts_from_one`), at sizes the model
    runs at.

    ONNX Runtime runs the model on the first batch before anything is measured on it. Where
    it rejects the defaults, the sizes are enlarged as verification enlarges them
    (:func:`~graphopt.inputs.enlarged_dims`; the run's verification passes the sizes it
    found in ``shapes``), and a batch the model rejects is fed one sample at a time. When
    nothing runs: a one-line :class:`UserInputError` naming the shapes and the fixes (and
    ``owner``, the pass that asked, when given).
    """
    axes = sample_axes(model)
    given = dict(shapes)
    dims = _sample_dims(model, given)
    session = _session(model, owner)
    bindings = [dims, *enlarged_dims(model, given, dims)]
    batched = _batch_size(model, axes)
    first_error: tuple[BaseException, dict[str, np.ndarray]] | None = None
    for index, trial in enumerate(bindings):
        bound = input_shapes(model, given, trial)
        batch = batched
        probe = _generated(model, bound, min(batch, count), axes, batch)
        feeds = next(probe.batches())
        error = _rejection(session, feeds)
        if error is not None and batch > 1:
            # A batch the model rejects (a Reshape to batch 1): one sample at a time, if
            # that runs; else the one sample's failure is the one to report.
            feeds = next(CalibrationSet(probe.arrays, "random", 1, False, axes).batches())
            single = _rejection(session, feeds)
            error, batch = (None, 1) if single is None else (single, batch)
        if error is None:
            calib = _generated(model, bound, count, axes, batch)
            notes = []
            if index:
                changed = ", ".join(
                    f"{k} {dims[k]} -> {v}" for k, v in trial.items() if v != dims[k]
                )
                notes.append(
                    f"--calib random: samples enlarged ({changed}): the model fails at the "
                    f"default size ({_innermost(first_error[0])})"
                )
            if batch != batched:
                notes.append("--calib random: samples fed one at a time (a batch fails)")
            one_size = _one_size_note(model, bound)
            if one_size:
                notes.append(one_size)
            calib.note = "; ".join(notes)
            return calib
        first_error = first_error or (error, feeds)
    error, feeds = first_error
    tried = ""
    if len(bindings) > 1:
        last = bindings[-1]
        moved = ", ".join(f"{k} up to {v}" for k, v in last.items() if v != dims[k])
        tried = f"; also fails with {moved}"
    raise UserInputError(
        f"{owner + ': ' if owner else ''}ONNX Runtime cannot run the model on the generated "
        "calibration inputs "
        f"({describe_feeds(feeds)}): {_innermost(error)}{tried}; bind sizes with "
        "--input-shape NAME:DxD... or give real data with --calib FILE.npz"
    )


def _one_size_note(model: ir.Model, bound: dict[str, tuple[int, ...]]) -> str:
    """Say that generated samples hold one size of each symbolic dim ("" without such dims).

    Every sample of a :class:`CalibrationSet` has one shape, so ranges are fitted and
    fidelity measured at that size only: a decoder bound to its decode step (sequence 1)
    quantized for it and reported its error there, while its prefill (a longer sequence)
    came out 15-20x worse, unsaid. The batch is left out (a larger batch repeats the
    work), as are dims named as sums of others (they follow their terms) and unnamed dims
    (``signal[1]``: no name says that the deployed model feeds it other sizes).
    """
    skipped = batch_dims(model) | set(dim_expressions(model))
    batch = _batch_symbol(graph_inputs(model))
    if batch is not None:
        skipped.add(batch)
    keys = dim_keys(model)
    unnamed = {key for (name, axis), key in keys.items() if key == f"{name}[{axis}]"}
    sizes = {k: v for k, v in dims_of(model, bound).items() if k not in skipped | unnamed}
    if not sizes:
        return ""
    text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    return (
        f"--calib random: fitted and measured at {text} only (every generated sample "
        "has one size of each symbolic dim: quantization ranges, pruning and factorization "
        "statistics alike); other sizes, such as a longer sequence, may lose more accuracy: "
        "give --calib FILE.npz with the sizes you deploy, or "
        "bind another size with --input-shape"
    )


def _generated(
    model: ir.Model,
    bound: dict[str, tuple[int, ...]],
    count: int,
    axes: dict[str, int | None],
    batch: int,
) -> CalibrationSet:
    """``count`` generated samples at ``bound`` shapes, laid out along ``axes``. Sample ``i``
    is the same whatever ``count`` (its own seeds), so a probe of the first batch is what
    the full set feeds first."""
    by_name = {v.name: v for v in graph_inputs(model)}
    samples = [make_inputs(model, bound, seed=1000 + i) for i in range(count)]
    arrays = {}
    for name in samples[0]:
        pieces = [
            _counts_from_one(s[name], by_name[name], axes[name], np.random.default_rng(2000 + i))
            for i, s in enumerate(samples)
        ]
        axis = axes[name]
        arrays[name] = np.stack(pieces) if axis is None else np.concatenate(pieces, axis=axis)
    return CalibrationSet(arrays, "random", batch, False, axes)


def _session(model: ir.Model, owner: str):
    """An ORT session on ``model``, or a one-line error saying why ORT cannot load it
    (``owner``: the pass that asked, when given)."""
    from graphopt.backends.ort_custom_ops import missing_library_hint
    from graphopt.sessions import make_session

    try:
        return make_session(model)
    except Exception as exc:
        _raise_if_out_of_memory(exc)
        raise UserInputError(
            f"{owner + ': ' if owner else ''}--calib random: ONNX Runtime cannot load the "
            "model to run calibration "
            f"samples: {_innermost(exc)}{missing_library_hint(model)}"
        ) from None


def _rejection(session, feeds: dict[str, np.ndarray]) -> BaseException | None:
    """Why ORT cannot run ``feeds``, or None when it can."""
    from graphopt.ortrun import run_session

    try:
        run_session(session, [o.name for o in session.get_outputs()], feeds)
    except Exception as exc:
        _raise_if_out_of_memory(exc)
        return exc
    return None


def _raise_if_out_of_memory(exc: BaseException) -> None:
    """A failed allocation is this machine's limit, not data the model rejects."""

    if is_out_of_memory(exc):
        raise MemoryError(str(exc)) from exc


def _innermost(exc: BaseException) -> str:
    from graphopt.ort_messages import innermost_message

    return innermost_message(exc)


def _counts_from_one(
    array: np.ndarray, value: ir.Value, axis: int | None, rng: np.random.Generator
) -> np.ndarray:
    """An integer scalar (or one value per sample, ``[B]``) is a count, length, rate or step
    more often than an index: 0 empties a Range, divides by zero, cuts a sequence to nothing.
    Such inputs take values from 1 up to what the generator allowed (``[0, high)``:
    :func:`graphopt.inputs.int_high`). Token ids and masks are left alone."""
    per_sample = array.ndim == 0 or (array.ndim == 1 and axis == 0)
    if not per_sample or array.dtype.kind not in "iu" or "mask" in value.name.lower():
        return array
    high = _generated_high(value)
    if high <= 1:
        return array  # a table of one row: 0 is the only valid value
    return rng.integers(1, high, size=array.shape).astype(array.dtype)


def _generated_high(value: ir.Value) -> int:
    from graphopt.inputs import int_high

    # The generator's own bound, so that a per-sample id spans an embedding as token ids do.
    return int_high(value)


def _free_sequence(model: ir.Model) -> bool:
    """Every 2-D input has a symbolic second dim (so batches may be cut to their length)."""
    two_d = [v for v in graph_inputs(model) if v.shape is not None and len(v.shape) == 2]
    return bool(two_d) and all(not isinstance(v.shape[1], int) for v in two_d)


def _batch_size(model: ir.Model, axes: dict[str, int | None]) -> int:
    """Feed several samples at once only when every input's batch dim is free."""
    for value in graph_inputs(model):
        axis = axes.get(value.name)
        if axis is None or value.shape is None or isinstance(value.shape[axis], int):
            return 1
    return BATCH


def _numpy_dtype(value: ir.Value) -> np.dtype | None:
    try:
        return np.dtype(value.dtype.numpy()) if value.dtype is not None else None
    except Exception:  # bfloat16 and friends: no plain numpy dtype to compare with
        return None
