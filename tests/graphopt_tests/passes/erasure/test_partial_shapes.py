"""Partly symbolic shapes (only the batch, or batch and sequence, symbolic) fold where exact.

TorchScript exports build every Reshape/Expand target at run time from Shape reads; the
static parts fold, the symbolic ones become 0 (copy) or -1 in a Reshape target, and the
exporter's ``Where(Equal(shape, -1), 1, shape)`` guard before each Expand goes. Every
rewrite is checked against ONNX Runtime at two batch sizes.
"""

import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper

from graphopt import editing, models
from graphopt.analysis.stats import count_nodes
from graphopt.api import OptimizeOptions, optimize
from graphopt.inputs import make_inputs
from graphopt.io import load, to_proto
from graphopt.output_errors import compare
from graphopt.passes.erasure.noop_ops import NoopOpsPass
from graphopt.passes.erasure.reshape_target import ReshapeTargetPass
from graphopt.passes.erasure.shape_folding import ShapeFoldingPass
from graphopt.verify import run_model
from graphopt_tests.helpers import make_model, tensor_info
from graphopt_tests.models.cases import require
from graphopt_tests.passes.erasure.util import check, inferred

F = T.FLOAT
I64 = np.int64


def _guarded_expand(compare_with):
    """x: [b, 1, 4] → Expand(x, Where(Equal(t, c), 1, t)), t = [Shape(x)[0], 3, 4]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axis0"], ["b1"]),
        helper.make_node("Concat", ["b1", "rest"], ["t"], axis=0),
        helper.make_node("Equal", ["t", "c"], ["is_c"]),
        helper.make_node("Where", ["is_c", "ones", "t"], ["guarded"]),
        helper.make_node("Expand", ["x", "guarded"], ["y"]),
    ]
    inits = {
        "zero": np.array(0, I64),
        "axis0": np.array([0], I64),
        "rest": np.array([3, 4], I64),
        "c": np.array(compare_with, I64),
        "ones": np.ones(3, I64),
    }
    return inferred(
        make_model(
            nodes, [tensor_info("x", F, ["b", 1, 4])], [tensor_info("y", F, ["b", 3, 4])], inits
        )
    )


def test_expand_guard_equal_is_decided_whatever_the_batch():
    model = _guarded_expand([-1, -1, -1])
    for batch in (1, 3):
        after, hits, ops = check(model, ShapeFoldingPass, shapes={"x": (batch, 1, 4)})
        assert hits == 1 and "Equal" not in ops
    where = next(n for n in after.graph if n.op_type == "Where")
    assert editing.constant_array(where.inputs[0]).tolist() == [False, False, False]


def test_equal_with_a_size_the_batch_may_have_is_kept():
    # Shape(x)[0] == 2 depends on the batch: nothing to decide before run time.
    model = _guarded_expand([2, 3, 4])
    _, hits, ops = check(model, ShapeFoldingPass, shapes={"x": (2, 1, 4)})
    assert hits == 0 and "Equal" in ops


def _where_model(cond, then_shape, else_shape, out_shape):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Where", ["cond", "other", "a"], ["y"]),
    ]
    inits = {"cond": np.array(cond, np.bool_), "other": np.ones(then_shape, np.float32)}
    return inferred(
        make_model(
            nodes, [tensor_info("x", F, list(else_shape))], [tensor_info("y", F, out_shape)], inits
        )
    )


def test_where_with_a_uniform_constant_condition_passes_its_branch():
    model = _where_model([False, False, False], [3], ["b", 3], ["b", 3])
    for batch in (1, 4):
        _, hits, ops = check(model, NoopOpsPass, shapes={"x": (batch, 3)})
        assert hits == 1 and "Where" not in ops


@pytest.mark.parametrize(
    ("cond", "then_shape", "else_shape"),
    [
        ([True, False, False], [3], [2, 3]),  # mixed: both branches are read
        ([False], [2, 3], [1, 3]),  # the other branch broadcasts the chosen one to [2, 3]
        ([[False], [False]], [3], [1, 3]),  # so does the condition
    ],
    ids=["mixed", "branch-broadcasts", "condition-broadcasts"],
)
def test_where_that_reads_both_branches_or_broadcasts_is_kept(cond, then_shape, else_shape):
    model = _where_model(cond, then_shape, else_shape, [2, 3])
    _, hits, ops = check(model, NoopOpsPass)
    assert hits == 0 and "Where" in ops


def test_dims_named_like_input_dims_become_copies():
    # LLaMA's q.view(B, S, -1, D): B and S read off the tensor before the projection.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero1", "two1"], ["bs"]),
        helper.make_node("Concat", ["bs", "tail"], ["target"], axis=0),
        helper.make_node("MatMul", ["x", "w"], ["q"]),
        helper.make_node("Reshape", ["q", "target"], ["y"]),
    ]
    inits = {
        "zero1": np.array([0], I64),
        "two1": np.array([2], I64),
        "tail": np.array([-1, 4], I64),
        "w": np.ones((6, 8), np.float32),
    }
    model = inferred(
        make_model(
            nodes,
            [tensor_info("x", F, ["batch", "sequence", 6])],
            [tensor_info("y", F, ["batch", "sequence", 2, 4])],
            inits,
        )
    )
    for shape in ((1, 5, 6), (3, 2, 6)):
        after, hits, ops = check(model, ReshapeTargetPass, shapes={"x": shape})
        assert hits == 1 and "Shape" not in ops and "Concat" not in ops
    reshape = next(n for n in after.graph if n.op_type == "Reshape")
    assert editing.constant_array(reshape.inputs[1]).tolist() == [0, 0, -1, 4]


def _count_after_onnxslim(path, folder) -> int:
    # Its command line in a process of its own, as bench/erasure.py runs it (imported here,
    # after torch, its sympy import can fail half-way).
    if find_spec("onnxslim") is None:
        pytest.skip("onnxslim is not installed: the peer the node counts are compared with")
    out = folder / "slim.onnx"
    subprocess.run([sys.executable, "-m", "onnxslim", str(path), str(out)], check=True)
    return count_nodes(load(out).model)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["llama_tiny_ts", "gpt2_tiny_ts"])
def test_torchscript_exports_fold_their_partial_shapes(name, tmp_path):
    # Dynamic batch and sequence; every target built from Shape at run time. graphopt
    # keeps no more nodes than onnxslim, and the result runs at other batch sizes.
    require(name)
    path = models.get(name)
    shapes = models.input_shapes(name)
    original = load(path).model
    result = optimize(path, None, OptimizeOptions(input_shapes=shapes))
    assert result.report.verification is not None and result.report.verification.ok
    assert count_nodes(result.model) <= _count_after_onnxslim(path, tmp_path)
    assert not any(n.op_type == "Equal" for n in result.model.graph)
    optimized = load(to_proto(result.model)).model
    for batch in (1, 3):
        batched = {k: (batch, *v[1:]) for k, v in shapes.items()}
        feeds = make_inputs(original, batched, seed=0)
        for ref, got in zip(run_model(original, feeds), run_model(optimized, feeds), strict=True):
            error = compare("output", ref, got)
            assert error.shape_ok and error.max_rel <= 1e-4
