"""The Python API: ``graphopt.optimize(...)`` does load → passes → verify → save."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import finalize, io
from graphopt.backends.ort import using_providers
from graphopt.backends.ort_custom_ops import (
    check_registrable,
    missing_library_hint,
    using_custom_ops,
)
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.errors import CheckFailedError, UserInputError, is_out_of_memory
from graphopt.opset import convert_opset
from graphopt.pipeline import (
    PassManager,
    PassSpec,
    ProgressCallback,
    RunReport,
    Step,
    default_pipeline,
    explicit_pipeline,
    explicit_specs,
    skip_notes,
)
from graphopt.registry import (
    PassContext,
    flag_key,
    flag_names,
    flag_owners,
    flagged_lossy_passes,
    get_pass,
)
from graphopt.verify import (
    NothingToCompare,
    VerificationUnavailable,
    Verifier,
    check_input_shapes,
)

if TYPE_CHECKING:
    from graphopt.backends.tensorrt.build import EngineReport

DEFAULT_FOLD_LIMIT_BYTES = 1 << 20


@dataclass
class OptimizeOptions:
    """Everything that decides what ``optimize`` does (the CLI and recipes fill this).

    ``optimize`` checks every field before any work (:func:`validate_options`: type, then
    range), for the CLI, recipes and API callers alike. A field given as None takes its
    default where None has no meaning of its own (``skip=None`` is ``[]``, ``target=None`` is
    ``"portable"``; ``fold_limit_bytes=None`` is no limit).
    """

    # An explicit ordered list of passes; None means the default pipeline.
    passes: list[PassSpec] | None = None
    skip: list[str] = field(default_factory=list)
    # Lossy passes added to the default pipeline (run in the fixed stage order).
    lossy: list[PassSpec] = field(default_factory=list)
    verify: bool = True
    # Max error relative to each output's largest magnitude; None: the default for the float
    # type the model computes in (float32 1e-4, float16 ~7.8e-3, bfloat16 ~6.3e-2; see
    # graphopt.verify.DTYPE_TOLERANCES). A number applies to every model.
    tolerance: float | None = None
    # ONNX Runtime custom-op libraries (.so/.dylib/.dll) registered in every ORT session
    # graphopt creates, so that models with custom ops can be verified (--custom-ops).
    custom_ops: list[str | os.PathLike] = field(default_factory=list)
    # ONNX Runtime execution providers of verification and of the lossy passes' calibration
    # and fidelity runs (--provider: "cuda", "cuda,cpu", ORT's full names); None: the CPU.
    # Timings that choose rewrites for a CPU target (crossovers, autotuning) stay on the CPU.
    provider: str | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Verify on the user's data instead of generated inputs: an .npz path (one array per
    # input, loaded without pickle) or {input name: array}.
    verify_inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None
    fold_limit_bytes: int | None = DEFAULT_FOLD_LIMIT_BYTES
    external_data: bool | None = None
    target: str = "portable"
    # Raise the default-domain opset to this first (onnx version converter), e.g. so that
    # fusions into LayerNormalization/Gelu/Attention can apply.
    opset: int | None = None
    seed: int = 0
    # Also build a TensorRT engine from the output (--engine; graphopt.backends.tensorrt).
    engine: EngineOptions | None = None
    # The lossy passes' flags, as the CLI spells them without dashes: a pass's own flag asks
    # for it (``prune="flops=0.3"``, ``quantize="int8"``) and its options' flags refine it
    # (``criterion="lsq"``, ``calib="c.npz"``). Given as keywords, ``OptimizeOptions(prune=...)``
    # lands here, and ``options.prune`` reads it back. Which names exist comes from the
    # passes' declarations (``GraphPass.flag``, ``PassOption.flag``), the same ones the CLI
    # builds its flags from; an option flag two passes declare (``calib``) goes to each pass
    # asked for that declares it. Options left out take the pass's declared default.
    flags: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: the pass flags.
        if name.startswith("__") or name == "flags":
            raise AttributeError(name)
        if name in self.flags:
            return self.flags[name]
        if name in flag_names():
            return None
        raise AttributeError(f"OptimizeOptions has no field or pass flag {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELD_NAMES or name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in flag_names():
            if value is None:
                self.flags.pop(name, None)
            else:
                self.flags[name] = value
        else:
            raise AttributeError(f"OptimizeOptions has no field or pass flag {name!r}")

    def lossy_specs(self) -> list[PassSpec]:
        """``lossy`` plus the lossy passes the flags ask for (run settings added)."""
        return self._with_run_settings(self._asked_lossy())

    def _asked_lossy(self) -> list[PassSpec]:
        """``lossy`` plus the lossy passes this object's flags ask for, as asked.

        Only the options set are passed: the pass fills the rest from its declared defaults
        (and the stamped record keeps "not set" apart from "set to the default"). Option flags
        given without their pass's flag refine that pass where ``lossy`` or ``passes`` (a
        recipe) runs it, as flags override a recipe; otherwise they are an error.
        """
        unknown = sorted(set(self.flags) - flag_names())
        if unknown:
            raise UserInputError(
                f"unknown option(s) {', '.join(map(repr, unknown))}: not a field of "
                "OptimizeOptions nor a flag of any lossy pass (`graphopt optimize --help` "
                "lists the flags)"
            )
        specs = list(self.lossy)
        recipe_runs = {s.name for s in specs} | {s.name for s in self.passes or ()}
        owners = flag_owners()
        used: set[str] = set()
        for cls in flagged_lossy_passes():
            asked = self.flags.get(flag_key(cls.flag))
            given = {
                t.option: self.flags[key]
                for key, targets in owners.items()
                if key in self.flags
                for t in targets
                if t.owner is cls and t.option is not None
            }
            if cls.flag_metavar is None and asked is not None:
                # A switch (--sparse-kernels): True asks for the pass, False does not; the
                # pass's own words ("on") are the CLI's, and "" must not read as "on".
                if not isinstance(asked, (bool, str)) or asked == "":
                    raise UserInputError(
                        f"{cls.flag} is a switch: give True or False (got {asked!r})"
                    )
                if asked is False:
                    used.add(flag_key(cls.flag))  # said, and said "no": not an orphan
                    asked = None
            if asked is None and not (given and cls.name in recipe_runs):
                continue
            used.add(flag_key(cls.flag))
            used.update(flag_key(cls.flag_of(name)) for name in given)
            # The pass parses its own flag's value ("flops=0.3").
            options = cls.options_from_flag(str(asked)) if asked is not None else {}
            options.update(given)
            specs = _merged(specs, cls.name, options, replace=asked is not None)
        idle = [key for key in self.flags if key not in used]
        if idle:
            raise UserInputError(_orphan_message(idle))
        return specs

    def _with_run_settings(self, specs: list[PassSpec]) -> list[PassSpec]:
        # --no-verify also turns off a lossy pass's own checks (pruning's zeroed-vs-removed
        # units): a pass that declares a ``verify`` option gets the run's; an option a recipe
        # gives the pass itself wins.
        return [
            PassSpec(s.name, {"verify": self.verify, **s.options})
            if any(o.name == "verify" for o in get_pass(s.name).options)
            else s
            for s in specs
        ]

    def pipeline(self) -> tuple[list[Step], list[str]]:
        """The steps this run executes, and notes on options given that change nothing."""
        if self.passes is None:
            lossy = self.lossy_specs()
            _check_targets(lossy, self.target)
            steps, notes = default_pipeline(lossy, self.skip), skip_notes(lossy, self.skip)
        else:
            specs, notes = explicit_specs(self.passes, self._asked_lossy(), self.skip)
            steps = explicit_pipeline(self._with_run_settings(specs))
        if not any(step.passes for step in steps):
            # Nothing would run, nothing be verified: a "written but not verified" with no
            # reason, or a silent copy of the input, would hide the mistake.
            listed = self.passes is not None and len(self.passes) > 0
            why = "--skip leaves none of them" if listed else "the pass list is empty"
            raise UserInputError(f"no passes to run: {why}")
        _refuse_repeated_lossy(steps)
        return steps, notes + _idle_option_notes(self, steps)


_FIELD_NAMES = frozenset(f.name for f in fields(OptimizeOptions))
_init_fields = OptimizeOptions.__init__  # the dataclass's own: fields by keyword


def _init_with_flags(self: OptimizeOptions, **given: Any) -> None:
    """OptimizeOptions(field=..., prune=..., calib=...): keywords that are not fields are pass
    flags (checked against the passes' declarations when the run's passes are built)."""
    pass_flags = {key: given.pop(key) for key in list(given) if key not in _FIELD_NAMES}
    if given.get("flags", {}) is None:  # None: the default (no flags)
        given["flags"] = {}
    _init_fields(self, **given)
    if pass_flags:  # else a flags= of the wrong type is left to validate_options to name
        self.flags.update(pass_flags)


OptimizeOptions.__init__ = _init_with_flags  # type: ignore[method-assign]


def _refuse_repeated_lossy(steps: list[Step]) -> None:
    """A lossy pass listed twice (``--passes prune,prune``, two recipe entries) would apply
    its cut twice while its report measures the second against the first: refused."""
    names = [spec.name for step in steps for spec in step.passes if not get_pass(spec.name).exact]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserInputError(
            f"lossy pass(es) {', '.join(map(repr, repeated))} listed more than once; each "
            "runs once (give the whole target to one entry, e.g. --prune flops=0.5)"
        )


def _repeated_lossy_notes(model: ir.Model, steps: list[Step]) -> list[str]:
    """A warning per lossy pass of this run that an earlier run already applied to the input
    (its metadata says so): a second prune/factorize/erase compounds the first, and this
    run's fidelity is measured against the input, not the model before the first run."""
    from graphopt.finalize import earlier_lossy_names

    earlier = earlier_lossy_names(model.metadata_props)
    notes = []
    for spec in (s for step in steps for s in step.passes):
        if spec.name in earlier and not get_pass(spec.name).exact:
            cls = get_pass(spec.name)
            applied = f" ({earlier[spec.name]})" if earlier[spec.name] else ""
            notes.append(
                f"warning: the input was already through {cls.flag or spec.name}{applied} "
                "(its metadata records it): this run applies it again on top, and its "
                "fidelity is measured against the input, not the model before the first run"
            )
    return notes


