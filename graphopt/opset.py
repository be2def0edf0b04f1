"""Raising a model's default-domain opset with the onnx version converter (only when asked).

Some fusions produce ops that need a newer opset than the model has (LayerNormalization 17,
Gelu 20, RMSNormalization and Attention 23). graphopt does not raise the opset for a fusion
on its own: ``--opset N`` converts first, and the pass manager's verification then covers
the conversion together with the rewrites. The one exception is a quantization mode whose
ops need a newer opset than the model has (per-channel DequantizeLinear 13,
DynamicQuantizeLinear 11): the user asked for the mode, so :func:`raise_in_place` converts
and says so.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter

from graphopt import io
from graphopt.errors import UserInputError


def default_opset(model: ir.Model) -> int:
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx", 0))


def convert_opset(model: ir.Model, version: int) -> tuple[ir.Model, str]:
    """The model at default-domain opset ``version`` (and a note), or unchanged when it is."""
    current = default_opset(model)
    latest = onnx.defs.onnx_opset_version()
    if version > latest:
        raise UserInputError(f"--opset {version}: the installed onnx supports up to {latest}")
    if version < current:
        raise UserInputError(
            f"--opset {version} is below the model's opset {current}; graphopt only raises it"
        )
    if version == current:
        return model, ""
    if current == 0:
        # The converter asserts in C++ on this; say what is missing instead.
        raise UserInputError(
            f"cannot convert to opset {version}: the model imports no default-domain (ai.onnx) "
            "opset (only other domains)"
        )
    try:
        converted = version_converter.convert_version(io.to_proto(model), version)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"cannot convert from opset {current} to {version}: {first[:200]}"
        ) from None
    result = io.load(converted).model
    changed = _interface_change(model, result)
    if changed:
        # The converter adapts some ops by changing what the graph takes (Scan 8 -> 9 drops
        # its batch axis from the graph's inputs): not a conversion users can deploy as is.
        raise UserInputError(
            f"converting from opset {current} to {version} changes the model's interface "
            f"({changed}); export the model at opset {version} or later instead"
        )
    return result, f"converted default-domain opset {current} -> {version}"


def _interface_change(before: ir.Model, after: ir.Model) -> str:
    """The first graph input or output whose name, type or rank/fixed dims differ, or ""."""
    pairs = [
        *zip(before.graph.inputs, after.graph.inputs, strict=False),
        *zip(before.graph.outputs, after.graph.outputs, strict=False),
    ]
    if len(before.graph.inputs) != len(after.graph.inputs) or len(before.graph.outputs) != len(
        after.graph.outputs
    ):
        return "the number of inputs or outputs"
    for old, new in pairs:
        if old.name != new.name or old.dtype != new.dtype:
            return f"{old.name!r} -> {new.name!r} {new.dtype}"
        if old.shape is not None and new.shape is not None:
            fixed = [
                (a, b)
                for a, b in zip(old.shape, new.shape, strict=False)
                if isinstance(a, int) and isinstance(b, int)
            ]
            if len(old.shape) != len(new.shape) or any(a != b for a, b in fixed):
                return f"{old.name!r} {list(old.shape)} -> {list(new.shape)}"
    return ""


def raise_in_place(model: ir.Model, version: int, why: str) -> str:
    """Raise ``model`` itself to opset ``version`` where it is older (a quantization mode
    whose ops need it: the user asked for the mode, and the conversion is exact and verified
    with the rest of the run). Returns the note that says so, with ``why``; "" if unchanged."""
    if default_opset(model) >= version:
        return ""
    converted, note = convert_opset(model, version)
    model.graph = converted.graph
    return f"{note} ({why})"
