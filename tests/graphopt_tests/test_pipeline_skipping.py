"""The pass manager skips idle passes (trigger ops absent, memoized no-ops) without any effect.

Differential: the default pipeline with skipping on and off must give byte-identical models;
and the skips must actually happen (a pass whose trigger ops are absent does not run).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from onnx import TensorProto, helper

from graphopt import editing, io
from graphopt.fingerprint import fingerprint
from graphopt.pipeline import PassManager, PassSpec, Step, default_pipeline, op_types
from graphopt.registry import GraphPass, PassContext, Stage, all_passes
from graphopt_tests.helpers import make_model, register_for_test, tensor_info

F = TensorProto.FLOAT
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def conv_bn_model() -> ir.Model:
    """Conv → BatchNormalization → Relu → Reshape(Shape-computed target) → Identity."""
    rng = np.random.default_rng(0)
    init = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
        "mean": rng.standard_normal(4).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "flat": np.array([1, -1], np.int64),
    }
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"]),
            helper.make_node("Relu", ["b"], ["r"]),
            helper.make_node("Reshape", ["r", "flat"], ["f"]),
            helper.make_node("Identity", ["f"], ["y"]),
        ],
        [tensor_info("x", F, [1, 3, 8, 8])],
        [tensor_info("y", F, [1, 256])],
        init,
    )


def if_model() -> ir.Model:
    """The only Identity sits inside an If branch: its pass must still run."""
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Abs", ["i"], ["t"])],
        "then",
        [],
        [tensor_info("t", F, [2])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor_info("e", F, [2])]
    )
    return make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [tensor_info("cond", TensorProto.BOOL, []), tensor_info("x", F, [2])],
        [tensor_info("y", F, [2])],
    )


def run_default(model: ir.Model, skip: bool, monkeypatch=None) -> tuple[bytes, PassManager]:
    manager = PassManager(default_pipeline(), PassContext(fold_limit_bytes=None))
    manager.skip_idle = skip
    if not skip and monkeypatch is not None:
        # Also never reuse a shape inference: every fusion pass infers again.
        monkeypatch.setattr(editing, "fingerprint", lambda model: object())
    result, _ = manager.run(model)
    return io.to_proto(result).SerializeToString(), manager


def light_models() -> list[Path]:
    return [LIGHT / f"light_{name}.onnx" for name in ("squeezenet", "shufflenet")]


@pytest.mark.parametrize("build", [conv_bn_model, if_model], ids=["conv_bn", "if"])
def test_skipping_changes_nothing_on_small_models(build, monkeypatch) -> None:
    skipped, _ = run_default(build(), skip=True)
    with monkeypatch.context() as patch:
        every, _ = run_default(build(), skip=False, monkeypatch=patch)
    assert skipped == every


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_skipping_changes_nothing_on_light_models(path: Path, monkeypatch) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not in this onnx install")
    skipped, manager = run_default(io.load(path).model, skip=True)
    with monkeypatch.context() as patch:
        every, full = run_default(io.load(path).model, skip=False, monkeypatch=patch)
    assert skipped == every
    ran = sum(s.runs for s in manager._stats.values())
    ran_all = sum(s.runs for s in full._stats.values())
    assert ran < ran_all  # skipping did happen


def test_pass_without_its_trigger_ops_is_skipped_but_listed() -> None:
    model = conv_bn_model()
    _, manager = run_default(model, skip=True)
    stats = manager._stats
    # No Transpose, Pad, MatMul or Dropout in this model: those passes never ran.
    for name in ("transpose-merge", "fuse-pad-conv", "fuse-matmul-add", "dropout"):
        assert stats[name].runs == 0, name
    # Triggered ones ran and did their work.
    assert stats["fuse-conv-bn"].runs == 1 and stats["fuse-conv-bn"].hits == 1
    assert stats["identity"].hits == 1
    # Every pass of the pipeline still has its row in the report (lowering passes such as
    # sparse-kernels join the pipeline only when their flag asks for them).
    default = {n for n, cls in all_passes().items() if cls.exact and cls.stage != Stage.LOWER}
    assert set(stats) == default


def test_pass_for_another_target_is_skipped_and_changes_nothing() -> None:
    passes = all_passes()
    ort_only = [n for n, cls in passes.items() if cls.targets == frozenset({"ort"})]
    assert "ort-attention" in ort_only and "ort-residual-sum" in ort_only
    assert passes["residual-sum"].targets == frozenset({"portable"})
    # The pass manager never runs them for the portable target, even without skipping.
    _, manager = run_default(conv_bn_model(), skip=False)
    assert all(manager._stats[n].runs == 0 for n in ort_only if n in manager._stats)
    # Called directly with the wrong target, a pass leaves the model as it was.
    model = conv_bn_model()
    before = fingerprint(model)
    result = passes["ort-residual-sum"](PassContext(target="portable"))(model)
    assert not result.modified and fingerprint(model) == before


def test_trigger_ops_inside_subgraphs_count() -> None:
    model = if_model()
    assert {"If", "Identity", "Neg"} <= op_types(model)
    _, manager = run_default(model, skip=True)
    assert manager._stats["identity"].hits == 1


class CountingPass(GraphPass):
    """Test only: a memoized pass that changes nothing and counts its runs."""

    name = "test-counting"
    memoize = True
    calls: ClassVar[list[int]] = []

    def rewrite(self, model: ir.Model) -> int:
        CountingPass.calls.append(1)
        return 0


class RenameOncePass(GraphPass):
    """Test only: renames the first node once, reporting no hit (a silent change)."""

    name = "test-rename-once"

    def rewrite(self, model: ir.Model) -> int:
        node = next(iter(model.graph))
        if node.name != "renamed":
            node.name = "renamed"
        return 0


def test_memoized_pass_reruns_only_after_a_change(monkeypatch) -> None:
    register_for_test(monkeypatch, CountingPass, RenameOncePass)
    monkeypatch.setattr(CountingPass, "calls", [])
    model = conv_bn_model()
    counting = PassSpec("test-counting")
    steps = [Step((counting,)), Step((counting,)), Step((PassSpec("test-rename-once"), counting))]
    manager = PassManager(steps, PassContext())
    manager.run(model)
    # Second step: same state as the first left unchanged → skipped. Third: the silent
    # rename changed the state (no hit reported), so it runs again.
    assert len(CountingPass.calls) == 2


def test_shape_filling_is_skipped_on_a_state_it_left_unchanged(monkeypatch) -> None:
    calls: list[int] = []
    real = ir.passes.common.ShapeInferencePass

    class Counting(real):
        def call(self, model):
            calls.append(1)
            return super().call(model)

    monkeypatch.setattr(ir.passes.common, "ShapeInferencePass", Counting)
    model = conv_bn_model()
    before = fingerprint(model)
    editing.fill_missing_shapes(model)  # fills in shapes: the state changes
    assert fingerprint(model) != before
    editing.fill_missing_shapes(model)  # runs, changes nothing: remembered
    editing.fill_missing_shapes(model)  # skipped
    assert len(calls) == 2
    model.graph.node(0).name = "other"  # any change: inference runs again
    editing.fill_missing_shapes(model)
    assert len(calls) == 3


def test_rule_fusions_apply_by_their_own_gate() -> None:
    from graphopt.passes.fusion.layer_norm import FuseLayerNormPass

    # Trigger ReduceMean, and every LayerNorm pattern also needs Sqrt and Add.
    assert not FuseLayerNormPass.applies(frozenset({"Conv", "Relu"}))
    assert not FuseLayerNormPass.applies(frozenset({"ReduceMean", "Sqrt"}))
    assert FuseLayerNormPass.applies(frozenset({"ReduceMean", "Sqrt", "Add", "Div"}))


def test_every_trigger_op_set_names_standard_ops() -> None:
    # A typo in a trigger op would silently switch a pass off.
    schemas = {schema.name for schema in onnx.defs.get_all_schemas_with_history()}
    for name, cls in all_passes().items():
        if cls.ops is not None:
            assert cls.ops, name
            assert cls.ops <= schemas, (name, sorted(cls.ops - schemas))
