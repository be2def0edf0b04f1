"""``--autotune``: the int8 candidates are built and timed here, the fastest is kept, and the
choice is recorded in the output's metadata and the report."""

from __future__ import annotations

import json

import onnx_ir as ir

from graphopt.passes.quantization.autotune import METADATA_KEY, candidate_settings
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.passes.quantization.test_static import _calib, small_cnn


def _quantize(tmp_path, **options) -> tuple[ir.Model, PassContext]:
    model = small_cnn()
    context = PassContext(target="ort")
    QuantizePass(context, mode="int8", calib=_calib(tmp_path), **options)(model)
    return model, context


def test_autotune_keeps_a_measured_candidate_and_records_it(tmp_path) -> None:
    model, context = _quantize(tmp_path, autotune=True)
    chosen = json.loads(model.metadata_props[METADATA_KEY])
    assert set(chosen["relative_times"]) == {"qdq/u8", "qdq/s8", "qoperator/u8", "qoperator/s8"}
    times = chosen["relative_times"]
    # The kept one is the fastest measured (times are recorded rounded: ties are possible).
    assert times[f"{chosen['quant_format']}/{chosen['activation_type']}"] == min(times.values())
    ops = {node.op_type for node in model.graph}
    assert ("QLinearConv" in ops) == (chosen["quant_format"] == "qoperator")
    record = context.details["quantize"]
    assert any(note.startswith("--autotune: time relative to") for note in record.notes)
    assert record.settings["autotune"] is True


def test_autotune_varies_only_what_the_user_left_unset(tmp_path) -> None:
    settings = QuantizePass(
        PassContext(target="ort"), mode="int8", quant_format="qdq", autotune=True
    ).resolved()
    options = candidate_settings(settings)
    assert [(s.quant_format, s.activation_type) for s in options] == [("qdq", "u8"), ("qdq", "s8")]


def test_autotune_outside_static_int8_for_ort_says_it_had_no_effect(tmp_path) -> None:
    model = small_cnn()
    context = PassContext(target="portable")
    QuantizePass(context, mode="int8", calib=_calib(tmp_path), autotune=True)(model)
    assert METADATA_KEY not in model.metadata_props
    assert any("--autotune had no effect" in n for n in context.details["quantize"].notes)


def test_a_rerun_reuses_this_machines_times_and_gives_the_same_choice(
    tmp_path, monkeypatch
) -> None:
    """Near-equal candidates flipped between runs (digits: qdq/s8 vs qoperator/u8), so the
    same options gave different files; the times are now cached per machine, as
    factorize's are, and a rerun reproduces the first run's metadata and graph."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, first_context = _quantize(tmp_path, autotune=True)
    assert list((tmp_path / "cache" / "graphopt" / "autotune").glob("times-*.json"))
    assert not any("cache" in n for n in first_context.notes)
    second, second_context = _quantize(tmp_path, autotune=True)
    assert any("from this machine's cache" in n for n in second_context.notes)
    assert second.metadata_props[METADATA_KEY] == first.metadata_props[METADATA_KEY]
    assert [n.op_type for n in second.graph] == [n.op_type for n in first.graph]
    # Other settings are another key: measured again.
    _, context = _quantize(tmp_path, autotune=True, calib_method="minmax")
    assert not any("cache" in n for n in context.notes)
