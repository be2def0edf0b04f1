"""The Python API: ``graphopt.optimize(...)`` does load → passes → verify → save."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from graphopt import finalize, io, size_targets
from graphopt.backends.ort import using_providers
from graphopt.backends.ort_custom_ops import (
    check_registrable,
    missing_library_hint,
    using_custom_ops,
)
from graphopt.backends.tensorrt.cli_options import EngineOptions
from graphopt.errors import CheckFailedError, GraphoptError, UserInputError, is_out_of_memory
from graphopt.input_dims import check_input_shapes
from graphopt.opset import convert_opset
from graphopt.option_checks import check_call, validate_options
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
    LOSSY_STAGES,
    PassContext,
    all_passes,
    flag_key,
    flag_names,
    flag_owners,
    flagged_lossy_passes,
    get_pass,
)
from graphopt.run_files import check_overwrites, resolve_output
from graphopt.verify import NothingToCompare, VerificationUnavailable, Verifier

if TYPE_CHECKING:
    from graphopt.backends.tensorrt.build import EngineReport

DEFAULT_FOLD_LIMIT_BYTES = 1 << 20


@dataclass
class OptimizeOptions:
    """Everything that decides what ``optimize`` does (the CLI and recipes fill this).

    ``optimize`` checks every field before any work (type, then range:
    :func:`graphopt.option_checks.validate_options`), for the CLI, recipes and API callers
    alike. A field given as None takes its default where None has no meaning of its own
    (``skip=None`` is ``[]``, ``target=None`` is ``"portable"``; ``fold_limit_bytes=None`` is
    no limit).
    """

    # An explicit ordered list of passes; None means the default pipeline.
    passes: list[PassSpec] | None = None
    skip: list[str] = field(default_factory=list)
    # Lossy passes added to the default pipeline (run in the fixed stage order).
    lossy: list[PassSpec] = field(default_factory=list)
    verify: bool = True
    # Max error relative to each output's largest magnitude; None: the default for the float
    # type the model computes in (float32 1e-4, float16 ~7.8e-3, bfloat16 ~6.3e-2; see
    # graphopt.tolerances.DTYPE_TOLERANCES). A number applies to every model.
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
        """``lossy`` plus the lossy passes the flags ask for (run settings added); in the
        order they run when the default pipeline runs them (a recipe's or ``lossy``'s
        ``[quantize, prune]`` runs prune first), so the record stamped on the output is the
        same as the flags' for the same run."""
        specs = self._asked_lossy()
        if self.passes is None:
            specs = sorted(specs, key=_stage_order)
        return self._with_run_settings(specs)

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
            # As the declared types (block_size="64" runs and is recorded as 64).
            options = cls.given_options(options)
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
        _refuse_pruning_compensation(steps)
        return steps, notes + _idle_option_notes(self, steps)


_FIELD_NAMES = frozenset(f.name for f in fields(OptimizeOptions))
_init_fields = OptimizeOptions.__init__  # the dataclass's own: fields by keyword


def _stage_order(spec: PassSpec) -> int:
    """Where the default pipeline runs a lossy (or Stage.LOWER) pass: by stage, as
    pipeline.default_pipeline orders them (a stable sort keeps the order within a stage)."""
    stage = get_pass(spec.name).stage
    return LOSSY_STAGES.index(stage) if stage in LOSSY_STAGES else len(LOSSY_STAGES)


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


def _refuse_pruning_compensation(steps: list[Step]) -> None:
    """``--compensation bias|lsq`` is pruning's consumer refit: without pruning in the run no
    pass takes it (quantize, sparsify and factorize take none or eora:RANK), refused as
    ``--round-to`` without its passes is, rather than noted and ignored."""
    specs = [spec for step in steps for spec in step.passes]
    if any(spec.name == "prune" for spec in specs):
        return
    for spec in specs:
        value = str(spec.options.get("compensation") or "").strip().lower()
        if value in ("bias", "lsq"):
            cls = get_pass(spec.name)
            raise UserInputError(
                f"--compensation {value} only applies with --prune flops=R|params=R (pruning's "
                f"consumer refit; or a recipe that runs prune): {cls.flag or cls.name} takes "
                "none or eora:RANK"
            )


