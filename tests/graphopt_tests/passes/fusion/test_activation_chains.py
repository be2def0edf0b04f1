"""fuse-relu-clip-chains: Relu/Clip chains merged into one node with combined bounds."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.passes.fusion.activation_chains import FuseReluClipChainsPass
from graphopt_tests.helpers import (
    assert_same_outputs,
    make_model,
    op_types,
    roundtrip,
    run_pass,
    tensor_info,
)

F = TensorProto.FLOAT
Spec = tuple[str, float | None, float | None]


def _model(chain: list[Spec], opset: int = 17, extra_output: bool = False):
    inits: dict[str, np.ndarray] = {}
    nodes = []
    for i, (op, low, high) in enumerate(chain):
        src = "X" if i == 0 else f"t{i - 1}"
        out = "Y" if i == len(chain) - 1 else f"t{i}"
        if op == "Relu":
            nodes.append(helper.make_node("Relu", [src], [out]))
        elif opset < 11:
            attrs = {k: v for k, v in (("min", low), ("max", high)) if v is not None}
            nodes.append(helper.make_node("Clip", [src], [out], **attrs))
        else:
            inputs = [src, "", ""]
            for j, bound in ((1, low), (2, high)):
                if bound is not None:
                    inits[f"b{i}_{j}"] = np.array(bound, np.float32)
                    inputs[j] = f"b{i}_{j}"
            while inputs[-1] == "":
                inputs.pop()
            nodes.append(helper.make_node("Clip", inputs, [out]))
    outputs = [tensor_info("Y", F, [2, 8])]
    if extra_output:
        outputs.append(tensor_info("t0", F, [2, 8]))
    return make_model(nodes, [tensor_info("X", F, [2, 8])], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    ("chain", "opset", "result"),
    [
        ([("Relu", None, None), ("Relu", None, None)], 17, "Relu"),
        ([("Relu", None, None), ("Clip", -1.0, 0.5)], 17, "Clip"),
        ([("Clip", -2.0, None), ("Clip", None, 1.0)], 17, "Clip"),
        ([("Clip", -1.0, None), ("Relu", None, None)], 17, "Relu"),
        ([("Clip", 0.2, 3.0), ("Relu", None, None)], 10, "Clip"),
        ([("Relu", None, None), ("Clip", 0.0, 6.0), ("Clip", -1.0, 4.0)], 17, "Clip"),
        ([("Clip", -5.0, 5.0), ("Clip", -1.0, None)], 9, "Clip"),
    ],
)
def test_merged(chain: list[Spec], opset: int, result: str) -> None:
    model = _model(chain, opset)
    after, hits = run_pass(model, FuseReluClipChainsPass)
    assert hits == len(chain) - 1
    assert op_types(after) == [result]
    assert [v.name for v in after.graph.outputs] == ["Y"]
    x = np.random.default_rng(0).normal(scale=4.0, size=(2, 8)).astype(np.float32)
    assert_same_outputs(model, roundtrip(after), {"X": x})


@pytest.mark.parametrize(
    ("chain", "extra_output"),
    [
        ([("Clip", 0.0, 1.0), ("Clip", 2.0, 3.0)], False),  # disjoint: the result is constant
        ([("Clip", None, -1.0), ("Relu", None, None)], False),
        ([("Relu", None, None), ("Relu", None, None)], True),
    ],
)
def test_refused(chain: list[Spec], extra_output: bool) -> None:
    after, hits = run_pass(_model(chain, extra_output=extra_output), FuseReluClipChainsPass)
    assert hits == 0
    assert len(op_types(after)) == 2


def test_non_constant_bound_refused() -> None:
    nodes = [helper.make_node("Relu", ["X"], ["t"]), helper.make_node("Clip", ["t", "lo"], ["Y"])]
    ins = [tensor_info("X", F, [2, 8]), tensor_info("lo", F, [])]
    model = make_model(nodes, ins, [tensor_info("Y", F, [2, 8])])
    _, hits = run_pass(model, FuseReluClipChainsPass)
    assert hits == 0


def test_merged_inside_if_branch() -> None:
    branch = helper.make_graph(
        [
            helper.make_node("Relu", ["X"], ["t"]),
            helper.make_node("Clip", ["t", "", "hi"], ["then_y"]),
        ],
        "then",
        [],
        [tensor_info("then_y", F, [2, 8])],
        [helper.make_tensor("hi", F, [], [6.0])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["else_y"])],
        "else",
        [],
        [tensor_info("else_y", F, [2, 8])],
    )
    nodes = [helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=other)]
    inputs = [tensor_info("X", F, [2, 8]), tensor_info("cond", TensorProto.BOOL, [])]
    model = make_model(nodes, inputs, [tensor_info("Y", F, [2, 8])])
    after, hits = run_pass(model, FuseReluClipChainsPass)
    assert hits == 1
    assert sorted(op_types(after)) == ["Clip", "Identity", "If"]
    x = np.random.default_rng(1).normal(scale=5.0, size=(2, 8)).astype(np.float32)
    assert_same_outputs(model, roundtrip(after), {"X": x, "cond": np.array(True)})
