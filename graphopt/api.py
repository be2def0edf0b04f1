"""The Python API: ``graphopt.optimize(...)`` does load → passes → verify → save."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from graphopt import io
from graphopt.errors import CheckFailedError, UserInputError
from graphopt.opset import convert_opset
from graphopt.pipeline import (
    PassManager,
    PassSpec,
    ProgressCallback,
    RunReport,
    default_pipeline,
    explicit_pipeline,
)
from graphopt.registry import PassContext
from graphopt.verify import DEFAULT_TOLERANCE, VerificationUnavailable, Verifier

DEFAULT_FOLD_LIMIT_BYTES = 1 << 20


@dataclass
class OptimizeOptions:
    """Everything that decides what ``optimize`` does (the CLI and recipes fill this)."""

    # An explicit ordered list of passes; None means the default pipeline.
    passes: list[PassSpec] | None = None
    skip: list[str] = field(default_factory=list)
    # Lossy passes added to the default pipeline (run in the fixed stage order).
    lossy: list[PassSpec] = field(default_factory=list)
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    fold_limit_bytes: int | None = DEFAULT_FOLD_LIMIT_BYTES
    external_data: bool | None = None
    target: str = "portable"
    # Raise the default-domain opset to this first (onnx version converter), e.g. so that
    # fusions into LayerNormalization/Gelu/Attention can apply.
    opset: int | None = None
    seed: int = 0
    # Structured pruning (lossy), e.g. prune="flops=0.3"; the rest refine it.
    prune: str | None = None
    criterion: str = "l2"
    allocation: str = "uniform"
    compensation: str = "none"
    round_to: int | None = None
    calib: str | None = None  # a .npz path, or "random"
    max_group_ratio: float = 0.8

    def lossy_specs(self) -> list[PassSpec]:
        """``lossy`` plus the pruning pass the ``prune`` fields ask for."""
        specs = list(self.lossy)
        if self.prune:
            from graphopt.passes.pruning.settings import PruneTarget

            target = PruneTarget.parse(self.prune)
            options = {
                target.kind: target.ratio,
                "criterion": self.criterion,
                "allocation": self.allocation,
                "compensation": self.compensation,
                "round_to": self.round_to or 0,
                "calib": self.calib or "",
                "max_group_ratio": self.max_group_ratio,
            }
            specs = [s for s in specs if s.name != "prune"] + [PassSpec("prune", options)]
        return specs


@dataclass
class OptimizeResult:
    model: ir.Model
    report: RunReport
    output_path: Path | None = None


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
    exact passes were rolled back (the output is then not written).
    """
    options = options or OptimizeOptions()
    target = _resolve_output(source, output, in_place)
    loaded = io.load(source)
    model = loaded.model
    if model is source:
        # Passes rewrite in place; the caller's ir.Model stays as it was (tensors are shared,
        # not copied: passes replace initializers rather than write into them).
        model = model.clone()
    if target is not None and not in_place:
        data_files = io.external_data_files(model)
        data_target = target.with_name(io.data_file_name(target))
        if any(_same_file(data_target, f) for f in data_files):
            raise UserInputError(
                f"{target}: its external-data file {data_target.name} would overwrite the "
                "input's weights; choose another output name"
            )
        if any(_same_file(target, f) for f in data_files):
            raise UserInputError(
                f"{target}: output would overwrite the input's external-data file; "
                "choose another output name"
            )
        if not target.parent.is_dir():
            # Refuse before the pipeline runs rather than after (io.save checks it too).
            raise UserInputError(f"{target}: output folder {target.parent} does not exist")
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
    steps = (
        explicit_pipeline(options.passes)
        if options.passes is not None
        else default_pipeline(options.lossy_specs(), options.skip)
    )
    verifier = None
    skipped_reason = ""
    if options.verify:
        try:
            # The reference is the model as given: an opset conversion is verified too.
            verifier = Verifier(
                original_for_verify, options.input_shapes, options.tolerance, options.seed
            )
        except VerificationUnavailable as exc:
            skipped_reason = f"ONNX Runtime cannot run the original model: {exc}"
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
    if target is not None:
        external = options.external_data
        if external is None and loaded.uses_external_data:
            external = True
        io.save(model, target, external_data=external)
    return OptimizeResult(model, report, target)


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
    if source_path is not None and _same_file(source_path, target):
        raise UserInputError(
            f"{target}: output would overwrite the input; use --in-place to replace it"
        )
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
        return a.resolve() == b.resolve()
    except OSError:
        return False
