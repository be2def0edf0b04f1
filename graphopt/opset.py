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
    try:
        converted = version_converter.convert_version(io.to_proto(model), version)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"cannot convert from opset {current} to {version}: {first[:200]}"
        ) from None
    return io.load(converted).model, f"converted default-domain opset {current} -> {version}"


def raise_in_place(model: ir.Model, version: int, why: str) -> str:
    """Raise ``model`` itself to opset ``version`` where it is older (a quantization mode
    whose ops need it: the user asked for the mode, and the conversion is exact and verified
    with the rest of the run). Returns the note that says so, with ``why``; "" if unchanged."""
    if default_opset(model) >= version:
        return ""
    converted, note = convert_opset(model, version)
    model.graph = converted.graph
    return f"{note} ({why})"