def _check_targets(specs: list[PassSpec], target: str) -> None:
    """A pass asked for by flag that only rewrites for other targets (``--sparse-kernels``
    without ``--target ort``) would silently do nothing: refused in one line."""
    for spec in specs:
        cls = get_pass(spec.name)
        if not cls.serves(target):
            wanted = " or ".join(f"--target {t}" for t in sorted(cls.targets or ()))
            raise UserInputError(f"{cls.flag or cls.name} needs {wanted} (got --target {target})")


def _merged(
    specs: list[PassSpec], name: str, options: dict[str, Any], *, replace: bool
) -> list[PassSpec]:
    """``specs`` with pass ``name`` given ``options``: replacing its entry (the pass's own flag
    was given) or refining it (only option flags were); a new entry when there is none."""
    if replace or all(s.name != name for s in specs):
        return [s for s in specs if s.name != name] + [PassSpec(name, options)]
    return [PassSpec(s.name, {**s.options, **options}) if s.name == name else s for s in specs]


def _orphan_message(names: list[str]) -> str:
    """Option flags given without any pass that takes them: which pass flag they need."""
    owners = flag_owners()
    flags = ", ".join(owners[n][0].flag for n in names)
    passes = list(dict.fromkeys(t.owner for n in names for t in owners[n]))
    needs = " or ".join(f"{cls.flag} {cls.flag_metavar or ''}".strip() for cls in passes)
    runs = " or ".join(cls.name for cls in passes)
    verb = "applies" if len(names) == 1 else "apply"
    return f"{flags} only {verb} with {needs} (or a recipe that runs {runs})"


