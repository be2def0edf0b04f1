"""Deterministic, idempotent, traceable: same input and options give the same bytes in any
process, ``optimize`` of its own output changes nothing, and the output records what made it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import finalize, io
from graphopt.api import OptimizeOptions
from graphopt.models.demo import write_demo
from graphopt.passes.erasure.constant_folding import ConstantFoldingPass
from graphopt.passes.erasure.dead_code import DeadCodePass, UnusedInitializersPass
from graphopt.registry import PassContext
from graphopt.verify import run_model
from graphopt_tests.analysis.zig_graphs import gqa_shape_targets
from graphopt_tests.passes.pruning.graphs import cnn, correlated, write_npz

ROOT = Path(__file__).resolve().parents[2]
F = TensorProto.FLOAT


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))


def branchy() -> onnx.ModelProto:
    """An If like silero-vad's: branches full of Constants, weights read only inside them.

    The outer If picks on the data. Its then-branch holds an unused Constant and an inner If
    whose condition is a Constant (folding inlines the taken branch); the untaken one alone
    reads the outer initializer ``w_dead`` and the branch Constant ``c_dead``. ``w_live``
    is read only inside the taken branch, ``unused_top`` by nothing.
    """
    shape = [4]
    inner_then = helper.make_graph(
        [helper.make_node("Mul", ["x", "w_live"], ["i_then"])],
        "inner_then",
        [],
        [helper.make_tensor_value_info("i_then", F, shape)],
    )
    inner_else = helper.make_graph(
        [
            helper.make_node("Add", ["x", "w_dead"], ["i_sum"]),
            helper.make_node("Mul", ["i_sum", "c_dead"], ["i_else"]),
        ],
        "inner_else",
        [],
        [helper.make_tensor_value_info("i_else", F, shape)],
    )
    then_branch = helper.make_graph(
        [
            _constant("t_unused", np.arange(3, dtype=np.float32)),
            _constant("c_dead", np.full(shape, 3.0, np.float32)),
            _constant("t_flag", np.array(True)),
            helper.make_node(
                "If", ["t_flag"], ["t_inner"], then_branch=inner_then, else_branch=inner_else
            ),
            _constant("t_axes", np.array([0], np.int64)),
            helper.make_node("Unsqueeze", ["t_inner", "t_axes"], ["t_2d"]),
            _constant("t_shape", np.array([4], np.int64)),
            helper.make_node("Reshape", ["t_2d", "t_shape"], ["t_out"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", F, shape)],
    )
    else_branch = helper.make_graph(
        [
            _constant("e_unused", np.ones((8, 8), np.float32)),
            helper.make_node("Sub", ["x", "shared"], ["e_out"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", F, shape)],
    )
    inits = {
        "zero": np.array(0.0, np.float32),
        "w_live": np.arange(4, dtype=np.float32),
        "w_dead": np.full(shape, 7.0, np.float32),
        "shared": np.full(shape, 0.5, np.float32),
        "unused_top": np.ones(64, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch
            ),
            helper.make_node("Add", ["y", "shared"], ["z"]),
        ],
        "branchy",
        [helper.make_tensor_value_info("x", F, shape)],
        [helper.make_tensor_value_info("z", F, shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def invented_dims() -> onnx.ModelProto:
    """NonZero's count is a dim ONNX inference invents (unk__N), numbered after the dead
    NonZero's in the first run and before it in the second, once dead code is gone."""
    nodes = [
        helper.make_node("Neg", ["x"], ["nx"]),
        helper.make_node("NonZero", ["nx"], ["dead_nz"]),
        helper.make_node("NonZero", ["x"], ["nz"]),
        helper.make_node("Transpose", ["nz"], ["t"], perm=[1, 0]),
        helper.make_node("Cast", ["t"], ["tf"], to=F),
        helper.make_node("ReduceSum", ["tf"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "invented_dims",
        [helper.make_tensor_value_info("x", F, [4])],
        [helper.make_tensor_value_info("y", F, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _names(model: onnx.ModelProto) -> set[str]:
    """Initializer names and Constant outputs, subgraphs included."""
    found: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        found.update(i.name for i in graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant":
                found.update(node.output)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return found


def _cli(args: list[str], hash_seed: str) -> subprocess.CompletedProcess:
    # A fresh interpreter per run: the hash seed (set/dict order of strings) is per process.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, "-m", "graphopt", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


# --- same input and options, same bytes, whatever the hash seed -----------------------------


def _save_case(case: str, folder: Path) -> Path:
    path = folder / f"{case}.onnx"
    if case == "branchy":
        onnx.save(branchy(), str(path))
    else:
        ir.save(cnn() if case == "cnn" else gqa_shape_targets(), path)
    return path


@pytest.mark.parametrize(
    "case,extra",
    [
        ("branchy", []),  # the default exact pipeline
        ("cnn", ["--prune", "flops=0.3", "--calib", "random"]),
        # Pruning rewrites shape constants here: the order of the new initializers followed
        # the iteration order of a set of (name, axis) keys, i.e. the hash seed.
        ("gqa", ["--prune", "flops=0.3", "--calib", "random"]),
    ],
)
def test_cli_output_is_byte_identical_across_hash_seeds(
    tmp_path: Path, case: str, extra: list[str]
) -> None:
    source = _save_case(case, tmp_path)
    outputs = []
    for seed in ("1", "2"):
        output = tmp_path / f"out{seed}.onnx"
        proc = _cli(["optimize", str(source), "-o", str(output), *extra], seed)
        assert proc.returncode == 0, proc.stderr
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]


def test_analyze_json_is_identical_across_hash_seeds(tmp_path: Path) -> None:
    source = _save_case("gqa", tmp_path)
    reports = []
    for seed in ("1", "2"):
        proc = _cli(["analyze", str(source), "--json"], seed)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        report.pop("seconds")  # analysis time: the one field that may differ
        reports.append(report)
    assert reports[0]["groups"], "the model has groups to compare"
    assert reports[0] == reports[1]


# --- optimize of its own output changes nothing ---------------------------------------------


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_model(io.load(model).model, {"x": x})[0]


def test_optimize_is_idempotent_on_if_branches(tmp_path: Path) -> None:
    source = tmp_path / "branchy.onnx"
    onnx.save(branchy(), str(source))
    first, second = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    graphopt.optimize(source, first)
    graphopt.optimize(first, second)
    assert second.read_bytes() == first.read_bytes()

    once = onnx.load(str(first))
    names = _names(once)
    # Read only by the untaken inner branch, or by nothing: gone.
    assert not names & {"w_dead", "c_dead", "unused_top", "t_unused", "e_unused"}
    # Read only inside the outer If's then-branch (outer scope, by name): kept.
    assert "w_live" in names
    for x in (np.array([1, 2, 3, 4], np.float32), np.array([-1, -2, 0.5, -3], np.float32)):
        expected = _outputs(branchy(), x)
        np.testing.assert_allclose(_outputs(once, x), expected, rtol=1e-6)
        np.testing.assert_allclose(_outputs(onnx.load(str(second)), x), expected, rtol=1e-6)


def test_optimize_is_idempotent_where_inference_invents_dims(tmp_path: Path) -> None:
    source = tmp_path / "nonzero.onnx"
    onnx.save(invented_dims(), str(source))
    first, second = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    graphopt.optimize(source, first)
    graphopt.optimize(first, second)
    assert second.read_bytes() == first.read_bytes()
    x = np.array([1, 0, 2, 0], np.float32)
    expected = _outputs(invented_dims(), x)
    np.testing.assert_allclose(_outputs(onnx.load(str(first)), x), expected)


def test_optimize_is_idempotent_on_the_demo_model(tmp_path: Path) -> None:
    """Fusions add initializers last and onnx-ir's shape inference moves every one over 1 KB
    to the end: the order a run left depended on its history, so a rerun reordered them."""
    source = write_demo(tmp_path / "demo.onnx")
    first, second = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    graphopt.optimize(source, first)
    graphopt.optimize(first, second)
    assert second.read_bytes() == first.read_bytes()


def test_initializers_are_ordered_by_first_use() -> None:
    model = io.load(branchy()).model
    graph = model.graph
    for name in reversed(list(graph.initializers)):  # the reverse of the first-use order
        graph.initializers[name] = graph.initializers.pop(name)
    assert finalize.order_initializers(model) == 1
    # Nodes in graph order, a node's bodies right after it (onnx keeps attributes sorted:
    # else_branch before then_branch): zero (Greater), shared (outer else-branch), w_dead
    # (inner else-branch), w_live (inner then-branch); unused_top is read by nothing.
    assert list(graph.initializers) == ["zero", "shared", "w_dead", "w_live", "unused_top"]
    assert finalize.order_initializers(model) == 0


def test_dead_code_ignores_readers_that_left_the_model() -> None:
    """Folding drops the inner If with its untaken branch; what only that branch read is dead
    at once, not after a save and a reload."""
    model = io.load(branchy()).model
    context = PassContext()
    ConstantFoldingPass(context)(model)
    DeadCodePass(context)(model)
    UnusedInitializersPass(context)(model)
    names = _names(io.to_proto(model))
    assert "c_dead" not in names and "w_dead" not in names
    assert "w_live" in names
    w_live = model.graph.initializers["w_live"]
    assert all(use.node.graph is not None for use in w_live.uses())


def test_dead_code_keeps_outer_values_live_branches_read() -> None:
    model = io.load(branchy()).model
    DeadCodePass(PassContext())(model)
    names = _names(io.to_proto(model))
    # No folding: the inner If stays, so both its branches' reads are live.
    assert {"w_live", "w_dead", "c_dead", "shared", "zero"} <= names
    assert not names & {"t_unused", "e_unused"}


def test_reading_the_written_constants_changes_no_byte(tmp_path: Path) -> None:
    """onnx-ir names a Constant's tensor after its output when a pass reads it from a loaded
    file; a written model already has those names, so a later run's reads change nothing."""
    source, output = tmp_path / "branchy.onnx", tmp_path / "o.onnx"
    onnx.save(branchy(), str(source))
    graphopt.optimize(source, output)
    loaded = io.load(output).model
    before = io.to_proto(loaded).SerializeToString()
    constants = [
        node.outputs[0]
        for node in ir.traversal.RecursiveGraphIterator(loaded.graph)
        if node.op_type == "Constant"
    ]
    assert constants, "the output keeps Constants to read"
    for value in constants:
        ir.convenience.get_const_tensor(value)
    assert io.to_proto(loaded).SerializeToString() == before


def _value(graph: ir.Graph, name: str) -> ir.Value:
    return next(out for node in graph for out in node.outputs if out.name == name)


def test_invented_dims_are_written_unnamed() -> None:
    """ONNX inference numbers the dims it invents (unk__N) by the state it ran on: a second
    run numbered and grouped them otherwise. Unnamed, they compare equal; other dims stay."""
    model = io.load(branchy()).model
    branch = model.graph.node(2).attributes["then_branch"].as_graph()
    _value(branch, "t_2d").shape = ir.Shape(["unk__7", "batch", 4])
    _value(model.graph, "y").shape = ir.Shape(["unk__12"])
    model.graph.outputs[0].shape = ir.Shape(["unk__1"])  # the model's interface: as declared
    assert finalize.drop_generated_dims(model) == 2
    assert list(_value(branch, "t_2d").shape) == [None, ir.SymbolicDim("batch"), 4]
    assert list(_value(model.graph, "y").shape) == [None]
    assert list(model.graph.outputs[0].shape) == [ir.SymbolicDim("unk__1")]
    assert finalize.drop_generated_dims(model) == 0


def test_naming_constants_leaves_the_callers_model_alone() -> None:
    caller = io.load(branchy()).model
    before = io.to_proto(caller).SerializeToString()
    graphopt.optimize(caller)
    assert io.to_proto(caller).SerializeToString() == before


def test_save_reload_save_is_byte_identical_with_streamed_initializers(tmp_path: Path) -> None:
    """A large initializer is streamed after the others; value_info, written in the IR's
    order, must list it there too, or the reloaded model saves to other bytes."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal(io.STREAM_THRESHOLD_BYTES // 4 + 16).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "big"], ["a"]),
            helper.make_node("Mul", ["a", "small"], ["y"]),
        ],
        "streamed",
        [helper.make_tensor_value_info("x", F, [big.size])],
        [helper.make_tensor_value_info("y", F, [big.size])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(np.float32(2), "small")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    io.save(io.load(proto).model, first)
    io.save(io.load(first).model, second)
    assert second.read_bytes() == first.read_bytes()


# --- the output records what produced it ----------------------------------------------------


def test_output_records_version_and_options(tmp_path: Path) -> None:
    source = tmp_path / "branchy.onnx"
    onnx.save(branchy(), str(source))
    output = tmp_path / "o.onnx"
    options = OptimizeOptions(skip=["cse"], seed=3, tolerance=1e-3)
    graphopt.optimize(source, output, options)
    props = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert props[finalize.VERSION_KEY] == graphopt.__version__
    assert set(json.loads(props[finalize.DEPENDENCIES_KEY])) == set(finalize.DEPENDENCIES)
    recorded = json.loads(props[finalize.OPTIONS_KEY])
    assert recorded["skip"] == ["cse"] and recorded["seed"] == 3
    assert recorded["tolerance"] == 1e-3 and recorded["passes"] is None
    restored = finalize.options_from_metadata(props)
    assert finalize.options_record(restored) == recorded


def test_record_names_custom_op_libraries_by_name_and_digest(tmp_path: Path) -> None:
    library = tmp_path / "libops.so"
    library.write_bytes(b"not a real library")
    record = finalize.options_record(OptimizeOptions(custom_ops=[library]))
    (entry,) = record["custom_ops"]
    assert entry["name"] == "libops.so" and len(entry["sha256"]) == 64
    assert str(tmp_path) not in json.dumps(record)  # no folder of the user's in the file
    assert "custom_ops" not in finalize.options_record(OptimizeOptions())


def test_recorded_options_reproduce_the_file(tmp_path: Path, monkeypatch) -> None:
    """Prune with a calibration file; rerun from the record alone, with the data elsewhere."""
    source = tmp_path / "cnn.onnx"
    ir.save(cnn(), source)
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    rng = np.random.default_rng(0)
    calib = write_npz(first_dir / "calib.npz", {"x": correlated(rng, (16, 3, 8, 8))})
    (second_dir / "calib.npz").write_bytes(Path(calib).read_bytes())
    options = OptimizeOptions(
        prune="flops=0.3", criterion="activation", compensation="bias", calib=calib, seed=5
    )
    first = tmp_path / "first.onnx"
    graphopt.optimize(source, first, options)
    props = {p.key: p.value for p in onnx.load(str(first)).metadata_props}
    recorded = json.loads(props[finalize.OPTIONS_KEY])
    # By name and digest: no folder of this machine in the file.
    assert recorded["lossy"][0]["options"]["calib"] == "calib.npz"
    assert str(tmp_path) not in props[finalize.OPTIONS_KEY]
    assert len(recorded["calib_sha256"]) == 64
    monkeypatch.chdir(second_dir)  # the recorded name resolves against the current folder
    second = tmp_path / "second.onnx"
    graphopt.optimize(source, second, finalize.options_from_metadata(props))
    assert second.read_bytes() == first.read_bytes()


def test_a_rerun_with_other_options_rewrites_the_record(tmp_path: Path) -> None:
    source = tmp_path / "branchy.onnx"
    onnx.save(branchy(), str(source))
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    graphopt.optimize(source, first)
    graphopt.optimize(first, second, OptimizeOptions(seed=9))
    props = [(p.key, p.value) for p in onnx.load(str(second)).metadata_props]
    keys = [k for k, _ in props]
    assert len(keys) == len(set(keys)), "one record, overwritten, not appended"
    assert json.loads(dict(props)[finalize.OPTIONS_KEY])["seed"] == 9


def test_earlier_lossy_runs_are_kept_and_a_repeat_is_warned(tmp_path: Path) -> None:
    """A run replaces the options record, which forgot that the input was pruned; the
    history keeps it, an exact-only rerun leaves the file as it was, and pruning the pruned
    model again (it compounds) says so."""
    source = tmp_path / "cnn.onnx"
    ir.save(cnn(), source)
    pruned, plain, plain_again, twice = (tmp_path / f"{n}.onnx" for n in "abcd")
    graphopt.optimize(source, pruned, OptimizeOptions(prune="flops=0.3"))
    assert finalize.HISTORY_KEY not in {p.key for p in onnx.load(str(pruned)).metadata_props}
    graphopt.optimize(pruned, plain)
    graphopt.optimize(plain, plain_again)
    assert plain_again.read_bytes() == plain.read_bytes()
    props = {p.key: p.value for p in onnx.load(str(plain)).metadata_props}
    history = json.loads(props[finalize.HISTORY_KEY])
    assert [[e["name"] for e in run["lossy"]] for run in history] == [["prune"]]
    assert json.loads(props[finalize.OPTIONS_KEY])["lossy"] == []
    result = graphopt.optimize(plain, twice, OptimizeOptions(prune="flops=0.3"))
    warnings = [n for n in result.report.notes if "already through --prune" in n]
    assert len(warnings) == 1 and "flops=0.3" in warnings[0]
    history = json.loads(
        {p.key: p.value for p in onnx.load(str(twice)).metadata_props}[finalize.HISTORY_KEY]
    )
    assert len(history) == 1  # the exact-only run in between added nothing
    # On the pruned output itself, the same options again: warned, and the history is left
    # as it was (for a lossy pass that is a fixed point, the file must stay the same).
    result = graphopt.optimize(pruned, None, OptimizeOptions(prune="flops=0.3"))
    assert [n for n in result.report.notes if "already through --prune" in n]
    assert finalize.HISTORY_KEY not in result.model.metadata_props
    # Another lossy pass on the pruned output: not a repeat (no warning), but its fidelity is
    # against the pruned input, not the float original, and the report says so.
    quantized = graphopt.optimize(pruned, None, OptimizeOptions(quantize="fp16"))
    assert not [n for n in quantized.report.notes if n.startswith("warning: the input was")]
    assert [n for n in quantized.report.notes if n.startswith("the input was already through")]
    against = "the input model that --prune already changed"
    assert quantized.report.reference_name == against
    assert quantized.report.details["quantize"].fidelity_against == against
