"""Zero-invariant groups: members, unit counts, shares, prunable vs blocked."""

from __future__ import annotations

import json

import numpy as np

from graphopt.analysis.zig import analyze
from graphopt_tests.analysis import zig_graphs as G


def _group_with(report, tensor: str, axis: int):
    for group in report.groups:
        if any(m.tensor == tensor and m.axis == axis for m in group.members):
            return group
    raise AssertionError(f"no group holds {tensor}[{axis}]")


def test_conv_output_channel_group_members() -> None:
    report = analyze(G.residual())
    group = _group_with(report, "c1.w", 0)
    assert group.prunable and group.size == 8
    members = {(m.tensor, m.axis) for m in group.members}
    assert members == {("c1.w", 0), ("c1.b", 0), ("c2.w", 1), ("c2.w", 0), ("c2.b", 0), ("c3.w", 1)}
    c3 = next(m for m in group.members if m.tensor == "c3.w")
    assert [u.tolist() for u in c3.units] == [[k] for k in range(8)]


def test_blocked_groups_keep_their_reason() -> None:
    report = analyze(G.residual())
    blocked = {r for g in report.groups if not g.prunable for r in g.reasons}
    assert blocked == {"graph input", "graph output"}
    assert all(g.prunable for g in report.groups[: len(report.prunable)])  # prunable first


def test_heads_group_units_are_whole_heads() -> None:
    report = analyze(G.attention(kv_heads=2))
    group = _group_with(report, "wq", 1)
    assert group.prunable and group.size == 2
    wq = next(m for m in group.members if m.tensor == "wq")
    np.testing.assert_array_equal(wq.units[0], np.arange(8))
    wk = next(m for m in group.members if m.tensor == "wk")
    np.testing.assert_array_equal(wk.units[1], np.arange(4, 8))


def test_shares_are_fractions_and_prunable_flops_are_covered() -> None:
    report = analyze(G.residual())
    group = _group_with(report, "c1.w", 0)
    assert 0 < group.flops_share <= 1 and 0 < group.params_share <= 1
    # all three convs touch the 8-channel group
    assert report.prunable_flops_share > 0.95


def test_layernorm_blocks_with_reason_and_json_round_trips() -> None:
    report = analyze(G.mlp_with_norm("layernorm"))
    assert not report.prunable
    data = json.loads(json.dumps(report.to_json()))
    assert data["prunable"] == 0 and data["groups"] == len(report.groups)
    assert any("LayerNormalization" in r["reason"] for r in data["top_reasons"])
    assert {"tensor", "axis", "indices"} <= set(data["group_list"][0]["members"][0])


def test_unit_indices_cover_every_dim() -> None:
    report = analyze(G.concat())
    group = _group_with(report, "b.w", 0)
    chosen = group.unit_indices([0])
    sizes = {k: len(v) for k, v in chosen.items()}
    assert sizes[("bn_s", 0)] == 1 and sizes[("c.w", 1)] == 1
    assert sum(sizes.values()) == len(group.dims) - sum(1 for v in chosen.values() if len(v) == 0)


def test_cli_analyze_table_and_json(tmp_path, capsys) -> None:
    from graphopt import io
    from graphopt.cli import main

    path = tmp_path / "attn.onnx"
    io.save(G.attention(kv_heads=2), path)
    assert main(["analyze", str(path)]) == 0
    text = capsys.readouterr().out
    assert "3 groups: 1 prunable, 2 blocked" in text and "graph output" in text
    assert main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prunable"] == 1 and data["group_list"][0]["size"] == 2


def test_old_ir_initializer_inputs_are_parameters() -> None:
    """IR < 4 lists every initializer as a graph input too: they are still weights, as
    optimize's initializer-inputs pass treats them, and the model is left as it was."""
    from graphopt.passes.pruning.zig_check import check_groups

    expected = analyze(G.residual())
    model = G.residual()
    model.ir_version = 3
    model.graph.inputs.extend(model.graph.initializers.values())
    inputs = [v.name for v in model.graph.inputs]
    report = analyze(model)
    assert [g.size for g in report.prunable] == [g.size for g in expected.prunable]
    assert report.prunable
    assert check_groups(model, report).ok
    assert model.ir_version == 3 and [v.name for v in model.graph.inputs] == inputs
