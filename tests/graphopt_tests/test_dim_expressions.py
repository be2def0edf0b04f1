"""Dims named by arithmetic on other dims (KV-cache decoders), and zero-sized dims."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.dim_expressions import dim_expressions, follow_expressions, parse_dim_expression
from graphopt.errors import UserInputError
from graphopt.input_dims import check_input_shapes
from graphopt_tests.helpers import tensor_info

MASK = "past_sequence_length + sequence_length"


def _decoder(mask_dim: str = MASK, present_dim: str = MASK) -> ir.Model:
    """A KV-cache decoder's interface: ids [b, seq], mask [b, mask_dim], past [b, 2, past, 4];
    the present cache (past and the new step) is [b, 2, present_dim, 4]."""
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_4d"]),  # [b, 1, seq, 1]
        helper.make_node("Expand", ["ids_4d", "step_shape"], ["new"]),  # [b, 2, seq, 4]
        helper.make_node("Concat", ["past", "new"], ["present"], axis=2),
        helper.make_node("ReduceSum", ["attention_mask"], ["count"], keepdims=0),
    ]
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 3]),
        helper.make_tensor("step_shape", TensorProto.INT64, [4], [1, 2, 1, 4]),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [
            tensor_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            tensor_info("attention_mask", TensorProto.INT64, ["batch_size", mask_dim]),
            tensor_info("past", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 4]),
        ],
        [
            tensor_info("present", TensorProto.FLOAT, ["batch_size", 2, present_dim, 4]),
            tensor_info("count", TensorProto.INT64, []),
        ],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        (MASK, ("+", "past_sequence_length", "sequence_length")),
        ("2*sequence_length", ("*", 2, "sequence_length")),
        ("(a + b) * 2 - 1", ("-", ("*", ("+", "a", "b"), 2), 1)),
        ("sequence_length", None),  # a plain name
        ("input_ids[1]", None),  # graphopt's key for an unnamed dim
        ("a +", None),
    ],
)
def test_dim_names_parse_as_expressions_of_names_and_ints(text: str, tree) -> None:
    assert parse_dim_expression(text) == tree


def test_a_dim_named_past_plus_sequence_follows_its_terms() -> None:
    # Before: the mask's length was bound on its own (16 beside a past of 32 and a sequence
    # of 16) and ORT failed in a Gather; every KV-cache export exited 4.
    model = _decoder()
    assert set(dim_expressions(model)) == {MASK}
    dims = {"batch_size": 1, "sequence_length": 16, MASK: 16, "past_sequence_length": 32}
    assert follow_expressions(model, dims)[MASK] == 48
    # A second shape moves every dim: the mask moves with the terms, not by its own step.
    moved = {"batch_size": 2, "sequence_length": 3, MASK: 10, "past_sequence_length": 16}
    assert follow_expressions(model, moved)[MASK] == 19


def test_a_given_mask_length_solves_for_the_one_free_term() -> None:
    # --input-shape input_ids:1x1 --input-shape attention_mask:1x9: the past is 8, not the
    # default 32 (which would contradict the mask the user gave).
    model = _decoder()
    fixed = {"batch_size": 1, "sequence_length": 1, MASK: 9}
    dims = {**fixed, "past_sequence_length": 32}
    assert follow_expressions(model, dims, fixed=fixed) == {**fixed, "past_sequence_length": 8}


def test_products_follow_too_and_unknown_terms_leave_a_name_alone() -> None:
    model = _decoder(mask_dim="2*sequence_length", present_dim="past_sequence_length + 1")
    expressions = dim_expressions(model)
    assert set(expressions) == {"2*sequence_length"}  # outputs' dims bind no input
    assert follow_expressions(model, {"sequence_length": 5})["2*sequence_length"] == 10
    # "seq-len" where "len" is no dim of the inputs: a name with a dash, not a difference.
    assert dim_expressions(_decoder("sequence_length-len", "present_len")) == {}


def test_a_separate_mask_symbol_takes_the_present_caches_declared_sum() -> None:
    # torch.export's decoders name the mask's length "total" and declare the present cache
    # "past_sequence_length + sequence_length": the mask covers the cached and new tokens.
    model = _decoder(mask_dim="total")
    assert dim_expressions(model) == {"total": parse_dim_expression(MASK)}
    dims = {"batch_size": 1, "sequence_length": 16, "total": 16, "past_sequence_length": 32}
    assert follow_expressions(model, dims)["total"] == 48
    # ... an inference, so it never refuses what the user gave.
    check_input_shapes(model, {"input_ids": (1, 1), "attention_mask": (1, 5), "past": (1, 2, 8, 4)})
    # Without the declared sum there is no evidence: the dims stay independent.
    assert dim_expressions(_decoder(mask_dim="total", present_dim="present_len")) == {}


def test_a_given_mask_that_contradicts_its_terms_is_refused() -> None:
    model = _decoder()
    shapes = {"input_ids": (1, 1), "attention_mask": (1, 10), "past": (1, 2, 8, 4)}
    with pytest.raises(UserInputError) as info:
        check_input_shapes(model, shapes)
    assert str(info.value) == (
        f"--input-shape attention_mask:1x10: dim {MASK!r} is 10 here, but the other shapes "
        "give past_sequence_length=8, sequence_length=1, so it must be 9"
    )
    check_input_shapes(model, {**shapes, "attention_mask": (1, 9)})


def test_an_empty_past_beside_a_prompt_is_a_shape_to_verify_at() -> None:
    # The prefill step: no cache yet. Before: refused as "a zero-sized dim gives empty
    # tensors", though the ids and the mask still have elements.
    model = _decoder()
    check_input_shapes(model, {"input_ids": (1, 8), "past": (1, 2, 0, 4)})
    # Every input empty (a zero batch) still proves nothing.
    with pytest.raises(UserInputError, match="a zero-sized dim gives empty tensors"):
        check_input_shapes(model, {"input_ids": (0, 8)})
    # The mask is empty too when both of its terms are 0.
    with pytest.raises(UserInputError, match="a zero-sized dim gives empty tensors"):
        check_input_shapes(model, {"input_ids": (1, 0), "past": (1, 2, 0, 4)})
