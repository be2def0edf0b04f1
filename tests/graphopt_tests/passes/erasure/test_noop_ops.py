import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper

from graphopt.passes.erasure.noop_ops import NoopOpsPass
from graphopt.verify import run_model
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)
from graphopt_tests.passes.erasure.util import check, inferred, lying_value_info

F = T.FLOAT
I64 = np.int64
F32 = np.float32


def _chain(op_node, inits=None, shape=(2, 3, 4), out_shape=None, opset=17, out_type=F):
    """x → Relu → op → Neg → y, so that the op under test sits between two plain nodes."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), op_node, helper.make_node("Abs", ["b"], ["y"])],
        [tensor_info("x", F, list(shape))],
        [tensor_info("y", out_type, list(out_shape or shape))],
        inits or {},
        opset=opset,
    )
    return inferred(model)


REMOVED = [
    ("cast", helper.make_node("Cast", ["a"], ["b"], to=T.FLOAT), {}, 17),
    (
        "reshape",
        helper.make_node("Reshape", ["a", "s"], ["b"]),
        {"s": np.array([2, 3, 4], I64)},
        17,
    ),
    (
        "reshape0",
        helper.make_node("Reshape", ["a", "s"], ["b"]),
        {"s": np.array([0, -1, 4], I64)},
        17,
    ),
    ("transpose", helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1, 2]), {}, 17),
    ("expand", helper.make_node("Expand", ["a", "s"], ["b"]), {"s": np.array([1, 4], I64)}, 17),
    ("pad", helper.make_node("Pad", ["a", "p"], ["b"]), {"p": np.zeros(6, I64)}, 17),
    ("pad-attr", helper.make_node("Pad", ["a"], ["b"], pads=[0] * 6), {}, 10),
    (
        "slice",
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["b"]),
        {
            "st": np.array([0, -3], I64),
            "en": np.array([2**62, 3], I64),
            "ax": np.array([2, 1], I64),
        },
        17,
    ),
    ("slice-attr", helper.make_node("Slice", ["a"], ["b"], starts=[0], ends=[9], axes=[0]), {}, 9),
    ("split", helper.make_node("Split", ["a"], ["b"], axis=1), {}, 17),
    ("concat", helper.make_node("Concat", ["a"], ["b"], axis=0), {}, 17),
    # x + -0.0 is x for every x (x + +0.0 is not: see test_add_of_positive_zero_...).
    (
        "add0",
        helper.make_node("Add", ["a", "c"], ["b"]),
        {"c": np.full((3, 1), -0.0, np.float32)},
        17,
    ),
    (
        "0add",
        helper.make_node("Add", ["c", "a"], ["b"]),
        {"c": np.full((4,), -0.0, np.float32)},
        17,
    ),
    ("sub0", helper.make_node("Sub", ["a", "c"], ["b"]), {"c": np.zeros((1,), np.float32)}, 17),
    ("mul1", helper.make_node("Mul", ["c", "a"], ["b"]), {"c": np.ones((1, 1, 4), np.float32)}, 17),
    ("div1", helper.make_node("Div", ["a", "c"], ["b"]), {"c": np.array(1, np.float32)}, 17),
]


@pytest.mark.parametrize(("label", "node", "inits", "opset"), REMOVED, ids=[r[0] for r in REMOVED])
def test_noop_removed(label, node, inits, opset):
    model = _chain(node, inits, opset=opset)
    _, hits, ops = check(model, NoopOpsPass)
    assert hits == 1 and ops == ["Relu", "Abs"], label


def test_flatten_rank2_removed():
    node = helper.make_node("Flatten", ["a"], ["b"], axis=1)
    model = _chain(node, shape=("n", 5))
    _, hits, ops = check(model, NoopOpsPass, shapes={"x": (3, 5)})
    assert hits == 1 and ops == ["Relu", "Abs"]


def test_reshape_symbolic_batch_with_minus_one():
    node = helper.make_node("Reshape", ["a", "s"], ["b"])
    model = _chain(node, {"s": np.array([-1, 3, 4], I64)}, shape=("n", 3, 4))
    _, hits, _ = check(model, NoopOpsPass, shapes={"x": (2, 3, 4)})
    assert hits == 1


KEPT = [
    ("cast", helper.make_node("Cast", ["a"], ["b"], to=T.DOUBLE), {}, (2, 3, 4), 17),
    (
        "reshape",
        helper.make_node("Reshape", ["a", "s"], ["b"]),
        {"s": np.array([3, 2, 4], I64)},
        (3, 2, 4),
        17,
    ),
    ("transpose", helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]), {}, (2, 4, 3), 17),
    (
        "expand",
        helper.make_node("Expand", ["a", "s"], ["b"]),
        {"s": np.array([2, 2, 3, 4], I64)},
        (2, 2, 3, 4),
        17,
    ),
    (
        "pad",
        helper.make_node("Pad", ["a", "p"], ["b"]),
        {"p": np.array([0, 0, 1, 0, 0, 0], I64)},
        (2, 3, 5),
        17,
    ),
    (
        "slice",
        helper.make_node("Slice", ["a", "st", "en"], ["b"]),
        {"st": np.array([1], I64), "en": np.array([2], I64)},
        (1, 3, 4),
        17,
    ),
    (
        "slice-step",
        helper.make_node("Slice", ["a", "st", "en", "ax", "sp"], ["b"]),
        {
            "st": np.array([-1], I64),
            "en": np.array([-(2**62)], I64),
            "ax": np.array([0], I64),
            "sp": np.array([-1], I64),
        },
        None,
        17,
    ),
    (
        "add-broadcasts",
        helper.make_node("Add", ["a", "c"], ["b"]),
        {"c": np.zeros((2, 2, 3, 4), np.float32)},
        (2, 2, 3, 4),
        17,
    ),
    (
        "add-nonzero",
        helper.make_node("Add", ["a", "c"], ["b"]),
        {"c": np.full((4,), 1e-3, np.float32)},
        None,
        17,
    ),
    (
        "zero-minus",
        helper.make_node("Sub", ["c", "a"], ["b"]),
        {"c": np.zeros((1,), np.float32)},
        None,
        17,
    ),
    (
        "one-div",
        helper.make_node("Div", ["c", "a"], ["b"]),
        {"c": np.ones((1,), np.float32)},
        None,
        17,
    ),
]


@pytest.mark.parametrize(
    ("label", "node", "inits", "out_shape", "opset"), KEPT, ids=[r[0] for r in KEPT]
)
def test_noop_refused(label, node, inits, out_shape, opset):
    out_type = T.DOUBLE if label == "cast" else F
    model = _chain(node, inits, out_shape=out_shape, opset=opset, out_type=out_type)
    _, hits, ops = check(model, NoopOpsPass)
    assert hits == 0 and len(ops) == 3, label


def test_noop_at_graph_output_keeps_name():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Cast", ["a"], ["y"], to=F)],
        [tensor_info("x", F, [2])],
        [tensor_info("y", F, [2])],
    )
    model = inferred(model)
    after, hits, ops = check(model, NoopOpsPass)
    assert hits == 1 and ops == ["Relu"] and after.graph.outputs[0].name == "y"


def test_and_with_true_removed():
    model = inferred(
        make_model(
            [
                helper.make_node("Not", ["x"], ["a"]),
                helper.make_node("And", ["t", "a"], ["b"]),
                helper.make_node("Not", ["b"], ["y"]),
            ],
            [tensor_info("x", T.BOOL, [2, 3])],
            [tensor_info("y", T.BOOL, [2, 3])],
            {"t": np.array(True)},
        )
    )
    _, hits, ops = check(model, NoopOpsPass)
    assert hits == 1 and ops == ["Not", "Not"]


def _reciprocal_of_sum(op: str, zero: float, before: str | None = None) -> ir.Model:
    """y = 1 / op(p, zero), p = before(x) (or x): the probe of a signed-zero flip."""
    nodes = [
        helper.make_node(op, ["p", "zero"], ["s"]),
        helper.make_node("Div", ["one", "s"], ["y"]),
    ]
    if before is not None:
        nodes.insert(0, helper.make_node(before, ["x"], ["p"]))
    model = make_model(
        nodes,
        [tensor_info("x" if before else "p", F, ["N", 4])],
        [tensor_info("y", F, ["N", 4])],
        {"zero": np.array(zero, np.float32), "one": np.array(1.0, np.float32)},
        opset=13,
    )
    return inferred(model)


def _bits_after_pass(model: ir.Model, feeds: dict[str, np.ndarray]) -> tuple[int, bool]:
    """(hits, whether the output is bit for bit the original's on ``feeds``)."""
    after, hits = run_pass(model, NoopOpsPass)
    (want,) = run_model(model, feeds)
    (got,) = run_model(roundtrip(after), feeds)
    return hits, np.array_equal(want.view(np.int32), got.view(np.int32))


SIGNED_ZEROS = {"p": np.array([[-0.0, 0.0, 1.0, -2.0]], np.float32)}


@pytest.mark.parametrize(("op", "zero"), [("Add", 0.0), ("Sub", -0.0)])
def test_adding_positive_zero_is_kept_it_turns_negative_zero_positive(op: str, zero: float):
    # -0.0 + 0.0 = +0.0: without the Add, 1 / x flips from +inf to -inf.
    hits, same = _bits_after_pass(_reciprocal_of_sum(op, zero), SIGNED_ZEROS)
    assert hits == 0 and same


@pytest.mark.parametrize(("op", "zero"), [("Add", -0.0), ("Sub", 0.0)])
def test_adding_negative_zero_is_removed_it_is_exact(op: str, zero: float):
    hits, same = _bits_after_pass(_reciprocal_of_sum(op, zero), SIGNED_ZEROS)
    assert hits == 1 and same


def test_adding_positive_zero_to_what_is_never_negative_zero_is_removed():
    # |x| clears the sign bit: |x| + 0.0 is |x| bit for bit.
    model = _reciprocal_of_sum("Add", 0.0, before="Abs")
    hits, same = _bits_after_pass(model, {"x": SIGNED_ZEROS["p"]})
    assert hits == 1 and same


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_zero_bias_after_a_matrix_product_is_removed(op: str):
    # ONNX Runtime sums from +0.0: a product of -0.0 inputs is +0.0, so the zero bias an
    # exporter leaves after it (freshly initialised transformers) changes no bit.
    model = make_model(
        [
            helper.make_node(op, ["x", "w"], ["p"]),
            helper.make_node("Add", ["p", "zero"], ["s"]),
            helper.make_node("Div", ["one", "s"], ["y"]),
        ],
        [tensor_info("x", F, ["N", 4])],
        [tensor_info("y", F, ["N", 3])],
        {
            "w": np.array([[1.0, -1.0, 0.0]] * 4, np.float32),
            "zero": np.zeros(3, np.float32),
            "one": np.array(1.0, np.float32),
        },
        opset=13,
    )
    zeros = {"x": np.array([[-0.0, -0.0, 0.0, -0.0], [1.0, 2.0, -0.0, 3.0]], np.float32)}
    hits, same = _bits_after_pass(inferred(model), zeros)
    assert hits == 1 and same


def test_reshape_to_a_shape_a_value_info_names_wrongly_is_kept():
    """z = Slice(y, 0:Shape(y)[1]) is y[N, T, 8]; a value_info calls it [N, S, 8] and
    inference cannot tell (a computed Slice end). Reshape(Relu(x)[N, S, 8], [N, T, -1] read
    off z) is not a no-op when S != T: only dims inference derives count as equal."""
    model = lying_value_info(
        [
            helper.make_node("Shape", ["z"], ["lead"], end=2),
            helper.make_node("Concat", ["lead", "minus_one"], ["shp"], axis=0),
            helper.make_node("Relu", ["x"], ["w"]),
            helper.make_node("Reshape", ["w", "shp"], ["r"]),
            helper.make_node("Softmax", ["r"], ["sm"], axis=-1),
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Reshape", ["sm", "sx"], ["out"]),
        ]
    )
    after, hits = run_pass(model, NoopOpsPass)
    assert hits == 0 and op_types(after).count("Reshape") == 2
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 4, 8)).astype(F32),
        "y": rng.standard_normal((2, 2, 8)).astype(F32),
    }
    assert_same_outputs(model, roundtrip(after), feeds)
