"""The demo model: valid, deterministic, full of the leftovers it promises, no torch needed."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.api import OptimizeOptions, optimize
from graphopt.models.demo import DEMO_INPUT, NUM_CLASSES, make_demo, write_demo


def test_demo_is_valid_and_runs(tmp_path):
    path = write_demo(tmp_path / "demo.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (logits,) = session.run(None, {DEMO_INPUT: x})
    assert logits.shape == (3, NUM_CLASSES)
    assert np.isfinite(logits).all()


def test_demo_is_deterministic():
    assert make_demo().SerializeToString() == make_demo().SerializeToString()


def test_demo_holds_every_leftover():
    model = make_demo()
    ops = Counter(n.op_type for n in model.graph.node)
    for op in ("Identity", "Dropout", "Pad", "BatchNormalization", "Shape", "Gather",
               "Unsqueeze", "Concat", "Reshape", "MatMul", "Constant"):  # fmt: skip
        assert ops[op] >= 1, op
    assert ops["Transpose"] == 3  # a cancelling pair + a weight transposed at run time
    # Repeated subexpression: two identical Sigmoid nodes on the same input.
    sigmoid_inputs = [tuple(n.input) for n in model.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoid_inputs) != len(set(sigmoid_inputs))
    # Duplicate initializers (same bytes under two names) and an unused one.
    raw = Counter(t.raw_data + bytes(t.dims) for t in model.graph.initializer)
    assert max(raw.values()) >= 2
    used = {i for n in model.graph.node for i in n.input}
    assert "unused_weight" not in used
    assert "unused_weight" in {t.name for t in model.graph.initializer}
    # Dead branch: a node output nobody consumes that is not a graph output.
    outputs = {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.output[0] not in used | outputs]
    assert dead


def test_demo_optimizes_and_verifies(tmp_path):
    source = write_demo(tmp_path / "demo.onnx")
    result = optimize(source, tmp_path / "demo.opt.onnx", OptimizeOptions())
    report = result.report
    assert report.verification is not None and report.verification.ok
    assert report.nodes_after < report.nodes_before
    assert not report.rolled_back
    onnx.checker.check_model(str(result.output_path))


def test_models_package_works_without_torch(tmp_path):
    # torch blocked at import: the catalog, the CLI and the demo must not need it, and a
    # torch model is refused with a hint instead of an ImportError traceback.
    block = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None;"
        "sys.modules['transformers'] = None;"
        "from graphopt.models.__main__ import main;"
    )
    env = {"GRAPHOPT_CACHE": str(tmp_path / "cache"), "PATH": ""}

    def run(args: list[str]) -> subprocess.CompletedProcess:
        code = f"{block} sys.exit(main({args!r}))"
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )

    done = run(["build", "demo", "-o", str(tmp_path / "demo.onnx")])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo.onnx").is_file()
    assert "Traceback" not in done.stderr
    listed = run(["list"])
    assert listed.returncode == 0
    assert "resnet18" in listed.stdout and "[needs torch" in listed.stdout
    refused = run(["build", "resnet18"])
    assert refused.returncode == 2
    assert "needs torch" in refused.stderr and "Traceback" not in refused.stderr
