"""Factorize a model's layers in place and record what it did (the ``factorize`` pass's work).

1. Layers are found and selected as sparsify does (:mod:`graphopt.passes.sparsity.layers`);
   grouped or non-2-D convs, Gemm with transA and layers thinner than ``MIN_SIDE`` stay whole.
2. Each layer's error for every rank comes from one SVD (whitened by its calibration input
   Gram for asvd, :mod:`.lowrank`), on the original model's inputs.
3. Ranks: the rule's (energy, ratio, rank), or for ``flops=R`` the allocation of least total
   error (:mod:`.allocation`), each layer's curve weighted by its measured effect on the
   model's outputs (:mod:`.sensitivity`). A layer is only factorized when the pair costs
   fewer FLOPs and, with the speed check on, is measured faster (:mod:`.speed`); for
   ``flops=R`` the layers that are not are taken out and the ranks allocated again among the
   rest.
4. With data, layers are fitted layer input by layer input in graph order (q/k/v together),
   each input observed on the model as already factorized (``IncrementalObserver``) next to
   the same input in the original model: ``V`` from the current input's whitened SVD, then
   ``U`` refitted by least squares toward the *original* outputs through the cross Gram, so
   a layer corrects what the layers before it lost.
5. With ``--compensation eora:R``, EoRA paths for what the factors still miss
   (:mod:`graphopt.passes.compensation.eora`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.analysis.flops import model_flops
from graphopt.editing import NameTable
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.factorization import lowrank, speed
from graphopt.passes.factorization.allocation import Option, allocate
from graphopt.passes.factorization.record import FactorizeRecord, Fitted, LayerFactorization
from graphopt.passes.factorization.settings import MIN_SIDE, RankRule, aligned, candidate_ranks
from graphopt.passes.factorization.surgery import factorize_layer, refusal
from graphopt.passes.sparsity import statistics
from graphopt.passes.sparsity.layers import Layer, find_layers, select
from graphopt.refusals import refuse_unchanged
from graphopt.registry import PassContext
from graphopt.size_targets import size_target_missed

# Rounds of "allocate, time, take the slower layers out" for flops=R.
SPEED_ROUNDS = 4


@dataclass(frozen=True)
class FactorizeSettings:
    rule: RankRule
    method: str = "svd"
    layers: tuple[str, ...] = ("all",)
    keep_last: bool = True
    multiple: int = 8
    speed_check: str = "on"  # on, off, or a file to replay timings from
    holdout: float = 0.25
    compensation: int = 0  # EoRA rank (0: none); needs calibration data


@dataclass
class Planned:
    """A selected layer, its cost at the run's shapes and its error curve."""

    layer: Layer
    rows: int  # M: rows of its input (Conv: output positions), 1 when unknown
    shape: speed.Shape
    energy: np.ndarray
    output: bool  # errors are output errors
    rank: int | None = None
    speedup: float | None = None
    # Model output change per unit of this layer's own error (see :mod:`.sensitivity`).
    sensitivity: float = 1.0

    @property
    def n(self) -> int:
        return self.layer.outputs

    @property
    def k(self) -> int:
        return self.layer.canonical_k

    @property
    def full(self) -> int:
        return int(self.energy.shape[0])

    def flops(self, rank: int | None = None) -> int:
        if rank is None:
            return 2 * self.rows * self.n * self.k
        return 2 * self.rows * rank * (self.n + self.k)

    def error(self, rank: int) -> float:
        total = float(self.energy.sum())
        return float(self.energy[rank:].sum()) / total if total > 0 else 0.0

    def energy_rank(self, share: float) -> int:
        """The smallest rank keeping ``share`` of the (whitened) energy."""
        total = float(self.energy.sum())
        if total <= 0:
            return 1
        kept = np.cumsum(self.energy) / total
        return int(min(self.full, np.searchsorted(kept, share - 1e-12) + 1))


