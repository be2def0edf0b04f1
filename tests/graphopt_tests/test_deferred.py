"""Deferred imports: sympy and onnx's reference evaluator load only when something uses them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import onnx

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_help_imports_no_model_library() -> None:
    out = run_python(
        """
        import contextlib, io, sys
        from graphopt.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
        print(sorted(m for m in ("onnx", "onnx_ir", "numpy", "onnxscript") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_optimize_runs_without_sympy_and_sympy_still_works(tmp_path: Path) -> None:
    source = LIGHT / "light_squeezenet.onnx"
    out = run_python(
        f"""
        import contextlib, io
        from graphopt import _deferred
        from graphopt.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            code = main([
                "optimize", {str(source)!r}, "-o", {str(tmp_path / "out.onnx")!r}, "--no-verify"
            ])
        print(code, _deferred.is_loaded("sympy"))
        import onnx_ir as ir
        dim = ir.SymbolicDim("n") * 2 + 1  # symbolic-dim arithmetic loads sympy on demand
        import sympy
        print(dim.value, _deferred.is_loaded("sympy"), sympy.Symbol("a") + 1)
        """
    )
    assert out.splitlines() == ["0 False", "2*n + 1 True a + 1"]


def test_deferred_reference_evaluator_loads_on_use() -> None:
    out = run_python(
        """
        import numpy as np
        from graphopt import _deferred
        _deferred.defer_onnx_reference()
        import onnx.reference.ops
        loaded = _deferred.is_loaded("onnx.reference.ops")
        from onnx import helper, TensorProto
        from onnx.reference import ReferenceEvaluator
        node = helper.make_node("Neg", ["x"], ["y"])
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        y = ReferenceEvaluator(helper.make_model(graph)).run(None, {"x": np.ones(1, np.float32)})
        print(loaded, onnx.reference.ops.load_op is not None, float(y[0][0]))
        """
    )
    assert out == "False True -1.0"
