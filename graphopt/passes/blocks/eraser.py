"""Erase the least useful residual blocks of a model in place (the ``erase-blocks`` pass's work).

Blocks are found by :mod:`.finding`, observed once on the calibration samples
(:mod:`.fitting`: angular distances and replacements), and scored one at a time:

* removal: the model with that block alone erased (with its replacement) is run on the
  scoring samples; the score is the largest ``1 - mean cosine`` over the model's outputs
  against the input model (nothing is cached across runs);
* angular: the block's angular distance between input and output.

The lowest-scored blocks are chosen up to the target (a count, or the fewest that save the
share of FLOPs asked, counted at the calibration shapes), erased together, and the result is
measured again: jointly on the scoring samples (removal), and against the input model on
calibration and held-out samples (the report's fidelity).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx_ir as ir

from graphopt.analysis.flops import model_flops
from graphopt.editing import NameTable
from graphopt.errors import UserInputError
from graphopt.passes.blocks.erasing import Replacement, erase, sweep, values_by_name
from graphopt.passes.blocks.finding import Block, find_blocks
from graphopt.passes.blocks.fitting import block_data
from graphopt.passes.blocks.record import BlockEntry, ErasureRecord
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.registry import PassContext
from graphopt.size_targets import size_target_missed

# Fitted samples each removal score is measured on (at most): one model run per block.
SCORE_SAMPLES = 32


@dataclass(frozen=True)
class EraseSettings:
    count: int = 0  # blocks to erase, or
    flops: float = 0.0  # the share of FLOPs to save
    score: str = "removal"
    replacement: str = "mean"
    ridge: float = 1e-3
    holdout: float = 0.25

    @property
    def target(self) -> str:
        return f"flops={self.flops:g}" if self.flops else f"{self.count} block(s)"


def erase_model(
    model: ir.Model, settings: EraseSettings, calib: CalibrationSet, context: PassContext
) -> ErasureRecord:
    """Erase blocks of ``model`` in place; the record says which and how well."""
    from graphopt.passes.calibration.fidelity import fidelity_sets

    started = time.perf_counter()
    record = ErasureRecord(settings.target, settings.score, settings.replacement)
    blocks, record.refused = find_blocks(model.graph)
    # A count beyond the blocks found, or any target on a model with none (a flops=R run
    # went on to observe no value, and ONNX Runtime could not load the empty model).
    if not blocks or settings.count > len(blocks):
        raise UserInputError(
            f"erase-blocks: {settings.target} asked, the model has {len(blocks)} "
            f"erasable residual block(s) ({len(record.refused)} candidate(s) refused)"
        )
    fit, held = calib, None
    if settings.holdout > 0:
        fit, held = calib.split(settings.holdout)
    sets, record.fidelity_source = fidelity_sets(model, fit, held, context, "erase-blocks")
    shapes = calib.sample_shapes()
    record.flops_before = model_flops(model, shapes).total
    data = block_data(model, blocks, fit, settings.replacement == "linear")
    replacements = [d.replacement(settings.replacement, settings.ridge) for d in data]
    scoring = fit.first(SCORE_SAMPLES)
    reference = _outputs(model, scoring) if settings.score == "removal" else None
    for block, replacement, stats in zip(blocks, replacements, data, strict=True):
        alone = model.clone()
        erase_all(alone, [block], [replacement])
        saved = record.flops_before - model_flops(alone, shapes).total
        score = stats.angular if reference is None else _change(model, alone, scoring, reference)
        share = saved / record.flops_before if record.flops_before else 0.0
        record.blocks.append(
            BlockEntry(block.name, block.kind, block.input, block.output, saved, share, score)
        )
    chosen = _choose(record, settings)
    original = model.clone()
    erase_all(model, [blocks[i] for i in chosen], [replacements[i] for i in chosen])
    for i in chosen:
        record.blocks[i].removed = True
        record.blocks[i].replacement = settings.replacement
    record.flops_after = model_flops(model, shapes).total
    if settings.flops:
        # Chosen on each block's saving alone; judged on the model written, all erased.
        record.target_missed = size_target_missed(
            f"erase-blocks {settings.target}", "FLOPs", record.flops_removed, settings.flops
        )
    if reference is not None and chosen:
        record.joint_score = _change(original, model, scoring, reference)
    record.notes.append(
        f"{settings.score} scores on {scoring.count if reference is not None else fit.count} "
        f"calibration samples; {settings.replacement} replacement fitted on {fit.count}"
    )
    if record.joint_score is not None and len(chosen) > 1:
        alone = sum(record.blocks[i].score for i in chosen)
        record.notes.append(
            f"jointly re-measured: 1 - cosine {record.joint_score:.4g} with all {len(chosen)} "
            f"erased (sum of the single-block scores {alone:.4g})"
        )
    if sets:
        from graphopt.passes.quantization.record import measure_fidelity

        reference = context.fidelity_reference(original)  # the run's original, if moved
        record.fidelity = measure_fidelity(reference, model, sets, optimized_too=False)
        record.fidelity_source = context.fidelity_source(record.fidelity_source)
    record.seconds = time.perf_counter() - started
    return record


def erase_all(model: ir.Model, blocks: list[Block], replacements: list[Replacement]) -> int:
    """Erase ``blocks`` of ``model`` with their replacements; how many nodes went.

    Values are looked up once before any edit and blocks erased last first: a block's input
    may be the output of the block before it, and a graph output's name moves to the value
    that takes its place."""
    graph = model.graph
    values = values_by_name(graph)
    names = NameTable(graph)
    pairs = sorted(zip(blocks, replacements, strict=True), key=lambda p: -p[0].index)
    resolved = [(values[b.input], values[b.output], b, r) for b, r in pairs]
    for source, output, block, replacement in resolved:
        erase(graph, source, output, replacement, block.channel_axis, names)
    return sweep(graph)


def _choose(record: ErasureRecord, settings: EraseSettings) -> list[int]:
    """The lowest-scored blocks up to the target, in graph order (ties: the earlier block)."""
    order = sorted(range(len(record.blocks)), key=lambda i: (record.blocks[i].score, i))
    if not settings.flops:
        return sorted(order[: settings.count])
    wanted = settings.flops * record.flops_before
    available = sum(max(b.flops, 0) for b in record.blocks)
    if available < wanted:
        raise UserInputError(
            f"erase-blocks: flops={settings.flops:g} asked, but all {len(record.blocks)} "
            f"erasable blocks save {available / max(record.flops_before, 1):.1%} of the FLOPs"
        )
    chosen, saved = [], 0
    for i in order:
        if saved >= wanted:
            break
        chosen.append(i)
        saved += record.blocks[i].flops
    return sorted(chosen)


def _outputs(model: ir.Model, calib: CalibrationSet):
    from graphopt.passes.calibration.fidelity import outputs_on

    return outputs_on(model, calib)


def _change(original: ir.Model, candidate: ir.Model, calib: CalibrationSet, reference) -> float:
    """Largest ``1 - mean cosine`` over the outputs of ``candidate`` against ``reference``."""
    from graphopt.passes.calibration.fidelity import measure, padding_mask

    names = [v.name for v in original.graph.outputs]
    got = _outputs(candidate, calib)
    fidelities = measure(names, reference, got, padding_mask(calib))
    return max(1.0 - f.mean_cosine for f in fidelities)