def _idle_option_notes(options: OptimizeOptions, steps: list[Step]) -> list[str]:
    """Options set that this run has no use for: said in the report rather than ignored."""
    names = [spec.name for step in steps for spec in step.passes]
    notes = []
    if not options.verify:
        given = {"--tolerance": options.tolerance is not None, "--seed": options.seed != 0}
        idle = [flag for flag, set_ in given.items() if set_]
        if idle:
            # Both only shape verification (its tolerance, its generated inputs).
            notes.append(f"{' and '.join(idle)} had no effect: verification was off (--no-verify)")
    # The limit binds constant folding, and the ORT fusions' preparation (which folds too).
    folds = "constant-folding" in names or (
        options.target == "ort" and any("ort" in (get_pass(n).targets or ()) for n in names)
    )
    if options.fold_limit_bytes != DEFAULT_FOLD_LIMIT_BYTES and not folds:
        notes.append("--fold-limit had no effect: constant-folding is not in this run's passes")
    if options.passes is not None:
        # The default pipeline skips another target's passes silently (they are listed as
        # skipped); a pass the user named is worth a word.
        other = [n for n in dict.fromkeys(names) if not get_pass(n).serves(options.target)]
        if other:
            notes.append(f"{', '.join(other)} did nothing: not a pass of --target {options.target}")
    return notes


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
}


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse(name: str, expected: str, value: Any) -> UserInputError:
    flag = _FIELD_FLAGS.get(name)
    label = f"{name} ({flag})" if flag else name
    return UserInputError(f"{label}: expected {expected}, got {_shown(value)}")


