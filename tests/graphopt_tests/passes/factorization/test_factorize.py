"""The ``factorize`` pass end to end: flags, the two-node form in the saved model, FLOPs, the
report, defaults, bad input, determinism and the speed check's record."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from graphopt import io
from graphopt.api import OptimizeOptions, optimize
from graphopt.cli import main
from graphopt.errors import UserInputError
from graphopt.passes.factorization.speed import METADATA_KEY
from graphopt.registry import flag_owners
from graphopt_tests.passes.factorization.graphs import anisotropic, ffn


def _files(tmp_path, samples: int = 40):
    path = tmp_path / "model.onnx"
    io.save(ffn(), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=anisotropic(np.random.default_rng(0), (samples, 6, 64)))
    return path, calib


def _metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[METADATA_KEY])


def _record(path, out, **options):
    options.setdefault("verify", False)
    return optimize(path, out, OptimizeOptions(**options)).report.details["factorize"]


def test_flags_are_derived_from_the_options():
    owners = flag_owners()
    for key in ("factorize", "factorize_method", "factorize_layers", "factorize_speed_check"):
        assert [t.owner.name for t in owners[key]] == ["factorize"]
    for shared in ("calib", "round_to", "compensation"):
        assert {"prune", "factorize"} <= {t.owner.name for t in owners[shared]}


def test_rank_rule_from_the_command_line(tmp_path, capsys):
    model, calib = _files(tmp_path)
    out = tmp_path / "f.onnx"
    args = ["optimize", str(model), "-o", str(out), "--factorize", "rank=16", "--calib", str(calib)]
    code = main([*args, "--factorize-speed-check", "off"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "factorize rank=16: 2 layers factorized" in text
    assert "method asvd (default)" in text and "held-out" in text and "speed check off" in text
    proto = onnx.load(str(out))
    assert [n.op_type for n in proto.graph.node if n.op_type == "MatMul"] == ["MatMul"] * 4
    shapes = sorted(tuple(t.dims) for t in proto.graph.initializer if len(t.dims) == 2)
    assert shapes == [(16, 64), (16, 128), (64, 16), (128, 16)]
    assert _metadata(out)["speed_check"] == "off"


def test_report_and_flops(tmp_path):
    model, calib = _files(tmp_path)
    record = _record(
        model, tmp_path / "f.onnx", factorize="flops=0.3", calib=str(calib),
        factorize_speed_check="off",
    )  # fmt: skip
    assert record.method == "asvd" and record.error_kind == "output"
    assert record.flops_removed >= 0.3 and record.flops_after < record.flops_before
    for layer in record.layers:
        assert layer.rank % 8 == 0 and layer.rank < layer.full
        assert layer.flops_after < layer.flops_before and 0 <= layer.error < 1
    cosines = [f.mean_cosine for f in record.fidelity["held-out"]]
    assert cosines and all(0.5 < c <= 1.0 + 1e-6 for c in cosines)
    assert any("weighted by their measured effect" in note for note in record.notes)
    data = record.to_json()
    assert data["flops_removed"] == pytest.approx(record.flops_removed)
    assert len(record.fitted) == len(record.layers)
    assert record.fitted[0].weight.shape == tuple(record.layers[0].shape)
    assert record.fitted[0].gram is not None


def test_asvd_beats_svd_end_to_end(tmp_path):
    model, calib = _files(tmp_path)
    errors = {}
    for method in ("svd", "asvd"):
        record = _record(
            model, tmp_path / f"{method}.onnx", factorize="rank=8", calib=str(calib),
            factorize_method=method, factorize_speed_check="off",
        )  # fmt: skip
        errors[method] = max(f.mean_abs for f in record.fidelity["held-out"])
    assert errors["asvd"] < errors["svd"]


def test_without_data_plain_svd_and_weight_errors(tmp_path, capsys):
    model, _ = _files(tmp_path)
    out = tmp_path / "f.onnx"
    code = main(["optimize", str(model), "-o", str(out), "--factorize", "ratio=0.25",
                 "--factorize-speed-check", "off", "--input-shape", "x:2x6x64"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert "method svd (default)" in text and "no calibration data" in text
    assert "generated" in text  # fidelity on generated inputs


def test_round_to_sets_the_rank_multiple(tmp_path):
    model, calib = _files(tmp_path)
    record = _record(
        model, tmp_path / "f.onnx", factorize="rank=10", calib=str(calib), round_to=16,
        factorize_speed_check="off",
    )  # fmt: skip
    assert [layer.rank for layer in record.layers] == [16, 16]


def test_layer_selection_and_thin_layers(tmp_path):
    model, calib = _files(tmp_path)
    record = _record(
        model, tmp_path / "f.onnx", factorize="rank=8", calib=str(calib),
        factorize_layers="down", factorize_speed_check="off",
    )  # fmt: skip
    assert [layer.node for layer in record.layers] == ["down"]
    assert any(name == "up" and "--factorize-layers" in why for name, why in record.skipped)
    # rank 64 of 64 saves nothing: every layer left whole, and the model would come back
    # unchanged (written as "0 layers factorized", exit 0, before): refused with the reason
    with pytest.raises(UserInputError) as caught:
        _record(
            model, tmp_path / "g.onnx", factorize="rank=64", calib=str(calib),
            factorize_speed_check="off",
        )  # fmt: skip
    message = str(caught.value)
    assert message.startswith("factorize rank=64: nothing to factorize: every candidate layer")
    assert "2 layers: rank 64 of 64 saves no FLOPs" in message
    assert message.endswith("the model would come back unchanged")
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--factorize", "flops=2"], "--factorize 'flops=2': flops=R needs 0 < R < 1"),
        (["--factorize", "rank=8", "--factorize-method", "asvd"], "asvd needs calibration"),
        (["--factorize", "rank=8", "--factorize-speed-check", "maybe"], "expected on, off"),
        (["--factorize", "rank=8", "--compensation", "eora:x"], "none or eora:RANK"),
        (["--factorize-method", "svd"], "--factorize-method only applies with --factorize"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    model, _ = _files(tmp_path)
    assert main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_deterministic_with_the_speed_check_off_or_replayed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, calib = _files(tmp_path)
    common = {"factorize": "flops=0.3", "calib": str(calib)}
    outs = [tmp_path / f"{i}.onnx" for i in range(4)]
    _record(model, outs[0], factorize_speed_check="off", **common)
    _record(model, outs[1], factorize_speed_check="off", **common)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    # Measured once, then replayed from the first output's metadata: the same model.
    measured = _record(model, outs[2], **common)
    recorded = _metadata(outs[2])
    assert recorded["timings"] and recorded["speed_check"] == "on"
    assert all(layer.speedup is not None for layer in measured.layers)
    (tmp_path / "cache").rename(tmp_path / "gone")  # nothing cached: replay alone decides
    _record(model, outs[3], factorize_speed_check=str(outs[2]), **common)
    assert _metadata(outs[3])["layers"] == recorded["layers"]
    proto2, proto3 = onnx.load(str(outs[2])), onnx.load(str(outs[3]))
    assert [t.SerializeToString() for t in proto2.graph.initializer] == [
        t.SerializeToString() for t in proto3.graph.initializer
    ]
    # The replay file is recorded by name: spelled relative, from another folder, the same
    # bytes (the path as typed was in the record).
    monkeypatch.chdir(tmp_path)
    relative = tmp_path / "relative.onnx"
    _record(model, relative, factorize_speed_check=outs[2].name, **common)
    assert relative.read_bytes() == outs[3].read_bytes()


def test_prunes_compensation_values_without_pruning_are_refused(tmp_path):
    """Before: accepted with a note that factorize ignored them; --round-to without its
    passes was exit 2, and so is pruning's refit without pruning now."""
    model, calib = _files(tmp_path)
    options = OptimizeOptions(
        factorize="rank=16",
        calib=str(calib),
        compensation="lsq",
        factorize_speed_check="off",
        verify=False,
    )
    with pytest.raises(UserInputError, match=r"^--compensation lsq only applies with --prune"):
        optimize(model, tmp_path / "f.onnx", options)
    assert not (tmp_path / "f.onnx").exists()


