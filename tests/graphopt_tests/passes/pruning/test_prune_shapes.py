"""Shapes after channel removal: pruned dims resized, every other dim as declared.

Removal used to drop every intermediate shape; inference from the inputs then lost the
symbolic ``batch``/``sequence`` past Reshapes whose target is read from ``Shape`` and the
head count of a ``(0, 0, -1, D)`` Reshape, and ORT's attention fusions, which check both,
fused nothing in a pruned BERT or MiniLM (``--prune ... --target ort``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt import api, models
from graphopt.analysis.zig import analyze
from graphopt.io import to_proto
from graphopt.passes.pruning.channel_removal import remove_channels
from graphopt_tests.helpers import make_model, tensor_info

HIDDEN, FFN, HEADS = 16, 32, 2


def _encoder_ffn() -> ir.Model:
    """x [batch, seq, 16] → FFN 16→32→16 → a head split (0, 0, -1, 8), with the shapes an
    exporter declares: the head count and the names past the Reshape (whose target is read
    from Shape) are known only from these."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
        helper.make_node("Shape", ["y"], ["s"], end=2),
        helper.make_node("Concat", ["s", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["z"], perm=[0, 2, 1, 3]),
    ]
    model = make_model(
        nodes,
        [tensor_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [tensor_info("z", TensorProto.FLOAT, ["batch", HEADS, "seq", HIDDEN // HEADS])],
        {
            "w1": rng.standard_normal((HIDDEN, FFN)).astype(np.float32),
            "w2": rng.standard_normal((FFN, HIDDEN)).astype(np.float32),
            "tail": np.array([-1, HIDDEN // HEADS], np.int64),
        },
    )
    declared = {"h": FFN, "r": FFN, "y": HIDDEN, "heads": [HEADS, HIDDEN // HEADS]}
    for node in model.graph:
        out = node.outputs[0]
        if out.name in declared:
            out.shape = ir.Shape(["batch", "seq", *np.atleast_1d(declared[out.name]).tolist()])
    return model


def _declared(model: ir.Model) -> dict[str, list]:
    return {
        o.name: [d if isinstance(d, int) else d.value for d in o.shape]
        for node in model.graph
        for o in node.outputs
        if o.shape is not None
    }


def _run(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    proto = to_proto(model)
    names = ["h", "r", "y", "heads"]
    del proto.graph.output[:]
    unranked = (helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    proto.graph.output.extend(unranked)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(None, {"x": x}), strict=True))


def test_removal_resizes_pruned_dims_and_keeps_the_others():
    model = _encoder_ffn()
    report = analyze(model, {"x": (1, 4, HIDDEN)})
    (group,) = report.prunable
    assert group.size == FFN
    removed = group.unit_indices(list(range(0, FFN, 2)))
    pruned = remove_channels(model, report.graph, removed, keep_shapes=True)
    shapes = _declared(pruned)
    assert shapes["h"] == shapes["r"] == ["batch", "seq", FFN // 2]
    # Untouched: the names, and the head count onnx inference cannot find.
    assert shapes["y"] == ["batch", "seq", HIDDEN]
    assert shapes["heads"] == ["batch", "seq", HEADS, HIDDEN // HEADS]
    # And they are what ONNX Runtime computes, at two input shapes.
    for batch, seq in ((1, 4), (3, 7)):
        x = np.random.default_rng(batch).standard_normal((batch, seq, HIDDEN), np.float32)
        for name, array in _run(pruned, x).items():
            expected = [batch if d == "batch" else seq if d == "seq" else d for d in shapes[name]]
            assert list(array.shape) == expected, name


def test_removal_for_further_edits_keeps_only_the_names():
    """Without keep_shapes (the decomposition edits head ranks afterwards), no int may be
    left stale; the names stay."""
    model = _encoder_ffn()
    report = analyze(model, {"x": (1, 4, HIDDEN)})
    (group,) = report.prunable
    pruned = remove_channels(model, report.graph, group.unit_indices([0, 1]))
    shapes = _declared(pruned)
    assert shapes["h"] == shapes["y"] == ["batch", "seq", None]


def _attention(model: ir.Model) -> Counter:
    return Counter(
        n.op_type
        for n in model.graph
        if n.domain == "com.microsoft" and n.op_type in ("Attention", "MultiHeadAttention")
    )


@pytest.mark.parametrize("name", ["bert_tiny", "gpt2_tiny"])
def test_pruned_transformer_fuses_attention_for_ort_as_unpruned(name):
    source = models.get(name)
    plain = api.optimize(source, None, api.OptimizeOptions(target="ort"))
    options = api.OptimizeOptions(target="ort", prune="flops=0.3", calib="random")
    pruned = api.optimize(source, None, options)
    assert pruned.report.details["prune"].flops_removed > 0.2
    assert _attention(plain.model) and _attention(pruned.model) == _attention(plain.model)
    # The fusions after pruning are verified against the pruned model at two input shapes.
    verification = pruned.report.verification
    assert verification is not None and verification.ok and not pruned.report.rolled_back