def _is_int(value: Any) -> bool:
    # bool is an int to Python, never a count or a seed to a user.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_path(value: Any) -> bool:
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
    """PassSpecs, or pass names standing for ``PassSpec(name)``; every name registered."""
    specs = []
    for entry in _sequence(name, value, "PassSpec or pass names"):
        if isinstance(entry, str):
            entry = PassSpec(get_pass(entry).name)
        elif not isinstance(entry, PassSpec):
            raise _refuse(name, "a list of PassSpec or pass names", value)
        elif not isinstance(entry.name, str) or not isinstance(entry.options, Mapping):
            raise _refuse(name, "PassSpec(name: str, options: dict)", entry)
        else:
            get_pass(entry.name)
        specs.append(entry)
    return specs


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
    if not is_real or not math.isfinite(value) or value <= 0:
        raise _refuse(name, "a finite number > 0", value)
    return float(value)


def _check_custom_ops(name: str, value: Any) -> list[str | os.PathLike]:
    if _is_path(value):
        return [value]  # one library
    paths = _sequence(name, value, "library paths")
    if not all(_is_path(p) for p in paths):
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
    against the model by verify.check_input_shapes)."""
    from graphopt.input_dims import parse_input_shapes

    if not isinstance(value, Mapping):
        raise _refuse(name, "a dict {input name: tuple of dims}", value)
    specs = []
    for key, dims in value.items():
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
    if not _is_path(value) or not os.fspath(value).strip():
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
    if not _is_int(value) or value < 0:
        raise _refuse(name, "a whole number >= 0", value)
    return int(value)


def _check_engine(name: str, value: Any) -> EngineOptions:
    if not isinstance(value, EngineOptions):
        raise _refuse(name, "EngineOptions", value)
    return value


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
    # replace keeps the caller's class (recipe.RecipeOptions merges flags into its entries).
    return dataclasses.replace(options, **checked)


def _check_call(source: Any, output: Any, in_place: Any, progress: Any) -> None:
    """``optimize``'s own arguments, before ``io`` would fail on them with a TypeError."""
    sources = (str, os.PathLike, bytes, bytearray, memoryview, onnx.ModelProto, ir.Model)
    if not isinstance(source, sources) or (
        isinstance(source, os.PathLike) and not _is_path(source)
    ):
        raise UserInputError(
            "source: expected a model path, bytes, an onnx.ModelProto or an onnx_ir.Model, "
            f"got {type(source).__name__}"
        )
    if output is not None and not _is_path(output):
        raise UserInputError(f"output: expected a path (str or os.PathLike), got {_shown(output)}")
    if not isinstance(in_place, bool):
        raise UserInputError(f"in_place: expected True or False, got {_shown(in_place)}")
    if progress is not None and not callable(progress):
        raise UserInputError(f"progress: expected a callable or None, got {_shown(progress)}")


