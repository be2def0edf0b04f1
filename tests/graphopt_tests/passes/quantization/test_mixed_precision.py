"""Mixed precision: the fewest most-sensitive layers go back to float until a target holds."""

from __future__ import annotations

import pytest

from graphopt.passes.quantization import mixed_precision as mp
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import run_pass
from graphopt_tests.passes.quantization.dynamic_graphs import (
    cosine,
    inputs,
    op_types,
    run,
    sensitive_chain,
    serialized,
    write_calib,
)

# A stand-in for a model: each quantized layer costs its penalty in cosine.
PENALTY = {"a": 0.001, "b": 0.02, "c": 0.002, "d": 0.008}


def fake_build(kept: frozenset[str]) -> frozenset[str]:
    return frozenset(PENALTY) - kept  # the layers quantized


# Positions each quantized layer flips (an argmax target): "a" costs little cosine but flips
# the most, so ranking by agreement and ranking by cosine disagree.
FLIPS = {"a": 0.03, "b": 0.0, "c": 0.004, "d": 0.001}


def fake_evaluate(quantized: frozenset[str]) -> mp.Measured:
    loss = sum(PENALTY[name] for name in quantized)
    return mp.Measured(1.0 - loss, 10 * loss, 1.0 - sum(FLIPS[name] for name in quantized))


@pytest.mark.parametrize("method", mp.METHODS)
def test_search_keeps_the_most_sensitive_layers_first(method):
    target = mp.Target(min_cosine=0.985)
    kept, curve = mp.search(fake_build, list(PENALTY), fake_evaluate, target, method=method)
    # All quantized: 0.969; b back: 0.989 >= 0.985.
    assert kept == {"b"}
    assert [p.kept_float for p in curve] == [0, 1]
    assert [p.layer for p in curve] == ["", "b"]
    assert curve[-1].cosine == pytest.approx(0.989)
    kept, curve = mp.search(fake_build, list(PENALTY), fake_evaluate, mp.Target(max_error=0.035))
    assert kept == {"b", "d"} and [p.layer for p in curve] == ["", "b", "d"]


def test_search_stops_at_once_when_everything_quantized_meets_the_target():
    kept, curve = mp.search(fake_build, list(PENALTY), fake_evaluate, mp.Target(0.9))
    assert kept == frozenset() and len(curve) == 1


def test_search_checks_the_target_on_the_held_out_evaluator():
    # Held-out samples see a larger loss: the search walks further than the fit data says.
    def held_out(quantized: frozenset[str]) -> mp.Measured:
        cosine, error, agreement = fake_evaluate(quantized)
        return mp.Measured(cosine - 0.005, error, agreement)

    kept, _ = mp.search(fake_build, list(PENALTY), fake_evaluate, mp.Target(0.985), check=held_out)
    assert kept == {"b", "d"}


def test_target_needs_a_bound_and_combines_both():
    with pytest.raises(ValueError):
        mp.Target()
    both = mp.Target(min_cosine=0.99, max_error=0.1)
    assert both.met(mp.Measured(0.995, 0.05))
    assert not both.met(mp.Measured(0.995, 0.2)) and not both.met(mp.Measured(0.98, 0.05))
    assert "cosine >= 0.99" in both.describe() and "error <= 0.1" in both.describe()
    agree = mp.Target(min_agreement=0.99)
    assert agree.met(mp.Measured(0.5, 9.0, 0.995)) and not agree.met(mp.Measured(1.0, 0.0, 0.98))
    assert "argmax agreement >= 0.99" in agree.describe()


def test_agreement_target_ranks_by_flipped_positions_not_cosine():
    # All quantized: agreement 0.965. Cosine ranks b first (it flips nothing); agreement
    # ranks a first, and a alone back in float meets 0.99 (0.995).
    kept, curve = mp.search(fake_build, list(PENALTY), fake_evaluate, mp.Target(min_agreement=0.99))
    assert kept == {"a"}
    assert [p.layer for p in curve] == ["", "a"]
    assert curve[-1].agreement == pytest.approx(0.995)
    # Flipped positions order the layers (a, c, d); b flips none, and its cosine cost still
    # ranks it above a layer that costs nothing at all.
    scores = mp.sensitivities(
        fake_build, list(PENALTY), fake_evaluate, mp.Target(min_agreement=0.99)
    )
    assert sorted(scores, key=lambda n: -scores[n]) == ["a", "c", "d", "b"]
    assert scores["b"] > 0


def test_agreement_target_on_a_model_without_classes_is_a_user_error():
    from graphopt.errors import UserInputError

    with pytest.raises(UserInputError, match="--min-agreement needs an output with a class axis"):
        mp.Target(min_agreement=0.99).met(mp.Measured(1.0, 0.0, None))


def test_int8_dynamic_keeps_exactly_the_sensitive_layer_in_float(tmp_path):
    model = sensitive_chain()
    calib = write_calib(tmp_path / "calib.npz", count=32)
    context = PassContext()
    options = dict(mode="int8-dynamic", calib=calib, min_cosine=0.999, smoothquant=0.0)
    result, hits = run_pass(model, QuantizePass, context, **options)
    record = context.details["quantize"]
    precisions = {layer.node: layer.precision for layer in record.layers}
    assert precisions == {"fc_a": "int8", "fc_b": "float", "fc_c": "int8", "fc_d": "int8"}
    assert hits == 3 and op_types(result).count("MatMul") == 1
    # The curve: everything quantized misses the target, fc_b back in float meets it.
    assert [p.layer for p in record.curve] == ["", "fc_b"]
    assert record.curve[0].cosine < 0.999 <= record.curve[1].cosine
    assert all(p.speedup is not None and p.speedup > 0 for p in record.curve)
    assert any("target mean cosine >= 0.999 met" in note for note in record.notes)
    x = inputs(16, seed=4)
    assert cosine(run(model, x), run(result, x)) >= 0.999
    again, _ = run_pass(model, QuantizePass, PassContext(), **options)
    assert serialized(again) == serialized(result)
