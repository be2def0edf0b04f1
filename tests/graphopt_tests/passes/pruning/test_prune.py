"""The pruning pass end to end on small models: targets, criteria, compensation, errors."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt import io
from graphopt.analysis.flops import model_flops
from graphopt.analysis.stats import live_parameter_count
from graphopt.errors import UserInputError
from graphopt.passes.pruning.prune import PrunePass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.passes.pruning.graphs import branches, cnn, correlated, mlp, write_npz

CNN_SHAPES = {"x": (1, 3, 8, 8)}
MLP_SHAPES = {"x": (1, 4, 16)}


def prune(model, **options):
    """Run the pass on a copy; return (pruned copy, its PruneReport, notes)."""
    copy = model.clone()
    context = PassContext()
    PrunePass(context, **options)(copy)
    return copy, context.details["prune"], context.notes


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale"])
def test_flops_target_reached_and_model_runs(criterion, allocation):
    model = cnn()
    pruned, report, _ = prune(
        model, flops=0.4, criterion=criterion, allocation=allocation, round_to=1
    )
    before = model_flops(model, CNN_SHAPES).total
    after = model_flops(pruned, CNN_SHAPES).total
    assert 0.39 <= 1 - after / before <= 0.6
    assert report.flops_removed == pytest.approx(1 - after / before)
    feeds = {"x": np.random.default_rng(0).random((2, 3, 8, 8), np.float32)}
    (out,) = run_model(pruned, feeds)
    assert out.shape == (2, 10)
    assert report.units_removed > 0


def test_params_target():
    model = mlp()
    pruned, report, _ = prune(model, params=0.5, round_to=1)
    assert live_parameter_count(pruned) <= 0.51 * live_parameter_count(model)
    assert report.params_removed >= 0.49


def test_round_to_aligns_kept_channels():
    pruned, _, _ = prune(mlp(hidden=64), flops=0.3, round_to=8)
    w1 = next(v for k, v in pruned.graph.initializers.items() if v.uses() and "w1" in k)
    assert w1.const_value.shape[1] % 8 == 0 and w1.const_value.shape[1] < 64


def test_units_with_zero_weights_are_removed_exactly():
    """Zeroed units carry nothing: removing them must leave the outputs unchanged."""
    model = mlp(hidden=64)
    zero = np.arange(0, 64, 2)  # half the hidden units
    for name, axis in (("w1", 1), ("b1", 0), ("w2", 0)):
        value = model.graph.initializers[name]
        array = value.const_value.numpy().copy()
        np.moveaxis(array, axis, 0)[zero] = 0
        value.const_value = io.ir.Tensor(array, name=name)
    pruned, report, _ = prune(model, params=0.35, criterion="l1", round_to=1)
    assert 0 < report.units_removed <= len(zero)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 4, 16)).astype(np.float32)}
    (ref,) = run_model(model, feeds)
    (got,) = run_model(pruned, feeds)
    assert np.abs(ref - got).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("compensation", ["bias", "lsq"])
def test_compensation_brings_outputs_closer_on_heldout(tmp_path, compensation):
    rng = np.random.default_rng(3)
    calib = write_npz(tmp_path / "c.npz", {"x": correlated(rng, (64, 4, 16)) + 1.0})
    model = mlp(hidden=64)
    _, report, notes = prune(
        model,
        flops=0.5,
        criterion="activation",
        compensation=compensation,
        calib=calib,
        round_to=1,
    )
    assert report.heldout_samples == 16
    before, after = report.fidelity_pruned[0], report.fidelity_compensated[0]
    assert after.mean_abs < before.mean_abs
    assert after.mean_cosine > before.mean_cosine
    assert any(f"after {compensation}" in n for n in notes)


def test_lsq_beats_bias_on_correlated_conv_inputs(tmp_path):
    rng = np.random.default_rng(5)
    calib = write_npz(tmp_path / "c.npz", {"x": correlated(rng, (48, 3, 8, 8), rank=2)})
    results = {}
    for method in ("bias", "lsq"):
        _, report, _ = prune(
            cnn(), flops=0.5, criterion="fluctuation", compensation=method, calib=calib
        )
        results[method] = report.fidelity_compensated[0].mean_abs
        assert results[method] < report.fidelity_pruned[0].mean_abs
    assert results["lsq"] < results["bias"]


@pytest.mark.parametrize(
    "build,expected", [(cnn, [["c2"], ["c3"], ["logits"]]), (branches, [["b1", "b2"], ["logits"]])]
)
def test_compensation_stages_never_hold_a_layer_with_one_it_reads(build, expected):
    """A layer is fitted on its input as it is when its stage starts: a refit upstream in the
    same stage would change that input afterwards. Parallel branches may share a stage."""
    from graphopt.analysis.zig import analyze
    from graphopt.passes.pruning.compensation import _stages
    from graphopt.passes.pruning.consumers import find_consumers, tag_nodes, tagged_nodes

    model = build()
    report = analyze(model, CNN_SHAPES)
    consumers = find_consumers(report, report.prunable)
    tag_nodes(model, consumers)
    nodes = tagged_nodes(model)
    stages = _stages(model, consumers, nodes)
    assert [[nodes[consumers[i].tag].outputs[0].name for i in s] for s in stages] == expected


def test_chained_layers_refitted_one_stage_after_another(tmp_path, monkeypatch):
    """Fitted together, c3 would correct an input error that c2's refit then removes: worse
    than fitting in order (the pass then keeps no refit at all)."""
    from graphopt.passes.pruning import compensation

    rng = np.random.default_rng(5)
    calib = write_npz(tmp_path / "c.npz", {"x": correlated(rng, (48, 3, 8, 8), rank=2)})
    errors = {}
    default = compensation.MAX_STAGES
    for stages in (default, 1):
        monkeypatch.setattr(compensation, "MAX_STAGES", stages)
        _, report, _ = prune(
            cnn(), flops=0.5, criterion="fluctuation", compensation="lsq", calib=calib
        )
        errors[stages] = report.fidelity_compensated[0].mean_abs
        plain = report.fidelity_pruned[0].mean_abs
    assert errors[default] < 0.2 * plain
    assert errors[default] < errors[1]


def test_data_criterion_without_calibration_is_a_user_error():
    with pytest.raises(UserInputError, match="needs calibration data"):
        prune(mlp(), flops=0.3, criterion="activation")
    with pytest.raises(UserInputError, match="needs calibration data"):
        prune(mlp(), flops=0.3, compensation="lsq")


def test_random_calibration_warns():
    _, report, notes = prune(
        mlp(), flops=0.3, criterion="activation", compensation="bias", calib="random"
    )
    assert report.calibration == "random"
    assert any(n.startswith("warning: --calib random") for n in notes)


def test_calibration_with_wrong_inputs_is_refused(tmp_path):
    calib = write_npz(tmp_path / "c.npz", {"other": np.zeros((4, 4, 16), np.float32)})
    with pytest.raises(UserInputError, match="no array for model input"):
        prune(mlp(), flops=0.3, criterion="activation", calib=calib)


def test_target_must_be_one_fraction():
    with pytest.raises(UserInputError):
        prune(mlp(), flops=1.5)
    with pytest.raises(UserInputError):
        prune(mlp(), flops=0.3, params=0.3)
    with pytest.raises(UserInputError):
        prune(mlp(), flops=0.3, criterion="magic")


def test_deterministic(tmp_path):
    rng = np.random.default_rng(7)
    calib = write_npz(tmp_path / "c.npz", {"x": correlated(rng, (24, 4, 16))})
    outputs = []
    for _ in range(2):
        pruned, _, _ = prune(
            mlp(), flops=0.4, criterion="activation", compensation="lsq", calib=calib
        )
        outputs.append(io.to_proto(pruned).SerializeToString())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("stride,dilation,pad", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 1, 0)])
def test_patch_rows_reproduce_conv(stride, dilation, pad):
    """im2col rows times the flattened weight equal the Conv ORT computes."""
    from onnx import TensorProto, helper

    from graphopt.passes.pruning.compensation import patch_rows
    from graphopt_tests.helpers import make_model, tensor_info

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], pads=[pad] * 4, strides=[stride] * 2, dilations=[dilation] * 2
    )
    model = make_model(
        [node],
        [tensor_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
        [tensor_info("y", TensorProto.FLOAT, [2, 5, "h", "w"])],
        {"w": weight},
    )
    (y,) = run_model(model, {"x": x})
    rows = patch_rows(x, (3, 3), (pad,) * 4, (stride,) * 2, (dilation,) * 2)
    got = (rows @ weight.reshape(5, -1).T).reshape(2, y.shape[2], y.shape[3], 5)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), y, rtol=1e-4, atol=1e-4)


def test_reconstruction_removes_a_duplicated_unit_and_lsq_absorbs_it(tmp_path):
    """A hidden unit that copies another carries nothing the other cannot: the reconstruction
    criterion picks one of the twins, and least squares moves its weight onto the other."""
    model = mlp(hidden=16)
    for name, axis in (("w1", 1), ("b1", 0)):
        value = model.graph.initializers[name]
        array = value.const_value.numpy().copy()
        np.moveaxis(array, axis, 0)[3] = np.moveaxis(array, axis, 0)[7]
        value.const_value = io.ir.Tensor(array, name=name)
    rng = np.random.default_rng(11)
    calib = write_npz(tmp_path / "c.npz", {"x": rng.standard_normal((64, 4, 16), np.float32)})
    pruned, report, _ = prune(
        model,
        params=0.05,  # one unit (w1 column, b1 entry, w2 row) is 33 of 544 params
        criterion="reconstruction",
        compensation="lsq",
        calib=calib,
        round_to=1,
        ridge=1e-6,
    )
    assert report.units_removed == 1
    feeds = {"x": rng.standard_normal((2, 4, 16)).astype(np.float32)}
    (ref,) = run_model(model, feeds)
    (got,) = run_model(pruned, feeds)
    assert np.abs(ref - got).max() <= 1e-3 * np.abs(ref).max()


def test_lsq_that_does_not_help_falls_back_to_bias(tmp_path, monkeypatch):
    """Least squares that moves the validation outputs further is not kept; bias compensation
    is tried next, and the report says which method the result carries."""
    import onnx_ir as ir

    from graphopt.passes.pruning import pruner

    real = pruner.compensate
    asked: list[str] = []

    def spoiled(original, pruned, consumers, calib, method, *args):
        asked.append(method)
        layers = real(original, pruned, consumers, calib, method, *args)
        if method == "lsq":  # a refit that wrecks the layer
            for node in pruned.graph:
                if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
                    w = node.inputs[1]
                    node.replace_input_with(1, ir.Value(name=f"{w.name}_bad"))
                    node.inputs[1].const_value = ir.tensor(w.const_value.numpy() * -3.0)
                    pruned.graph.register_initializer(node.inputs[1])
        return layers

    monkeypatch.setattr(pruner, "compensate", spoiled)
    rng = np.random.default_rng(3)
    calib = write_npz(tmp_path / "c.npz", {"x": correlated(rng, (64, 4, 16)) + 1.0})
    _, report, notes = prune(
        mlp(hidden=64), flops=0.5, criterion="activation", compensation="lsq", calib=calib
    )
    assert asked == ["lsq", "bias"]
    assert report.compensation_used == "bias" and report.compensation_kept
    assert report.fidelity_compensated[0].mean_abs < report.fidelity_pruned[0].mean_abs
    assert any("trying bias compensation" in n for n in notes)
    assert any("after bias" in n for n in notes)