@dataclass
class OptimizeResult:
    model: ir.Model
    report: RunReport
    output_path: Path | None = None
    # The TensorRT engine build's report (options.engine), built or why it was skipped.
    engine: EngineReport | None = None


def default_output_path(source: Path) -> Path:
    """``IN_STEM.opt.onnx`` beside the input."""
    return source.with_name(source.stem + ".opt.onnx")


def optimize(
    source: io.ModelSource,
    output: str | os.PathLike | None = None,
    options: OptimizeOptions | None = None,
    *,
    in_place: bool = False,
    progress: ProgressCallback | None = None,
) -> OptimizeResult:
    """Optimize a model; write it when ``output`` is given (or ``in_place``), else only return it.

    Raises :class:`~graphopt.errors.CheckFailedError` when verification fails after the
    exact passes were rolled back (the output is then not written). When verification was
    asked for but ONNX Runtime cannot run the original model on the generated inputs, the
    output is written and ``result.report.verified`` is False, with the reason in
    ``result.report.verification_skipped`` (the CLI exits 4).
    """
    _check_call(source, output, in_place, progress)
    options = validate_options(options)
    # Before anything is loaded or registered (a custom-op library is loaded to check it);
    # _optimize checks again against the weights the loaded model reads.
    check_overwrites(source, output, options, in_place=in_place)
    if options.engine is not None:
        from graphopt.backends.tensorrt.build import check_options

        if options.engine.input_path is None and isinstance(source, (str, os.PathLike)):
            # The API's callers get the CLI's checks: the engine never replaces the input
            # or the ONNX output, and --shapes names are checked against the input's.
            written = source if in_place else output
            options = dataclasses.replace(
                options,
                engine=dataclasses.replace(options.engine, input_path=source, output_path=written),
            )
        check_options(options.engine)  # before minutes of passes, not after
    # Every ORT session of the run (verification, probes in passes) registers these.
    with using_custom_ops(options.custom_ops) as libraries, using_providers(options.provider):
        check_registrable(libraries)
        result = _optimize(source, output, options, in_place=in_place, progress=progress)
    if options.target == "tensorrt" and options.engine is None:
        # An engine build would name what TensorRT rejects; without one, the rule table
        # does (an ORT-targeted input keeps MatMulNBits, u8 Q/DQ, graphopt's kernels).
        from graphopt.backends.tensorrt.lint import rejection_notes

        result.report.notes.extend(rejection_notes(result.model))
    if options.engine is not None:
        from graphopt.backends.tensorrt.build import build_engine

        if progress is not None:
            progress("building the TensorRT engine")
        source_model = result.output_path or ir.serde.serialize_model(result.model)
        result.engine = build_engine(source_model, options.engine, dict(options.input_shapes))
    return result


