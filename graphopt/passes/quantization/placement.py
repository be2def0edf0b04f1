"""Where int8 goes: the compute nodes, the tensors that get a scale, and which share one.

The placement is what a runtime can fuse, not just what can be quantized:

- **compute** (Conv, Gemm, MatMul): activation inputs and weights in int8 (weights
  per-channel), bias alongside; the output is quantized *after* a single-use Relu/Clip
  epilogue, so ONNX Runtime folds the activation into the quantize step and fuses
  DQ→Conv→Q into one QLinearConv;
- **elementwise** (Add): a residual sum whose inputs are both int8 stays int8 (QLinearAdd),
  with its own output range (again after a Relu epilogue);
- **averaging** (GlobalAveragePool, AveragePool) on an int8 input: own output range;
- **data movement** (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Concat, ...)
  on int8 inputs: the output *shares* the input's scale and zero point (one scale across all
  of Concat's inputs), so the runtime drops the DQ/Q around them and int8 flows through;
- everything else stays float with its reason: sensitive ops (Softmax, LayerNormalization,
  GELU, ...), ``--exclude``, or ops with no int8 kernel.

One ONNX Runtime rule (``--target ort``): a SiLU, ``x · Sigmoid(x)``, on a quantized ``x``
stays float and is emitted as one ``com.microsoft`` QuickGelu (alpha 1, the same function).
ORT gives each consumer of a DequantizeLinear its own copy before its fusions run, so the
Sigmoid and the Mul stop sharing an input and ORT's own SiLU→QuickGelu fusion no longer
matches: the float model runs one fused kernel, the QDQ model two passes over memory plus
a third for the product. Quantizing the SiLU instead (QLinearSigmoid + QLinearMul, what
``quantize_static`` does) is slower still. Measured on EfficientNet-B0 (ORT 1.32, 1 thread,
this 2-core VNNI machine, speed-up over fp32 at batch 1/8): ORT's QDQ 0.84×/1.18× (its
int8 SiLU took 7.8 of 16.8 ms), ours with float Sigmoid+Mul 0.67×/0.83×, ours with
QuickGelu 1.02×/1.29×.

Depthwise Convs stay int8 on every target. ORT's int8 depthwise kernel is slower than its
fp32 NCHWc one here (profiled at batch 1: EfficientNet-B0 1.52 vs 1.13 ms, MobileNetV3
1.59 vs 0.89 ms), but a float depthwise Conv between int8 ones adds layout Transposes and
Q/DQ that grow with the batch: keeping them float measured 1.17×/1.18× (EfficientNet-B0)
and 1.15×/1.12× (MobileNetV3) against 1.02×/1.27× and 1.02×/1.24× all-int8 (batch 1/8),
a loss at batch 8 where ORT's own quantizer already reaches 1.24× on MobileNetV3.

Also for ONNX Runtime: a ReduceMean over the two spatial axes of a 4-D int8 tensor
(``keepdims``; how exporters write a squeeze-excitation's pooling) is averaging, emitted as
GlobalAveragePool, which ORT fuses into QLinearGlobalAveragePool; it has no int8 ReduceMean
in QDQ form, and its float ReduceMean on the NHWC tensors between QLinearConvs reduces the
middle axes, its slow case (MobileNetV3, 3 such means: 1.03×/1.15× → 1.08×/1.16×). A mean
of a float tensor (EfficientNet's, after the SiLU) stays float: quantizing its input for
the int8 pool gained at batch 1 but lost at batch 8 (1.00×/1.31× → 1.10-1.18×/1.23×).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.editing import attribute, const_ints

COMPUTE = frozenset({"Conv", "Gemm", "MatMul"})
ELEMENTWISE = frozenset({"Add"})
AVERAGING = frozenset({"GlobalAveragePool", "AveragePool"})
# Ops whose output values are a subset of (a rearrangement of) their input's: a shared
# scale is exact for them.
DATA_MOVEMENT = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Identity",
        "Slice",
        "Gather",
        "Split",
        "DepthToSpace",
        "SpaceToDepth",
        "Resize",
    }
)
EPILOGUES = frozenset({"Relu", "Clip"})
# ONNX Runtime runs these on int8 through a 256-entry table (QLinearLeakyRelu,
# QLinearSigmoid) when a DQ feeds them and a Q follows: --target ort places them int8 when
# their input is int8 and an int8 compute node reads the output (which then has a Q anyway).
# Not when only float ops read it: a table lookup then a DQ costs what a DQ then the float
# op costs, and adds a rounding.
LOOKUP = frozenset({"LeakyRelu", "Sigmoid"})
# Kept float on purpose: their numerics need the range (normalizations, exponentials).
SENSITIVE = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "RMSNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "GroupNormalization",
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "Erf",
        "Exp",
        "Log",
        "Pow",
        "Sqrt",
        "Div",
        "ReduceMean",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
    }
)
# Nodes that carry no computation worth a precision line.
UNREPORTED = frozenset({"Constant"})


@dataclass
class Placement:
    """What is quantized. Tensors map to the root of their shared-scale group."""

    compute: dict[str, str] = field(default_factory=dict)  # node -> how
    floats: dict[str, str] = field(default_factory=dict)  # node -> why it stays float
    tensors: dict[str, str] = field(default_factory=dict)  # tensor -> group root
    weights: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (input, axis)
    # Compute outputs before their epilogue (bias correction and re-placement observe them).
    raw_outputs: dict[str, str] = field(default_factory=dict)  # node -> output tensor
    # --target ort: SiLU pairs emitted as one QuickGelu (see the module docstring).
    silu: dict[str, str] = field(default_factory=dict)  # Mul node -> its Sigmoid node
    # Whether quantized graph outputs come out of their DequantizeLinear (``outputs_too``,
    # --target ort). Otherwise a graph output also read by an int8 layer is quantized for
    # that reader only and stays float as a model output.
    outputs_quantized: bool = False
    # --target ort: spatial ReduceMeans emitted as GlobalAveragePool (ditto).
    global_means: set[str] = field(default_factory=set)  # ReduceMean nodes

    def groups(self) -> dict[str, list[str]]:
        by_root: dict[str, list[str]] = {}
        for tensor, root in self.tensors.items():
            by_root.setdefault(root, []).append(tensor)
        return {root: sorted(members) for root, members in sorted(by_root.items())}


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


def is_weight(value: ir.Value | None) -> bool:
    """A constant tensor (initializer or Constant output): quantized offline, never observed."""
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def overridable(value: ir.Value | None) -> bool:
    """An initializer that is also a graph input: its stored value is a default the caller
    may replace at run time, so it is neither a weight to store in int8 (that would freeze
    the default and drop the caller's value) nor an activation with calibrated ranges."""
    return value is not None and value.is_graph_input() and value.const_value is not None


def overridable_reason(name: str | None) -> str:
    """Why a layer reading the overridable initializer ``name`` stays float (every mode)."""
    return (
        f"{name} is an initializer the caller may override (also a graph input): "
        "quantizing it would freeze its stored value"
    )


def weight_refusal(node: ir.Node) -> str:
    """Why a MatMul/Gemm has no stored float32 weight matrix as its second input, in the
    words int8 (static) uses, for the modes that quantize stored weights only (int8-dynamic,
    fp8). ``W @ x`` read "weight is not a constant matrix (activation × activation)", as did a
    tied embedding's ``MatMul(r, Transpose(emb))``."""
    from graphopt.editing import constant_array, is_constant

    a = node.inputs[0] if node.inputs else None
    b = node.inputs[1] if len(node.inputs) > 1 else None
    if b is None:
        return "no weight input"
    if is_constant(a) and not is_constant(b):
        return f"{node.op_type} with a constant first input"
    if is_constant(b):
        if b.dtype is not None and b.dtype != ir.DataType.FLOAT:
            return f"weight {b.name} is {b.dtype.name.lower()}, not float32"
        array = constant_array(b, max_bytes=1 << 20) if b.shape is None else None
        rank = len(b.shape) if b.shape is not None else (array.ndim if array is not None else 2)
        if rank != 2:
            return f"{node.op_type} with a weight of rank != 2"
        return ""
    producer = b.producer()
    if producer is not None and any(is_constant(v) for v in producer.inputs):
        source = next(v.name for v in producer.inputs if is_constant(v))
        return (
            f"weight {b.name} is computed at run time ({producer.op_type} of {source}), not a "
            "stored constant"
        )
    return "weight is not a constant matrix (activation × activation)"


def _activation(value: ir.Value | None) -> bool:
    return value is not None and is_float(value) and not is_weight(value)


def _compute_check(node: ir.Node) -> tuple[int | None, int | None, str]:
    """(weight input, channel axis, "") when ``node`` can run in int8, else a reason."""
    inputs = list(node.inputs)
    if not inputs or not all(v is None or is_float(v) for v in inputs):
        return None, None, "not a float32 node"
    fed = [v.name for v in inputs[:2] if overridable(v)]
    if fed:
        return None, None, overridable_reason(fed[0])
    if node.op_type == "Conv":
        if len(inputs) < 2 or not _activation(inputs[0]) or not is_weight(inputs[1]):
            return None, None, "Conv without a constant weight"
        return 1, 0, ""
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0:
            return None, None, "Gemm with transA or alpha (no int8 kernel form)"
        if len(inputs) > 2 and attribute(node, "beta", 1.0) != 1.0:
            return None, None, "Gemm with beta != 1"
        if not _activation(inputs[0]) or not is_weight(inputs[1]):
            return None, None, "Gemm without a constant weight"
        return 1, (0 if attribute(node, "transB", 0) else 1), ""
    if node.op_type == "MatMul":
        a, b = inputs[0], inputs[1]
        if not _activation(a):
            return None, None, "MatMul with a constant first input"
        if is_weight(b):
            shape = b.const_value.shape if b.const_value is not None else None
            rank = len(shape) if shape is not None else 2
            if rank != 2:
                return None, None, "MatMul with a weight of rank != 2"
            return 1, 1, ""
        return None, None, ""  # both activations: per-tensor on both
    return None, None, "no int8 kernel"


def place(
    model: ir.Model,
    exclude,
    excluded_nodes: frozenset[str] = frozenset(),
    outputs_too: bool = False,
    target: str | None = None,
) -> Placement:
    """The placement for ``model``: ``exclude(node)`` (``--exclude``) and ``excluded_nodes``
    (node names, e.g. mixed precision's float set) keep nodes in float. ``outputs_too``:
    graph outputs may be quantized as well (ONNX Runtime fuses DQ→Conv/Gemm→Q only: a
    Conv or Gemm that writes a float graph output keeps dequantizing its weight every run).
    ``target``: the run's ``--target``; None infers it from ``outputs_too`` (which only
    ``--target ort`` sets)."""
    ort = target == "ort" if target is not None else outputs_too
    graph = model.graph
    placement = Placement()
    groups = placement.tensors
    outputs = {v.name for v in graph.outputs}

    def keep_float(node: ir.Node) -> str:
        if node.name in excluded_nodes:
            return "kept in float (mixed precision)"
        if exclude(node):
            return "kept in float (--exclude)"
        return ""

    placement.outputs_quantized = outputs_too

    def quantizable(value: ir.Value) -> bool:
        return _activation(value) and (outputs_too or value.name not in outputs)

    def epilogue(node: ir.Node) -> ir.Value:
        """The compute output, or its single-use Relu/Clip's output (the Q goes there)."""
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) != 1 or (out.name in outputs and not outputs_too):
            return out
        user = uses[0].node
        if user.op_type not in EPILOGUES or user.domain != "" or keep_float(user):
            return out
        if user.op_type == "Clip" and any(not is_weight(v) for v in list(user.inputs)[1:] if v):
            return out
        if not quantizable(user.outputs[0]):
            return out
        placement.compute[user.name] = f"int8 (fused into {node.op_type}: quantized after it)"
        return user.outputs[0]

    for node in graph:  # topological order
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op in UNREPORTED:
            continue
        if node.name in placement.compute:
            continue  # an epilogue already placed
        reason = keep_float(node)
        if op in COMPUTE:
            weight, axis, why = _compute_check(node)
            if reason or why:
                placement.floats[node.name] = reason or why
                continue
            out = node.outputs[0]
            how = "int8 (per-channel weights)" if weight is not None else "int8 (both inputs)"
            if not quantizable(out):
                # A float graph output (portable: TensorRT fuses DQ→op with a float output;
                # ORT would not, which is why --target ort quantizes outputs too).
                how += ", float output"
            for index, value in enumerate(node.inputs):
                # A graph output read here is quantized for this reader whatever the target:
                # the emission leaves the model output float where outputs are not quantized
                # (else the layer would run weight-only under an "int8" label).
                if index != weight and index < 2 and _activation(value):
                    groups.setdefault(value.name, value.name)
            if weight is not None:
                placement.weights[node.name] = (weight, axis)
            placement.raw_outputs[node.name] = out.name
            out = epilogue(node)
            if quantizable(out):
                groups.setdefault(out.name, out.name)
            placement.compute[node.name] = how
            continue
        data = [v for v in node.inputs if v is not None and not is_weight(v)]
        int8_inputs = bool(data) and all(v.name in groups for v in data)
        if op in ELEMENTWISE and not reason:
            if int8_inputs and len(data) == 2:
                out = epilogue(node)
                placement.raw_outputs[node.name] = node.outputs[0].name
                if quantizable(out):
                    groups.setdefault(out.name, out.name)
                    placement.compute[node.name] = "int8 (both inputs int8)"
                    continue
            placement.floats[node.name] = reason or "float (an input is not int8)"
            continue
        if ort and op in LOOKUP and node.domain == "" and not reason and int8_inputs:
            out = node.outputs[0]
            read_in_int8 = any(
                use.node.op_type in COMPUTE
                and use.idx < 2
                and not keep_float(use.node)
                and not _compute_check(use.node)[2]
                for use in out.uses()
            )
            if read_in_int8 and quantizable(out):  # (never a SiLU's Sigmoid: a Mul reads it)
                groups.setdefault(out.name, out.name)
                placement.compute[node.name] = f"int8 (own output scale; ORT: QLinear{op})"
                continue
        spatial_mean = ort and op == "ReduceMean" and node.domain == "" and _spatial_mean(node)
        if spatial_mean and not reason and int8_inputs and quantizable(node.outputs[0]):
            groups.setdefault(node.outputs[0].name, node.outputs[0].name)
            placement.compute[node.name] = "int8 (own output scale; as GlobalAveragePool)"
            placement.global_means.add(node.name)
            continue
        if op in AVERAGING and not reason and int8_inputs and quantizable(node.outputs[0]):
            groups.setdefault(node.outputs[0].name, node.outputs[0].name)
            placement.compute[node.name] = "int8 (own output scale)"
            continue
        if op in DATA_MOVEMENT and not reason and int8_inputs:
            outs = [v for v in node.outputs if quantizable(v)]
            if op in ("Gather", "Slice", "Reshape", "Split", "Resize") and len(data) > 1:
                outs = []  # a data-dependent index/shape input: not pure data movement
            if len(outs) == len(node.outputs):
                root = _union(groups, [v.name for v in data])
                for value in outs:
                    groups[value.name] = root
                placement.compute[node.name] = "int8 (shares its input's scale)"
                continue
        placement.floats[node.name] = reason or (
            # The exact passes fold BatchNormalization into the Conv before it; one left
            # here had no Conv to fold into (and would split a Conv from its Q).
            "float (a BatchNormalization not folded into a Conv)"
            if op == "BatchNormalization"
            else "float (numerically sensitive)"
            if op in SENSITIVE
            else "float (inputs not int8)"
            if op in DATA_MOVEMENT | AVERAGING | ELEMENTWISE
            else "float (no int8 kernel)"
        )
    _compress(groups)
    if ort:
        _place_silu(graph, placement)
    return placement


