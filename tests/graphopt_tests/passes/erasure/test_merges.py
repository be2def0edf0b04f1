"""squeeze-unsqueeze, transpose-merge and reshape-merge."""

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper

from graphopt.passes.erasure.reshape_merge import ReshapeMergePass
from graphopt.passes.erasure.squeeze_unsqueeze import SqueezeUnsqueezePass
from graphopt.passes.erasure.transpose_merge import TransposeMergePass
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.passes.erasure.util import check, inferred

F = T.FLOAT
I64 = np.int64


def _model(nodes, x_shape, y_shape, inits=None, opset=17, extra_outputs=()):
    return inferred(
        make_model(
            [helper.make_node("Relu", ["x"], ["a"]), *nodes, helper.make_node("Abs", ["c"], ["y"])],
            [tensor_info("x", F, x_shape)],
            [tensor_info("y", F, y_shape), *extra_outputs],
            inits or {},
            opset=opset,
        )
    )


def _squeeze_pair(first, second, axes1, axes2, opset):
    if opset >= 13:
        nodes = [
            helper.make_node(first, ["a", "ax1"], ["b"]),
            helper.make_node(second, ["b", "ax2"], ["c"]),
        ]
        return nodes, {"ax1": np.array(axes1, I64), "ax2": np.array(axes2, I64)}
    nodes = [
        helper.make_node(first, ["a"], ["b"], axes=axes1),
        helper.make_node(second, ["b"], ["c"], axes=axes2),
    ]
    return nodes, {}


@pytest.mark.parametrize("opset", [11, 17])
def test_squeeze_then_unsqueeze_cancels(opset):
    nodes, inits = _squeeze_pair("Squeeze", "Unsqueeze", [1], [-2], opset)
    model = _model(nodes, [2, 1, 3], [2, 1, 3], inits, opset)
    _, hits, ops = check(model, SqueezeUnsqueezePass)
    assert hits == 1 and ops.count("Unsqueeze") == 0


@pytest.mark.parametrize("opset", [11, 17])
def test_unsqueeze_then_squeeze_cancels(opset):
    nodes, inits = _squeeze_pair("Unsqueeze", "Squeeze", [0, 3], [3, 0], opset)
    model = _model(nodes, [2, 3], [2, 3], inits, opset)
    _, hits, ops = check(model, SqueezeUnsqueezePass)
    assert hits == 1 and "Squeeze" not in ops


def test_squeeze_unsqueeze_other_axes_refused():
    nodes, inits = _squeeze_pair("Squeeze", "Unsqueeze", [1], [0], 17)
    model = _model(nodes, [2, 1, 3], [1, 2, 3], inits)
    _, hits, ops = check(model, SqueezeUnsqueezePass)
    assert hits == 0 and "Unsqueeze" in ops


def test_squeeze_without_axes_refused():
    nodes = [
        helper.make_node("Squeeze", ["a"], ["b"]),
        helper.make_node("Unsqueeze", ["b", "ax"], ["c"]),
    ]
    model = _model(nodes, [2, 1, 3], [2, 1, 3], {"ax": np.array([1], I64)})
    _, hits, _ = check(model, SqueezeUnsqueezePass)
    assert hits == 0


def _transposes(p1, p2):
    return [
        helper.make_node("Transpose", ["a"], ["b"], perm=p1),
        helper.make_node("Transpose", ["b"], ["c"], perm=p2),
    ]


def test_transposes_cancel():
    model = _model(_transposes([0, 2, 3, 1], [0, 3, 1, 2]), [1, 2, 3, 4], [1, 2, 3, 4])
    _, hits, ops = check(model, TransposeMergePass)
    assert hits == 1 and "Transpose" not in ops


def test_transposes_compose():
    model = _model(_transposes([1, 0, 2], [0, 2, 1]), [2, 3, 4], [3, 4, 2])
    _, hits, ops = check(model, TransposeMergePass)
    assert hits == 1 and ops.count("Transpose") == 1


def test_transposes_default_perm():
    nodes = [
        helper.make_node("Transpose", ["a"], ["b"]),
        helper.make_node("Transpose", ["b"], ["c"]),
    ]
    model = _model(nodes, [2, 3, 4], [2, 3, 4])
    _, hits, ops = check(model, TransposeMergePass)
    assert hits == 1 and "Transpose" not in ops


def test_transpose_middle_used_elsewhere_stays_correct():
    nodes = _transposes([1, 0], [1, 0])
    model = _model(nodes, [2, 3], [2, 3], extra_outputs=[tensor_info("b", F, [3, 2])])
    _, hits, ops = check(model, TransposeMergePass)
    assert hits == 1 and ops.count("Transpose") == 1


