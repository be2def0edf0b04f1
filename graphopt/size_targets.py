"""Size targets of the structural lossy passes: when a reduction reached counts as missed.

``--prune flops=R|params=R``, ``--decompose flops=R|ratio=R``, ``--factorize flops=R`` and
``--erase-blocks flops=R`` move in whole channels, heads, ranks and blocks, so they land
near the target, not on it; each record states what it reached, and a run short by more
than :data:`SIZE_TARGET_SLACK` of the target sets the record's ``target_missed`` line, which
the CLI turns into exit 1 after writing the model (as a missed fidelity target does).

A target is judged on the model written (:func:`judge_written`): the paths compensation
adds (EoRA) and the Q/DQ a later quantize inserts count, as ``graphopt inspect`` counts them.
An op without a FLOPs formula counts 0 there (:mod:`graphopt.analysis.flops`), so with one in
the model a flops=R share is of the counted FLOPs only: a note then names those ops, whether
the target was met or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from graphopt.report import signed_percent

# A size target (prune flops=/params=, decompose flops=/ratio=, factorize flops=, erase-blocks
# flops=) is missed when the reduction reached is under this share of the one asked: the
# passes move in whole channels, heads, ranks and blocks, and their notes already say a
# small shortfall; a run short by more than a tenth of what was asked did not do what it was
# asked (flops=0.5 reaching 30%), and says so by its exit code (1), like a missed fidelity
# target.
SIZE_TARGET_SLACK = 0.9


def size_target_missed(asked: str, measure: str, reached: float, target: float) -> str:
    """A pass record's ``target_missed`` line for a size target: "" when ``reached`` (the
    share of ``measure`` removed) is at least :data:`SIZE_TARGET_SLACK` of ``target``.
    ``asked`` is the pass and its target as the user wrote them (``prune flops=0.5``)."""
    if reached >= SIZE_TARGET_SLACK * target:
        return ""
    return (
        f"{asked}: target NOT met: {measure} {_change(reached)} reached of the asked "
        f"{_change(target)} (met from {_change(SIZE_TARGET_SLACK * target)})"
    )


def _change(removed: float) -> str:
    """A share removed as the change it makes (``-30.0%``; ``+1.2%`` for a model that grew)."""
    return signed_percent(-removed)


# The passes whose record carries a size target, and the record field that spells it
# ("flops=0.3", "params=0.2"; others, such as decompose's ratio=R or erase-blocks' count,
# are not counts of the written model and stay judged by the pass).
_TARGET_FIELDS = {"erase-blocks": "target", "prune": "target", "decompose": "target"}
_TARGET_FIELDS["factorize"] = "rule"


@dataclass(frozen=True)
class Counts:
    """FLOPs (as ``graphopt inspect`` counts them) and live parameters of a model."""

    flops: int
    params: int
    # Op types counted as 0 for lack of a formula (FlopsReport.not_counted): a FLOPs share
    # is then a share of the counted FLOPs only, which the verdict must say.
    not_counted: tuple[str, ...] = ()
    # Op types with nodes whose shapes could not be inferred (FlopsReport.unknown_shape): they
    # count 0, so the total may leave out most of the model (a raw export whose shapes only
    # the exact passes' folding makes inferable) and cannot judge a target.
    unknown_shape: tuple[str, ...] = ()


def count(model: ir.Model, shapes: dict[str, tuple[int, ...]] | None) -> Counts | None:
    """The counts the size targets are judged on, with the inputs bound as ``inspect`` binds
    them (``shapes``: --input-shape, else its defaults); None when shape inference cannot
    bind them (each pass's own verdict stands then)."""
    from graphopt.analysis.flops import model_flops
    from graphopt.analysis.stats import live_parameter_count

    try:
        flops = model_flops(model, shapes)
    except Exception:  # counting is a check on top: never fail the run on it
        return None
    return Counts(
        flops.total,
        live_parameter_count(model),
        tuple(sorted(flops.not_counted)),
        tuple(sorted(flops.unknown_shape)),
    )


def sized_passes(names: list[str]) -> bool:
    """Whether a run of these passes may hold a size target to judge on the written model."""
    return any(name in _TARGET_FIELDS for name in names)


def judge_written(details: dict[str, Any], original: Counts, written: Counts) -> list[str]:
    """Judge every size target (flops=R, params=R) on the model written, after every later
    pass (compensation paths, Q/DQ, exact rewrites), with the same slack: each record's
    ``target_missed`` is set (or cleared) from it. Returns the report's notes: one per target
    whose written count differs from the pass's own, or that followed another structural
    pass (its share is of the model it received); and one naming the ops counted as 0 for
    lack of a formula when a flops=R target was judged with some in the model (its share is
    of the counted FLOPs only, which a met target must not hide).

    A target is relative to its pass's input: the share the other structural passes of the
    run removed (their own before/after ratios) is taken out of the written model's change,
    so that ``--erase-blocks 1 --prune flops=0.2`` judges prune on 20% of what it received.
    """
    judged = []
    for name, field_name in _TARGET_FIELDS.items():
        record = details.get(name)
        spelled = str(getattr(record, field_name, "") or "")
        kind, _, value = spelled.partition("=")
        if kind not in ("flops", "params") or not hasattr(record, f"{kind}_before"):
            continue
        try:
            target = float(value)
        except ValueError:
            continue
        before, after = getattr(record, f"{kind}_before"), getattr(record, f"{kind}_after")
        if before > 0:
            judged.append((name, spelled, kind, target, record, after / before))
    notes = _not_counted_notes(judged, original, written)
    unknown = sorted(set(original.unknown_shape) | set(written.unknown_shape))
    for name, spelled, kind, target, record, own in judged:
        if kind == "flops" and unknown:
            # The input's count of a TorchScript SSDLite left 82 Convs out (1.6 MFLOPs for
            # 1.2 GFLOPs): judged on it, a met target read "+49230.9%, NOT met".
            notes.append(
                f"{name} {spelled}: judged on its own count: FLOPs of the input or the "
                f"model written cannot be counted whole (shapes unknown: {', '.join(unknown)})"
            )
            continue
        # The other structural passes of this run, by their own ratios (not their counts:
        # a pass counts at its calibration samples' shapes), whatever their target.
        others = []
        rest = 1.0
        for other_name in _TARGET_FIELDS:
            other = details.get(other_name)
            b, a = getattr(other, f"{kind}_before", 0), getattr(other, f"{kind}_after", 0)
            if other_name != name and b > 0 and a > 0:
                others.append(other_name)
                rest *= a / b
        base, final = getattr(original, kind), getattr(written, kind)
        if base <= 0:
            continue
        reached = 1.0 - final / base / rest
        if not others and abs(reached - (1.0 - own)) < 0.005:
            continue  # the pass's own count is the written model's: its verdict stands
        asked = f"{name} {spelled}"
        measure = "FLOPs" if kind == "flops" else "params"
        record.target_missed = size_target_missed(
            asked, f"{measure} in the model written", reached, target
        )
        received = f" of the {measure} it received (after {', '.join(others)})" if others else ""
        notes.append(
            f"{asked}: the model written has {final:,} {measure} against the input's "
            f"{base:,} ({signed_percent(final / base - 1.0)}); judged on it, {name} made "
            f"{measure} {_change(reached)}{received} (its own count, on the model it "
            f"received, {_change(1.0 - own)}; the difference is what the passes before and "
            "after it changed)"
        )
    return notes


def _not_counted_notes(judged: list[tuple], original: Counts, written: Counts) -> list[str]:
    """One line for the flops=R targets judged while ops without a FLOPs formula (counted
    as 0) are in the input or the written model."""
    missing = sorted(set(original.not_counted) | set(written.not_counted))
    asked = [f"{name} {spelled}" for name, spelled, kind, *_ in judged if kind == "flops"]
    if not missing or not asked:
        return []
    return [
        f"{', '.join(asked)}: the FLOPs shares are of the counted FLOPs only; not counted "
        f"(no formula, counted as 0): {', '.join(missing)}"
    ]
