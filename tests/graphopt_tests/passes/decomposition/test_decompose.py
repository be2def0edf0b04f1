"""The ``decompose`` pass end to end: inner dims shrink, FLOPs drop, fidelity is reported,
modules it cannot prove are left with a reason, bad flags are one-line errors, and the same
input gives the same bytes."""

from __future__ import annotations

import onnx
import pytest

from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.models import build
from graphopt.registry import flag_owners


def _run(
    source, out, target="flops=0.25", modules="mlp,qk,vo", calib="random", allocation="uniform"
):
    # uniform: every selected kind is cut, so each kind's surgery is exercised.
    options = OptimizeOptions(
        decompose=target, modules=modules, calib=calib, decompose_allocation=allocation
    )
    return optimize(source, out, options).report.details["decompose"]


def _matrix_shapes(path) -> list[tuple[int, ...]]:
    proto = onnx.load(str(path))
    return sorted(tuple(t.dims) for t in proto.graph.initializer if len(t.dims) == 2)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """BERT-tiny decomposed at flops=0.25 (every module kind), with its record."""
    out = tmp_path_factory.mktemp("bert") / "bert.onnx"
    source = build("bert_tiny")
    return source, out, _run(source, out)


def test_global_allocation_is_the_default_and_reported(tmp_path) -> None:
    options = OptimizeOptions(decompose="flops=0.25", calib="random")
    record = optimize(build("bert_tiny"), tmp_path / "g.onnx", options).report.details["decompose"]
    assert record.allocation == "global"
    assert record.flops_removed == pytest.approx(0.25, abs=0.02)


def test_flags_are_derived_from_the_options():
    owners = flag_owners()
    assert [t.owner.name for t in owners["decompose"]] == ["decompose"]
    assert [t.owner.name for t in owners["modules"]] == ["decompose"]
    assert "decompose" in [t.owner.name for t in owners["calib"]]


