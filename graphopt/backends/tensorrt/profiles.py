"""Optimization profiles: the min/opt/max of every dynamic dim of the network's inputs.

**One range per dim, not per input.** Dims with the same name are one dim (``sequence`` of
``input_ids`` and of ``attention_mask``; :func:`graphopt.input_dims.dim_keys`, which also
joins unnamed batch dims): TensorRT refuses a profile whose shared dims disagree ("kOPT
values are not self-consistent"), and a model fed two lengths for one named dim fails.

Each dim's range comes from, in this order:

- ``--shapes name:min=1x3x224x224,opt=4x3x224x224,max=8x3x224x224``: each of that input's
  dims, and so every other input sharing one of them; two ``--shapes`` that give a shared
  dim different ranges are refused;
- ``--input-shape name:1x3x224x224``: the size verification ran at, fixed (min = opt = max),
  likewise for every input sharing the dim;
- else derived from what the dim usually is in deployment, so that an engine serves more
  than the one size graphopt verified with: the batch (first dim of an input of rank >= 2)
  1 / 1 / 8; the spatial dims of an image (the last two of a rank-4 float input) 224
  (fixed); the sequence of a token input (dim 1 of a rank-2 integer input) 1 / 128 / 512;
  any other dim 1 / 16 / 64. Then clamped to what the model states: the smallest size a
  window needs (:func:`graphopt.input_dims.dim_limits`) and the largest its lookups take (a
  position table: :mod:`.size_bounds`). A derived range the model does not bound is a guess:
  the plan's notes say so, and how to give the real one.

**Shape tensors.** An integer input TensorRT reads as a shape (it feeds Reshape's shape) has
fixed dims; the profile bounds its *values* (``set_shape_input``), which cannot be derived:
``--shapes name:min=1x16,opt=4x16,max=8x16`` gives them (here two values), and without it the
input is refused, naming the flag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.errors import UserInputError
from graphopt.input_dims import dim_keys, graph_inputs

BATCH = (1, 1, 8)
IMAGE_SIDE = (224, 224, 224)
SEQUENCE = (1, 128, 512)
OTHER = (1, 16, 64)
_KEYS = ("min", "opt", "max")
# The largest profile dim graphopt passes on: TensorRT-RTX 1.7's set_shape refuses 2**31 to
# 2**32 - 1 ("inconsistent with other shapes"), takes some larger values and raises TypeError
# past int64; each would otherwise surface as an internal error after the ONNX is written.
MAX_DIM = 2**31 - 1
# Shape-tensor values may be 0 (Reshape's "copy this dim") or -1 ("infer it").
_MIN_VALUE = -1

Range = tuple[int, int, int]
Shapes = Mapping[str, tuple[tuple[int, ...], ...]]
# (dim key, the other dims' sizes) -> the largest size the model takes and why, or None.
LimitFinder = Callable[[str, Mapping[str, int]], "tuple[int, str] | None"]


@dataclass(frozen=True)
class ProfileInput:
    """A network input as a profile sees it."""

    name: str
    dims: tuple[int, ...]  # as the parsed network has them; -1: dynamic
    is_float: bool
    # Per axis: the dim's key (graphopt.input_dims.dim_keys), shared by the inputs with a
    # dim of that name; None or missing: the input's own (``name[axis]``).
    keys: tuple[str | None, ...] = ()
    # TensorRT reads its values as a shape (Reshape's shape): the profile bounds its values.
    shape_tensor: bool = False

    def key(self, axis: int) -> str | None:
        """The dim at ``axis``'s key; None for a fixed dim."""
        if self.dims[axis] >= 0:
            return None
        named = self.keys[axis] if axis < len(self.keys) else None
        return named or f"{self.name}[{axis}]"

    @property
    def values(self) -> int:
        """How many values a shape tensor holds (its dims are fixed)."""
        count = 1
        for d in self.dims:
            count *= max(d, 0)
        return count


