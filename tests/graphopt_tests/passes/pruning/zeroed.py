"""An independent check of a pruned model: the original with the removed units zeroed.

Which output units a layer lost is read from the weights alone (each kept row of the pruned
weight is found among the original's rows by value), not from graphopt's own bookkeeping;
those rows and their bias entries are zeroed in a copy of the original, and both models run
in ONNX Runtime at the shapes given.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _out_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans = [a.i for a in node.attribute if a.name == "transB"]
        return 0 if trans and trans[0] else 1
    return 1  # ConvTranspose (groups of 1), MatMul by a 2-D weight


def _layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    names = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in LAYERS and n.input[1] in names]


def removed_units(original: onnx.ModelProto, pruned: onnx.ModelProto) -> dict[str, list[int]]:
    """Per original weight name, the output units the pruned model no longer has."""
    weights = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    kept_w = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    before, after = _layers(original), _layers(pruned)
    assert len(before) == len(after)
    removed: dict[str, list[int]] = {}
    for node_o, node_p in zip(before, after, strict=True):
        axis = _out_axis(node_o)
        full = np.moveaxis(weights[node_o.input[1]], axis, 0)
        kept = np.moveaxis(kept_w[node_p.input[1]], axis, 0)
        if kept.shape[0] == full.shape[0]:
            continue
        rows = full.reshape(full.shape[0], -1)
        found = set()
        for row in kept.reshape(kept.shape[0], -1):
            # A kept row may have lost input columns: match it by its values as a set.
            values = set(row.tolist())
            hits = [k for k in range(len(rows)) if values <= set(rows[k].tolist())]
            assert len(hits) == 1, f"{node_o.name}: row matches {hits}"
            found.add(hits[0])
        gone = sorted(set(range(len(rows))) - found)
        assert removed.get(node_o.input[1], gone) == gone  # a shared weight: same units
        removed[node_o.input[1]] = gone
    return removed


def zeroed(original: onnx.ModelProto, removed: dict[str, list[int]]) -> onnx.ModelProto:
    """``original`` with the removed output units' weight rows and bias entries zeroed."""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    inits = {i.name: i for i in model.graph.initializer}
    for node in _layers(model):
        gone = removed.get(node.input[1])
        if not gone:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).copy()
        index = [slice(None)] * w.ndim
        index[_out_axis(node)] = gone
        w[tuple(index)] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        if len(node.input) > 2 and node.input[2] in inits:
            b = numpy_helper.to_array(inits[node.input[2]]).copy()
            b[gone] = 0
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
    return model


def assert_zeroed_equivalent(
    original: onnx.ModelProto, pruned: onnx.ModelProto, shapes: list[tuple[int, ...]]
) -> dict[str, list[int]]:
    """The pruned model computes the original with its removed units zeroed, at each shape
    of the single input; returns the removed units."""
    removed = removed_units(original, pruned)
    assert removed, "nothing was removed"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def session(m: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(m.SerializeToString(), options, ["CPUExecutionProvider"])

    reference, result = session(zeroed(original, removed)), session(pruned)
    name = original.graph.input[0].name
    rng = np.random.default_rng(3)
    for shape in shapes:
        feeds = {name: rng.standard_normal(shape).astype(np.float32)}
        want, got = reference.run(None, feeds)[0], result.run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    return removed