def factorize_model(
    model: ir.Model,
    settings: FactorizeSettings,
    calib: CalibrationSet | None,
    context: PassContext,
) -> FactorizeRecord:
    """Factorize ``model``'s selected layers in place; the record says what and how well."""
    from graphopt.passes.calibration.fidelity import fidelity_sets

    started = time.perf_counter()
    record = FactorizeRecord(str(settings.rule), settings.method, speed_check=settings.speed_check)
    found, refused = find_layers(model.graph)
    chosen, left = select(found, settings.layers, settings.keep_last, "--factorize-")
    record.skipped.extend(refused)
    record.skipped.extend(left)
    layers = []
    for layer in chosen:
        why = refusal(layer)
        if not why and min(layer.outputs, layer.canonical_k) < MIN_SIDE:
            why = f"{layer.outputs} x {layer.canonical_k}: a side under {MIN_SIDE}"
        if why:
            record.skipped.append((layer.name, why))
        else:
            layers.append(layer)
    if not layers:
        # Before any data is read or layer timed: the model would come back as given.
        refuse_unchanged(model, f"factorize {settings.rule}", "factorize", record.skipped)
    fit, held = calib, None
    if calib is not None and settings.holdout > 0:
        fit, held = calib.split(settings.holdout)
    shapes = calib.sample_shapes() if calib is not None else dict(context.input_shapes)
    record.flops_before = model_flops(model, shapes).total
    sets, record.fidelity_source = fidelity_sets(model, fit, held, context, "factorize")
    original = model.clone() if layers else None
    planned = _curves(model, layers, shapes, settings, fit, record)
    record.error_kind = "output" if fit is not None else "weight"
    check = _speed_check(settings, record)
    chosen_plans = _plan(planned, settings, record, check)
    if not chosen_plans:
        if not any(why.endswith("not faster") for _, why in record.skipped):
            # Every candidate left whole by the rank rule (no FLOPs saved): a fact of the
            # model and the options, and the model would come back unchanged: refused.
            refuse_unchanged(model, f"factorize {settings.rule}", "factorize", record.skipped)
        # The speed check measured the pairs slower on this CPU: an answer the pass was
        # asked to find (on by default), machine-dependent, its timings recorded in the
        # output's metadata for a replay. Reported (exit 0), said first, not refused as bad
        # input: the same options factorize on a CPU where the pairs are faster.
        record.notes.insert(
            0,
            "nothing factorized: the speed check measured every layer the rule would "
            "factorize slower as a pair in ONNX Runtime on this CPU, so the model is "
            "unchanged (--factorize-speed-check off lets FLOPs alone decide)",
        )
    _write_metadata(model, planned, settings, record, check)
    names = NameTable(model.graph)
    if fit is not None and original is not None:
        _sequential(model, original, chosen_plans, settings.method, fit, names, record)
    else:
        for plan in chosen_plans:
            _apply(model, plan, None, None, "svd", names, record)
    record.flops_after = model_flops(model, shapes).total
    if record.target_flops and record.flops_before - record.flops_after < record.target_flops:
        wanted = record.target_flops / record.flops_before
        record.notes.append(
            f"flops={settings.rule.value:g}: target not reached, {record.flops_removed:.1%} of "
            f"the model's FLOPs removed (short by {wanted - record.flops_removed:.1%}): the "
            "layers that qualify (selected, faster when factorized) cannot give more"
        )
    elif overshoot := record.overshoot_note(settings.multiple):
        record.notes.append(overshoot)
    record.target_missed = _target_missed(settings, record)
    if original is not None and sets and record.layers:
        from graphopt.passes.quantization.record import measure_fidelity

        reference = context.fidelity_reference(original)  # the run's original, if moved
        record.fidelity = measure_fidelity(reference, model, sets, optimized_too=False)
        record.fidelity_source = context.fidelity_source(record.fidelity_source)
    if settings.compensation and fit is not None and record.fitted:
        _compensate(model, original, record, settings.compensation, sets, context)
    record.seconds = time.perf_counter() - started
    return record


