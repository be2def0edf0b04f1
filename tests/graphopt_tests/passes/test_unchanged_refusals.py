"""sparsify, factorize and decompose refuse a run that would hand the model back unchanged
(exit 2, one line naming why), as quantize does: an already quantized model (start from the
float one), or every candidate left as it was. Before, each wrote a copy with "0 layers
sparsified" / "0 layers factorized" / "0 modules decomposed" and exit 0. The one measured
exception: factorize's speed check finding every pair slower is a reported result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graphopt import io
from graphopt.cli import main
from graphopt_tests.passes.factorization.graphs import anisotropic, ffn


def _files(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "ffn.onnx"
    io.save(ffn(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=anisotropic(np.random.default_rng(0), (40, 6, 64)))
    return model, calib


def _optimize(capsys, source: Path, out: Path, *args: str) -> tuple[int, str, str]:
    code = main(["optimize", str(source), "-o", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture
def quantized(tmp_path: Path, capsys) -> tuple[Path, Path]:
    model, calib = _files(tmp_path)
    out = tmp_path / "int8.onnx"
    code, _, err = _optimize(capsys, model, out, "--quantize", "int8", "--calib", str(calib))
    assert code == 0, err
    return out, calib


@pytest.mark.parametrize(
    ("flag", "verb"),
    [
        (["--sparsity", "2:4"], "sparsify"),
        (["--factorize", "flops=0.2", "--factorize-speed-check", "off"], "factorize"),
        (["--decompose", "flops=0.2"], "decompose"),
    ],
)
def test_an_already_quantized_model_is_refused(tmp_path, capsys, quantized, flag, verb) -> None:
    source, calib = quantized
    out = tmp_path / "out.onnx"
    code, _, err = _optimize(capsys, source, out, *flag, "--calib", str(calib))
    assert code == 2 and err.count("\n") == 0, err
    assert f"{verb} " in err and "the model is already quantized (it has DequantizeLinear" in err
    assert err.endswith(f"{verb} the float model, then quantize it")
    assert not out.exists()


def test_every_candidate_left_is_refused_naming_the_reasons(tmp_path, capsys) -> None:
    model, calib = _files(tmp_path)
    out = tmp_path / "out.onnx"
    args = ["--sparsity", "2:4", "--sparsity-layers", "nothing*", "--calib", str(calib)]
    code, _, err = _optimize(capsys, model, out, *args)
    assert code == 2, err
    assert err == (
        "graphopt: error: sparsify 2:4: nothing to sparsify: every candidate layer is left as "
        "it was (2 layers: not in --sparsity-layers nothing*); the model would come back "
        "unchanged"
    )
    assert not out.exists()


def test_a_speed_check_that_keeps_every_layer_whole_is_a_reported_result(
    tmp_path, capsys, monkeypatch
) -> None:
    """The speed check's answer is measured on this CPU (the same options factorize where
    the pairs are faster): reported and written with the timings, not refused as bad input;
    a flops=R target so missed is a failed check (exit 1), naming the speed check."""
    from graphopt.passes.factorization import speed
    from graphopt.passes.sparsity.crossover import Timing

    monkeypatch.setattr(speed.SpeedCheck, "timing", lambda self, shape, rank: Timing(1.0, 2.0))
    model, calib = _files(tmp_path)
    out = tmp_path / "out.onnx"
    args = ["--factorize", "flops=0.3", "--calib", str(calib), "--no-verify"]
    code, text, err = _optimize(capsys, model, out, *args)
    assert code == 1, err
    assert err.startswith("graphopt: error: factorize flops=0.3: target NOT met: FLOPs 0.0%")
    assert "the speed check left 2 layer(s) whole" in err
    assert "factorize flops=0.3: 0 layers factorized" in text
    assert "nothing factorized: the speed check measured every layer" in text
    assert out.exists()
