"""The channel dependency graph: per-rule couplings and their index mappings."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.analysis.channel_shapes import reshape_groups
from graphopt.analysis.dependency import build_dependency_graph
from graphopt.analysis.shape_entries import DimRef, entry_sinks, shape_source
from graphopt_tests.analysis import zig_graphs as G


def _units(graph, key):
    """Unit label of every channel of dim ``key`` (equal labels: removed together)."""
    labels = graph.element_components()
    dim = graph.dims[key]
    return labels[dim.offset : dim.offset + dim.size]


def _same_unit(graph, a, i, b, j) -> bool:
    return _units(graph, a)[i] == _units(graph, b)[j]


def _reasons(graph, key) -> set[str]:
    """Block reasons anywhere in the group of dims holding ``key``."""
    comp = next(c for c in graph.dim_components() if key in c)
    return {r for k in comp for r in graph.dims[k].blocked}


def test_residual_add_couples_both_sides_one_to_one() -> None:
    g = build_dependency_graph(G.residual())
    for k in range(8):
        assert _same_unit(g, ("c1.w", 0), k, ("c2.w", 0), k)
        assert _same_unit(g, ("c1.w", 0), k, ("c3.w", 1), k)
    assert not _same_unit(g, ("c1.w", 0), 0, ("c1.w", 0), 1)
    assert not g.dims[("c1.w", 0)].blocked


def test_concat_offsets_and_batchnorm_params() -> None:
    g = build_dependency_graph(G.concat())
    for k in range(6):  # b's channel k is concat channel 4 + k
        assert _same_unit(g, ("b.w", 0), k, ("bn_s", 0), 4 + k)
        assert _same_unit(g, ("b.w", 0), k, ("c.w", 1), 4 + k)
    assert _same_unit(g, ("a.w", 0), 3, ("bn_m", 0), 3)
    assert not _same_unit(g, ("a.w", 0), 0, ("b.w", 0), 0)


def test_concat_of_a_repeated_input_couples_every_copy() -> None:
    g = build_dependency_graph(G.concat(repeat=True))
    for k in range(4):
        assert _same_unit(g, ("a.w", 0), k, ("c.w", 1), k)
        assert _same_unit(g, ("a.w", 0), k, ("c.w", 1), 10 + k)


def test_depthwise_is_per_channel_grouped_conv_is_per_group() -> None:
    g = build_dependency_graph(G.grouped())
    units = _units(g, ("c1.w", 0))
    # group=2 over 8 channels: channels 0-3 and 4-7 go together
    assert len(set(units[:4])) == 1 and len(set(units[4:])) == 1 and units[0] != units[4]
    assert _same_unit(g, ("dw.w", 0), 5, ("c1.w", 0), 5)
    assert ("g2.w", 1) not in g.dims  # per-group input axis is never a channel dim


def test_slice_and_split_offsets() -> None:
    g = build_dependency_graph(G.channel_slice())
    for k in range(4):  # Slice [2, 6): c2 input k is c1 output 2 + k
        assert _same_unit(g, ("c1.w", 0), 2 + k, ("c2.w", 1), k)
    # Split [3, 5] then Concat(p1, p0): c1 channel 3 + k is concat channel k
    assert _same_unit(g, ("c1.w", 0), 3, ("c3.w", 1), 0)
    assert _same_unit(g, ("c1.w", 0), 0, ("c3.w", 1), 5)


def test_group_norm_units_are_whole_groups() -> None:
    g = build_dependency_graph(G.group_norm())
    units = _units(g, ("c1.w", 0))
    assert [len(set(units[i : i + 2])) for i in range(0, 8, 2)] == [1, 1, 1, 1]
    assert len(set(units)) == 4
    np.testing.assert_array_equal(_units(g, ("gn_s", 0)), units)


def test_conv_flatten_gemm_maps_a_channel_to_its_block_of_features() -> None:
    g = build_dependency_graph(G.conv_flatten_gemm())
    units = _units(g, ("fc.w", 1))
    np.testing.assert_array_equal(units, np.repeat(_units(g, ("c1.w", 0)), 4))


def test_attention_heads_couple_q_k_v_columns_and_output_rows() -> None:
    g = build_dependency_graph(G.attention())
    q, k, v, o = (_units(g, key) for key in (("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)))
    np.testing.assert_array_equal(q, k)
    np.testing.assert_array_equal(q, v)
    np.testing.assert_array_equal(q, o)
    assert len(set(q)) == 4  # one unit per head
    assert len(set(q[:4])) == 1  # head 0 = columns 0..3


def test_gqa_couples_each_kv_head_with_its_query_group() -> None:
    g = build_dependency_graph(G.attention(kv_heads=2))
    q, k = _units(g, ("wq", 1)), _units(g, ("wk", 1))
    assert len(set(q)) == 2
    # kv head 0 (k columns 0..3) serves query heads 0 and 1 (q columns 0..7)
    assert set(q[:8]) == {k[0]} and set(k[:4]) == {k[0]}
    assert set(q[8:]) == {k[4]}


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("layernorm", "LayerNormalization normalizes"),
        ("rmsnorm", "ReduceMean reduces over the channel axis"),
        ("custom", "no dependency rule for custom.ops.Mystery"),
        # A zeroed channel turns inf/NaN there, and 0 · inf = NaN after it (removed: gone).
        ("Reciprocal", "Reciprocal is not finite at 0"),
        ("Log", "Log is not finite at 0"),
        ("Acosh", "Acosh is not finite at 0"),
        ("divide-by-channel", "Div by the channel"),
        ("negative-power", "Pow of the channel to a power that may be negative"),
    ],
)
def test_blocking_ops_say_why(kind: str, reason: str) -> None:
    g = build_dependency_graph(G.mlp_with_norm(kind))
    assert any(reason in r for r in _reasons(g, ("w1", 1)))


def test_a_divisor_that_is_never_zero_does_not_block() -> None:
    # sqrt(|h| + eps) is eps at a zeroed channel: dividing by it stays finite.
    g = build_dependency_graph(G.mlp_with_norm("divide-by-channel-plus-eps"))
    assert not _reasons(g, ("w1", 1))


def test_graph_inputs_and_outputs_block() -> None:
    g = build_dependency_graph(G.residual())
    assert "graph input" in g.dims[("x", 1)].blocked
    assert "graph output" in g.dims[("c3", 1)].blocked


def test_analysis_does_not_touch_the_model() -> None:
    model = G.attention()
    before = {n: v.shape for n, v in model.graph.initializers.items()}
    shapes = [str(v.shape) for node in model.graph for v in node.outputs]
    build_dependency_graph(model)
    assert {n: v.shape for n, v in model.graph.initializers.items()} == before
    assert [str(v.shape) for node in model.graph for v in node.outputs] == shapes


def test_reshape_groups() -> None:
    assert reshape_groups((1, 16, 128), (1, 16, 4, 32))[0] == [
        ([0], [0]),
        ([1], [1]),
        ([2], [2, 3]),
    ]
    assert reshape_groups((1, 4, 2, 2), (1, 16))[0] == [([0], [0]), ([1, 2, 3], [1])]
    groups, _, solved = reshape_groups(("batch", 16, 128), (1, 16, "?", 32))
    assert solved[2] == 4 and groups[-1] == ([2], [2, 3])
    assert reshape_groups((6,), (4,)) is None


def test_run_time_reshape_targets_map_heads_like_constant_ones() -> None:
    """TorchScript's Shape → Gather/Slice → Concat targets: q/k/v columns of the packed qkv
    Gemm and output-projection rows couple per head, and nothing blocks."""
    for head_entry in (-1, 4):
        g = build_dependency_graph(G.attention_shape_targets(head_entry=head_entry))
        qkv, o = _units(g, ("w_qkv", 1)), _units(g, ("wo", 0))
        q, k, v = qkv[:16], qkv[16:32], qkv[32:]
        np.testing.assert_array_equal(q, k)
        np.testing.assert_array_equal(q, v)
        np.testing.assert_array_equal(q, o)
        assert len(set(q)) == 4 and len(set(q[:4])) == 1  # whole heads of head_dim 4
        assert not _reasons(g, ("wo", 0))


def test_shape_entries_are_traced_to_their_source() -> None:
    g = build_dependency_graph(G.attention_shape_targets())
    ctx = g.context
    values = {o.name: o for node in g.model.graph for o in node.outputs}
    values["x"] = g.model.graph.inputs[0]
    assert shape_source(ctx, values["q_t"], 2) == -1  # n_head: a constant piece
    assert shape_source(ctx, values["q_t"], 3) == 4  # head_dim
    assert shape_source(ctx, values["q_t"], 0) == DimRef(values["q"], 0)  # batch, symbolic
    # x.view(-1, x.size(-1)): Slice(Shape(x), -1:) → Squeeze → Unsqueeze → Concat
    assert shape_source(ctx, values["x_rows_t"], 1) == DimRef(values["x"], 2)
    # Shape(merged)[2] only ends up as entry 1 of the Reshape that flattens merged itself.
    reshape = values["merged_rows"].producer()
    assert entry_sinks(ctx, values["merged_shape"], 2) == [(reshape, 1, 1)]
    assert entry_sinks(ctx, values["merged_shape"], 0) == []  # Slice -1: drops the batch


def test_arithmetic_on_a_channel_count_blocks() -> None:
    g = build_dependency_graph(G.attention_shape_targets(computed_head_dim=True))
    assert "Shape reads the channel count (the channel count is used by Div)" in _reasons(
        g, ("wo", 0)
    )


def test_reshape_zero_entry_follows_the_input_channel_axis() -> None:
    g = build_dependency_graph(G.reshape_zero_entry())
    np.testing.assert_array_equal(_units(g, ("c1.w", 0)), _units(g, ("wm", 0)))
    assert not _reasons(g, ("wm", 0))


def test_run_time_repeat_kv_and_rotary_bounds_map_like_constant_ones() -> None:
    """LLaMA's TorchScript GQA: ``Shape(k)[1] * n_rep`` heads behind the ``Where(Equal(t,
    -1), 1, t)`` guard, rotate_half slicing head_dim at a run-time bound."""
    g = build_dependency_graph(G.gqa_shape_targets())
    q, k, v, o = (_units(g, key) for key in (("wq", 1), ("wk", 1), ("wv", 1), ("wo", 0)))
    np.testing.assert_array_equal(k, v)
    np.testing.assert_array_equal(q, o)
    assert set(q[:8]) == {k[0]} and set(q[8:]) == {k[4]} and k[0] != k[4]
    assert not _reasons(g, ("wq", 1))


def test_scaled_shape_entries() -> None:
    g = build_dependency_graph(G.gqa_shape_targets())
    values = {o.name: o for node in g.model.graph for o in node.outputs}
    # kv heads × n_rep, and the guarded Expand target entry (the guard never fires)
    assert shape_source(g.context, values["k_mt"], 1) == DimRef(values["k_r"], 1, 2)
    assert shape_source(g.context, values["k_target_guarded"], 1) == DimRef(values["k_r"], 1)
    assert shape_source(g.context, values["k_target_guarded"], 2) == 2
    sinks = entry_sinks(g.context, values["k_r_shape"], 1)
    by_op = sorted((node.op_type, position, factor) for node, position, factor in sinks)
    assert by_op == [("Expand", 1, 1), ("Reshape", 1, 2)]