def test_bert_tiny_inner_dims_shrink_and_flops_drop(bert):
    _, out, record = bert
    kinds = sorted(m.kind for m in record.decomposed)
    assert kinds == ["mlp", "mlp", "qk", "qk", "vo", "vo"] and not record.skipped
    for m in record.decomposed:
        heads = 1 if m.kind == "mlp" else 4  # attention keeps the same dims in every head
        assert m.after == heads * round(m.before // heads * (1 - record.ratio))
        assert m.after < m.before and m.flops > 0 and 0 < m.error < 1
    assert record.flops_removed == pytest.approx(0.25, abs=0.01)
    assert record.check == "passed"
    # The saved weights really are smaller: up/down 128x512 -> 128x384, Q/K/V/O 128 -> 96.
    shapes = _matrix_shapes(out)
    mlp = next(m for m in record.decomposed if m.kind == "mlp")
    assert (128, mlp.after) in shapes and (mlp.after, 128) in shapes
    assert (128, 512) not in shapes and (512, 128) not in shapes
    assert (128, 96) in shapes and (96, 128) in shapes
    assert set(record.fidelity) == {"calibration", "held-out"}
    assert all(f.mean_cosine > 0.99 for f in record.fidelity["held-out"])
    assert record.to_json()["decomposed"][0]["kind"] in ("mlp", "qk", "vo")


def test_a_decomposed_model_decomposes_again(tmp_path):
    """A first run can leave V with fewer dims per head than Q; a second run read V with
    Q's head dim and crashed (IndexError). Now such V/O blocks are left, with the reason."""
    first, second = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    # V/O alone in the first run: global allocation over all kinds may leave V whole,
    # depending on the calibration data (on ids spanning the vocabulary it cuts only MLPs).
    _run(build("bert_tiny"), first, "ratio=0.3", "vo")
    record = _run(first, second, "ratio=0.3", allocation="global")
    assert record.check == "passed"
    left = [why for _, kind, why in record.skipped if kind == "vo"]
    assert left and all("differ from Q's" in why for why in left)
    assert record.decomposed  # the MLPs still shrink


def test_ratio_target_and_one_module_kind(tmp_path):
    source = build("bert_tiny")
    record = _run(source, tmp_path / "vo.onnx", "ratio=0.5", "vo")
    assert [m.kind for m in record.decomposed] == ["vo", "vo"]
    assert all((m.before, m.after) == (128, 64) for m in record.decomposed)
    assert record.ratio == 0.5 and 0 < record.flops_removed < 0.25


def test_llama_attention_left_with_reasons(tmp_path):
    # GPT-2's fused QKV attention is decomposed: test_fused.py.
    record = _run(build("llama_tiny"), tmp_path / "llama.onnx")
    assert [m.kind for m in record.decomposed] == ["mlp", "mlp"]
    reasons = {(kind, why) for _, kind, why in record.skipped}
    assert any(kind == "qk" and "rotary" in why for kind, why in reasons)
    assert any(kind == "vo" and "grouped-query" in why for kind, why in reasons)
    assert record.flops_removed > 0 and record.check == "passed"


def test_from_the_command_line_with_global_allocation(tmp_path, capsys):
    source = tmp_path / "bert.onnx"
    onnx.save(onnx.load(str(build("bert_tiny"))), str(source))
    out = tmp_path / "o.onnx"
    args = ["optimize", str(source), "-o", str(out), "--decompose", "ratio=0.25"]
    args += ["--decompose-allocation", "global", "--modules", "mlp,vo", "--calib", "random"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "decompose ratio=0.25 (mlp,vo):" in text
    assert "allocation global: share removed per module kind" in text
    assert "held-out" in text and "--calib random" in text
    # Inner dims the original does not have: the MLP width and the V/O head dims shrank.
    before, after = set(_matrix_shapes(source)), set(_matrix_shapes(out))
    assert {s[1] for s in after - before if s[0] == 128} - {512, 128}


def test_a_wrong_shape_rewrite_is_caught_and_the_module_left(tmp_path, monkeypatch):
    """The shrunk model must compute what the padded one computes: break the head-split
    rewrite, and the Q/K modules are left as they are, with the reason."""
    from graphopt.passes.decomposition import surgery

    monkeypatch.setattr(surgery, "set_shape_entry", lambda *args, **kwargs: None)
    record = _run(build("bert_tiny"), tmp_path / "o.onnx", "ratio=0.25", "mlp,qk")
    assert [m.kind for m in record.decomposed] == ["mlp", "mlp"]
    assert [(kind, why) for _, kind, why in record.skipped] == [
        ("qk", "shape check failed: left as it is")
    ] * 2
    assert record.check == "passed after leaving out the modules that failed it"
    # Judged on the model written: the Q/K channels put back count as not removed.
    assert record.target_missed == (
        "decompose ratio=0.25: target NOT met: inner channels -20.0% reached of the asked "
        "-25.0% (met from -22.5%)"
    )


def test_a_missed_flops_target_exits_1_with_the_model_written(tmp_path, capsys):
    """Before: V/O alone reaching -15.5% of an asked -50% was a note and exit 0 (ppocr_rec
    at flops=0.2 reached -6.6%); a target short by more than a tenth is a failed check."""
    out = tmp_path / "o.onnx"
    args = ["optimize", str(build("bert_tiny")), "-o", str(out), "--decompose", "flops=0.5"]
    code = main([*args, "--modules", "vo", "--calib", "random", "--no-verify"])
    assert code == 1 and out.is_file()
    assert capsys.readouterr().err.strip() == (
        "graphopt: error: decompose flops=0.5: target NOT met: FLOPs -15.5% reached of the "
        "asked -50.0% (met from -45.0%) (written all the same)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--decompose", "flops=1.5", "--calib", "random"], "--decompose 'flops=1.5': expected"),
        (["--decompose", "rank=4", "--calib", "random"], "expected flops=R"),
        (["--decompose", "flops=0.2", "--modules", "mlp,ffn", "--calib", "random"], "--modules"),
        (["--decompose", "flops=0.2"], "--calib"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    source = build("bert_tiny")
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_same_input_same_bytes(tmp_path, bert):
    source, first, _ = bert
    again = tmp_path / "again.onnx"
    _run(source, again)
    assert first.read_bytes() == again.read_bytes()


@pytest.mark.slow
def test_minilm_on_real_sentences(tmp_path):
    from graphopt.models import sentences

    source = build("minilm")
    calib = str(sentences.minilm_npz(tmp_path / "calib.npz", "calib", 64, seq_len=32))
    out = tmp_path / "minilm.onnx"
    record = _run(source, out, "ratio=0.2", calib=calib)
    assert sorted({m.kind for m in record.decomposed}) == ["mlp", "qk", "vo"]
    assert len(record.decomposed) == 18 and record.check == "passed"
    assert 0.1 < record.flops_removed < 0.25
    reference = sentences.embed(source, "eval", 32)
    cosine = sentences.mean_cosine(reference, sentences.embed(out, "eval", 32))
    assert cosine > 0.85  # 0.88 measured: 64 short sentences are few for 1536x1536 statistics
    assert all(0 < m.error < 1 for m in record.decomposed)
    assert record.fidelity["held-out"][0].mean_cosine > 0.8


def test_the_inner_share_is_counted_in_channels():
    """The headline said "inner dims -17% on average" (the mean of per-module shares 0.5, 0.5,
    0, 0, 0, 0) where 256 of 768 selected inner channels (33%) went."""
    from graphopt.passes.decomposition.record import DecomposeRecord, ModuleRecord

    record = DecomposeRecord("ratio=0.3", "mlp,qk,vo", allocation="global")
    record.decomposed = [
        ModuleRecord(0, "mlp", 256, 128, 0.2, 10),
        ModuleRecord(1, "mlp", 256, 128, 0.2, 10),
    ]
    record.inner_before, record.inner_after = 768, 512
    record.params_before, record.params_after = 103_226, 70_202
    line = record.headline()
    assert "inner channels -33% (256 of 768), per module -0%..-50%" in line
    assert "params 103,226 -> 70,202" in line


def test_params_before_and_after_are_filled(tmp_path):
    """params_before/params_after stayed 0 in the record."""
    import onnx_ir as ir

    from graphopt.analysis.stats import parameter_count

    source, out = build("bert_tiny"), tmp_path / "p.onnx"
    record = _run(source, out, "ratio=0.5", "mlp")
    removed = sum(m.before - m.after for m in record.decomposed)
    # Before: the model as the pass gets it (exact passes ran first and may drop constants).
    assert 0.99 * parameter_count(ir.load(str(source)))[0] < record.params_before
    assert record.params_before <= parameter_count(ir.load(str(source)))[0]
    assert record.params_after == parameter_count(ir.load(str(out)))[0]
    # Each MLP channel removed takes at least its up column and down row (hidden 128).
    assert record.params_before - record.params_after >= removed * 2 * 128
    assert record.inner_before == sum(m.before for m in record.decomposed)
    assert record.ratio == pytest.approx(removed / record.inner_before)


def test_a_decomposed_transformer_fuses_attention_for_ort_as_undecomposed():
    # Channel removal dropped every declared shape and the head ranks left stale ones: the
    # symbolic batch/sequence names ORT's attention fusions check were lost, and a
    # decomposed BERT fused no attention with --target ort.
    from collections import Counter

    from graphopt import models

    def attention(model) -> Counter:
        return Counter(
            n.op_type
            for n in model.graph
            if n.domain == "com.microsoft" and n.op_type in ("Attention", "MultiHeadAttention")
        )

    source = models.get("bert_tiny")
    plain = optimize(source, None, OptimizeOptions(target="ort"))
    options = OptimizeOptions(target="ort", decompose="flops=0.3", calib="random")
    decomposed = optimize(source, None, options)
    assert decomposed.report.details["decompose"].decomposed
    # Every attention fuses (as MultiHeadAttention where the query/key and value widths now
    # differ and ORT's packed Attention does not apply).
    fused = sum(attention(plain.model).values())
    assert fused and sum(attention(decomposed.model).values()) == fused
    verification = decomposed.report.verification
    assert verification is not None and verification.ok and not decomposed.report.rolled_back