def _target_missed(settings: FactorizeSettings, record: FactorizeRecord) -> str:
    """The flops=R target's miss line ("" when met, or for a per-layer rule, which every
    factorized layer meets by construction), with the speed check named when it left layers
    whole: the same options reach further on a CPU where the pairs are faster."""
    if settings.rule.kind != "flops":
        return ""
    asked = f"factorize {settings.rule}"
    missed = size_target_missed(asked, "FLOPs", record.flops_removed, settings.rule.value)
    slow = sum(1 for _, why in record.skipped if why.endswith("not faster"))
    if missed and slow:
        missed += (
            f"; the speed check left {slow} layer(s) whole as slower in ONNX Runtime on this "
            "CPU (--factorize-speed-check off lets FLOPs alone decide)"
        )
    return missed


def _compensate(
    model: ir.Model,
    original: ir.Model | None,
    record: FactorizeRecord,
    rank: int,
    sets: dict,
    context: PassContext,
) -> None:
    """EoRA paths (:mod:`graphopt.passes.compensation.eora`) for the factorized layers'
    remaining error ``W − U·V``, on the Gram of their inputs as the fit saw them."""
    from graphopt.editing import attribute
    from graphopt.passes.compensation.conv import factorized
    from graphopt.passes.compensation.eora import ChangedLayer, compensate

    changed, skipped = [], []
    for fitted in record.fitted:
        conv, why = (None, "")
        if fitted.second.op_type == "Conv":
            # A Conv path beside the pair: the first Conv's geometry, the layer's channels.
            conv, why = factorized(fitted.first, int(fitted.weight.shape[0]))
        if why:
            skipped.append((fitted.name, why))
        elif fitted.gram is None:
            skipped.append((fitted.name, "no input Gram (input too wide or not observed)"))
        else:
            # Gemm's alpha scales the product: the path must add alpha·ΔW.
            gemm = fitted.second.op_type == "Gemm"
            alpha = float(attribute(fitted.second, "alpha", 1.0)) if gemm else 1.0
            weight = np.asarray(fitted.weight, np.float64) * alpha
            delta = (weight - fitted.approx * alpha).astype(np.float32)
            gram = np.asarray(fitted.gram, np.float64)
            changed.append(
                ChangedLayer(fitted.name, fitted.input, fitted.output, weight, delta, gram, conv)
            )
    measure = None
    if original is not None and sets:
        from graphopt.passes.quantization.record import measure_fidelity

        reference = context.fidelity_reference(original)  # as the pass's own fidelity
        measure = functools.partial(measure_fidelity, reference, sets=sets, optimized_too=False)
    before = record.fidelity or None
    result = compensate(
        model, changed, rank, "factorize", measure, dict(context.input_shapes), before
    )
    result.skipped[:0] = skipped
    result.fidelity_source = record.fidelity_source
    record.compensation = result
    if result.fidelity_after:
        record.fidelity = result.fidelity_after


def _curves(
    model: ir.Model,
    layers: list[Layer],
    shapes: dict[str, tuple[int, ...]],
    settings: FactorizeSettings,
    fit: CalibrationSet | None,
    record: FactorizeRecord,
) -> list[Planned]:
    """Each layer's size at the run's shapes and error for every rank, on original inputs
    (for ``flops=R`` with data, scaled by each layer's measured sensitivity)."""
    dims = _layer_dims(model, layers, shapes)
    hessians: dict[int, np.ndarray | None] = {}
    if fit is not None and layers:
        from graphopt.passes.calibration.activations import observe

        names = sorted({layer.node.inputs[0].name for layer in layers})
        stats = statistics.gather(observe(model, names, fit), layers, want_gram=True)
        hessians = {key: entry.hessian for key, entry in stats.items()}
    planned = []
    for layer in layers:
        rows, in_shape = dims.get(id(layer.node), (1, None))
        hessian = hessians.get(id(layer.node))
        energy = lowrank.energies(layer.canonical(), hessian, settings.method)
        shape = speed.layer_shape(layer, in_shape, rows)
        planned.append(Planned(layer, rows, shape, energy, hessian is not None))
    if settings.rule.kind == "flops" and fit is not None and planned:
        _weigh(model, planned, hessians, settings, fit, record)
    return planned


