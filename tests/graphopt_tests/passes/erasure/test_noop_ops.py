import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper

from graphopt.passes.erasure.noop_ops import NoopOpsPass
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.erasure.util import check, inferred

F = T.FLOAT
I64 = np.int64


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
    ("add0", helper.make_node("Add", ["a", "c"], ["b"]), {"c": np.zeros((3, 1), np.float32)}, 17),
    ("0add", helper.make_node("Add", ["c", "a"], ["b"]), {"c": np.zeros((4,), np.float32)}, 17),
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