def _optimize(
    source: io.ModelSource,
    output: str | os.PathLike | None,
    options: OptimizeOptions,
    *,
    in_place: bool,
    progress: ProgressCallback | None,
) -> OptimizeResult:
    target = _resolve_output(source, output, in_place)
    loaded = io.load(source)
    model = loaded.model
    # Refused with or without verification: a wrong rank, a dim the model fixes or a zero.
    check_input_shapes(model, options.input_shapes)
    if model is source:
        # Passes rewrite in place; the caller's ir.Model stays as it was (tensors are shared,
        # not copied: passes replace initializers rather than write into them).
        model = model.clone()
    if target is not None:
        # Refuse a missing folder, or a device/FIFO/link/folder as output, before the pipeline
        # runs rather than after (io.save checks again).
        external = options.external_data
        io.check_output_target(
            target, data=loaded.uses_external_data if external is None else external
        )
    # The weights as loaded (subgraphs included), not the header scan the CLI checked with.
    check_overwrites(
        source, output, options, in_place=in_place, data_files=io.external_data_files(model)
    )
    context = PassContext(
        fold_limit_bytes=options.fold_limit_bytes,
        input_shapes=dict(options.input_shapes),
        target=options.target,
    )
    original_for_verify = model
    if options.opset is not None:
        model, conversion_note = convert_opset(model, options.opset)
        if conversion_note:
            context.note(conversion_note)
    steps, notes = options.pipeline()
    for note in notes + _repeated_lossy_notes(model, steps):
        context.note(note)
    verifier = None
    skipped_reason = ""
    feeds, feeds_source = _verify_inputs(options)
    if options.verify:
        if progress is not None:
            progress("running the original model in ONNX Runtime")
        try:
            # The reference is the model as given: an opset conversion is verified too.
            verifier = Verifier(
                original_for_verify,
                options.input_shapes,
                options.tolerance,
                options.seed,
                feeds=feeds,
                feeds_source=feeds_source,
            )
        except VerificationUnavailable as exc:
            if is_out_of_memory(str(exc)):
                # Not "ORT cannot run this model" (exit 4): this machine ran out (exit 3).
                raise MemoryError(str(exc)) from None
            skipped_reason = (
                str(exc)
                if isinstance(exc, NothingToCompare)
                else f"ONNX Runtime cannot run the original model: {exc}"
                + missing_library_hint(original_for_verify)
            )
        if verifier is not None and verifier.input_note:
            # The default sizes did not run and larger ones did: pruning's generated data
            # (--calib random, its zero-invariance check) and its FLOPs use the ones that ran.
            context.input_shapes = dict(verifier.generated_shapes)
    manager = PassManager(steps, context, verifier, progress)
    model, report = manager.run(model)
    if not options.verify:
        report.verification_skipped = "--no-verify"
    elif skipped_reason:
        report.verification_skipped = skipped_reason
    verification = report.verification
    # After lossy passes, ``verification`` covers the exact passes (against the lossy
    # result); the lossy change itself is in ``report.lossy_check``.
    if verification is not None and not verification.ok:
        raise CheckFailedError(f"verification failed: {verification.reason}")
    # A canonical form and the record of what produced it: same input and options, same
    # bytes; `optimize` of its own output changes nothing (see graphopt/finalize.py).
    finalize.name_constant_tensors(model)
    finalize.order_initializers(model)
    finalize.drop_generated_dims(model)
    finalize.stamp(model, options)
    if target is not None:
        if progress is not None:
            progress("writing the output")
        external = options.external_data
        if external is None and loaded.uses_external_data:
            external = True
        io.save(model, target, external_data=external)
    return OptimizeResult(model, report, target)


def _verify_inputs(options: OptimizeOptions) -> tuple[dict[str, np.ndarray] | None, str]:
    """The user's verification inputs, loaded (checked against the model by the Verifier)."""
    given = options.verify_inputs
    if given is None:
        return None, ""
    if not options.verify:
        # Data to verify on and no verification: one of the two is a mistake.
        raise UserInputError("--verify-inputs and --no-verify contradict each other")
    if isinstance(given, Mapping):
        return {str(k): np.asarray(v) for k, v in given.items()}, "verify_inputs"
    from graphopt.calibration import load_npz

    return load_npz(given, what="verification inputs"), os.fspath(given)