def test_reshape_chain_collapses():
    nodes = [
        helper.make_node("Reshape", ["a", "s1"], ["b"]),
        helper.make_node("Reshape", ["b", "s2"], ["c"]),
    ]
    inits = {"s1": np.array([6, -1], I64), "s2": np.array([-1, 3, 8], I64)}
    model = _model(nodes, [2, 3, 4, 2], [2, 3, 8], inits)
    _, hits, ops = check(model, ReshapeMergePass)
    assert hits == 1 and ops.count("Reshape") == 1


def test_flatten_then_reshape_collapses():
    nodes = [
        helper.make_node("Flatten", ["a"], ["b"], axis=2),
        helper.make_node("Reshape", ["b", "s2"], ["c"]),
    ]
    model = _model(nodes, [2, 3, 4], [6, 4], {"s2": np.array([6, 4], I64)})
    _, hits, _ = check(model, ReshapeMergePass)
    assert hits == 1


def test_reshape_with_zero_refused():
    # 0 copies the intermediate tensor's dim 1 (4), not the source's (3)
    nodes = [
        helper.make_node("Reshape", ["a", "s1"], ["b"]),
        helper.make_node("Reshape", ["b", "s2"], ["c"]),
    ]
    inits = {"s1": np.array([3, 4], I64), "s2": np.array([-1, 0], I64)}
    model = _model(nodes, [4, 3], [3, 4], inits)
    _, hits, _ = check(model, ReshapeMergePass)
    assert hits == 0


def test_reshape_dynamic_shape_refused():
    nodes = [
        helper.make_node("Reshape", ["a", "s1"], ["b"]),
        helper.make_node("Shape", ["a"], ["s2"]),
        helper.make_node("Reshape", ["b", "s2"], ["c"]),
    ]
    model = _model(nodes, [4, 3], [4, 3], {"s1": np.array([3, 4], I64)})
    _, hits, _ = check(model, ReshapeMergePass)
    assert hits == 0


@pytest.mark.parametrize(
    ("opset", "axes1", "axes2"), [(11, [1, 2], [3]), (17, [0], [-1]), (17, [1], [0, 2])]
)
def test_unsqueeze_chain_merges(opset, axes1, axes2):
    nodes, inits = _squeeze_pair("Unsqueeze", "Unsqueeze", axes1, axes2, opset)
    rank = 2 + len(axes1) + len(axes2)
    expected = np.zeros((2, 3))
    for axes in (axes1, axes2):
        expected = np.expand_dims(
            expected, [a if a >= 0 else a + expected.ndim + len(axes) for a in axes]
        )
    assert expected.ndim == rank
    model = _model(nodes, [2, 3], list(expected.shape), inits, opset)
    _, hits, ops = check(model, SqueezeUnsqueezePass)
    assert hits == 1 and ops.count("Unsqueeze") == 1


def test_unsqueeze_chain_with_shared_middle_kept():
    nodes, inits = _squeeze_pair("Unsqueeze", "Unsqueeze", [0], [0], 17)
    model = _model(
        nodes, [2, 3], [1, 1, 2, 3], inits, extra_outputs=[tensor_info("b", F, [1, 2, 3])]
    )
    _, hits, _ = check(model, SqueezeUnsqueezePass)
    assert hits == 0


def test_unsqueeze_middle_read_by_two_unsqueezes_merges_both():
    nodes, inits = _squeeze_pair("Unsqueeze", "Unsqueeze", [0], [3], 17)
    nodes.append(helper.make_node("Unsqueeze", ["b", "ax1"], ["d"]))
    model = _model(
        nodes, [2, 3], [1, 2, 3, 1], inits, extra_outputs=[tensor_info("d", F, [1, 1, 2, 3])]
    )
    _, hits, ops = check(model, SqueezeUnsqueezePass)
    assert hits == 2 and ops.count("Unsqueeze") == 2


def test_transpose_moving_only_unit_axes_before_reshape_is_dropped():
    from onnx import TensorProto, helper

    from graphopt.passes.erasure.transpose_merge import TransposeIntoReshapePass
    from graphopt_tests.helpers import (
        assert_same_outputs,
        make_model,
        op_types,
        run_pass,
        tensor_info,
    )

    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["n", 1, 1, 8])],
        [tensor_info("y", TensorProto.FLOAT, ["n", 8])],
        {"shape": np.array([-1, 8], dtype=np.int64)},
    )
    rewritten, hits = run_pass(model, TransposeIntoReshapePass)
    assert hits == 1
    assert "Transpose" not in op_types(rewritten)
    assert_same_outputs(model, rewritten, shapes={"x": (3, 1, 1, 8)})


def test_transpose_reordering_data_is_kept():
    from onnx import TensorProto, helper

    from graphopt.passes.erasure.transpose_merge import TransposeIntoReshapePass
    from graphopt_tests.helpers import make_model, run_pass, tensor_info

    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [tensor_info("y", TensorProto.FLOAT, [2, 12])],
        {"shape": np.array([2, 12], dtype=np.int64)},
    )
    _, hits = run_pass(model, TransposeIntoReshapePass)
    assert hits == 0
