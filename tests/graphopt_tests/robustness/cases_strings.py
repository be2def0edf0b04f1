"""Hostile cases 21: corrupt string fields (names, doc strings, attribute strings, metadata),
and attributes a flipped byte elsewhere breaks (no type, a list of the wrong length).

Bytes flipped inside string fields keep the protobuf framing intact, so the file parses and
the damage reaches every later stage: invalid UTF-8 (which protobuf hands to Python as
``bytes``), renamed values (dangling references), unknown op types, attribute names and
values, control characters. The model has a bit of everything that holds text.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt_tests.robustness.build import F, _add, vi, writer
from graphopt_tests.robustness.stringflip import flip_in_strings


def text_rich_model() -> onnx.ModelProto:
    """Conv (auto_pad) → Pad (mode) → Einsum (equation) → If → Relu, with every kind of text."""
    rng = np.random.default_rng(3)
    w = onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w")
    w.doc_string = "conv weight"
    pads = onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    cond = onnx.numpy_helper.from_array(np.array(True), "cond")
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["e"], ["t"], name="then_relu", doc_string="then doc")],
        "then_branch",
        [],
        [vi("t", F, ["batch", 2, 6, 6])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["e"], ["n"], name="else_neg")],
        "else_branch",
        [],
        [vi("n", F, ["batch", 2, 6, 6])],
    )
    nodes = [
        helper.make_node(
            "Conv", ["x", "w"], ["c"], name="conv", doc_string="conv doc", auto_pad="SAME_UPPER"
        ),
        helper.make_node("Pad", ["c", "pads"], ["p"], name="pad", mode="reflect"),
        helper.make_node("Einsum", ["p"], ["e"], name="einsum", equation="bchw->bchw"),
        helper.make_node(
            "If", ["cond"], ["i"], name="branch", then_branch=then_g, else_branch=else_g
        ),
        helper.make_node("Relu", ["i"], ["y"], name="relu_out"),
    ]
    for node in nodes:
        helper.set_metadata_props(node, {"source": f"layer.{node.name}"})
    graph = helper.make_graph(
        nodes,
        "text_rich",
        [vi("x", F, ["batch", 2, 4, 4])],
        [vi("y", F, ["batch", 2, 6, 6])],
        [w, pads, cond],
        doc_string="graph doc",
        value_info=[vi("c", F, ["batch", 2, 4, 4])],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18)],
        producer_name="hostile-corpus",
        producer_version="1.0",
        doc_string="model doc",
    )
    proto.ir_version = 8
    helper.set_model_props(proto, {"author": "corpus", "license": "none"})
    onnx.checker.check_model(proto, full_check=True)
    return proto


_RICH: list[bytes] = []


def text_rich_bytes() -> bytes:
    if not _RICH:
        _RICH.append(text_rich_model().SerializeToString())
    return _RICH[0]


# Random flips anywhere in the text, one to three at a time; then flips that keep the text
# valid UTF-8 (most "any" flips are refused at load, these reach the later stages).
for _seed in range(24):
    _add(
        "string_flip",
        f"seed{_seed}",
        writer(lambda s=_seed: flip_in_strings(text_rich_bytes(), s, 1 + s % 3)),
    )
for _seed in range(16):
    _add(
        "string_flip",
        f"text_seed{_seed}",
        writer(lambda s=_seed: flip_in_strings(text_rich_bytes(), s, 1 + s % 2, mode="text")),
    )

# Each kind of text field on its own: once invalid UTF-8, once valid but changed text.
STRING_FIELDS = (
    "ModelProto.doc_string",
    "ModelProto.producer_name",
    "GraphProto.name",
    "GraphProto.doc_string",
    "NodeProto.name",
    "NodeProto.doc_string",
    "NodeProto.op_type",
    "NodeProto.input",
    "NodeProto.output",
    "AttributeProto.name",
    "AttributeProto.s",
    "ValueInfoProto.name",
    "TensorProto.name",
    "TensorProto.doc_string",
    "Dimension.dim_param",
    "StringStringEntryProto.key",
    "StringStringEntryProto.value",
)
for _field in STRING_FIELDS:
    for _mode in ("invalid", "text"):
        _add(
            "string_flip",
            f"{_field}/{_mode}",
            writer(lambda f=_field, m=_mode: flip_in_strings(text_rich_bytes(), 7, 1, f, m)),
        )


def _untyped_attribute() -> onnx.ModelProto:
    """A Conv whose ``strides`` lost its type (a flipped varint): onnx-ir cannot write it."""
    proto = text_rich_model()
    conv = proto.graph.node[0]
    conv.attribute.append(helper.make_attribute("strides", [1, 1]))
    conv.attribute[-1].type = onnx.AttributeProto.UNDEFINED
    return proto


def _custom_binary_attribute() -> onnx.ModelProto:
    """A custom-domain op may keep arbitrary bytes in a string attribute (ORT's EPContext)."""
    proto = text_rich_model()
    blob = helper.make_node("Blob", ["y"], ["z"], domain="com.vendor", name="blob")
    blob.attribute.append(helper.make_attribute("payload", b"\xff\xfe\x00binary"))
    proto.graph.node.append(blob)
    proto.graph.output[0].name = "z"
    proto.opset_import.append(helper.make_opsetid("com.vendor", 1))
    return proto


def _conv_pads_wrong_length() -> onnx.ModelProto:
    """Conv ``pads`` with 3 values for 2 spatial axes (a flipped tag dropped one)."""
    proto = text_rich_model()
    conv = proto.graph.node[0]
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1]))
    return proto


_add("bad_attributes", "untyped", writer(_untyped_attribute))
_add("bad_attributes", "conv_pads_wrong_length", writer(_conv_pads_wrong_length))
_add("string_flip", "custom_domain_binary_attribute", writer(_custom_binary_attribute))
