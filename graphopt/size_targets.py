"""Size targets of the structural lossy passes: when a reduction reached counts as missed.

``--prune flops=R|params=R``, ``--decompose flops=R|ratio=R``, ``--factorize flops=R`` and
``--erase-blocks flops=R`` move in whole channels, heads, ranks and blocks, so they land
near the target, not on it; each record states what it reached, and a run short by more
than :data:`SIZE_TARGET_SLACK` of the target sets the record's ``target_missed`` line, which
the CLI turns into exit 1 after writing the model (as a missed fidelity target does).
"""

from __future__ import annotations

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