def _weigh(
    model: ir.Model,
    planned: list[Planned],
    hessians: dict[int, np.ndarray | None],
    settings: FactorizeSettings,
    fit: CalibrationSet,
    record: FactorizeRecord,
) -> None:
    """Measure each layer's sensitivity at half its break-even rank (:mod:`.sensitivity`)."""
    from graphopt.passes.factorization.sensitivity import PROBE_SAMPLES, sensitivities

    probes = []
    for plan in planned:
        even = plan.n * plan.k / (plan.n + plan.k)
        probes.append(aligned(even / 2, settings.multiple, plan.full))

    def approximation(plan: Planned, rank: int):
        def build() -> np.ndarray:
            w = plan.layer.canonical()
            hessian = hessians.get(id(plan.layer.node))
            u, v = lowrank.spectrum(w, hessian, settings.method).factors(rank)
            return plan.layer.stored(u @ v)

        return build

    measured = sensitivities(
        model,
        [plan.layer.weight for plan in planned],
        [approximation(p, r) for p, r in zip(planned, probes, strict=True)],
        [p.error(r) for p, r in zip(planned, probes, strict=True)],
        fit,
    )
    known = [m for m in measured if m is not None]
    fallback = float(np.median(known)) if known else 1.0
    for plan, value in zip(planned, measured, strict=True):
        plan.sensitivity = value if value is not None else fallback
    if known:
        record.notes.append(
            f"allocation: layer errors weighted by their measured effect on the model's "
            f"outputs ({min(known):.3g}..{max(known):.3g} per unit of layer error; one probe "
            f"per layer on {min(PROBE_SAMPLES, fit.count)} samples)"
        )


def _layer_dims(
    model: ir.Model, layers: list[Layer], shapes: dict[str, tuple[int, ...]]
) -> dict[int, tuple[int, tuple[int, ...] | None]]:
    """Per layer: M (rows of its input; a Conv's output positions) and its input's shape."""
    from graphopt.analysis.shapes import infer_shapes, static_shape
    from graphopt.errors import UserInputError

    try:
        inferred, _ = infer_shapes(model, shapes)
    except UserInputError:
        return {}
    clones = list(inferred.graph)
    index = {id(node): i for i, node in enumerate(model.graph)}
    dims = {}
    for layer in layers:
        node = clones[index[id(layer.node)]]
        x, y = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if layer.op == "Conv":
            rows = int(y[0] * np.prod(y[2:])) if y else 1
        else:
            rows = int(np.prod(x[:-1])) if x else 1
        dims[id(layer.node)] = (max(rows, 1), x)
    return dims


def _plan(
    planned: list[Planned],
    settings: FactorizeSettings,
    record: FactorizeRecord,
    check: speed.SpeedCheck | None,
) -> list[Planned]:
    """Ranks for the rule; the layers to factorize (see the module docstring, step 3)."""
    rule = settings.rule
    if rule.kind == "flops":
        return _plan_flops(planned, settings, record, check)
    kept = []
    for plan in planned:
        if rule.kind == "rank":
            wanted = rule.value
        elif rule.kind == "ratio":
            wanted = rule.value * plan.full
        else:
            wanted = plan.energy_rank(rule.value)
        rank = aligned(wanted, settings.multiple, plan.full)
        if plan.flops(rank) >= plan.flops():
            record.skipped.append((plan.layer.name, _no_saving(plan, rank)))
            continue
        plan.rank = rank
        kept.append(plan)
    return _timed(kept, check, record)


def _plan_flops(planned, settings, record, check) -> list[Planned]:
    target = round(settings.rule.value * record.flops_before)
    record.target_flops = target
    pool = list(planned)
    for _ in range(SPEED_ROUNDS):
        options = [
            [
                Option(r, plan.sensitivity * plan.error(r), plan.flops() - plan.flops(r))
                for r in candidate_ranks(plan.full, settings.multiple)
                if plan.flops(r) < plan.flops()
            ]
            for plan in pool
        ]
        result = allocate(options, target)
        for plan, rank in zip(pool, result.ranks, strict=True):
            plan.rank = rank
        chosen = [plan for plan in pool if plan.rank is not None]
        fast = _timed(chosen, check, record)
        if len(fast) == len(chosen):
            break
        slow = {id(p) for p in chosen} - {id(p) for p in fast}
        pool = [plan for plan in pool if id(plan) not in slow]
    for plan in pool:
        if plan.rank is None:
            record.skipped.append(
                (plan.layer.name, "left whole by the allocation (highest error per FLOP saved)")
            )
    return [plan for plan in pool if plan.rank is not None]