@dataclass(frozen=True)
class InputProfile:
    """One input's min/opt/max shapes (a shape tensor's: values) and where they came from."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    source: str  # "--shapes", "--input-shape", "derived", "--shapes other", or several
    values: bool = False  # a shape tensor's values (set_shape_input), not its dims

    def describe(self) -> str:
        dims = ", ".join(f"{k}={_text(getattr(self, k))}" for k in _KEYS)
        what = "values " if self.values else ""
        return f"{self.name}: {what}{dims} ({self.source})"


@dataclass(frozen=True)
class DimRange:
    """One symbolic dim's range and where it came from."""

    key: str
    min: int
    opt: int
    max: int
    source: str  # "--shapes NAME", "--input-shape NAME" or "derived"
    # Derived only: the model bounds the max (why), or nothing does (a guess).
    bound: str = ""

    @property
    def range(self) -> Range:
        return (self.min, self.opt, self.max)


@dataclass
class ProfilePlan:
    """The profiles of the inputs with a dynamic dim, each dim's range, and what to say."""

    profiles: list[InputProfile] = field(default_factory=list)
    dims: dict[str, DimRange] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_shapes(specs: Sequence[str] | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Repeated ``name:min=AxB,opt=AxB,max=AxB`` into {name: (min, opt, max)}."""
    result: dict[str, tuple[tuple[int, ...], ...]] = {}
    for spec in specs or ():
        name, sep, body = spec.rpartition(":")
        parts = dict(p.split("=", 1) for p in body.split(",") if "=" in p)
        if not sep or not name or sorted(parts) != sorted(_KEYS) or body.count("=") != 3:
            raise UserInputError(
                f"--shapes {spec!r}: expected NAME:min=DxD,opt=DxD,max=DxD, e.g. "
                "input:min=1x3x224x224,opt=4x3x224x224,max=8x3x224x224"
            )
        try:
            shapes = tuple(tuple(int(d) for d in parts[k].lower().split("x")) for k in _KEYS)
        except ValueError:
            raise UserInputError(f"--shapes {spec!r}: dims must be integers") from None
        low, opt, high = shapes
        if not len(low) == len(opt) == len(high):
            raise UserInputError(f"--shapes {spec!r}: min, opt and max differ in rank")
        # Dims must be positive; a shape tensor's values may be 0 or -1 (checked once it is
        # known which the input is: check_given).
        if any(not _MIN_VALUE <= a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
            raise UserInputError(f"--shapes {spec!r}: need 0 < min <= opt <= max in every dim")
        if max(high, default=0) > MAX_DIM:
            raise UserInputError(
                f"--shapes {spec!r}: dims must be at most {MAX_DIM} (what TensorRT takes)"
            )
        if name in result and result[name] != shapes:
            # Which one was meant? The last one used to win without a word.
            raise UserInputError(f"--shapes {name}: given twice, with different ranges")
        result[name] = shapes
    return result


def check_given(inputs: Sequence[ProfileInput], shapes: Shapes) -> dict[str, DimRange]:
    """The dims ``--shapes`` binds, checked against the inputs: names, ranks, the dims the
    model fixes, one range per shared dim, a shape tensor's value count. Run on the input
    model before the passes, and on the network before the build."""
    by_name = {i.name: i for i in inputs}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise UserInputError(
            f"--shapes: no network input named {', '.join(map(repr, unknown))} "
            f"(inputs: {', '.join(sorted(by_name))})"
        )
    dims: dict[str, DimRange] = {}
    for name, (low, opt, high) in shapes.items():
        given = by_name[name]
        if given.shape_tensor:
            _check_values(given, (low, opt, high))
            continue
        if any(a < 1 for a in low):
            raise UserInputError(f"--shapes {name}: need 0 < min <= opt <= max in every dim")
        if len(low) != len(given.dims):
            raise UserInputError(
                f"--shapes {name}: {len(low)} dims given, but input {name!r} has "
                f"{len(given.dims)} ({_text(given.dims, '?')})"
            )
        for axis, (d, a, b, c) in enumerate(zip(given.dims, low, opt, high, strict=True)):
            if d >= 0 and not a == b == c == d:
                raise UserInputError(
                    f"--shapes {name}: axis {axis} of input {name!r} is fixed at {d} by the "
                    f"model ({_text(given.dims, '?')}), not {_range_text((a, b, c))}"
                )
            key = given.key(axis)
            if key is None:
                continue
            other = dims.get(key)
            if other is not None and other.range != (a, b, c):
                raise UserInputError(
                    f"--shapes {name} and {other.source}: dim {key!r} is "
                    f"{_range_text((a, b, c))} here but {_range_text(other.range)} there; "
                    "inputs that share a named dim take one range"
                )
            dims.setdefault(key, DimRange(key, a, b, c, f"--shapes {name}"))
    return dims


def check_input_shapes(
    inputs: Sequence[ProfileInput],
    dims: Mapping[str, DimRange],
    input_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """``--input-shape`` fixing a dim that ``--shapes`` gives another range (through another
    input sharing it): refused, as two ``--shapes`` that disagree are, not silently settled
    for one of them. ``dims``: what :func:`check_given` returned."""
    for given in inputs:
        fixed = input_shapes.get(given.name)
        if given.shape_tensor or fixed is None or len(fixed) != len(given.dims):
            continue
        for axis, size in enumerate(fixed):
            key = given.key(axis)
            other = dims.get(key) if key is not None else None
            if other is None or other.range == (size, size, size):
                continue
            if other.source == f"--shapes {given.name}":
                continue  # the same input's own --shapes: the engine's range, by design
            raise UserInputError(
                f"--input-shape {given.name} and {other.source}: dim {key!r} is {size} here "
                f"but {_range_text(other.range)} there; inputs that share a named dim take "
                f"one range: give {given.name} the same --shapes range, or make them agree"
            )


def check_shape_tensors(inputs: Sequence[ProfileInput], shapes: Shapes) -> None:
    """A shape tensor without ``--shapes``: its values' range cannot be derived."""
    for given in inputs:
        if given.shape_tensor and given.name not in shapes:
            example = "x".join(["V"] * max(given.values, 1))
            raise UserInputError(
                f"input {given.name!r} is a shape tensor (TensorRT reads its values as a "
                "shape, e.g. Reshape's), whose values an optimization profile must bound and "
                f"graphopt cannot guess: give them with --shapes {given.name}:min={example},"
                f"opt={example},max={example} ({given.values} value(s) each, not dims)"
            )


def plan_profiles(
    inputs: Sequence[ProfileInput | tuple[str, tuple[int, ...], bool]],
    shapes: Shapes,
    input_shapes: Mapping[str, tuple[int, ...]],
) -> list[InputProfile]:
    """Profiles of the network's inputs that have a dynamic dim (-1) or are shape tensors.
    ``inputs``: :class:`ProfileInput`, or (name, dims, is a floating-point input)."""
    return plan(inputs, shapes, input_shapes).profiles


def plan(
    inputs: Sequence[ProfileInput | tuple[str, tuple[int, ...], bool]],
    shapes: Shapes,
    input_shapes: Mapping[str, tuple[int, ...]],
    lower: Mapping[str, int] | None = None,
    largest: LimitFinder | None = None,
) -> ProfilePlan:
    """The profile plan: one range per dim key (module docstring). ``lower``: the smallest
    size per key the model needs; ``largest``: the largest it takes (:mod:`.size_bounds`)."""
    listed = [i if isinstance(i, ProfileInput) else ProfileInput(*i) for i in inputs]
    result = ProfilePlan()
    dims = check_given(listed, shapes)
    check_shape_tensors(listed, shapes)
    check_input_shapes(listed, dims, input_shapes)
    for given in listed:  # --input-shape: where --shapes left a dim unbound
        fixed = input_shapes.get(given.name)
        if given.shape_tensor or fixed is None or len(fixed) != len(given.dims):
            continue
        for axis, size in enumerate(fixed):
            key = given.key(axis)
            if key is not None and key not in dims:
                dims[key] = DimRange(key, size, size, size, f"--input-shape {given.name}")
    derived = _derive(listed, dims, lower or {})
    if largest is not None:
        _bound(derived, dims, largest)
        result.notes += _past_the_model(dims, derived, largest)
    dims.update(derived)
    result.dims = dims
    for given in listed:
        profile = _profile(given, shapes, dims)
        if profile is not None:
            result.profiles.append(profile)
    result.notes += _notes(listed, dims, derived)
    return result


def _derive(
    inputs: Sequence[ProfileInput], dims: Mapping[str, DimRange], lower: Mapping[str, int]
) -> dict[str, DimRange]:
    """A range for each dim nothing given binds: the most telling place it occurs decides
    (a sequence, an image side, a batch, else other)."""
    kinds: dict[str, Range] = {}
    for given in inputs:
        if given.shape_tensor:
            continue
        for axis in range(len(given.dims)):
            key = given.key(axis)
            if key is None or key in dims:
                continue
            kind = _kind(given, axis)
            known = kinds.get(key)
            if known is None or _PRIORITY.index(kind) < _PRIORITY.index(known):
                kinds[key] = kind
    derived = {}
    for key, (low, opt, high) in kinds.items():
        need = lower.get(key, 0)
        # A window (a Conv's kernel) needs at least ``need``: the whole range moves up.
        low, opt, high = max(low, need), max(opt, need), max(high, need)
        derived[key] = DimRange(key, low, opt, high, "derived")
    return derived


_PRIORITY = (SEQUENCE, IMAGE_SIDE, BATCH, OTHER)


def _kind(given: ProfileInput, axis: int) -> Range:
    rank = len(given.dims)
    if axis == 0 and rank >= 2:
        return BATCH
    if rank == 4 and given.is_float and axis >= 2:
        return IMAGE_SIDE
    if rank == 2 and not given.is_float and axis == 1:
        return SEQUENCE
    return OTHER


def _bound(
    derived: dict[str, DimRange], given: Mapping[str, DimRange], largest: LimitFinder
) -> None:
    """Clamp each derived max to the largest size the model takes (the others at opt)."""
    sizes = {key: r.opt for key, r in {**given, **derived}.items()}
    for key, dim in list(derived.items()):
        found = largest(key, {k: v for k, v in sizes.items() if k != key})
        if found is None:
            continue
        size, why = found
        if size >= dim.max:
            took = f"the model takes up to {size}: {why}"
            derived[key] = DimRange(key, *dim.range, "derived", took)
            continue
        low = min(dim.min, size)
        derived[key] = DimRange(
            key, low, min(max(dim.opt, low), size), size, "derived", f"max from the model: {why}"
        )


def _past_the_model(
    given: Mapping[str, DimRange], derived: Mapping[str, DimRange], largest: LimitFinder
) -> list[str]:
    """A warning per --shapes dim whose max the model cannot take (its positions run out):
    the user's choice stands, but the engine would be asked for sizes that fail."""
    sizes = {key: r.opt for key, r in {**given, **derived}.items()}
    warnings = []
    for key, dim in given.items():
        if not dim.source.startswith("--shapes") or dim.max == dim.min:
            continue
        found = largest(key, {k: v for k, v in sizes.items() if k != key})
        if found is not None and found[0] < dim.max:
            warnings.append(
                f"warning: {dim.source}: dim {key!r} goes up to {dim.max}, but the model "
                f"takes at most {found[0]} ({found[1]}); larger inputs fail"
            )
    return warnings


def _profile(
    given: ProfileInput, shapes: Shapes, dims: Mapping[str, DimRange]
) -> InputProfile | None:
    if given.shape_tensor:
        low, opt, high = shapes[given.name]
        return InputProfile(given.name, low, opt, high, "--shapes", values=True)
    keys = [given.key(axis) for axis in range(len(given.dims))]
    if all(k is None for k in keys):
        return None
    low, opt, high = _shapes(given, dims)
    sources = []
    for key in keys:
        if key is None:
            continue
        source = dims[key].source
        # "--shapes x" on x itself reads "--shapes"; on another input it names the one.
        if source.endswith(f" {given.name}"):
            source = source.rsplit(" ", 1)[0]
        if source not in sources:
            sources.append(source)
    return InputProfile(given.name, low, opt, high, ", ".join(sources))


def _shapes(given: ProfileInput, dims: Mapping[str, DimRange]) -> list[tuple[int, ...]]:
    """``given``'s min, opt and max shapes from its dims' ranges."""
    ranges = []
    for axis, d in enumerate(given.dims):
        key = given.key(axis)
        ranges.append(dims[key].range if key is not None else (d, d, d))
    return [tuple(r[i] for r in ranges) for i in range(3)]


def _notes(
    inputs: Sequence[ProfileInput], dims: Mapping[str, DimRange], derived: Mapping[str, DimRange]
) -> list[str]:
    """What the report says about the derived dims: which the model bounds, which are guesses
    (and the --shapes that sets them)."""
    places: dict[str, list[str]] = {}
    for given in inputs:
        for axis in range(len(given.dims)):
            key = given.key(axis)
            if key is not None and given.name not in places.setdefault(key, []):
                places[key].append(given.name)
    notes = []
    guesses = []
    for key, dim in derived.items():
        where = f"dim {key!r} ({', '.join(places.get(key, []))}) {_range_text(dim.range)}"
        if dim.bound.startswith("max from the model"):
            notes.append(f"profile {where}: {dim.bound}")
        elif dim.bound:
            notes.append(f"profile {where}: default max; {dim.bound}")
        else:
            guesses.append(where)
    if guesses:
        example = next(
            (
                i
                for i in inputs
                if not i.shape_tensor and any(i.key(a) in derived for a in range(len(i.dims)))
            ),
            None,
        )
        how = " with --shapes NAME:min=DxD,opt=DxD,max=DxD (or --input-shape)"
        if example is not None:
            shapes = _shapes(example, dims)
            shown = ",".join(f"{k}={_text(shape)}" for k, shape in zip(_KEYS, shapes, strict=True))
            how = f" with --shapes, e.g. --shapes {example.name}:{shown} (or --input-shape)"
        notes.append(
            f"profile {'; '.join(guesses)}: a guess, nothing in the model bounds "
            f"{'it' if len(guesses) == 1 else 'them'}; the engine takes only these sizes: "
            f"give the sizes it will see{how}"
        )
    return notes


# The operands TensorRT reads as shapes (the op's input index): an integer network input
# reaching one is a shape tensor.
_SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Resize": (3,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "OneHot": (1,),
    "Pad": (1,),
    "Upsample": (1,),
}
# Ops a shape passes through as a shape (TensorRT computes them on shape tensors).
_SHAPE_CARRIERS = {
    "Cast", "Concat", "Unsqueeze", "Squeeze", "Identity", "Gather", "Slice", "Add", "Sub",
    "Mul", "Div", "Max", "Min", "Neg", "Abs", "Reshape", "Flatten", "Where",
}  # fmt: skip
_INTEGER_TYPES = (ir.DataType.INT32, ir.DataType.INT64)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def model_inputs(model: ir.Model) -> list[ProfileInput]:
    """The inputs of an ONNX model (tensors of declared shape) as profiles see them, before
    any TensorRT parse: symbolic dims as -1 with their keys, and an integer input that feeds
    a shape (Reshape's shape, directly or through shape arithmetic) as a shape tensor."""
    keys = dim_keys(model)
    found = []
    for value in graph_inputs(model):
        if value.shape is None or not isinstance(value.type, ir.TensorType):
            continue
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in value.shape)
        found.append(
            ProfileInput(
                value.name,
                dims,
                value.dtype in _FLOAT_TYPES,
                tuple(keys.get((value.name, axis)) for axis in range(len(dims))),
                value.dtype in _INTEGER_TYPES and len(dims) <= 1 and _feeds_a_shape(value),
            )
        )
    return found


