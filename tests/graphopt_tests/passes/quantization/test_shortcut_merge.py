"""Summed pointwise Convs merged into one Conv over their concatenated inputs: exact in float
(ORT, two batch sizes), strided shortcuts subsampled, only plain 1x1 Convs whose outputs only
the Add reads, ``--target ort`` static int8 only, and reported: the per-layer table shows the
merged layers in int8, the fidelity stays measured against the unmerged float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.passes.quantization import shortcut_merge
from graphopt.passes.quantization.quantize import QuantizePass
from graphopt.registry import PassContext
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    random_calib,
    run_pass,
    tensor_info,
)


def block(
    shortcut_stride: int = 2,
    main_kernel: int = 1,
    shortcut_extra_use: bool = False,
    output_is_sum: bool = False,
    c_out: int = 16,
) -> ir.Model:
    """A bottleneck with a projection shortcut:
    x [N, 8, 12, 12] -> Conv 3x3 (stride s) -> Relu -> Conv main -> Add <- Conv 1x1 (stride s)
    <- x; then Relu -> y (or the sum itself is y)."""
    rng = np.random.default_rng(0)
    s = shortcut_stride
    inits = {
        "w_in": rng.standard_normal((6, 8, 3, 3)).astype(np.float32) * 0.3,
        "w_main": rng.standard_normal((c_out, 6, main_kernel, main_kernel)).astype(np.float32),
        "b_main": rng.standard_normal(c_out).astype(np.float32),
        "w_short": rng.standard_normal((c_out, 8, 1, 1)).astype(np.float32),
        "b_short": rng.standard_normal(c_out).astype(np.float32),
    }
    pad = main_kernel // 2
    nodes = [
        helper.make_node(
            "Conv", ["x", "w_in"], ["h0"], name="conv_in", pads=[1] * 4, strides=[s, s]
        ),
        helper.make_node("Relu", ["h0"], ["h"], name="relu_in"),
        helper.make_node(
            "Conv", ["h", "w_main", "b_main"], ["m"], name="conv_main", pads=[pad] * 4
        ),
        helper.make_node(
            "Conv", ["x", "w_short", "b_short"], ["sc"], name="conv_short", strides=[s, s]
        ),
        helper.make_node("Add", ["m", "sc"], ["y" if output_is_sum else "sum"], name="add"),
    ]
    outputs = [tensor_info("y", TensorProto.FLOAT, ["N", c_out, 12 // s, 12 // s])]
    if not output_is_sum:
        nodes.append(helper.make_node("Relu", ["sum"], ["y"], name="relu_out"))
    if shortcut_extra_use:
        nodes.append(helper.make_node("Neg", ["sc"], ["z"], name="also_reads_shortcut"))
        outputs.append(tensor_info("z", TensorProto.FLOAT, ["N", c_out, 12 // s, 12 // s]))
    return make_model(
        nodes, [tensor_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])], outputs, inits
    )


def _feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(5).standard_normal((batch, 8, 12, 12), np.float32)}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("output_is_sum", [False, True])
def test_merging_is_exact(stride, output_is_sum) -> None:
    model = block(stride, output_is_sum=output_is_sum)
    before = model.clone()
    merged = shortcut_merge.merge_summed_pointwise_convs(model)
    assert [(p.add, p.convs) for p in merged] == [("add", ("conv_main", "conv_short"))]
    types = op_types(model)
    assert "Add" not in types and types.count("Conv") == 2 and "Concat" in types
    assert ("MaxPool" in types) == (stride == 2)
    conv = next(n for n in model.graph if n.name == merged[0].name)
    assert conv.inputs[1].const_value.numpy().shape == (16, 6 + 8, 1, 1)
    assert [v.name for v in model.graph.outputs] == ["y"]
    for batch in (1, 3):  # N is symbolic
        assert_same_outputs(before, model, _feeds(batch), tolerance=1e-5)
    assert "conv_main + conv_short" in shortcut_merge.note(merged)


@pytest.mark.parametrize(
    "kwargs",
    [{"main_kernel": 3}, {"shortcut_extra_use": True}, {"c_out": 12}],
    ids=[
        "a 3x3 Conv in the sum",
        "the shortcut's output read elsewhere too",
        "inputs wider than the output (6 + 8 > 12)",
    ],
)
def test_sums_outside_the_conditions_are_left_alone(kwargs) -> None:
    model = block(**kwargs)
    assert shortcut_merge.merge_summed_pointwise_convs(model) == []
    assert "Concat" not in op_types(model)


def test_an_excluded_conv_is_not_merged() -> None:
    model = block()
    merged = shortcut_merge.merge_summed_pointwise_convs(
        model, lambda node: node.name == "conv_short"
    )
    assert merged == [] and "Add" in op_types(model)


def _calib(tmp_path: Path) -> str:
    return random_calib(tmp_path, (32, 8, 12, 12))


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_static_int8_merges_for_ort_only(tmp_path, target) -> None:
    context = PassContext(target=target)
    quantized, _ = run_pass(block(), QuantizePass, context, mode="int8", calib=_calib(tmp_path))
    record = context.details["quantize"]
    merged = target == "ort"
    assert any("merged into one Conv" in note for note in record.notes) == merged
    assert ("Concat" in op_types(quantized)) == merged
    assert ("Add" in op_types(quantized)) != merged
    # The per-layer table still lists the original layers, all in int8.
    layers = {layer.node: layer for layer in record.layers}
    for name in ("conv_main", "conv_short", "add"):
        assert layers[name].precision == "int8"
        assert ("merged into" in layers[name].reason) == merged
    # Fidelity against the unmerged float original, and it holds.
    cosines = [f.mean_cosine for rows in record.fidelity.values() for f in rows]
    assert cosines and min(cosines) > 0.995


def _sum_of_convs(
    convs: list[tuple[str, str, int]], channels: int = 4, out: int = 16, size: int = 8
) -> ir.Model:
    """Convs (name, input, stride) 1x1 -> summed left to right -> y; inputs [N, channels,
    size, size] named as the Convs read them. No biases."""
    rng = np.random.default_rng(3)
    inits, nodes, total = {}, [], None
    for name, x, stride in convs:
        inits[f"w_{name}"] = rng.standard_normal((out, channels, 1, 1)).astype(np.float32)
        nodes.append(
            helper.make_node(
                "Conv", [x, f"w_{name}"], [f"o_{name}"], name=name, strides=[stride, stride]
            )
        )
        if total is not None:
            nodes.append(
                helper.make_node("Add", [total, f"o_{name}"], [f"s_{name}"], name=f"add_{name}")
            )
            total = f"s_{name}"
        else:
            total = f"o_{name}"
    nodes.append(helper.make_node("Relu", [total], ["y"], name="relu"))
    xs = sorted({x for _, x, _ in convs})
    stride = max(s for _, _, s in convs)
    return make_model(
        nodes,
        [tensor_info(x, TensorProto.FLOAT, ["N", channels, size, size]) for x in xs],
        [tensor_info("y", TensorProto.FLOAT, ["N", out, size // stride, size // stride])],
        inits,
    )


def _feeds_for(model: ir.Model, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {
        v.name: rng.standard_normal((batch, *v.shape.dims[1:])).astype(np.float32)
        for v in model.graph.inputs
    }


def test_two_strided_convs_of_the_same_input_get_distinct_names() -> None:
    model = _sum_of_convs([("c1", "x", 2), ("c2", "x", 2)])
    before = model.clone()
    merged = shortcut_merge.merge_summed_pointwise_convs(model)
    assert len(merged) == 1 and op_types(model).count("MaxPool") == 2
    names = [o.name for n in model.graph for o in n.outputs]
    assert len(names) == len(set(names))
    for batch in (1, 2):
        assert_same_outputs(before, model, _feeds_for(before, batch), tolerance=1e-5)


def test_new_names_do_not_clash_with_existing_nodes() -> None:
    model = _sum_of_convs([("c1", "h", 1), ("c2", "x", 1)])
    # A node already called what the merged Conv would be called.
    relu = next(n for n in model.graph if n.name == "relu")
    relu.name = "c1_merged"
    before = model.clone()
    (pair,) = shortcut_merge.merge_summed_pointwise_convs(model)
    assert pair.name != "c1_merged"
    node_names = [n.name for n in model.graph]
    assert len(node_names) == len(set(node_names))
    assert_same_outputs(before, model, _feeds_for(before, 2), tolerance=1e-5)


def test_a_merged_conv_merged_again_is_reported_under_its_final_name(tmp_path) -> None:
    # Add(Add(Conv(h), Conv(x)), Conv(z)): merged twice, every original layer maps to the last.
    model = _sum_of_convs([("c1", "h", 1), ("c2", "x", 1), ("c3", "z", 1)])
    before = model.clone()
    merged = shortcut_merge.merge_summed_pointwise_convs(model)
    assert len(merged) == 2 and "Add" not in op_types(model)
    final = shortcut_merge.final_names(merged)
    originals = {"c1", "c2", "c3", "add_c2", "add_c3"}
    assert originals <= set(final)  # and the first merged Conv, merged again
    assert set(final.values()) == {merged[-1].name}
    assert_same_outputs(before, model, _feeds_for(before, 2), tolerance=1e-5)
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(path, **{x: rng.standard_normal((16, 4, 8, 8), np.float32) for x in "hxz"})
    context = PassContext(target="ort")
    run_pass(before, QuantizePass, context, mode="int8", calib=str(path))
    layers = {layer.node: layer for layer in context.details["quantize"].layers}
    for name in originals:
        assert layers[name].precision == "int8", layers[name]
        assert layers[name].reason.startswith(f"merged into {merged[-1].name}")


def test_unknown_dims_are_not_taken_for_equal_ones(monkeypatch) -> None:
    # A broadcasting Add ([N,16,1,1] + [N,16,8,8]) whose shapes inference could not fill in:
    # two unknown dims must not pass for the same size.
    import onnx_ir.passes.common

    model = _sum_of_convs([("c1", "h", 1), ("c2", "x", 1)])
    for node in model.graph:
        for value in node.outputs:
            if value.name in ("o_c1", "o_c2"):
                value.shape = ir.Shape([None, 16, None, None])
    monkeypatch.setattr(
        onnx_ir.passes.common.ShapeInferencePass,
        "call",
        lambda self, m: onnx_ir.passes.PassResult(m, False),
    )
    assert shortcut_merge.merge_summed_pointwise_convs(model) == []
