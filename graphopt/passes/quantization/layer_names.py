"""Names of the unnamed nodes quantization lists: as the user's model lists them.

``--exclude`` and the quantization record name nodes of the model the user gave
(:mod:`graphopt.analysis.origins`); an unnamed node takes the name of the recorded node it
stands for, so the name the report prints is the one ``--exclude`` takes.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.analysis.origins import OriginalNodes, present_values


def name_unnamed(model: ir.Model, original: OriginalNodes | None) -> None:
    """Name every unnamed node of the main graph as the input model lists it: the name of the
    recorded node it stands for (its layer op's where it is a fusion), else
    ``OpType_index`` of its position now (nothing recorded)."""
    from graphopt.passes.quantization.record import LAYER_OPS

    taken = {node.name for node in model.graph if node.name}
    present = present_values(model.graph) if original is not None else set()
    constants = frozenset(model.graph.initializers)
    for index, node in enumerate(model.graph):
        if node.name:
            continue
        found = original.origins(node, present, constants) if original is not None else []
        same = [o for o in found if o.op_type == node.op_type]
        layer = [o for o in found if o.op_type in LAYER_OPS]
        pick = (same or layer or found or [None])[0]
        name = pick.name if pick is not None else f"{node.op_type}_{index}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