def test_an_unreachable_flops_target_is_reported_with_the_shortfall(tmp_path):
    model, calib = _files(tmp_path)
    record = _record(
        model, tmp_path / "f.onnx", factorize="flops=0.95", calib=str(calib),
        factorize_speed_check="off",
    )  # fmt: skip
    assert record.layers and all(layer.rank == 8 for layer in record.layers)
    note = next(n for n in record.notes if "target not reached" in n)
    assert f"{record.flops_removed:.1%} of the model's FLOPs removed" in note
    assert record.flops_removed < 0.95
    assert record.target_missed.startswith("factorize flops=0.95: target NOT met: FLOPs -")
    assert record.to_json()["target_missed"] == record.target_missed


def test_a_missed_flops_target_exits_1_with_the_model_written(tmp_path, capsys):
    """Before: the shortfall was a note and the run exited 0; a flops=R target short by more
    than a tenth is a failed check (exit 1, written), and a met one stays exit 0."""
    model, calib = _files(tmp_path)
    common = ["--calib", str(calib), "--factorize-speed-check", "off", "--no-verify"]
    missed, met = tmp_path / "missed.onnx", tmp_path / "met.onnx"
    assert (
        main(["optimize", str(model), "-o", str(missed), "--factorize", "flops=0.95", *common]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphopt: error: factorize flops=0.95: target NOT met: FLOPs -")
    assert err.endswith("of the asked -95.0% (met from -85.5%) (written all the same)")
    assert missed.is_file() and "speed check" not in err
    assert main(["optimize", str(model), "-o", str(met), "--factorize", "flops=0.3", *common]) == 0
    assert met.is_file()


def test_eora_compensation_adds_paths_and_reduces_the_error(tmp_path):
    model, calib = _files(tmp_path)
    common = {"factorize": "rank=8", "calib": str(calib), "factorize_speed_check": "off"}
    plain = _record(model, tmp_path / "plain.onnx", **common)
    record = _record(model, tmp_path / "eora.onnx", compensation="eora:8", **common)
    assert record.compensation is not None and len(record.compensation.layers) == 2
    assert all(c.error_after < c.error_before for c in record.compensation.layers)
    worst = {r: max(f.mean_abs for f in x.fidelity["held-out"])
             for r, x in (("plain", plain), ("eora", record))}  # fmt: skip
    assert worst["eora"] < worst["plain"]
    assert "compensation" in record.to_json()


def test_eora_without_calibration_names_the_flag(tmp_path, capsys):
    model, _ = _files(tmp_path)
    args = ["--factorize", "rank=8", "--compensation", "eora:4"]
    assert main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--calib" in err and "eora:4" in err


def test_convolutions_end_to_end(tmp_path):
    from graphopt_tests.passes.factorization.graphs import cnn

    path, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    io.save(cnn(), path)
    rng = np.random.default_rng(1)
    images = np.einsum("cr,nrhw->nchw", rng.standard_normal((16, 4)),
                       rng.standard_normal((24, 4, 10, 10)))  # fmt: skip
    np.savez(calib, x=images.astype(np.float32))
    record = _record(
        path, tmp_path / "f.onnx", factorize="rank=16", calib=str(calib),
        factorize_speed_check="off", compensation="eora:4",
    )  # fmt: skip
    assert [(layer.node, layer.op) for layer in record.layers] == [
        ("conv1", "Conv"),
        ("conv2", "Conv"),
    ]
    assert ("fc", "the last layer (classifier): --factorize-keep-last false") in record.skipped
    assert [layer.rank for layer in record.layers] == [16, 16]
    assert [layer.shape for layer in record.layers] == [[48, 144], [64, 432]]
    cosine = [f.mean_cosine for f in record.fidelity["held-out"]]
    assert cosine and min(cosine) > 0.9
    # EoRA beside each factorized Conv pair: a Conv (the layer's kernel, r channels) and a
    # 1x1 Conv back to the layer's channels, added to the pair's output.
    assert record.compensation is not None
    assert [layer.node for layer in record.compensation.layers] == ["conv1", "conv2"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    assert ops.count("Conv") == 8


def test_energy_and_ratio_rules(tmp_path):
    model, calib = _files(tmp_path)
    ranks = {}
    for rule in ("energy=0.9", "energy=0.99", "ratio=0.25"):
        record = _record(
            model, tmp_path / "f.onnx", factorize=rule, calib=str(calib),
            factorize_speed_check="off",
        )  # fmt: skip
        ranks[rule] = [layer.rank for layer in record.layers]
    # The inputs have 6 strong directions: most of the whitened energy sits in few ranks.
    assert ranks["energy=0.9"] and all(r <= 16 for r in ranks["energy=0.9"])
    assert all(a <= b for a, b in zip(ranks["energy=0.9"], ranks["energy=0.99"], strict=False))
    assert ranks["ratio=0.25"] == [16, 16]  # 0.25 x 64, aligned to 8


def test_the_shown_layer_error_is_the_relative_output_error(tmp_path):
    """The report showed ‖XΔWᵀ‖²/‖XWᵀ‖² as the "relative output error" (0.168 for a layer
    whose outputs moved by 41%): the shown value must be ‖XΔWᵀ‖/‖XWᵀ‖."""
    model, calib = _files(tmp_path)
    record = _record(
        model, tmp_path / "f.onnx", factorize="rank=16", calib=str(calib),
        factorize_speed_check="off",
    )  # fmt: skip
    # "up" reads the model input: the fitted samples are the first 30 of 40 (a quarter held
    # out), with nothing factorized before it.
    x = np.load(calib)["x"][:30].reshape(-1, 64).astype(np.float64)
    (fitted,) = [f for f in record.fitted if f.name == "up"]
    (layer,) = [entry for entry in record.layers if entry.node == "up"]
    w, approx = fitted.weight.astype(np.float64), fitted.approx.astype(np.float64)
    # Canonical weights are [N, K]: the layer computes x @ Wᵀ.
    expected = np.linalg.norm(x @ (w - approx).T) / np.linalg.norm(x @ w.T)
    assert layer.error == pytest.approx(expected, rel=1e-3)
    assert record.to_json()["layers"][record.layers.index(layer)]["error"] == layer.error


def test_an_overshot_flops_target_is_noted():
    """flops=R runs could remove well past R (34.8% for flops=0.3) without a word."""
    from graphopt.passes.factorization.record import FactorizeRecord, LayerFactorization

    record = FactorizeRecord("flops=0.3", flops_before=1000, flops_after=650, target_flops=300)
    record.layers = [LayerFactorization("a", "MatMul", "ffn", [8, 8], 8, 16, 500, 150, 0.1, 1.2)]
    record.skipped = [("b", "rank 8: measured 0.90x the layer's speed in ORT (M=4), not faster")]
    note = record.overshoot_note(8)
    assert note is not None and "overshot: 35.0%" in note and "30% was asked" in note
    assert "speed check left 1 layer(s) whole" in note and "steps of 8" in note
    record.flops_after = 690  # 31%: within the tolerance
    assert record.overshoot_note(8) is None
    record.target_flops = 0  # not a flops=R rule
    assert record.overshoot_note(8) is None