def _no_saving(plan: Planned, rank: int) -> str:
    even = plan.n * plan.k / (plan.n + plan.k)
    return f"rank {rank} of {plan.full} saves no FLOPs (break-even below {even:.0f})"


def _speed_check(settings: FactorizeSettings, record: FactorizeRecord) -> speed.SpeedCheck | None:
    if settings.speed_check == "off":
        record.notes.append("speed check off: FLOPs alone decided which layers to factorize")
        return None
    replay = None
    if settings.speed_check != "on":
        replay = speed.load_replay(settings.speed_check)
        record.notes.append(f"speed check replayed from {settings.speed_check}")
    return speed.SpeedCheck(replay)


def _timed(plans: list[Planned], check: speed.SpeedCheck | None, record: FactorizeRecord):
    """The plans whose pair is measured faster than the layer (all when not checking)."""
    if check is None:
        return plans
    fast = []
    for plan in plans:
        assert plan.rank is not None
        timing = check.timing(plan.shape, plan.rank)
        plan.speedup = round(timing.speedup, 4)
        if timing.speedup > 1.0:
            fast.append(plan)
        else:
            record.skipped.append(
                (
                    plan.layer.name,
                    f"rank {plan.rank}: measured {plan.speedup:.2f}x the layer's speed in ORT "
                    f"(M={plan.rows}), not faster",
                )
            )
            plan.rank = None
    return fast


def _write_metadata(
    model: ir.Model,
    planned: list[Planned],
    settings: FactorizeSettings,
    record: FactorizeRecord,
    check: speed.SpeedCheck | None,
) -> None:
    """The timings and decisions in the output model (replayable, see :mod:`.speed`)."""
    from graphopt.passes.sparsity.crossover import canonical

    layers = [
        {"layer": p.layer.name, "rank": p.rank, "full": p.full, "speedup": p.speedup}
        for p in planned
    ]
    replayed = settings.speed_check not in ("on", "off")
    # A replay file by its name, as calibration files are: a path would make the same run
    # from another folder (or spelled relative vs absolute) give other bytes.
    mode = Path(settings.speed_check).name if replayed else settings.speed_check
    data: dict = {"version": 1, "rule": record.rule, "speed_check": mode}
    data["layers"] = layers
    if check is not None:
        data["timings"] = dict(sorted(check.used.items()))
        if check.measured:
            record.notes.append(
                f"speed check: {check.measured} shape class(es) timed now, the rest from "
                "the cache; timings in the output's metadata (graphopt.factorize)"
            )
    model.metadata_props[speed.METADATA_KEY] = canonical(data)


def _sequential(
    model: ir.Model,
    original: ir.Model,
    plans: list[Planned],
    method: str,
    fit: CalibrationSet,
    names: NameTable,
    record: FactorizeRecord,
) -> None:
    """Fit layer input by layer input (see the module docstring, step 4)."""
    from graphopt.passes.pruning.incremental import IncrementalObserver

    stages: dict[int, list[Planned]] = {}
    for plan in plans:
        stages.setdefault(id(plan.layer.node.inputs[0]), []).append(plan)
    batches = list(fit.batches())
    current = IncrementalObserver(model, batches, fit.source)
    reference = IncrementalObserver(original, batches, fit.source)
    fallbacks = 0
    for group in stages.values():
        name = group[0].layer.node.inputs[0].name
        observed = zip(current.advance([name]), reference.advance([name]), strict=True)
        grams = _pair_grams(observed, [p.layer for p in group], name)
        for plan in group:
            entry = grams.get(id(plan.layer.node))
            if entry is None:
                fallbacks += 1
                _apply(model, plan, None, None, "svd", names, record)
            else:
                _apply(model, plan, *entry, method, names, record)
    refit = (
        "; second factor refitted toward the original outputs (cross Gram of the current "
        "and the original inputs)"
        if method == "asvd"
        else ""
    )
    record.notes.append(
        f"{method}: layer inputs observed on {fit.count} calibration samples through the "
        f"layers already factorized{refit}; errors are each layer's own relative output "
        "error on its current inputs"
    )
    if fallbacks:
        record.notes.append(
            f"{fallbacks} layer(s) without input statistics (Conv with auto_pad, or inputs "
            f"wider than {statistics.MAX_HESSIAN_FEATURES}): plain svd, weight error"
        )


