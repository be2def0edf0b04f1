"""Run the default exact pipeline on a catalog model and measure what it changed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

import graphopt.models as gm
from graphopt.api import OptimizeOptions, optimize
from graphopt.inputs import make_inputs
from graphopt.io import load
from graphopt.output_errors import compare
from graphopt.verify import run_model

TOLERANCE = 1e-4


@dataclass
class Exactness:
    name: str
    nodes_before: int
    nodes_after: int
    worst_rel: float
    seconds: float
    problems: list[str] = field(default_factory=list)

    def row(self) -> str:
        status = "ok" if not self.problems else "; ".join(self.problems)
        return (
            f"{self.name:<22} {self.nodes_before:>6} → {self.nodes_after:<6} "
            f"{self.worst_rel:>10.2e} {self.seconds:>8.1f}s  {status}"
        )


HEADER = f"{'model':<22} {'nodes before → after':<20} {'worst rel':>10} {'time':>9}  status"


def _dims(value: ir.Value) -> list[int | str | None]:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (d.value if d is not None else None) for d in value.shape]


def _batched(shapes: dict[str, tuple[int, ...]], model: ir.Model) -> dict[str, tuple[int, ...]]:
    """The test shapes with batch 2 on inputs whose leading dim is symbolic."""
    result = dict(shapes)
    for value in model.graph.inputs:
        dims = _dims(value)
        if value.name in result and dims and not isinstance(dims[0], int):
            result[value.name] = (2, *result[value.name][1:])
    return result


def check_exactness(name: str) -> Exactness:
    """Optimize ``name`` with the default exact pipeline (verification on) and cross-check.

    Besides the pipeline's own verification, the original and optimized models are run
    again on fresh inputs at the test shapes and at batch 2 (dynamic batch must survive),
    and the declared input/output shapes are compared.
    """
    path = gm.get(name)
    shapes = gm.input_shapes(name)
    original = load(path).model
    result = optimize(path, None, OptimizeOptions(input_shapes=shapes))
    report = result.report
    optimized = result.model
    problems: list[str] = []
    if report.verification is None:
        problems.append(f"not verified: {report.verification_skipped}")
    elif not report.verification.ok:
        problems.append(f"verification failed: {report.verification.reason}")
    for pass_name in report.rolled_back:
        problems.append(f"rolled back: {pass_name}")
    for stats in report.stats:
        if stats.status != "ok":
            problems.append(f"{stats.name}: {stats.status}")
    for before, after in zip(original.graph.inputs, optimized.graph.inputs, strict=False):
        if (before.name, _dims(before)) != (after.name, _dims(after)):
            problems.append(f"input {before.name} {_dims(before)} -> {after.name} {_dims(after)}")
    if [v.name for v in original.graph.inputs] != [v.name for v in optimized.graph.inputs]:
        problems.append("graph inputs changed")
    for before, after in zip(original.graph.outputs, optimized.graph.outputs, strict=False):
        old, new = _dims(before), _dims(after)
        pinned = [
            i for i, (a, b) in enumerate(zip(old, new, strict=False))
            if (isinstance(a, int) != isinstance(b, int) and not (a is None or b is None))
            or (isinstance(a, int) and a != b)
        ]  # fmt: skip
        if (old and new and len(old) != len(new)) or pinned:
            problems.append(f"output {before.name} declared {old} -> {new}")
    worst = report.verification.worst_rel if report.verification else float("nan")
    for feed_shapes, seed in ((shapes, 1), (_batched(shapes, original), 2)):
        feeds = make_inputs(original, feed_shapes, seed=seed)
        try:
            got = run_model(optimized, feeds)
        except Exception as exc:
            problems.append(f"optimized fails at {feed_shapes}: {str(exc).splitlines()[0]}")
            continue
        ref = run_model(original, feeds)
        for value, r, g in zip(original.graph.outputs, ref, got, strict=True):
            err = compare(value.name, np.asarray(r), np.asarray(g))
            if not err.shape_ok:
                problems.append(f"{value.name}: {err.detail}")
            elif err.max_rel > TOLERANCE or err.detail:
                problems.append(f"{value.name}: rel error {err.max_rel:.3g} at {feed_shapes}")
            worst = max(worst, err.max_rel)
    return Exactness(name, report.nodes_before, report.nodes_after, worst, report.seconds, problems)
