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
:func:`symbolic_shape_inference` raises and the ``--target ort`` fusions keep ONNX's shapes;
so they do when it runs out of time (``TimeoutError``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

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


# ORT's tool simplifies every dim expression with sympy, whose cost grows with the
# expressions: on a TorchScript Faster R-CNN (box decoding: Slices of dims computed from dims)
# one ``sympy.simplify`` in ``_infer_Slice`` ran for over 7 minutes. The shapes only help the
# ``--target ort`` fusions find matches, so past this limit the tool is stopped. Normal models
# take far less (MiniLM: under 0.1 s, ~1 s on a run's first call, which warms up sympy).
SYMBOLIC_SHAPES_TIME_LIMIT_S = 60.0

# sha256 of each model the tool ran out of time on → the limit it had. Every ``--target ort``
# fusion pass prepares the same model (LLaMA: 3 of 4 calls got identical protos), and a model
# that took the whole limit once would take it again in each of them.
_timed_out: dict[bytes, float] = {}


class _OutOfTime(BaseException):
    """Raised inside ORT's tool past the time limit; a BaseException so that the tool's own
    ``except Exception`` handlers cannot swallow it and carry on."""


def symbolic_shape_inference(
    model: onnx.ModelProto, time_limit: float | None = None
) -> onnx.ModelProto | None:
    """ORT's symbolic shapes (``auto_merge``) of ``model``; None if incomplete. Writes no file.

    Raises TimeoutError when the tool still runs after ``time_limit`` seconds (default
    :data:`SYMBOLIC_SHAPES_TIME_LIMIT_S`), or already did on this very model: an error rather
    than None so that the caller can tell the user why the shapes are missing.
    """
    limit = SYMBOLIC_SHAPES_TIME_LIMIT_S if time_limit is None else time_limit
    out_of_time = f"ORT's symbolic shape inference ran out of time ({limit:g} s)"
    key = hashlib.sha256(model.SerializeToString()).digest()
    if _timed_out.get(key, -1.0) >= limit:
        raise TimeoutError(out_of_time)
    tool = _symbolic_shape_tool()
    opset = tool.get_opset(model)
    if not opset or opset < 7:
        return None
    inference = tool.SymbolicShapeInference(2**31 - 1, True, False, 0)
    _add_quantized_matmuls(inference)
    complete = False
    previous = sys.getprofile()
    # The deadline is a profile hook: per thread, so it works in any thread and leaves the
    # others be. A profiler already hooked in (cProfile's hook cannot be set back from
    # Python) keeps its hook and the tool runs without a limit.
    if previous is None:
        sys.setprofile(_deadline_hook(time.monotonic() + limit))
    try:
        inference._preprocess(model)
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except _OutOfTime:
        _timed_out[key] = limit
        raise TimeoutError(out_of_time) from None
    finally:
        if previous is None:
            sys.setprofile(None)  # CPython drops a hook that raised; this drops one that did not
    return inference.out_mp_ if complete else None


# Contrib ops graphopt's int8-dynamic quantization writes that the tool has no rule for, and
# the input whose float type their output has. Without a rule every shape after them was
# unknown, and --target ort's attention fusions (which read the head count from the shapes)
# found nothing in a quantized RoBERTa or GPT-2.
_QUANTIZED_MATMULS = {"MatMulIntegerToFloat": 2, "DynamicQuantizeMatMul": 0}


def _add_quantized_matmuls(inference: Any) -> None:
    """Shape rules for :data:`_QUANTIZED_MATMULS`: a MatMul's shape, the float input's type."""
    for op, typed in _QUANTIZED_MATMULS.items():

        def infer(node: onnx.NodeProto, typed: int = typed) -> None:
            dtype = inference.known_vi_[node.input[typed]].type.tensor_type.elem_type
            inference._compute_matmul_shape(node, dtype)

        inference.dispatcher_.setdefault(op, infer)


def _deadline_hook(deadline: float) -> Callable[[FrameType, str, Any], None]:
    """A profile function that raises :class:`_OutOfTime` at the first Python call after
    ``deadline`` (a C call that never returns is out of its reach). Measured cost: the tool
    runs ~1.7-1.9x as long under it (MiniLM: 0.03 s → 0.05 s)."""

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and time.monotonic() > deadline:
            raise _OutOfTime

    return hook


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
