"""Raising the default-domain opset: exact conversions pass, interface changes are refused."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import opset
from graphopt.errors import UserInputError
from graphopt.opset import convert_opset, default_opset, raise_in_place
from graphopt.verify import run_model


def _scan_8() -> ir.Model:
    """A Scan at opset 8, whose inputs carry a batch axis that Scan 9 no longer has."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
            helper.make_node("Identity", ["sum_out"], ["scan_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("sum_in", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("next", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("sum_out", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2]),
        ],
    )
    scan = helper.make_node("Scan", ["", "initial", "x"], ["y", "z"], body=body, num_scan_inputs=1)
    graph = helper.make_graph(
        [scan],
        "g",
        [
            helper.make_tensor_value_info("initial", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 4
    return ir.serde.deserialize_model(model)


def _relu(opset: int) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return ir.serde.deserialize_model(model)


def test_an_exact_conversion_keeps_the_interface_and_says_so() -> None:
    converted, note = convert_opset(_relu(11), 17)
    assert default_opset(converted) == 17 and note == "converted default-domain opset 11 -> 17"
    assert [v.name for v in converted.graph.inputs] == ["x"]


def test_a_conversion_keeps_the_declared_dims_unnamed() -> None:
    """The converter's shape inference names what the model left unnamed (``unk__1``); the
    written interface is the model's own."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    proto.ir_version = 7
    model = ir.serde.deserialize_model(proto)
    converted, _ = convert_opset(model, 13)
    assert [list(v.shape) for v in (*converted.graph.inputs, *converted.graph.outputs)] == [
        list(v.shape) for v in (*model.graph.inputs, *model.graph.outputs)
    ]
    assert "unk__" not in str(converted.graph.outputs[0].shape)


def test_large_weights_cross_the_converter_as_references_and_come_back_unread(tmp_path) -> None:
    """A 1 GB model converted as bytes peaked at 3.5 GB (the proto, the converter's copy,
    the tensors read back): weights over INLINE_BYTES now go through as references and the
    converted model holds the very tensor objects, unread (external data stays on disk)."""
    from graphopt import io as graphopt_io

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)  # 128 KiB
    branch_w = rng.standard_normal((512, 64)).astype(np.float32)
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "bw"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(branch_w, "bw")],
    )
    other = helper.make_graph(
        [helper.make_node("ReduceSum", ["h"], ["e"], axes=[1], keepdims=1)],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 1])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    proto.ir_version = 7
    path = tmp_path / "m.onnx"
    graphopt_io.save(ir.serde.deserialize_model(proto), path, external_data=True)
    model = graphopt_io.load(path).model
    tensors = {v.name: v.const_value for g in model.graphs() for v in g.initializers.values()}
    assert isinstance(tensors["w"], ir.ExternalTensor)
    converted, _ = convert_opset(model, 13)
    after = {v.name: v.const_value for g in converted.graphs() for v in g.initializers.values()}
    assert after["w"] is tensors["w"] and after["bw"] is tensors["bw"]
    # The model it was given is whole again too.
    assert {v.name: v.const_value for v in model.graph.initializers.values()}["w"] is tensors["w"]
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32), "c": np.array(True)}
    np.testing.assert_array_equal(run_model(converted, feeds)[0], run_model(model, feeds)[0])


def test_a_conversion_that_changes_the_inputs_is_refused() -> None:
    """The onnx converter turns Scan 8 into Scan 9 by dropping the batch axis from the
    graph's inputs: int8-dynamic (which needs opset 11) then failed with exit 1."""
    with pytest.raises(UserInputError, match=r"changes the model's interface \('initial' \[1, 2\]"):
        convert_opset(_scan_8(), 11)


def test_a_model_without_a_default_domain_import_is_refused_in_words() -> None:
    """onnx's converter asserted in C++ ("assertInVersionRange ... between 1 an") on a model
    that imports only other domains (the training ops' ai.onnx.preview.training)."""
    graph = helper.make_graph(
        [helper.make_node("Custom", ["x"], ["y"], domain="example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("example", 1)])
    model.ir_version = 8
    with pytest.raises(UserInputError, match="imports no default-domain"):
        convert_opset(ir.serde.deserialize_model(model), 11)


# onnx's version converter changes what some ops compute: Resize/Upsample from opset 10 lose
# their asymmetric coordinates, Hardmax before 13 its flattening, GroupNormalization 18 its
# per-group scale. graphopt converts the first two exactly, refuses the third by name, and
# runs every conversion before and after in ONNX Runtime.


def _model(nodes, inputs, opset: int, inits=(), ir_version: int = 6) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return ir.serde.deserialize_model(model)


def _resize(op: str, mode: str, scales: list[float], opset: int) -> ir.Model:
    return _model(
        [helper.make_node(op, ["x", "sc"], ["y"], mode=mode)],
        [("x", ["N", 2, 9, 10])],
        opset,
        [("sc", np.array(scales, np.float32))],
        ir_version=5 if opset >= 10 else 4,
    )


def _hardmax(axis: int | None) -> ir.Model:
    kwargs = {} if axis is None else {"axis": axis}
    return _model(
        [helper.make_node("Hardmax", ["x"], ["y"], **kwargs)], [("x", ["N", 3, 4, 5])], 11
    )


def _same_outputs(before: ir.Model, after: ir.Model) -> None:
    x = np.random.default_rng(3).standard_normal((2, *before.graph.inputs[0].shape[1:]))
    feeds = {before.graph.inputs[0].name: x.astype(np.float32)}
    np.testing.assert_allclose(run_model(after, feeds)[0], run_model(before, feeds)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("op", "mode", "scales", "opset", "version"),
    [
        ("Resize", "linear", [1, 1, 2, 2], 10, 11),  # was off by 0.55 (half_pixel)
        ("Resize", "linear", [1, 1, 2, 2], 10, 13),
        ("Resize", "linear", [1, 1, 0.5, 0.7], 10, 13),
        ("Upsample", "linear", [1, 1, 2, 2], 9, 11),
        ("Resize", "nearest", [1, 1, 1.5, 2.5], 10, 13),
        ("Resize", "nearest", [1, 1, 0.6, 0.5], 10, 13),  # ORT rounds up when downsampling
        ("Upsample", "nearest", [1, 1, 2, 3], 9, 13),
    ],
)
def test_resize_and_upsample_from_opset_10_keep_their_coordinates(
    op, mode, scales, opset, version
) -> None:
    model = _resize(op, mode, scales, opset)
    converted, note = convert_opset(model, version)
    assert note == f"converted default-domain opset {opset} -> {version}"
    resize = next(n for n in converted.graph if n.op_type == "Resize")
    assert resize.attributes["coordinate_transformation_mode"].as_string() == "asymmetric"
    _same_outputs(model, converted)


def test_a_nearest_resize_10_scaling_up_and_down_at_once_is_refused() -> None:
    """ORT rounds the index down on axes that upsample and up on those that downsample; no
    single opset-11 nearest_mode does both."""
    with pytest.raises(UserInputError, match=r"--opset 13: cannot convert a nearest Resize"):
        convert_opset(_resize("Resize", "nearest", [1, 1, 0.6, 2], 10), 13)


@pytest.mark.parametrize("axis", [None, 0, 1, 2, -2, -1, 3])
def test_hardmax_before_13_keeps_its_flattening(axis) -> None:
    """The converter kept Hardmax's axis, so Hardmax(axis=1) over a 4-D input went from
    one 1 per row of the flattened 2-D input to one 1 per axis-1 fiber: off by 1.0."""
    model = _hardmax(axis)
    converted, _ = convert_opset(model, 13)
    _same_outputs(model, converted)
    flattened = any(n.op_type == "Flatten" for n in converted.graph)
    assert flattened == (axis not in (-1, 3))


def _group_norm_18(scale_input: bool = False) -> ir.Model:
    node = helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], num_groups=2)
    inputs = [("x", ["N", 4, 3, 3])] + ([("g", [2])] if scale_input else [])
    inits = [("b", np.array([0.1, -0.3], np.float32))]
    if not scale_input:
        inits.append(("g", np.array([0.5, 2.0], np.float32)))
    return _model([node], inputs, 18, inits, ir_version=8)


def test_group_normalization_18_to_21_repeats_scale_and_bias_per_channel() -> None:
    """The converter kept the per-group scale and bias that 21 reads per channel: ORT could
    not run the result ("Attempting to broadcast an axis by a dimension other than 1")."""
    model = _group_norm_18()
    converted, _ = convert_opset(model, 21)
    node = next(iter(converted.graph))
    assert [v.shape.dims for v in node.inputs[1:]] == [(4,), (4,)]
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), [0.5, 0.5, 2.0, 2.0])
    _same_outputs(model, converted)


def test_group_normalization_with_a_scale_input_is_refused_by_name() -> None:
    with pytest.raises(
        UserInputError,
        match=r"^--opset 21: cannot convert GroupNormalization from opset 18 to 21: .* not "
        "initializers",
    ):
        convert_opset(_group_norm_18(scale_input=True), 21)
    assert default_opset(convert_opset(_group_norm_18(scale_input=True), 20)[0]) == 20


def test_a_conversion_that_changes_the_outputs_is_refused(monkeypatch) -> None:
    """Any adapter graphopt does not know about: the conversion is run before and after in
    ORT on generated inputs (here the Resize fix is switched off to stand for one)."""
    monkeypatch.setattr(opset, "_keep_resize_10_semantics", lambda *args: None, raising=False)
    with pytest.raises(
        UserInputError,
        match=r"^--opset 11: converting opset 10 -> 11 changes what the model computes "
        r"\(output 'y' off by 0\.\d+\); onnx's version converter .*: give the model at opset "
        r"11 from its exporter$",
    ):
        convert_opset(_resize("Resize", "linear", [1, 1, 2, 2], 10), 11)


def test_quantization_names_itself_when_its_opset_raise_changes_the_model(monkeypatch) -> None:
    """--quantize int8 raised the opset through the same converter, and verification then
    reported the conversion's error as quantization error (exit 0)."""
    monkeypatch.setattr(opset, "_keep_resize_10_semantics", lambda *args: None, raising=False)
    with pytest.raises(UserInputError, match=r"^per-channel .* needs opset 13, so graphopt"):
        raise_in_place(
            _resize("Resize", "linear", [1, 1, 2, 2], 10), 13, "per-channel X needs opset 13"
        )


def test_a_model_that_cannot_run_is_converted_with_a_note() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [("x", None)], 11)
    converted, note = convert_opset(model, 13)
    assert default_opset(converted) == 13
    assert note.startswith("converted default-domain opset 11 -> 13 (not checked on its own: ")