def _feeds_a_shape(value: ir.Value, depth: int = 6) -> bool:
    for use in value.uses():
        node = use.node
        if node.domain not in ("", "ai.onnx"):
            continue
        if use.idx in _SHAPE_OPERANDS.get(node.op_type, ()):
            return True
        if depth and node.op_type in _SHAPE_CARRIERS:
            # Gather/Slice/Reshape carry their data (input 0) only; the others any input.
            if node.op_type in ("Gather", "Slice", "Reshape") and use.idx != 0:
                continue
            if any(_feeds_a_shape(out, depth - 1) for out in node.outputs):
                return True
    return False


def _check_values(given: ProfileInput, shapes: tuple[tuple[int, ...], ...]) -> None:
    low = shapes[0]
    if any(d < 0 for d in given.dims):
        raise UserInputError(
            f"--shapes {given.name}: input {given.name!r} is a shape tensor of dynamic size "
            f"({_text(given.dims, '?')}); TensorRT takes shape tensors of fixed size only"
        )
    if len(low) != given.values:
        raise UserInputError(
            f"--shapes {given.name}: input {given.name!r} is a shape tensor (TensorRT reads "
            f"its values as a shape) holding {given.values} value(s): give {given.values} "
            f"values each for min, opt and max, not {len(low)}"
        )


def _range_text(dims: Range) -> str:
    low, opt, high = dims
    return str(low) if low == opt == high else f"{low}/{opt}/{high}"


def _text(dims: Sequence[int], unknown: str = "-1") -> str:
    return "x".join(unknown if d < 0 else str(d) for d in dims) or "scalar"
