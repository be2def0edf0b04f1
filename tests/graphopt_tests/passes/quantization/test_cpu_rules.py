"""The CPU rule table: which int8 activation type ``--target ort`` takes when none is given,
and the record of that choice in the output (the same options give another file on another
CPU family, so the file must say which choice made it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphopt.passes.quantization import cpu_rules
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import run_pass
from graphopt_tests.passes.quantization.test_int8_rounding import _calib_file, matmul_model


def test_this_machine_has_a_row_of_the_table() -> None:
    assert cpu_rules.cpu_family() in cpu_rules.RULES
    assert cpu_rules.activation_type_for_this_cpu() in ("u8", "s8")


@pytest.mark.parametrize(("family", "expected"), [("arm64", "s8"), ("x86-vnni", "u8")])
def test_the_table_choice_is_recorded_with_its_cpu_family(
    tmp_path: Path, monkeypatch, family: str, expected: str
) -> None:
    monkeypatch.setattr(cpu_rules, "cpu_family", lambda: family)
    model = matmul_model()
    context = PassContext(target="ort")
    calib = _calib_file(tmp_path, model)
    model, _ = run_pass(model, QuantizePass, context, mode="int8", calib=calib)
    record = json.loads(model.metadata_props[cpu_rules.CPU_RULE_KEY])
    assert record == {"activation_type": expected, "cpu_family": family}
    notes = context.details["quantize"].notes
    assert any(f"--activation-type {expected} gives the same file on any CPU" in n for n in notes)
    zero_points = [v for n, v in model.graph.initializers.items() if n.endswith("zero_point")]
    assert zero_points
    assert {zp.const_value.dtype.name.lower() for zp in zero_points} >= {
        "uint8" if expected == "u8" else "int8"
    }


def test_no_record_when_the_type_is_given_or_the_target_is_portable(tmp_path: Path) -> None:
    for target, given in (("ort", {"activation_type": "u8"}), ("", {})):
        model = matmul_model()
        calib = _calib_file(tmp_path, model)
        model, _ = run_pass(
            model, QuantizePass, PassContext(target=target), mode="int8", calib=calib, **given
        )
        assert cpu_rules.CPU_RULE_KEY not in model.metadata_props
