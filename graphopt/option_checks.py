"""Checking option values: each ``OptimizeOptions`` field, and ``optimize``'s own arguments.

The one check of option values for the CLI, recipes and the API (:func:`validate_options`):
a wrong type or a value out of range is a one-line :class:`~graphopt.errors.UserInputError`
naming the field and its command-line flag, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.errors import UserInputError
from graphopt.pipeline import PassSpec
from graphopt.registry import get_pass, shown_value

if TYPE_CHECKING:
    from graphopt.api import OptimizeOptions

TARGETS = ("portable", "ort", "tensorrt")
# The command-line flag of each field, named in the messages beside the field.
_FIELD_FLAGS = {
    "passes": "--passes",
    "skip": "--skip",
    "verify": "--no-verify",
    "tolerance": "--tolerance",
    "custom_ops": "--custom-ops",
    "provider": "--provider",
    "input_shapes": "--input-shape",
    "verify_inputs": "--verify-inputs",
    "fold_limit_bytes": "--fold-limit",
    "external_data": "--external-data",
    "target": "--target",
    "opset": "--opset",
    "seed": "--seed",
    "engine": "--engine",
    "engine.shapes": "--shapes",
    "engine.builder_level": "--builder-level",
    "engine.compute_capabilities": "--compute-capability",
}


SEED_LIMIT = 1 << 64


def _refuse(name: str, expected: str, value: Any) -> UserInputError:
    flag = _FIELD_FLAGS.get(name)
    label = f"{name} ({flag})" if flag else name
    return UserInputError(f"{label}: expected {expected}, got {shown_value(value)}")


def _is_int(value: Any) -> bool:
    # bool is an int to Python, never a count or a seed to a user.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_path(value: Any) -> bool:
    # bytes paths are refused: every message and record prints paths as text.
    return isinstance(value, str) or (
        isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)
    )


def _sequence(name: str, value: Any, what: str) -> list:
    """A list or tuple as a list; a bare string is refused rather than iterated by letter."""
    if not isinstance(value, (list, tuple)):
        raise _refuse(name, f"a list of {what}", value)
    return list(value)


def _check_pass_specs(name: str, value: Any) -> list[PassSpec]:
    """PassSpecs, or pass names standing for ``PassSpec(name)``; every name registered, and
    the options converted to the types the pass declares, as a recipe's are (a Path is
    recorded as its text, ``"64"`` as 64: the output records what ran)."""
    specs = []
    for entry in _sequence(name, value, "PassSpec or pass names"):
        if isinstance(entry, str):
            entry = PassSpec(get_pass(entry).name)
        elif not isinstance(entry, PassSpec):
            raise _refuse(name, "a list of PassSpec or pass names", value)
        elif not isinstance(entry.name, str) or not isinstance(entry.options, Mapping):
            raise _refuse(name, "PassSpec(name: str, options: dict)", entry)
        specs.append(_converted_spec(name, entry))
    return specs


def _converted_spec(name: str, spec: PassSpec) -> PassSpec:
    cls = get_pass(spec.name)
    if not all(isinstance(key, str) for key in spec.options):
        raise _refuse(name, "option names as text", spec.options)
    try:
        options = cls.given_options(spec.options)
    except UserInputError as exc:
        raise UserInputError(f"{name}: {exc}") from None
    return PassSpec(cls.name, options)


def lift_inline_lossy(
    passes: list[PassSpec] | None, lossy: list[PassSpec], skip: list[str]
) -> tuple[list[PassSpec] | None, list[PassSpec]]:
    """A lossy pass in an explicit list (``passes: [..., {name: prune, options: {flops:
    0.3}}]``) moved to ``lossy``, its list entry left bare: the form ``--passes ...,prune
    --prune flops=0.3`` gives. One truth for the record: the output's ``lossy`` names the
    pass and its calibration file, and a later run on it warns that the pass ran before.
    ``lossy``'s own options win over the entry's (flags and ``lossy:`` refine the list)."""
    if passes is None:
        return passes, lossy
    asked = {spec.name: spec.options for spec in lossy}
    lifted: dict[str, dict[str, Any]] = {}
    bare = []
    for spec in passes:
        if get_pass(spec.name).exact or spec.name in skip:
            bare.append(spec)
            continue
        # A repeated lossy entry is refused later (api._refuse_repeated_lossy): kept as given.
        lifted.setdefault(spec.name, {}).update(spec.options)
        bare.append(PassSpec(spec.name))
    if not lifted:
        return passes, lossy
    merged = [
        PassSpec(spec.name, {**lifted[spec.name], **spec.options}) if spec.name in lifted else spec
        for spec in lossy
    ]
    merged += [PassSpec(n, options) for n, options in lifted.items() if n not in asked]
    return bare, merged


def _check_skip(name: str, value: Any) -> list[str]:
    names = _sequence(name, value, "pass names")
    if not all(isinstance(n, str) for n in names):
        raise _refuse(name, "a list of pass names", value)
    return [get_pass(n).name for n in names]


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _refuse(name, "True or False", value)
    return bool(value)


def _check_tolerance(name: str, value: Any) -> float:
    # NaN compares false with every error, so "error > NaN" never fails a rewrite; inf, 0
    # and negatives prove nothing or refuse everything.
    is_real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    try:
        finite = is_real and math.isfinite(value)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite or value <= 0:
        raise _refuse(name, "a finite number > 0", value)
    return float(value)


def _check_custom_ops(name: str, value: Any) -> list[str | os.PathLike]:
    if is_path(value):
        return [value]  # one library
    paths = _sequence(name, value, "library paths")
    if not all(is_path(p) for p in paths):
        raise _refuse(name, "a library path or a list of them", value)
    return paths


def _check_provider(name: str, value: Any) -> str | list[str]:
    if isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)
    ):
        return value if isinstance(value, str) else list(value)
    raise _refuse(name, 'provider names ("cuda,cpu" or a list of them)', value)


def _check_input_shapes(name: str, value: Any) -> dict[str, tuple[int, ...]]:
    """{input name: dims}: checked by the parser of ``--input-shape`` itself, so the API's
    dims are the command line's (whole numbers >= 0; zero and unknown names are refused
    against the model by input_dims.check_input_shapes)."""
    from graphopt.input_dims import parse_input_shapes

    if not isinstance(value, Mapping):
        raise _refuse(name, "a dict {input name: tuple of dims}", value)
    specs = []
    for key, dims in value.items():
        if isinstance(dims, np.ndarray) and dims.ndim == 1:
            dims = dims.tolist()  # a shape held as an array (np.array(x.shape)) worked before
        if not isinstance(key, str) or not isinstance(dims, (list, tuple)):
            raise _refuse(name, "a dict {input name: tuple of dims}", {key: dims})
        specs.append(f"{key}:{'x'.join(map(_dim_text, dims))}")
    return parse_input_shapes(specs)


def _dim_text(dim: Any) -> str:
    # Anything but a whole number reaches the parser as its repr, which it refuses: True and
    # 1.5 must not pass as int() would read them (1).
    return str(int(dim)) if _is_int(dim) else repr(dim)


def _check_verify_inputs(name: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise _refuse(name, "input names as keys", value)
        return value
    if not is_path(value) or not os.fspath(value).strip():
        raise _refuse(name, "an .npz path or a dict {input name: array}", value)
    return value


def _check_fold_limit(name: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise _refuse(name, "a whole number of bytes >= 0 or None (no limit)", value)
    return int(value)


def _check_target(name: str, value: Any) -> str:
    if value not in TARGETS:
        raise _refuse(name, f"one of {', '.join(TARGETS)}", value)
    return value


def _check_opset(name: str, value: Any) -> int:
    if not _is_int(value):
        raise _refuse(name, "an opset number", value)
    return int(value)


def _check_seed(name: str, value: Any) -> int:
    # Bounded: the seed is written into the output's metadata (JSON), and an int past
    # Python's 4300-digit str() limit cannot be.
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise _refuse(name, "a whole number from 0 to 2**64 - 1", value)
    return int(value)


def _check_engine(name: str, value: Any) -> EngineOptions:
    """EngineOptions with fields of the types its flags give: a string where a list belongs
    would be read letter by letter ("8.9" as four capabilities), a "2" compared with 0-5."""
    if not isinstance(value, EngineOptions):
        raise _refuse(name, "EngineOptions", value)
    if not is_path(value.path):  # an empty one: check_engine_target's --engine message
        raise _refuse(f"{name}.path", "the engine's path (str or os.PathLike)", value.path)
    for field_name in ("input_path", "output_path"):
        path = getattr(value, field_name)
        if path is not None and not is_path(path):
            raise _refuse(f"{name}.{field_name}", "a path or None", path)
    level = value.builder_level
    if level is not None and not _is_int(level):
        raise _refuse(f"{name}.builder_level", "a whole number 0 to 5 or None", level)
    shapes = _texts(f"{name}.shapes", value.shapes, '"NAME:min=DxD,opt=DxD,max=DxD" texts')
    capabilities = _texts(
        f"{name}.compute_capabilities", value.compute_capabilities, 'texts like "8.9"'
    )
    return dataclasses.replace(
        value,
        shapes=shapes,
        builder_level=None if level is None else int(level),
        compute_capabilities=capabilities,
    )


def _texts(name: str, value: Any, what: str) -> list[str]:
    """A list (or tuple) of strings; a bare string is refused, not iterated by letter."""
    texts = _sequence(name, value, what)
    if not all(isinstance(text, str) for text in texts):
        raise _refuse(name, f"a list of {what}", value)
    return texts


def _check_flags(name: str, value: Any) -> dict[str, Any]:
    # The values are the passes' to check (with the run's passes, in ``pipeline``).
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _refuse(name, "a dict {flag name: value}", value)
    return dict(value)


# Fields that have no use for None: given None, they take their default (skip=None: []).
_NONE_IS_DEFAULT = frozenset(
    {"skip", "lossy", "custom_ops", "input_shapes", "flags", "verify", "target", "seed"}
)
# One check per field: its value (None already replaced by the default) -> the value used.
_FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "passes": _check_pass_specs,
    "skip": _check_skip,
    "lossy": _check_pass_specs,
    "verify": _check_bool,
    "tolerance": _check_tolerance,
    "custom_ops": _check_custom_ops,
    "provider": _check_provider,
    "input_shapes": _check_input_shapes,
    "verify_inputs": _check_verify_inputs,
    "fold_limit_bytes": _check_fold_limit,
    "external_data": _check_bool,
    "target": _check_target,
    "opset": _check_opset,
    "seed": _check_seed,
    "engine": _check_engine,
    "flags": _check_flags,
}


def validate_options(options: OptimizeOptions | None) -> OptimizeOptions:
    """``options`` checked field by field, as a new object (the caller's is left as it was).

    The one check of option values for the CLI, recipes and the API (``optimize`` calls it
    first): a wrong type or a value out of range is a one-line :class:`UserInputError`
    naming the field (and its flag), before anything is loaded. None takes the field's
    default where None means nothing else (``_NONE_IS_DEFAULT``); pass names stand for
    ``PassSpec(name)``; one library path for a list of one.
    """
    from graphopt.api import OptimizeOptions  # api calls this module: imported when used

    if options is None:
        return OptimizeOptions()
    if not isinstance(options, OptimizeOptions):
        raise UserInputError(
            f"options: expected OptimizeOptions, got {type(options).__name__} "
            "(OptimizeOptions(**d) builds one from a dict)"
        )
    checked: dict[str, Any] = {}
    for f in fields(OptimizeOptions):
        value = getattr(options, f.name)
        if value is None and f.name in _NONE_IS_DEFAULT:
            value = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
        # Other fields' None means something (no fold limit, the dtype's tolerance): kept.
        checked[f.name] = None if value is None else _FIELD_CHECKS[f.name](f.name, value)
    checked["passes"], checked["lossy"] = lift_inline_lossy(
        checked["passes"], checked["lossy"], checked["skip"]
    )
    # replace keeps the caller's class (recipe.RecipeOptions merges flags into its entries).
    result = dataclasses.replace(options, **checked)
    # The lossy passes' flags resolved and converted now, before anything is loaded: a bad
    # value (--sparse-kernels-threads 100000, block_size="6x") is refused here, not after
    # the model was read and the original verified.
    result.lossy_specs()
    return result


def check_call(source: Any, output: Any, in_place: Any, progress: Any) -> None:
    """``optimize``'s own arguments, before ``io`` would fail on them with a TypeError."""
    sources = (str, os.PathLike, bytes, bytearray, memoryview, onnx.ModelProto, ir.Model)
    if not isinstance(source, sources) or (isinstance(source, os.PathLike) and not is_path(source)):
        raise UserInputError(
            "source: expected a model path, bytes, an onnx.ModelProto or an onnx_ir.Model, "
            f"got {type(source).__name__}"
        )
    if output is not None and not is_path(output):
        raise UserInputError(
            f"output: expected a path (str or os.PathLike), got {shown_value(output)}"
        )
    if not isinstance(in_place, bool):
        raise UserInputError(f"in_place: expected True or False, got {shown_value(in_place)}")
    if progress is not None and not callable(progress):
        raise UserInputError(f"progress: expected a callable or None, got {shown_value(progress)}")
