"""Which graphopt pass or option fixes a node TensorRT's parser rejects.

Matched on TensorRT's reason and the node's op; shared by ``optimize --engine`` (its error
message) and ``graphopt lint`` (each finding). Kept as one table so that the two say the same.
"""

from __future__ import annotations

import re
from typing import Protocol

# (pattern on "OP: reason", the fix) in order; the first match wins.
_FIXES: tuple[tuple[str, str], ...] = (
    (
        r"zero point|asymmetric",
        "the model is quantized asymmetrically (uint8 / non-zero zero points, e.g. ORT's "
        "quantize_dynamic): graphopt optimize --target tensorrt --requantize symmetric, or "
        "quantize the float model with --target tensorrt --quantize int8",
    ),
    (
        r"[Ii]nt32 but must|int32 DequantizeLinear",
        "an int32 bias DequantizeLinear (ORT's quantize_static): graphopt optimize --target "
        "tensorrt --requantize symmetric stores it in float",
    ),
    (
        r"UINT8|uint8",
        "uint8 Q/DQ: graphopt optimize --target tensorrt --requantize symmetric",
    ),
    (
        r"^MatMulNBits",
        "ORT's MatMulNBits takes float16 activations in TensorRT: quantize the float model "
        "with graphopt optimize --target tensorrt --quantize int4-weight --opset 21 (int4 "
        "DequantizeLinear, float16 activations)",
    ),
    (
        r"^(QLinear\w+|\w+Integer|DynamicQuantizeLinear|QAttention|QGemm)\b",
        "ONNX Runtime's quantized form: start from the float model and use graphopt optimize "
        "--target tensorrt --quantize int8 (Q/DQ) or int4-weight (DequantizeLinear)",
    ),
    (
        r"must resolve to (an )?initializer|is_weights|must be an initializer",
        "an input TensorRT needs as a constant is computed: run the default pipeline "
        "(constant-folding) and bind dynamic dims with --input-shape so it folds",
    ),
    (
        r"data type|convertDtype|Unsupported ONNX data type",
        "a tensor type TensorRT lacks (double, uint16/32/64, int16, string...): cast it to "
        "float32/int32/int64 at the graph boundary, or re-export in a supported type",
    ),
    (
        r"outputs for",
        "a node with optional outputs TensorRT cannot produce (training outputs, indices, "
        "LayerNorm mean/inv-std): re-export for inference so they are unused",
    ),
    (
        r"[Pp]lugin|^\S+: false$|No importer",
        "TensorRT's parser has no importer for this op: keep it out of the model (export "
        "with another op, or run that part elsewhere); --target tensorrt never emits it",
    ),
)
# No known fix: nothing said (pointing at `graphopt lint` from lint's own output was circular).
_DEFAULT_FIX = ""


class _Rejection(Protocol):
    node_name: str
    op_type: str
    reason: str


def fix_for(op_type: str, reason: str) -> str:
    """The graphopt option or pass that fixes a rejection of ``op_type`` for ``reason``, or ""
    when none is known."""
    text = f"{op_type}: {reason}"
    for pattern, fix in _FIXES:
        if re.search(pattern, text):
            return fix
    return _DEFAULT_FIX


def describe_rejection(error: _Rejection) -> str:
    """``node 'n' (Op): reason; fix: ...`` on one line."""
    where = f"node {error.node_name!r} ({error.op_type})" if error.op_type else "graph"
    reason = " ".join(error.reason.split())
    fix = fix_for(error.op_type, reason)
    return f"{where}: {reason}" + (f"; fix: {fix}" if fix else "")
