"""The one place graphopt imports private modules of onnxscript.

``_constant_folding`` (the folder graphopt's constant folding extends), ``_pattern_ir`` (the
pattern nodes of a rewrite rule, read to find a rule's trigger ops), ``_fusion_utils`` and
``_ir_utils`` (shape checks of ORT fusions) have no stability promise: any onnxscript release
may rename or change them. pyproject.toml bounds onnxscript (and onnx-ir, whose
``_symbolic_shapes`` graphopt defers at start-up) above the last minor release tested; lifting
a bound means running the suite against the new release and updating this module.

ONNX Runtime's symbolic shape inference (a tools script, not an API) is driven step by step
here because its ``infer_shapes`` saves ``sym_shape_infer_temp.onnx`` into the current folder
whenever inference is incomplete. onnxruntime is not bounded for it: if those steps change,
:func:`symbolic_shape_inference` raises and the ``--target ort`` fusions keep ONNX's shapes.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import onnx
from onnxscript.optimizer import _constant_folding as constant_folding
from onnxscript.rewriter import _fusion_utils as fusion_utils
from onnxscript.rewriter import _ir_utils as ir_utils
from onnxscript.rewriter import _pattern_ir as pattern_ir

__all__ = [
    "constant_folding",
    "fusion_utils",
    "ir_utils",
    "pattern_ir",
    "symbolic_shape_inference",
]


def symbolic_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ORT's symbolic shapes (``auto_merge``) of ``model``; None if incomplete. Writes no file."""
    tool = _symbolic_shape_tool()
    opset = tool.get_opset(model)
    if not opset or opset < 7:
        return None
    inference = tool.SymbolicShapeInference(2**31 - 1, True, False, 0)
    complete = False
    inference._preprocess(model)
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


@functools.cache
def _symbolic_shape_tool() -> ModuleType:
    """``onnxruntime/tools/symbolic_shape_infer.py``, loaded by itself.

    Importing it as ``onnxruntime.tools.symbolic_shape_infer`` runs the package's
    ``__init__``, which imports torch when torch is installed: 3-12 s of a run, for nothing.
    """
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise ImportError("onnxruntime is not installed")
    path = Path(spec.origin).parent / "tools" / "symbolic_shape_infer.py"
    loader_spec = importlib.util.spec_from_file_location("_graphopt_ort_symbolic_shapes", path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module
