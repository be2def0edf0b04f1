"""What the ``--target ort`` fusions share: run onnxscript's ORT fusion rules on a copy.

onnxscript's ``ort_fusions`` rules need shapes and a constant-folded graph, and several of them
create intermediate ops in a private domain (``ai.onnxruntime._fusion``) that a later rule is
meant to consume. A graphopt pass must leave a valid, runnable model, so each pass here works on
a clone: prepare, apply its rules, inline whatever intermediate op no rule consumed, and only
when contrib ops really appeared does the result replace the model. A pass that finds nothing
leaves the model untouched (the preparation's folding is not smuggled in under zero hits).

The preparation is graphopt's own (shape inference, then the pipeline's cleanup passes, whose
constant folding obeys the run's ``--fold-limit``), not onnxscript's whole optimizer, which
has folding limits and rewrites (BatchNorm fusion among them) of its own. Each pass
declares the op types its rules start from (``ops``), so the pass manager skips it on models
without them (a CNN pays nothing for the transformer fusions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter.ort_fusions import shape_optimization

from graphopt import io
from graphopt.registry import GraphPass, PassContext, Stage, all_passes

MS_DOMAIN = "com.microsoft"
# Where onnxscript parks intermediate fusion ops (SDPA, RotaryEmbedding before cos/sin caching).
PRIVATE_DOMAIN_PREFIX = "ai.onnxruntime._fusion"

# A fusion step: onnxscript's ``fuse_*`` functions take the model and return a count.
FusionStep = Callable[..., int]


def count_ops(model: ir.Model, ops: tuple[tuple[str, str], ...]) -> int:
    """Nodes of the main graph whose (domain, op_type) is in ``ops``."""
    found = Counter((node.domain or "", node.op_type) for node in model.graph)
    return sum(found[op] for op in ops)


def prepare(model: ir.Model, context: PassContext, symbolic: bool = False) -> ir.Model:
    """Shapes and folding before fusing (graphopt's own passes, the run's fold limit).

    ONNX's shape inference leaves TorchScript exports' attention reshapes (target built by
    Concat from Shape ops, with a -1) as unrelated unknown dims, and the MHA rules then cannot
    tell that Q, K and V agree on batch, heads and sequence. ORT's symbolic shape inference
    names those dims consistently (``symbolic``); on dynamo exports it fails or, merging dims,
    hides matches that ONNX's shapes allow, so passes try ONNX's shapes first.
    Its ``auto_merge`` assumes broadcast dims equal (e.g. ``Min(512, sequence)`` and
    ``sequence``), so its shapes only guide the rules and are dropped afterwards (see
    :func:`reset_shapes`).
    """
    common_passes.ShapeInferencePass()(model)
    clean(model, context)
    if symbolic:
        model = _symbolic_shapes(model) or model
    shape_optimization.rules.apply_to_model(model)
    clean(model, context)
    return model


def clean(model: ir.Model, context: PassContext) -> None:
    """graphopt's cleanup passes (the pipeline's own), to a fixed point (at most 4 rounds)."""
    cleanup = [cls for cls in all_passes().values() if cls.stage == Stage.CLEANUP]
    for _ in range(4):
        changed = False
        for cls in cleanup:
            changed |= cls(context).call(model).modified
        if not changed:
            return


def _symbolic_shapes(model: ir.Model) -> ir.Model | None:
    """``model`` re-loaded with ORT's symbolic shapes, or None when that inference fails."""
    from graphopt.private_apis import symbolic_shape_inference

    try:
        proto = symbolic_shape_inference(io.to_proto(model))
    except Exception:  # any failure there just means: keep ONNX's shapes
        return None
    if proto is None:
        return None
    return io.load(proto).model


def value_shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    """Shapes of node outputs by name."""
    return {v.name: v.shape for node in model.graph for v in node.outputs if v.name}


def reset_shapes(model: ir.Model, shapes: dict[str, ir.Shape | None]) -> None:
    """Give intermediate values the shapes ONNX's inference found (unknown for new ones)."""
    for node in model.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = shapes.get(value.name)


def finish(model: ir.Model, context: PassContext) -> None:
    """Inline intermediate fusion functions that no rule consumed; drop dead nodes."""
    # Only onnxscript's intermediate functions: the model's own functions stay as they are.
    common_passes.InlinePass(lambda f: f.domain.startswith(PRIVATE_DOMAIN_PREFIX))(model)
    clean(model, context)
    for domain in [d for d in model.graph.opset_imports if d.startswith(PRIVATE_DOMAIN_PREFIX)]:
        if not any(node.domain == domain for node in model.graph):
            del model.graph.opset_imports[domain]
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
        model.opset_imports.setdefault(MS_DOMAIN, 1)


def adopt(model: ir.Model, result: ir.Model) -> None:
    """Make ``model`` (the object the pass manager holds) carry ``result``'s graph."""
    model.graph = result.graph
    model.functions.clear()
    model.functions.update(result.functions)


class OrtFusionPass(GraphPass):
    """Base of the ORT contrib-op fusions (not registered itself)."""

    stage = Stage.FUSION
    exact = True
    # Rewrites the main graph only: onnxscript's rules do not descend into If/Loop bodies.
    handles_subgraphs = False
    # Contrib ops run only on ONNX Runtime.
    targets = frozenset(("ort",))
    # The fusion steps, applied in order to the prepared clone.
    steps: ClassVar[tuple[FusionStep, ...]] = ()
    # The contrib ops this family produces; hits = how many more of them there are after.
    produces: ClassVar[tuple[tuple[str, str], ...]] = ()

    def repair(self, model: ir.Model) -> bool:
        """Fix what the rules got wrong in ``model`` (the clone); False refuses the result."""
        return True

    def rewrite(self, model: ir.Model) -> int:
        before = count_ops(model, self.produces)
        onnx_shapes: dict[str, ir.Shape | None] = {}
        for symbolic in (False, True):
            work = prepare(model.clone(), self.context, symbolic)
            if not symbolic:
                onnx_shapes = value_shapes(work)
            for step in self.steps:
                step(work)
            if not self.repair(work):
                continue
            finish(work, self.context)
            if symbolic:
                reset_shapes(work, onnx_shapes)
            hits = count_ops(work, self.produces) - before
            if hits > 0:
                adopt(model, work)
                return hits
        return 0
