"""Residual Add feeding LayerNormalization → a two-input Sum (portable target).

Same math, same node count, standard ONNX. Why: ONNX Runtime's level-2 optimizer
(``SkipLayerNormFusion``) turns ``Add(a, b) → LayerNormalization`` into its contrib
``SkipLayerNormalization`` whenever it can prove ``a`` and ``b`` have the same 3-D shape and
the Add has no other reader, and ORT 1.32's CPU kernel for that op is several times slower
than the Add + LayerNormalization it replaces (CPU time, 1 thread: 15 vs 4.5 us on
[1, 16, 128], 319 vs 52 us on [1, 128, 384]). graphopt's output carries the symbolic shapes
its inference found (value_info), which often prove exactly that equality where the
original export or onnxslim's output does not (TorchScript BERT: the attention output's
Reshape target is computed from Shape ops), so ORT fused more of them on graphopt's output and
ran it slower. The fusion matches the op type ``Add`` only; a two-input ``Sum`` is the same
elementwise addition with the same broadcasting and is left alone. At ORT_DISABLE_ALL, Sum and
Add cost the same.

Only the Adds ORT could fuse are rewritten: both operands computed (not constants; a bias Add
is not a residual), the Add's only reader is the LayerNormalization's X input, and the sum
is not a graph output. ``--target ort`` has its own ``ort-residual-sum``.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt import editing
from graphopt.registry import GraphPass, Stage, register


@register
class ResidualSumPass(GraphPass):
    """Residual Add read only by LayerNormalization → two-input Sum (ORT then keeps Add+LN)."""

    name = "residual-sum"
    targets = frozenset(("portable",))
    stage = Stage.FUSION
    ops = frozenset(("LayerNormalization",))

    def rewrite(self, model: ir.Model) -> int:
        hits = 0
        # One table for node and value names, subgraphs included: every unnamed Add used to
        # give its Sum the node name "_sum", and two of them failed verification (duplicate
        # node names), rolling the whole pass back.
        names = editing.NameTable(model.graph)
        for graph in (model.graph, *model.graph.subgraphs()):
            for node in list(graph):
                if editing.is_op(node, "LayerNormalization") and self._to_sum(graph, node, names):
                    hits += 1
        return hits

    @staticmethod
    def _to_sum(graph: ir.Graph, norm: ir.Node, names: editing.NameTable) -> bool:
        x = norm.inputs[0] if norm.inputs else None
        add = x.producer() if x is not None else None
        if add is None or not editing.is_op(add, "Add") or len(add.inputs) != 2:
            return False
        if editing.single_user(x) is not norm or any(
            value is None or editing.is_constant(value) for value in add.inputs
        ):
            return False
        # No dtype check: LayerNormalization's X types (float16/32/64, bfloat16) are all Sum
        # types, and TorchScript exports often carry no value types at all.
        total = ir.node("Sum", list(add.inputs), name=names.take(f"{add.name or x.name}_sum"))
        total.outputs[0].name = names.take(f"{x.name}_sum")
        total.outputs[0].type = x.type
        total.outputs[0].shape = x.shape
        graph.insert_after(add, [total])
        editing.replace_value(x, total.outputs[0])
        editing.remove_if_dead(add)
        return True