def _resolve_output(
    source: io.ModelSource, output: str | os.PathLike | None, in_place: bool
) -> Path | None:
    source_path = Path(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else None
    if in_place:
        if source_path is None:
            raise UserInputError("--in-place needs a model file as input")
        if output is not None:
            raise UserInputError("--in-place and -o/--output are mutually exclusive")
        return source_path
    if output is None:
        return None
    target = Path(os.fspath(output))
    if source_path is not None and io.same_file(source_path, target):
        raise UserInputError(
            f"{target}: output would overwrite the input; use --in-place to replace it"
        )
    return target


# Pass options whose value names a file the pass reads, unless it is one of these words; by
# option name (the core knows passes only through the registry), as finalize records them.
_FILE_OPTIONS = {
    "calib": ("--calib file", ("", "random")),
    "decisions": ("--sparse-kernels-decisions file", ("",)),
    "speed_check": ("--factorize-speed-check file", ("on", "off")),
}

Files = Iterable[tuple[str, str | os.PathLike]]


def check_overwrites(
    source: io.ModelSource,
    output: str | os.PathLike | None,
    options: OptimizeOptions,
    *,
    in_place: bool = False,
    data_files: Iterable[Path] | None = None,
    also_read: Files = (),
    also_written: Files = (),
) -> None:
    """Refuse a file the run writes that is a file it reads, or that it writes twice.

    Read: the input model and its external data (``data_files``; None: from the model file's
    header), the recipe, calibration and verification data, custom-op libraries and the
    files pass options replay (``_FILE_OPTIONS``). Written: the output and its data file,
    the engine, ``--save-ort-optimized``. Each written file would replace a read one only
    after the run read it, so nothing fails, and the user's file is gone: refused in one
    line, before any work. ``also_read``/``also_written``: (what, path) the caller adds
    (the CLI's --recipe and --save-ort-optimized). Compared as io.same_file does (the same
    inode when both exist, links included; else the resolved path).
    """
    options = validate_options(options)
    target = _resolve_output(source, output, in_place)
    model: list[tuple[str, Path]] = []
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        model.append(("the input model", path))
        if data_files is None:
            data_files = _scanned_data_files(path)
    model += [("the input's external-data file", Path(f)) for f in data_files or ()]
    read = [*_read_files(options), *((what, Path(os.fspath(p))) for what, p in also_read)]
    # (who writes, what the file is to the other writers, where)
    written: list[tuple[str, str, Path]] = []
    if target is not None:
        data = target.with_name(io.data_file_name(target))
        written += [
            ("the output", "the output", target),
            ("the output's data file", "the output's data file", data),
        ]
    flags = [("--engine", options.engine.path)] if options.engine is not None else []
    for flag, path in [*flags, *also_written]:
        if _is_path(path):
            written.append((flag, f"the {flag} file", Path(os.fspath(path))))
    for index, (writer, _, path) in enumerate(written):
        others = read + [(what, other) for _, what, other in written[:index]]
        # --in-place replaces the model and its weights: what it is for. The engine against
        # the model, its weights and the output: tensorrt.build.check_options, in its words.
        if writer == "--engine":
            others = read
        elif not (in_place and writer in ("the output", "the output's data file")):
            others += model
        for what, other in others:
            if io.same_file(path, other):
                raise UserInputError(
                    f"{writer} {path}: is {what}; give another path (the run would overwrite it)"
                )


def _read_files(options: OptimizeOptions) -> list[tuple[str, Path]]:
    """The data files ``options`` name: verification inputs, libraries, pass options' files."""
    files = []
    if _is_path(options.verify_inputs):
        files.append(("the --verify-inputs file", options.verify_inputs))
    files += [("the --custom-ops library", library) for library in options.custom_ops]
    for spec in [*(options.passes or []), *options.lossy_specs()]:
        for option, value in spec.options.items():
            what, words = _FILE_OPTIONS.get(option, ("", ()))
            if what and _is_path(value) and os.fspath(value).strip().lower() not in words:
                files.append((f"the {what}", value))
    return [(what, Path(os.fspath(path))) for what, path in files]


def _scanned_data_files(path: Path) -> list[Path]:
    """The external-data files the model file at ``path`` names, from its header (a scan, not
    a load: the CLI checks before the model is loaded; the API checks again after)."""
    from graphopt.backends.tensorrt.model_scan import scan_model

    header = scan_model(path)
    return [path.parent / location for location in sorted(header.locations if header else ())]
