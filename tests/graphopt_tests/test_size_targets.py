"""Size targets judged on the model written (graphopt/size_targets.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from graphopt import io
from graphopt.cli import main
from graphopt.size_targets import Counts, judge_written
from graphopt_tests.passes.factorization.graphs import anisotropic, ffn


def _record(target: str, before: int, after: int) -> SimpleNamespace:
    return SimpleNamespace(
        target=target, flops_before=before, flops_after=after, params_before=0,
        params_after=0, target_missed="",
    )  # fmt: skip


def test_compensation_paths_added_later_count_against_the_target():
    """Before: prune's -32.5% stood though EoRA and Q/DQ made the written model grow."""
    prune = _record("flops=0.3", 1000, 675)
    notes = judge_written({"prune": prune}, Counts(1000, 10), Counts(1215, 12))
    assert prune.target_missed.startswith(
        "prune flops=0.3: target NOT met: FLOPs in the model written +21.5% reached"
    )
    assert len(notes) == 1 and "1,215 FLOPs against the input's 1,000 (+21.5%)" in notes[0]
    assert "its own count, on the model it received, -32.5%" in notes[0]


def test_a_written_count_equal_to_the_pass_keeps_its_verdict():
    prune = _record("flops=0.3", 1000, 700)
    assert judge_written({"prune": prune}, Counts(2000, 10), Counts(1400, 10)) == []
    assert prune.target_missed == ""


def test_a_later_stage_is_judged_on_what_it_received():
    """--erase-blocks 1 --prune flops=0.2: prune's share is of the erased model's FLOPs,
    and the note says so."""
    erase = _record("1 blocks", 1000, 500)
    prune = _record("flops=0.2", 500, 400)
    notes = judge_written({"erase-blocks": erase, "prune": prune}, Counts(1000, 1), Counts(400, 1))
    assert prune.target_missed == "" and erase.target_missed == ""
    assert len(notes) == 1
    assert "prune made FLOPs -20.0% of the FLOPs it received (after erase-blocks)" in notes[0]


def test_factorize_with_eora_short_of_the_target_exits_1(tmp_path, capsys):
    """Before: factorize flops=0.3 reported 30.9% removed and exited 0, while its EoRA
    paths left the written model only 12% smaller."""
    model, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    io.save(ffn(), model)
    np.savez(calib, x=anisotropic(np.random.default_rng(0), (40, 6, 64)))
    args = ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--factorize", "flops=0.3",
            "--calib", str(calib), "--factorize-speed-check", "off", "--no-verify"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--compensation", "eora:16"]) == 1
    captured = capsys.readouterr()
    assert "target NOT met: FLOPs in the model written -12.0%" in captured.err
    assert "judged on it, factorize made FLOPs -12.0%" in " ".join(captured.out.split())
