"""The one place graphopt imports private modules of onnxscript.

``_constant_folding`` (the folder graphopt's constant folding extends), ``_pattern_ir`` (the
pattern nodes of a rewrite rule, read to find a rule's trigger ops), ``_fusion_utils`` and
``_ir_utils`` (shape checks of ORT fusions) have no stability promise: any onnxscript release
may rename or change them. pyproject.toml bounds onnxscript (and onnx-ir, whose
``_symbolic_shapes`` graphopt defers at start-up) above the last minor release tested; lifting
a bound means running the suite against the new release and updating this module.
"""

from __future__ import annotations

from onnxscript.optimizer import _constant_folding as constant_folding
from onnxscript.rewriter import _fusion_utils as fusion_utils
from onnxscript.rewriter import _ir_utils as ir_utils
from onnxscript.rewriter import _pattern_ir as pattern_ir

__all__ = ["constant_folding", "fusion_utils", "ir_utils", "pattern_ir"]
