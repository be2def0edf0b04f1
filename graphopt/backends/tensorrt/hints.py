"""Which graphopt pass or option fixes a node TensorRT's parser rejects, and the parser's
reason cleaned to one line.

Matched on TensorRT's reason, the node's op and domain, and (for quantization) why
``--requantize symmetric`` would leave that node as it is; shared by ``optimize --engine``
(its error message) and ``graphopt lint`` (each finding). Kept as one table so that the two
say the same.
"""

from __future__ import annotations

import re
from typing import Protocol

_REQUANTIZE = "graphopt optimize --target tensorrt --requantize symmetric"
_FROM_FLOAT = (
    "quantize the float model instead: graphopt optimize --target tensorrt --quantize int8"
)
_BLOCKED = "--requantize symmetric leaves this one as it is ({blocker}): " + _FROM_FLOAT

# (pattern on "OP: reason", the fix, the fix when --requantize cannot convert the node or
# None when the first never names --requantize) in order; the first match wins.
_FIXES: tuple[tuple[str, str, str | None], ...] = (
    (
        r"^DequantizeLinear: .*rank-0 \(scalar\)",
        f"a scalar quantized constant (ORT's quantize_static quantizes Mul/Add factors): "
        f"{_REQUANTIZE} stores it in float (exact)",
        None,
    ),
    (
        r"^(QuantizeLinear|DequantizeLinear): .*computed zero point",
        "give the QuantizeLinear/DequantizeLinear its zero point as an initializer (or "
        "leave it out: zero); constant-folding in the default pipeline folds one computed "
        "from constants",
        None,
    ),
    (
        r"^(LSTM|GRU|RNN): .*(sequence_lens|ISelectLayer must have .?thenInput)",
        "a float16 RNN with sequence_lens: keep it in float32, e.g. graphopt optimize "
        "--target tensorrt --quantize fp16 --exclude LSTM,GRU,RNN (the rest in float16), or "
        "drop sequence_lens when every sequence has the full length",
        None,
    ),
    (
        r"^(Cast|CastLike): .*never in a Cast",
        "cast to or from FP8/FP4/INT4 with QuantizeLinear/DequantizeLinear (scale 1) instead "
        "of Cast, or keep that tensor in float16/float32 at the network's inputs and outputs",
        None,
    ),
    (
        r"^(QuantizeLinear|DequantizeLinear): .*(zero point|asymmetric|uint8|UINT8)",
        "asymmetric or uint8 quantization (e.g. ORT's quantize_static/quantize_dynamic): "
        f"{_REQUANTIZE} re-rounds it to int8 with zero point 0 (lossy, fidelity reported), "
        f"or {_FROM_FLOAT}",
        _BLOCKED,
    ),
    (
        r"^DequantizeLinear: .*([Ii]nt32 but must|int32|INT32)",
        f"an int32 bias DequantizeLinear (ORT's quantize_static): {_REQUANTIZE} stores it in float",
        _BLOCKED,
    ),
    (
        r"^(DynamicQuantizeLinear|MatMulInteger|ConvInteger)\b",
        f"ONNX Runtime's dynamic quantization: {_REQUANTIZE} turns DynamicQuantizeLinear + "
        f"MatMulInteger/ConvInteger into int8 weight-only MatMuls/Convs (lossy), or "
        f"{_FROM_FLOAT}",
        _BLOCKED,
    ),
    (
        r"^(QLinear\w+|\w+Integer|QAttention|QGemm|QOrdered\w+)\b",
        "ONNX Runtime's QOperator form, which --requantize symmetric does not convert: "
        "start from the float model and use graphopt optimize --target tensorrt --quantize "
        "int8 (Q/DQ) or int4-weight (DequantizeLinear)",
        None,
    ),
    (
        r"UINT8|uint8|UInt8",
        "a uint8 tensor computed inside the graph (a Cast to uint8, uint8 arithmetic): "
        "TensorRT has uint8 only at the network's inputs and outputs; compute in int32 or "
        "float there (re-export the model); there is no Q/DQ here for --requantize",
        None,
    ),
    (
        r"^MatMulNBits",
        "ORT's MatMulNBits: quantize the float model with graphopt optimize --target "
        "tensorrt --quantize int4-weight --opset 21 (int4 DequantizeLinear, float16 "
        "activations)",
        None,
    ),
    (
        r"opset 7",
        "the model's opset is below 7: graphopt optimize IN --target tensorrt --opset 13 "
        "raises it (onnx version converter)",
        None,
    ),
    (
        r"must be a constant|must resolve to|build-time constant|not a constant|is_weights|"
        r"must be an initializer|as an initializer|fold to a constant",
        "an input TensorRT needs as a constant is computed: run the default pipeline "
        "(constant-folding) and bind dynamic dims with --input-shape so it folds",
        None,
    ),
    (
        r"shape computed from a float|is a shape tensor and must have type|isInFlight",
        "a shape (sizes, pads, counts) computed from a float input's values: TensorRT "
        "computes shapes from int32/int64 inputs and constants only; compute it from the "
        "input's Shape in int64, or make it a constant (constant-folding, --input-shape)",
        None,
    ),
    (
        r"data type|convertDtype|Unsupported ONNX data type",
        "a tensor type TensorRT lacks (double, uint16/32/64, int16, string...): cast it to "
        "float32/int32/int64 at the graph boundary, or re-export in a supported type",
        None,
    ),
    (
        r"outputs for|more than one output|only support output",
        "a node with optional outputs TensorRT cannot produce (training outputs, indices, "
        "LayerNorm mean/inv-std): re-export for inference so they are unused",
        None,
    ),
)
# ORT's contrib ops come from ORT's fusions (graphopt's --target ort among them); the
# tensorrt target keeps the standard ONNX ops TensorRT imports.
_CONTRIB_FIX = (
    "an ONNX Runtime contrib op (from an ORT fusion, e.g. --target ort): optimize the "
    "source model with graphopt optimize --target tensorrt, which keeps standard ONNX ops"
)
_NO_IMPORTER = (
    r"[Pp]lugin|no importer",
    "TensorRT's parser has no importer for this op: keep it out of the model (export "
    "with another op, or run that part elsewhere); --target tensorrt never emits it",
)
# No known fix: nothing said (pointing at `graphopt lint` from lint's own output was circular).
_DEFAULT_FIX = ""


