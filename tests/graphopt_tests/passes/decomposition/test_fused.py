"""Q/K and V/O decomposition through a fused QKV projection (GPT-2 style: one MatMul/Gemm,
a Split into q, k, v): found in every layer, weights and Split sizes shrink, the result runs
at other sequence lengths, and where dropping the dims loses nothing the output is the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.api import OptimizeOptions, optimize
from graphopt.errors import UserInputError
from graphopt.models import build

HIDDEN, HEADS, DIM = 64, 4, 16
KEPT = 12  # of DIM, at ratio=0.25


def _run(source, out, modules="qk,vo", target="ratio=0.25"):
    options = OptimizeOptions(
        decompose=target, modules=modules, calib="random", decompose_allocation="uniform"
    )
    return optimize(source, out, options).report.details["decompose"]


def _outputs(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _fused_attention(split: str, opset: int) -> onnx.ModelProto:
    """One GPT-2-style attention layer whose dropped dims carry nothing: per head, a quarter
    of Q's columns (and bias) is zero, and V's columns have rank 12 of 16. Dropping a quarter
    of every head's Q/K and V/O dims is then exact, so the output must not change.

    ``split``: how the Split states its sizes (``input``, ``attribute``, ``equal``), or
    ``gemm``: the dynamo exporter's layout, Gemm (transB, with C) on a 2-D view of the input,
    a Reshape to ``[B, S, 3·H·D]`` before the Split, a 2-D head merge sharing the flattening
    shape constant of the input, and O as a Gemm (transB, with C)."""
    rng = np.random.default_rng(0)
    wq, wk = rng.normal(size=(2, HIDDEN, HIDDEN)) / 8
    bq, bk, bv, bo = rng.normal(size=(4, HIDDEN)) / 4
    dead = np.concatenate([h * DIM + np.arange(KEPT, DIM) for h in range(HEADS)])
    wq[:, dead], bq[dead] = 0.0, 0.0
    wv = np.concatenate(
        [rng.normal(size=(HIDDEN, KEPT)) @ rng.normal(size=(KEPT, DIM)) / 8 for _ in range(HEADS)],
        axis=1,
    )
    # Shuffle Q's dims within each head: the kept ones are not simply the first ones.
    order = np.concatenate([h * DIM + rng.permutation(DIM) for h in range(HEADS)])
    wq, wk, bq, bk = wq[:, order], wk[:, order], bq[order], bk[order]
    gemm = split == "gemm"
    w_qkv, w_o = np.concatenate([wq, wk, wv], axis=1), rng.normal(size=(HIDDEN, HIDDEN)) / 8
    inits = {
        "w_qkv": w_qkv.T if gemm else w_qkv,
        "b_qkv": np.concatenate([bq, bk, bv]),
        "w_o": w_o.T if gemm else w_o,
        "b_o": bo,
        "scale": np.array(1.0 / np.sqrt(DIM)),
        "heads_shape": np.array([0, 0, HEADS, DIM], dtype=np.int64),
        "merge_shape": np.array([-1, HIDDEN] if gemm else [0, 0, HIDDEN], dtype=np.int64),
        "sizes": np.array([HIDDEN] * 3, dtype=np.int64),
        "lead_axes": np.array([0, 1], dtype=np.int64),
        "qkv_width": np.array([3 * HIDDEN], dtype=np.int64),
        "width": np.array([HIDDEN], dtype=np.int64),
    }
    split_inputs, split_attrs = ["qkv"], {"axis": 2}
    if split == "input":
        split_inputs.append("sizes")
    elif split == "attribute":
        split_attrs["split"] = [HIDDEN] * 3
    elif opset >= 18:
        split_attrs["num_outputs"] = 3
    if gemm:
        nodes = [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Gather", ["x_shape", "lead_axes"], ["lead"], axis=0),
            helper.make_node("Reshape", ["x", "merge_shape"], ["x_2d"]),
            helper.make_node("Gemm", ["x_2d", "w_qkv", "b_qkv"], ["qkv_2d"], transB=1),
            helper.make_node("Concat", ["lead", "qkv_width"], ["qkv_shape"], axis=0),
            helper.make_node("Reshape", ["qkv_2d", "qkv_shape"], ["qkv"]),
        ]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w_qkv"], ["qkv_mm"]),
            helper.make_node("Add", ["qkv_mm", "b_qkv"], ["qkv"]),
        ]
    nodes.append(helper.make_node("Split", split_inputs, ["q", "k", "v"], **split_attrs))
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes.append(helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_h"]))
        nodes.append(helper.make_node("Transpose", [f"{name}_h"], [f"{name}_t"], perm=perm))
    nodes += [
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged"]),
    ]
    if gemm:
        nodes += [
            helper.make_node("Gemm", ["merged", "w_o", "b_o"], ["o_2d"], transB=1),
            helper.make_node("Concat", ["lead", "width"], ["y_shape"], axis=0),
            helper.make_node("Reshape", ["o_2d", "y_shape"], ["y"]),
        ]
    else:
        nodes += [
            helper.make_node("MatMul", ["merged", "w_o"], ["o_mm"]),
            helper.make_node("Add", ["o_mm", "b_o"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "fused_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [
            numpy_helper.from_array(a.astype(np.float32) if a.dtype == np.float64 else a, name)
            for name, a in inits.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    ("split", "opset"),
    [("input", 13), ("attribute", 11), ("equal", 18), ("equal", 13), ("gemm", 18)],
)
def test_dropping_dims_that_carry_nothing_is_exact(tmp_path, split, opset):
    source, out = tmp_path / "attention.onnx", tmp_path / "out.onnx"
    onnx.save(_fused_attention(split, opset), str(source))
    record = _run(source, out)
    assert [(m.kind, m.before, m.after) for m in record.decomposed] == [
        ("qk", HIDDEN, HEADS * KEPT),
        ("vo", HIDDEN, HEADS * KEPT),
    ]
    assert not record.skipped and record.check == "passed"
    proto = onnx.load(str(out))
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    fused, o_rows = (HIDDEN, 3 * HEADS * KEPT), (HEADS * KEPT, HIDDEN)  # 192 -> 144, 64 -> 48
    if split == "gemm":  # stored transposed
        fused, o_rows = fused[::-1], o_rows[::-1]
    assert fused in shapes.values() and o_rows in shapes.values()
    assert not {(HIDDEN, 3 * HIDDEN), (3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN)} & set(shapes.values())
    split_node = next(n for n in proto.graph.node if n.op_type == "Split")
    sizes = [list(a.ints) for a in split_node.attribute if a.name == "split"]
    if not sizes:
        sizes = [numpy_helper.to_array(_init(proto, split_node.input[1])).tolist()]
    assert sizes == [[HEADS * KEPT] * 3]
    rng = np.random.default_rng(1)
    for seq in (5, 11):  # dynamic sequence: the rewritten shapes hold at any length
        x = rng.normal(size=(2, seq, HIDDEN)).astype(np.float32)
        (want,) = _outputs(source, {"x": x})
        (got,) = _outputs(out, {"x": x})
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


def test_a_fused_projection_read_elsewhere_is_left_with_the_reason(tmp_path):
    model = _fused_attention("input", 13)
    # The fused output is also a model output: its width cannot change.
    model.graph.output.append(
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", "seq", 3 * HIDDEN])
    )
    source = tmp_path / "attention.onnx"
    onnx.save(model, str(source))
    # Every module left: the model would come back unchanged ("0 modules decomposed", exit
    # 0, before), so the run is refused with the reason.
    out = tmp_path / "out.onnx"
    with pytest.raises(UserInputError) as caught:
        _run(source, out)
    assert str(caught.value) == (
        "decompose ratio=0.25: nothing to decompose: every candidate module is left as it "
        "was (2 modules: fused QKV projection output has other readers); the model would "
        "come back unchanged"
    )
    assert not out.exists()


def _init(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in proto.graph.initializer if i.name == name)


@pytest.fixture(scope="module", params=["gpt2_tiny", "gpt2_tiny_ts"])
def gpt2(request, tmp_path_factory):
    """GPT-2 from both exporters: dynamo (Gemm on a 2-D view, Split by num_outputs) and
    TorchScript (Split sizes as an input, shapes read at run time by Shape nodes)."""
    out = tmp_path_factory.mktemp("gpt2") / "gpt2.onnx"
    source = build(request.param)
    return source, out, _run(source, out)


def test_gpt2_attention_is_decomposed_in_every_layer(gpt2):
    source, out, record = gpt2
    assert [(m.layer, m.kind) for m in record.decomposed] == [
        (0, "qk"), (0, "vo"), (1, "qk"), (1, "vo"),
    ]  # fmt: skip
    assert not record.skipped and record.check == "passed"
    assert all((m.before, m.after) == (128, 96) for m in record.decomposed)
    assert record.flops_removed > 0 and record.flops_after < record.flops_before
    before = sorted(tuple(t.dims) for t in onnx.load(str(source)).graph.initializer)
    after = sorted(tuple(t.dims) for t in onnx.load(str(out)).graph.initializer)
    # c_attn 128x384 -> 128x288 (q, k, v each 96), c_proj 128x128 -> 96x128, in both layers.
    assert before.count((128, 384)) == 2 and after.count((128, 288)) == 2
    assert (128, 384) not in after and after.count((96, 128)) == 2
    assert all(f.mean_cosine > 0.99 for f in record.fidelity["held-out"])


def test_gpt2_decomposed_runs_at_other_sequence_lengths(gpt2):
    source, out, _ = gpt2
    rng = np.random.default_rng(2)
    for seq in (7, 23):
        feeds = {
            "input_ids": rng.integers(0, 1000, size=(1, seq)).astype(np.int64),
            "attention_mask": np.ones((1, seq), dtype=np.int64),
        }
        (want,) = _outputs(source, feeds)
        (got,) = _outputs(out, feeds)
        assert got.shape == want.shape == (1, seq, 1000)
        cosine = np.sum(want * got, -1) / np.linalg.norm(want, axis=-1)
        assert np.min(cosine / np.linalg.norm(got, axis=-1)) > 0.95


def test_full_rank_rewrite_of_the_exported_gpt2_is_exact(tmp_path):
    """Every Q/K dim kept and V/O rotated at full rank (rank = head dim): the surgery rewrites
    the fused weight, the Split sizes, the head reshapes and O, and nothing may change."""
    import onnx_ir as ir

    from graphopt.analysis.zig import analyze
    from graphopt.passes.decomposition import decomposer, surgery
    from graphopt.passes.decomposition.modules import find_modules

    source = build("gpt2_tiny")
    model = ir.load(str(source))
    report = analyze(model, {"input_ids": (1, 16), "attention_mask": (1, 16)})
    found = find_modules(report)
    assert len(found.attentions) == 2 and not found.skipped
    plan = surgery.Plan()
    rng = np.random.default_rng(3)
    for att in found.attentions:
        width = att.heads * att.head_dim
        plan.qks.append(surgery.QkPlan(att, np.arange(width)))
        mix = rng.normal(size=(att.v.weight.shape[0],) * 2)
        # Any input correlation: at full rank the rotation is an exact change of basis.
        p = decomposer._prepare_vo(att, mix @ mix.T, np.zeros(len(mix)), (1, 16, width))
        _, new_v, v_bias, new_o, o_bias, _ = p.data
        plan.vos.append(surgery.VoPlan(att, att.head_dim, new_v, v_bias, new_o, o_bias))
    out = tmp_path / "rotated.onnx"
    ir.save(surgery.build(model, report, found, plan, padded=False), str(out))
    rotated = {i.name: tuple(i.dims) for i in onnx.load(str(out)).graph.initializer}
    # Full width kept, but every fused and O weight rewritten (the originals are gone).
    assert sorted(rotated.values()).count((128, 384)) == 2
    assert not any(n.endswith(("c_attn.weight", "c_proj.weight")) for n in rotated if "attn" in n)
    feeds = {
        "input_ids": rng.integers(0, 1000, size=(2, 9)).astype(np.int64),
        "attention_mask": np.ones((2, 9), dtype=np.int64),
    }
    (want,) = _outputs(source, feeds)
    (got,) = _outputs(out, feeds)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
