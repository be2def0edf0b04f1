"""shape-through-slice and shape-concat, proven against ONNX Runtime."""

import numpy as np
from onnx import TensorProto as T
from onnx import helper

from graphopt.passes.erasure.shape_reads import ShapeConcatPass, ShapeThroughSlicePass
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.erasure.util import check, inferred

I64 = np.int64


def _position_ids_model(gather_index: int):
    """BERT's position_ids[:, :seq] read back through Shape (what the exporter emits)."""
    nodes = [
        helper.make_node("Shape", ["ids"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["seq", "zero1"], ["seq1"]),
        helper.make_node("Slice", ["pos", "zero1", "seq1", "one1"], ["sliced"]),
        helper.make_node("Shape", ["sliced"], ["s2"]),
        helper.make_node("Gather", ["s2", "k"], ["d"], axis=0),
        helper.make_node("Unsqueeze", ["d", "zero1"], ["d1"]),
        helper.make_node("Concat", ["d1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["sliced", "target"], ["y"]),
    ]
    inits = {
        "pos": np.arange(128, dtype=I64).reshape(1, 128),
        "one": np.array(1, I64),
        "zero1": np.array([0], I64),
        "one1": np.array([1], I64),
        "k": np.array(gather_index, I64),
        "minus1": np.array([-1], I64),
    }
    return inferred(
        make_model(
            nodes,
            [tensor_info("ids", T.INT64, ["b", "s"])],
            [tensor_info("y", T.INT64, [1, "s"])],
            inits,
        )
    )


def test_unsliced_axis_of_a_constant_is_folded():
    model = _position_ids_model(gather_index=0)
    _after, hits, ops = check(model, ShapeThroughSlicePass, shapes={"ids": (2, 7)})
    assert hits == 1
    assert ops.count("Shape") == 1  # the Shape of the Slice is gone, Shape(ids) stays
    assert "Gather" in ops  # seq = Shape(ids)[1] is dynamic and kept


def test_sliced_axis_is_kept():
    model = _position_ids_model(gather_index=1)  # axis 1 is sliced: its length is dynamic
    _, hits, ops = check(model, ShapeThroughSlicePass, shapes={"ids": (2, 7)})
    assert hits == 0
    assert ops.count("Shape") == 2


def _concat_model(indices, unsqueeze=True, x_shape=("b", "s", 4)):
    nodes = [helper.make_node("Shape", ["x"], ["s"])]
    parts = []
    inits = {"zero1": np.array([0], I64)}
    for n, i in enumerate(indices):
        inits[f"i{n}"] = np.array(i if unsqueeze else [i], I64)
        nodes.append(helper.make_node("Gather", ["s", f"i{n}"], [f"g{n}"], axis=0))
        if unsqueeze:
            nodes.append(helper.make_node("Unsqueeze", [f"g{n}", "zero1"], [f"u{n}"]))
            parts.append(f"u{n}")
        else:
            parts.append(f"g{n}")
    nodes.append(helper.make_node("Concat", parts, ["target"], axis=0))
    nodes.append(helper.make_node("Relu", ["x"], ["y"]))
    return inferred(
        make_model(
            nodes,
            [tensor_info("x", T.FLOAT, list(x_shape))],
            [
                tensor_info("y", T.FLOAT, list(x_shape)),
                tensor_info("target", T.INT64, [len(indices)]),
            ],
            inits,
        )
    )


def test_full_concat_of_shape_dims_is_the_shape():
    for unsqueeze in (True, False):
        model = _concat_model([0, 1, -1], unsqueeze=unsqueeze)
        _after, hits, ops = check(model, ShapeConcatPass, shapes={"x": (2, 3, 4)})
        assert hits == 1
        assert ops.count("Concat") == 0 and ops.count("Gather") == 0
        assert ops.count("Shape") == 1


def test_partial_or_reordered_concat_is_kept():
    for indices in ([0, 1], [1, 0, 2], [0, 0, 2], [0, 1, 2, 2]):
        model = _concat_model(indices)
        _, hits, ops = check(model, ShapeConcatPass, shapes={"x": (2, 2, 4)})
        assert hits == 0, indices
        assert "Concat" in ops