class _Rejection(Protocol):
    node_name: str
    op_type: str
    reason: str


def fix_for(op_type: str, reason: str, *, domain: str = "", blocker: str | None = None) -> str:
    """The graphopt option or pass that fixes a rejection of ``op_type`` for ``reason``, or ""
    when none is known. ``blocker``: why ``--requantize symmetric`` would leave that node as
    it is (it is then not suggested)."""
    text = f"{op_type}: {reason}"
    for pattern, fix, blocked in _FIXES:
        if re.search(pattern, text):
            if blocker and blocked is not None:
                return blocked.format(blocker=blocker)
            return fix
    if domain == "com.microsoft":
        return _CONTRIB_FIX
    if re.search(_NO_IMPORTER[0], text):
        return _NO_IMPORTER[1]
    return _DEFAULT_FIX


def describe_rejection(error: _Rejection) -> str:
    """``node 'n' (Op): reason; fix: ...`` on one line."""
    index = getattr(error, "node_index", -1)
    if not error.op_type:
        where = "graph"
    elif error.node_name:
        where = f"node {error.node_name!r} ({error.op_type})"
    else:  # the parser's index is the main-graph node's (the If/Loop/call it is in, if nested)
        where = f"{error.op_type} at main-graph node {index}" if index >= 0 else error.op_type
    reason = clean_reason(error.reason, error.op_type, (error.node_name,)).rstrip(".")
    fix = fix_for(error.op_type, reason)
    return f"{where}: {reason}" + (f"; fix: {fix}" if fix else "")


# The CUDA runtime's complaint on a machine without a usable driver: not about the model.
_NOISE = re.compile(r"cudaError|Cuda Runtime|catchCudaError|CUDA driver version")
_ERROR_CODE = re.compile(r"^(?:\S+: )?Error Code \d+: ([\w ]+?) \((.*)\)\s*\.?$", re.S)
_DLA = re.compile(r"\bDLA\b|_DLA\b|\bk[A-Z][A-Z0-9_]+ flag")
_SOURCE_AT = re.compile(r"\s*\.?\s*In \S+ at /\S+$")


def clean_reason(text: str, op_type: str = "", names: tuple[str, ...] = ()) -> str:
    """TensorRT's reason on one line: the message, without its source locations, assertion
    conditions, node dumps and the CUDA runtime's noise. ``names``: the node's names (a
    layer name TensorRT puts before a message is dropped; the finding names the node)."""
    lines: list[str] = []
    for raw in str(text).splitlines():
        line = raw.strip()
        if not line or _NOISE.search(line) or line.startswith("Invalid Node - "):
            continue
        line = _message(line)
        for name in names:
            # The node's name, or a layer TensorRT made of it ("NAME_4": the node's 5th).
            prefix = re.match(re.escape(name) + r"(?:_\d+)?: ", line) if name else None
            if prefix:
                line = line[prefix.end() :]
        line = _without_dla(" ".join(line.split()))
        if line and line not in lines:
            lines.append(line)
    reason = "; ".join(lines)
    if reason == "false":  # what the parser says for an op it has no importer for
        return f"TensorRT's parser has no importer for {op_type or 'this node'}"
    if reason.startswith("Plugin not found") and op_type:
        return f"no importer for {op_type}, and no plugin of that name (Plugin not found)"
    return reason or ("invalid node" if str(text).strip() else "")


def _without_dla(line: str) -> str:
    """``line`` without its sentences about DLA builder flags (kENABLE_..._DLA, "DLA version
    >= 3.16 only"): they concern NVIDIA's DLA accelerator, which graphopt does not build for."""
    sentences = re.split(r"(?<=\.)\s+", line)
    kept = [s for s in sentences if not _DLA.search(s)]
    return " ".join(kept) if kept else line


def _message(line: str) -> str:
    """The message in one line of TensorRT's output."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # "[file.cpp::function::123] "
    nested = line.find("Assertion failed: ")
    if nested > 0:  # "In node -1 with name: ... (function): CODE: Assertion failed: ..."
        line = line[nested:]
    if line.startswith("Assertion failed: "):
        line = line[len("Assertion failed: ") :]
        if ": " in line:  # "condition: message" (a condition's "::" has no space)
            return line.split(": ", 1)[1]
    elif line.startswith(":") and ": " in line:  # a condition already cut at its "::"
        return line.split(": ", 1)[1]
    quoted = re.search(r'&&\s*"(.*)"\s*$', line)  # condition && "message"
    if quoted:
        return quoted.group(1)
    coded = _ERROR_CODE.match(line)
    if coded:
        kind, inner = coded.groups()
        inner = _SOURCE_AT.sub("", inner.strip()).strip()
        return f"internal error: {inner}" if kind == "Internal Error" else inner
    return _SOURCE_AT.sub("", line)
