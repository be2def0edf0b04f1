"""Every lossy pass refuses a run whose model would come back unchanged in the same one-line
form, ``ASKED: nothing to VERB: WHY; the model would come back unchanged``: quantize's own
record, the op check the pipeline runs before any pass, and the layer searches of sparsify,
factorize and decompose."""

from __future__ import annotations

import re

import onnx_ir as ir
import pytest

from graphopt.errors import UserInputError
from graphopt.passes.quantization.record import LayerPrecision, QuantRecord
from graphopt.refusals import QUANTIZED_WEIGHT, refuse_nothing_to_do, refuse_unchanged

FORM = re.compile(r"^[^\n]+?: nothing to [a-z]+: [^\n]+; the model would come back unchanged$")


def _empty_model() -> ir.Model:
    return ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 17}), ir_version=9)


def test_refuse_nothing_to_do_names_the_ops_it_rewrites() -> None:
    with pytest.raises(UserInputError) as caught:
        refuse_nothing_to_do("--sparsity", frozenset({"MatMul", "Conv"}), {"Relu", "Add"})
    message = str(caught.value)
    assert FORM.match(message), message
    assert message.startswith("--sparsity: nothing to do: the model has none of the ops")
    assert "(Conv, MatMul)" in message


def test_refuse_nothing_to_do_returns_when_an_op_is_present() -> None:
    assert refuse_nothing_to_do("--sparsity", frozenset({"MatMul"}), {"MatMul"}) is None
    # A pass without declared ops (None/empty) is never refused here.
    assert refuse_nothing_to_do("--prune", frozenset(), {"Relu"}) is None


def test_quantize_and_layer_refusals_read_alike() -> None:
    record = QuantRecord(
        mode="int8",
        layers=[LayerPrecision("mm", "MatMul", "float", "weight shared with other nodes")],
    )
    quantize = record.unchanged_refusal()
    with pytest.raises(UserInputError) as caught:
        refuse_unchanged(_empty_model(), "sparsify 2:4", "sparsify", [("mm", "too small")])
    sparsify = str(caught.value)
    for message in (quantize, sparsify):
        assert FORM.match(message), message
    assert quantize.startswith("quantize int8: nothing to quantize: every candidate stays float")
    assert "weight shared with other nodes" in quantize
    assert sparsify.startswith("sparsify 2:4: nothing to sparsify: every candidate layer")
    assert "1 layer: too small" in sparsify


def test_refuse_unchanged_without_candidates_says_what_it_looked_for() -> None:
    with pytest.raises(UserInputError) as caught:
        refuse_unchanged(_empty_model(), "factorize rank=8", "factorize", [])
    assert str(caught.value) == (
        "factorize rank=8: nothing to factorize: no MatMul/Gemm/Conv with a constant weight; "
        "the model would come back unchanged"
    )


def test_quantized_weights_only_point_to_the_float_model() -> None:
    # No quantized op in the graph: the reason is reported like any other.
    with pytest.raises(UserInputError) as caught:
        refuse_unchanged(_empty_model(), "sparsify 2:4", "sparsify", [("w", QUANTIZED_WEIGHT)])
    assert QUANTIZED_WEIGHT in str(caught.value)
