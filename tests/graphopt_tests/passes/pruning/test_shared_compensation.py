"""``--compensation`` is one flag shared by prune (none|bias|lsq|eora:RANK) and the passes
after it (eora:RANK): with an EoRA value pruning keeps its own default refit and adds paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.cli import main


@pytest.fixture
def ffn_and_calib(tmp_path: Path) -> tuple[Path, Path]:
    from graphopt_tests.passes.pruning.graphs import correlated, mlp

    model = tmp_path / "ffn.onnx"
    ir.save(mlp(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (32, 4, 16)))
    return model, calib


def test_prune_keeps_its_default_and_adds_paths_for_an_eora_value(ffn_and_calib, capsys) -> None:
    model, calib = ffn_and_calib
    out_path = model.parent / "out.onnx"
    args = ["optimize", str(model), "-o", str(out_path), "--prune", "flops=0.3"]
    code = main([*args, "--calib", str(calib), "--compensation", "eora:8"])
    out = capsys.readouterr().out
    assert code == 0 and out_path.exists()
    # lsq (pruning's default) stays underneath; eora:8 adds a rank-8 path after it.
    assert "compensation lsq (default)" in out
    assert "EoRA rank 8: 1 float32 low-rank paths added" in out
    assert "is for factorize/sparsify/quantize" not in out
    assert sum(n.op_type == "MatMul" for n in ir.load(out_path).graph) == 4


def test_a_value_no_pass_takes_is_one_line_and_exit_2(ffn_and_calib, capsys) -> None:
    model, calib = ffn_and_calib
    args = ["optimize", str(model), "-o", str(model.parent / "o.onnx"), "--prune", "flops=0.3"]
    code = main([*args, "--calib", str(calib), "--compensation", "bogus"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--compensation 'bogus'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