def _pair_grams(observed, layers: list[Layer], name: str):
    """Per layer: the Gram ``H̃`` of its current input and the cross Gram ``C = X̃ᵀX`` with
    its original input (canonical order, per row). Layers reading one MatMul input share them."""
    from graphopt.passes.calibration.activations import sequence_mask

    sums: dict[object, list] = {}
    key_of = {}
    for layer in layers:
        if not statistics.supported(layer) or layer.canonical_k > statistics.MAX_HESSIAN_FEATURES:
            continue
        key_of[id(layer.node)] = id(layer.node) if layer.op == "Conv" else "matmul"
    for batch, ((feeds, now), (_, then)) in enumerate(observed):
        mask = sequence_mask(feeds)
        done = set()
        for layer in layers:
            key = key_of.get(id(layer.node))
            if key is None or key in done:
                continue
            done.add(key)
            # One seed for both sides: a Conv's sampled patch rows must be the same patches.
            cur = statistics.layer_rows(layer, now[name], mask, np.random.default_rng(batch))
            ori = statistics.layer_rows(layer, then[name], mask, np.random.default_rng(batch))
            # float32 products (BLAS speed), float64 sums across batches.
            parts = [(cur.T @ b).astype(np.float64) for b in (cur, ori)]
            parts.append(cur.shape[0])
            if key in sums:
                sums[key] = [a + b for a, b in zip(sums[key], parts, strict=True)]
            else:
                sums[key] = parts
    result = {}
    for layer in layers:
        key = key_of.get(id(layer.node))
        if key is None or key not in sums:
            continue
        current, cross, rows = sums[key]
        rows = max(rows, 1)
        result[id(layer.node)] = (current / rows, cross / rows)
    return result


def _apply(
    model: ir.Model,
    plan: Planned,
    current: np.ndarray | None,
    cross: np.ndarray | None,
    method: str,
    names: NameTable,
    record: FactorizeRecord,
) -> None:
    """Factor one layer at its planned rank and rewrite it; record it."""
    layer, rank = plan.layer, plan.rank
    assert rank is not None
    w = layer.canonical()
    hessian = current if method == "asvd" else None
    u, v = lowrank.spectrum(w, hessian, method).factors(rank)
    if method == "asvd" and current is not None:
        u = lowrank.refit_u(w, v, current, cross)
    approx = u @ v
    squared = (
        lowrank.output_error(w, approx, current)
        if current is not None
        else lowrank.weight_error(w, approx)
    )
    # Shown as the relative error ‖XΔWᵀ‖/‖XWᵀ‖: the squared ratio read as one understated it.
    error = float(np.sqrt(squared))
    x, y = layer.node.inputs[0], layer.node.outputs[0]
    assert x is not None
    kind, name, op, shape = layer.kind, layer.name, layer.op, [plan.n, plan.k]
    done = factorize_layer(model.graph, layer, u, v, names)
    record.layers.append(
        LayerFactorization(
            name,
            op,
            kind,
            shape,
            rank,
            plan.full,
            plan.flops(),
            plan.flops(rank),
            error,
            plan.speedup,
        )
    )
    gram = None if current is None else current.astype(np.float32)
    kept = approx.astype(np.float32)
    record.fitted.append(Fitted(name, w, kept, done.first, done.second, x, y, gram))