def _spatial_mean(node: ir.Node) -> bool:
    """Whether a ReduceMean is a GlobalAveragePool: axes {2, 3} of a 4-D input, kept."""
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) != 4 or attribute(node, "keepdims", 1) != 1:
        return False
    inputs = list(node.inputs)
    axes = const_ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
    if axes is None:
        axes = attribute(node, "axes", None)  # before opset 18
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _silu_mul(sigmoid: ir.Node) -> ir.Node | None:
    """The Mul of ``x · Sigmoid(x)`` when ``sigmoid`` is the pair's Sigmoid, else None."""
    x, out = sigmoid.inputs[0], sigmoid.outputs[0]
    if sigmoid.op_type != "Sigmoid" or x is None or out.is_graph_output():
        return None
    uses = out.uses()
    if len(uses) != 1:
        return None
    mul = uses[0].node
    if mul.op_type != "Mul" or mul.domain != "":
        return None
    if sorted([id(v) for v in mul.inputs]) != sorted([id(x), id(out)]):
        return None
    return mul


def _place_silu(graph: ir.Graph, placement: Placement) -> None:
    """Mark each float ``Mul(x, Sigmoid(x))`` on a quantized ``x`` for QuickGelu emission.
    Only on a quantized ``x``: on a float one ORT fuses the pair itself."""
    for node in graph:
        if node.op_type != "Sigmoid" or node.domain != "" or node.name not in placement.floats:
            continue
        x = node.inputs[0]
        mul = _silu_mul(node)
        if mul is None or x.name not in placement.tensors or mul.name not in placement.floats:
            continue
        placement.silu[mul.name] = node.name
        why = "float (SiLU, emitted as one QuickGelu for ONNX Runtime)"
        placement.floats[node.name] = placement.floats[mul.name] = why


def _union(groups: dict[str, str], names: list[str]) -> str:
    """Merge the groups of ``names`` into one; returns its root (the smallest name)."""
    roots = sorted({_find(groups, name) for name in names})
    root = roots[0]
    for other in roots[1:]:
        groups[other] = root
    return root


def _find(groups: dict[str, str], name: str) -> str:
    while groups[name] != name:
        name = groups[name]
    return name


def _compress(groups: dict[str, str]) -> None:
    for name in list(groups):
        groups[name] = _find(groups, name)
