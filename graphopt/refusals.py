"""Refusals of a lossy run whose model would come back unchanged, in one wording for every pass.

A lossy pass that changes nothing would write a copy of its input that passes for a compressed
model ("0 layers sparsified", exit 0), and skipped like an idle exact pass it would run none of
its checks. Every such run stops instead (exit 2) with one line: ``ASKED: nothing to VERB:
WHY; the model would come back unchanged``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NoReturn

import onnx_ir as ir

from graphopt.editing import is_op
from graphopt.errors import UserInputError

# The reason a layer search gives for a weight behind DequantizeLinear; a run whose layers
# all read so is told to start from the float model.
QUANTIZED_WEIGHT = "weight is quantized (behind DequantizeLinear)"


def unchanged_message(asked: str, verb: str, why: str) -> str:
    """The one line every unchanged-model refusal reads: ``asked`` is the flag and value
    (``sparsify 2:4``), ``verb`` what the pass does, ``why`` what it found."""
    return f"{asked}: nothing to {verb}: {why}; the model would come back unchanged"


def refuse_nothing_to_do(asked: str, rewritten: frozenset[str], present: Iterable[str]) -> None:
    """Refuse a lossy pass asked for (``asked``: its flag) on a model with none of the ops it
    rewrites; return when the model has one of them."""
    if not rewritten or not rewritten.isdisjoint(present):
        return
    ops = ", ".join(sorted(rewritten))
    why = f"the model has none of the ops it rewrites ({ops})"
    raise UserInputError(unchanged_message(asked, "do", why))


def refuse_unchanged(
    model: ir.Model,
    asked: str,
    verb: str,
    skipped: Sequence[tuple[str, ...]],
    unit: str = "layer",
    none_found: str = "no MatMul/Gemm/Conv with a constant weight",
) -> NoReturn:
    """Refuse a run in which every candidate was left as it was. ``skipped``: (layer, ...,
    reason) per ``unit`` left, the reason last; ``none_found``: what to say when there was no
    candidate at all. A model that is already quantized is told to start from the float
    model, as quantize says."""
    from graphopt.analysis.excluded import is_quantized_op

    quantized = sorted({n.op_type for n in model.graph if is_quantized_op(n)})
    by_reason = Counter(entry[-1] for entry in skipped)
    others = Counter({r: n for r, n in by_reason.items() if r != QUANTIZED_WEIGHT})
    floats = _float_layers(model)
    if quantized and (QUANTIZED_WEIGHT in by_reason or not floats):
        # The float layers' own reasons, where there are any (with none, every reason
        # follows from the quantization: a Softmax behind QuantizeLinear is no attention).
        rest = (
            f"; the other {unit}s are left as they were ({_reasons(others, unit)})"
            if others and floats
            else ""
        )
        raise UserInputError(
            f"{asked}: the model is already quantized (it has {', '.join(quantized)}){rest}; "
            f"{verb} the float model, then quantize it"
        )
    why = (
        f"every candidate {unit} is left as it was ({_reasons(by_reason, unit)})"
        if by_reason
        else none_found
    )
    raise UserInputError(unchanged_message(asked, verb, why))


def _reasons(counts: Counter[str], unit: str, limit: int = 4) -> str:
    """``3 layers: weight shared with another node; 1 layer: ...``, the commonest first."""
    parts = [
        f"{n} {unit}{'s' if n != 1 else ''}: {reason}"
        for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f"; and {more} more reason(s)" if more > 0 else "")


def _float_layers(model: ir.Model) -> bool:
    """Whether any MatMul/Gemm/Conv of the main graph reads a constant float weight."""
    for node in model.graph:
        if is_op(node, ("MatMul", "Gemm", "Conv")) and len(node.inputs) > 1:
            tensor = ir.convenience.get_const_tensor(node.inputs[1])
            if tensor is not None and tensor.dtype.is_floating_point():
                return True
    return False