def _repeated_lossy_notes(model: ir.Model, steps: list[Step]) -> list[str]:
    """A note per lossy pass an earlier run already applied to the input (its metadata says
    so): this run's fidelity is measured against that input, not the model before it; a
    warning when this run applies the same pass again (a second prune/factorize/erase
    compounds the first)."""
    from graphopt.finalize import earlier_lossy_names

    earlier = earlier_lossy_names(model.metadata_props)
    names = {spec.name for step in steps for spec in step.passes if not get_pass(spec.name).exact}
    if not names:
        return []  # an exact-only run measures no fidelity
    notes = []
    for name, options in earlier.items():
        cls = get_pass(name) if name in all_passes() else None
        flag = (cls.flag if cls is not None else "") or name
        applied = f" ({options})" if options else ""
        if name in names:
            notes.append(
                f"warning: the input was already through {flag}{applied} (its metadata "
                "records it): this run applies it again on top, and its fidelity is "
                "measured against the input, not the model before the first run"
            )
        else:
            notes.append(
                f"the input was already through {flag}{applied} (its metadata records it): "
                "this run's fidelity is measured against the input model, not the model "
                "before that lossy step"
            )
    return notes


def _earlier_lossy_flags(model: ir.Model) -> list[str]:
    """The flags of the lossy passes the input's metadata says an earlier run applied."""
    from graphopt.finalize import earlier_lossy_names

    return [
        (get_pass(name).flag if name in all_passes() else "") or name
        for name in earlier_lossy_names(model.metadata_props)
    ]


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
    else:
        # Skipping another target's pass changes nothing, as skipping an unasked lossy one.
        skipped = [n for n in dict.fromkeys(options.skip) if not get_pass(n).serves(options.target)]
        if skipped:
            notes.append(
                f"skip {', '.join(skipped)}: not a pass of --target {options.target}, so "
                "skipping changed nothing"
            )
    return notes


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
    check_call(source, output, in_place, progress)
    options = validate_options(options)
    # Before anything is loaded or registered (a custom-op library is loaded to check it);
    # _optimize checks again against the weights the loaded model reads.
    check_overwrites(source, output, options, in_place=in_place)
    if options.engine is not None:
        from graphopt.backends.tensorrt.build import check_options

        if options.target == "ort":
            # ORT's output holds com.microsoft ops (fused attention, MatMulNBits, QLinear*),
            # which TensorRT's parser rejects one by one after minutes of passes.
            raise UserInputError(
                "--engine builds a TensorRT engine from the output, and --target ort writes "
                "ONNX Runtime's com.microsoft ops, which TensorRT's parser does not take: use "
                "--target tensorrt (or portable: standard ONNX ops only)"
            )
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
        result, write = _optimize(source, output, options, in_place=in_place, progress=progress)
    if options.engine is None:
        if write is not None:
            result.output_path = write()
        if options.target == "tensorrt":
            # An engine build would name what TensorRT rejects; without one, the rule table
            # does (an ORT-targeted input keeps MatMulNBits, u8 Q/DQ, graphopt's kernels).
            from graphopt.backends.tensorrt.lint import rejection_notes

            result.report.notes.extend(rejection_notes(result.model))
        return result
    replaced = Path(os.fspath(source)) if in_place else None  # check_call: a path
    _build_engine(result, write, options, replaced=replaced, progress=progress)
    return result


def _build_engine(
    result: OptimizeResult,
    write: Callable[..., Path] | None,
    options: OptimizeOptions,
    *,
    replaced: Path | None,
    progress: ProgressCallback | None,
) -> None:
    """Build ``options.engine`` from the run's output. A parser or builder failure raises
    :class:`~graphopt.backends.tensorrt.build.EngineBuildError` carrying ``result``, so the
    report is still printed.

    Without ``--in-place`` the ONNX output is written first (the engine is built from the
    file, and a model TensorRT refuses is still worth having: lint it, run it in ORT). With
    ``--in-place`` the input is replaced only once the engine has built: the output is
    written to a temporary folder beside it and built from there, so that a lossy result
    whose engine fails (a node the parser rejects, a profile the builder cannot meet) never
    replaces the model it was made from. No TensorRT module at all is not such a failure:
    the output is written either way (exit 4, as documented).
    """
    from graphopt.backends.tensorrt.build import EngineBuildError, build_engine
    from graphopt.backends.tensorrt.module import find_tensorrt

    assert options.engine is not None
    engine = options.engine
    shapes = dict(options.input_shapes)
    if progress is not None:
        progress("building the TensorRT engine")
    first = replaced is not None and write is not None and find_tensorrt().found is not None
    if write is not None and not first:
        result.output_path = write()
    try:
        if first:
            assert replaced is not None and write is not None
            folder = replaced.parent if str(replaced.parent) else Path(".")
            with io.temporary_folder(folder, replaced.name) as trial:
                result.engine = build_engine(write(trial / replaced.name), engine, shapes)
        else:
            source_model = result.output_path or ir.serde.serialize_model(result.model)
            result.engine = build_engine(source_model, engine, shapes)
    except GraphoptError as exc:
        raise EngineBuildError(exc, result) from None
    if first:
        assert write is not None
        result.output_path = write()


