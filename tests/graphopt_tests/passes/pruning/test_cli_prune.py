"""`graphopt optimize --prune ...` from the command line: success, and one-line refusals."""

from __future__ import annotations

import numpy as np

from graphopt import io
from graphopt.cli import main
from graphopt_tests.passes.pruning.graphs import correlated, mlp


def _files(tmp_path):
    model = tmp_path / "mlp.onnx"
    io.save(mlp(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (32, 4, 16)))
    return model, calib


def test_prune_from_the_command_line(tmp_path, capsys):
    model, calib = _files(tmp_path)
    out = tmp_path / "pruned.onnx"
    code = main(
        [
            "optimize", str(model), "-o", str(out), "--prune", "flops=0.3",
            "--criterion", "reconstruction", "--compensation", "lsq", "--calib", str(calib),
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "pruning flops=0.3" in text and "+ lsq" in text
    assert io.load(out).model.graph.initializers  # an ordinary loadable model


def test_refinements_without_prune_are_refused(tmp_path, capsys):
    model, _ = _files(tmp_path)
    assert main(["optimize", str(model), "--criterion", "activation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--criterion only applies with --prune" in err


def test_pickled_calibration_is_refused_in_one_line(tmp_path, capsys):
    model, _ = _files(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([object()], dtype=object))
    code = main(
        ["optimize", str(model), "--prune", "flops=0.3", "--criterion", "activation",
         "--calib", str(bad)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "mlp.opt.onnx").exists()


def test_data_free_pruning_without_verification_says_it_measured_nothing(tmp_path, capsys):
    # Before: with l2 and no calibration samples, --no-verify left the cut unmeasured and
    # the report silent about it.
    model, _ = _files(tmp_path)
    out = tmp_path / "pruned.onnx"
    code = main(["optimize", str(model), "-o", str(out), "--prune", "flops=0.3", "--no-verify"])
    flat = " ".join(capsys.readouterr().out.split())
    assert code == 0, flat
    assert "prune: fidelity not measured: no held-out calibration samples" in flat
    # With verification the lossy change is measured on generated inputs, and no such note.
    assert main(["optimize", str(model), "-o", str(out), "--prune", "flops=0.3"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "lossy change vs the original (prune" in flat and "not measured" not in flat


def test_round_to_zero_is_refused_not_read_as_the_default(tmp_path, capsys):
    model, _ = _files(tmp_path)
    for flag in ("--prune", "--factorize"):
        target = "flops=0.3"
        code = main(["optimize", str(model), flag, target, "--round-to", "0", "--no-verify"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "--round-to" in err and "0" in err and "\n" not in err, err


def test_a_lossy_pass_listed_twice_is_refused(tmp_path, capsys):
    # Before: prune ran twice, its headline measured the second cut against the first.
    model, _ = _files(tmp_path)
    code = main(["optimize", str(model), "--passes", "prune,prune", "--prune", "flops=0.3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'prune' listed more than once" in err, err


def test_calibration_of_the_wrong_shape_is_refused_when_loaded(tmp_path, capsys):
    # l2 without compensation read the samples only to measure fidelity: ORT's
    # InvalidArgument there was an internal error (exit 3), and pruning's analysis at the
    # data's shapes found "no prunable group". Now refused when the file is loaded.
    model, _ = _files(tmp_path)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=correlated(np.random.default_rng(0), (8, 4, 15)))  # x is [.., .., 16]
    for flags in (
        ["--prune", "flops=0.3", "--criterion", "l2", "--compensation", "none"],
        ["--sparsity", "2:4", "--sparsity-criterion", "magnitude"],
    ):
        code = main(["optimize", str(model), *flags, "--calib", str(wrong)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "has size 15 on axis 2; the model fixes it at 16" in err, err
        assert "\n" not in err


def test_a_head_without_bias_that_is_the_graph_output_is_compensated(tmp_path, capsys):
    """The last MatMul has no bias and is the graph output (an LM head): bias compensation
    inserted an Add that read its own output, and ORT refused the candidate ("the graph is not
    acyclic", exit 3)."""
    model = mlp()
    last_add = list(model.graph)[-1]
    matmul_out = last_add.inputs[0]
    model.graph.outputs[0] = matmul_out
    model.graph.remove(last_add, safe=True)
    matmul_out.name = "y"
    path = tmp_path / "head.onnx"
    io.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated(np.random.default_rng(0), (32, 4, 16)))
    out = tmp_path / "pruned.onnx"
    code = main(
        ["optimize", str(path), "-o", str(out), "--prune", "flops=0.3", "--calib", str(calib)]
    )
    text = capsys.readouterr()
    assert code == 0, text.err
    assert [v.name for v in io.load(out).model.graph.outputs] == ["y"]


def test_a_target_missed_beyond_the_slack_exits_1_with_the_model_written(tmp_path, capsys):
    """Before: -74.7% reached of an asked -90% (no group loses more than 80%) was a note and
    exit 0. A target short by more than a tenth is a failed check, as quantize's is."""
    model, _ = _files(tmp_path)
    out = tmp_path / "pruned.onnx"
    code = main(["optimize", str(model), "-o", str(out), "--prune", "flops=0.9"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and out.is_file()
    assert err == (
        "graphopt: error: prune flops=0.9: target NOT met: flops -74.7% reached of the asked "
        "-90.0% (met from -81.0%) (written all the same)"
    )


def test_a_run_that_removes_no_unit_is_refused_unchanged(tmp_path, capsys):
    """Before: a prunable group that loses no unit at the target (here --max-group-ratio
    allows less than one) wrote the model unchanged as a pruned one, exit 0."""
    model, _ = _files(tmp_path)
    out = tmp_path / "pruned.onnx"
    args = ["--prune", "flops=0.3", "--max-group-ratio", "0.01"]
    code = main(["optimize", str(model), "-o", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err == (
        "graphopt: error: prune flops=0.3: nothing to prune: every candidate group is left as "
        "it was (1 group: no unit goes at this target (alignment to --round-to, "
        "--max-group-ratio 0.01)); the model would come back unchanged"
    )