def _optimize(
    source: io.ModelSource,
    output: str | os.PathLike | None,
    options: OptimizeOptions,
    *,
    in_place: bool,
    progress: ProgressCallback | None,
) -> tuple[OptimizeResult, Callable[..., Path] | None]:
    """The run, up to the write: the result (``output_path`` not set yet) and the function
    that writes it to the output file (None when there is none), which :func:`optimize`
    calls before an engine build, or after it with ``--in-place``."""
    target = resolve_output(source, output, in_place)
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
    input_data_files = io.external_data_files(model)
    check_overwrites(source, output, options, in_place=in_place, data_files=input_data_files)
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
    if options.engine is not None:
        # What the build would refuse after the passes and the write, refused now: --shapes
        # that do not fit the input, a shape-tensor input without values, FP8 for old GPUs.
        from graphopt.backends.tensorrt.build import check_model

        check_model(model, options.engine, fp8=_asks_fp8(steps), input_shapes=options.input_shapes)
    for note in notes + _repeated_lossy_notes(model, steps):
        context.note(note)
    lossy_run = any(not get_pass(spec.name).exact for step in steps for spec in step.passes)
    earlier_lossy = _earlier_lossy_flags(model) if lossy_run else []
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
    names = [spec.name for step in steps for spec in step.passes]
    # Size targets are judged on the model written (after compensation paths and Q/DQ that
    # later passes add), against the input, counted as `graphopt inspect` counts.
    shapes = dict(context.input_shapes) or None
    counted_input = size_targets.count(model, shapes) if size_targets.sized_passes(names) else None
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
    if earlier_lossy:
        _name_lossy_input(report, earlier_lossy)
    if counted_input is not None:
        written = size_targets.count(model, shapes)
        if written is not None:
            judged = size_targets.judge_written(report.details, counted_input, written)
            report.notes.extend(judged)
    if target is None:
        return OptimizeResult(model, report), None
    external = options.external_data
    if external is None and loaded.uses_external_data:
        external = True
    if in_place:
        report.notes.extend(_orphaned_data_notes(input_data_files, target))

    def write(path: Path = target) -> Path:
        """Save the output to ``target`` (or, to build an engine first, beside it)."""
        if progress is not None and path == target:
            progress("writing the output")
        return io.save(model, path, external_data=external)

    return OptimizeResult(model, report), write


def _orphaned_data_notes(data_files: set[Path], target: Path) -> list[str]:
    """--in-place writes the data beside the model as ``NAME.onnx.data``: an input whose
    weights were in other files leaves them behind, unread by the new model (left alone:
    another model may share them), which a large model doubles its disk use with."""
    kept = (target.parent / io.data_file_name(target)).resolve()
    left = sorted(path for path in data_files if path.resolve() != kept and path.exists())
    if not left:
        return []
    size = sum(path.stat().st_size for path in left) / 2**20
    names = ", ".join(path.name for path in left[:3]) + (", ..." if len(left) > 3 else "")
    return [
        f"--in-place: the input's external data ({names}, {size:.1f} MiB) is no longer read by "
        f"the model, whose data is now {kept.name} or inline; remove it once no other model "
        "uses it"
    ]


def _name_lossy_input(report: RunReport, earlier: list[str]) -> None:
    """The fidelity of a run whose input an earlier run already made lossy is against that
    input, not the float original: the titles say so."""
    input_model = f"the input model that {' and '.join(earlier)} already changed"
    report.reference_name = input_model
    quantized = report.details.get("quantize")
    if getattr(quantized, "fidelity_against", "") == "the float original":
        quantized.fidelity_against = input_model


def _asks_fp8(steps: list[Step]) -> bool:
    """Whether the run quantizes to FP8 (--quantize fp8, or a recipe's quantize entry)."""
    return any(
        spec.name == "quantize" and str(spec.options.get("mode", "")).strip().lower() == "fp8"
        for step in steps
        for spec in step.passes
    )


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
