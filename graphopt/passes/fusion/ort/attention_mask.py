"""An additive padding/causal mask built from the 2-D attention mask → Attention's mask_index.

transformers builds a float (batch, 1, seq, seq) bias from the (batch, seq) 0/1 mask with a
dozen shape, compare and Where ops, and Attention then reads that bias for every head. ORT's
Attention takes the raw 2-D mask itself (``mask_index``, int32) and, with ``unidirectional``,
the causal part; the mask-building subgraph then goes away as dead code.

The mask subgraph has no single shape across exporters and transformers versions, so instead
of matching it the pass probes it: it evaluates the bias (in ORT) for random 0/1 masks at a
few batch sizes and lengths and accepts only a bias that is 0 exactly where the 2-D mask keeps
a key (and, for the causal form, the key is not after the query) and ≤ -10000 elsewhere.
Those are the masks the rewrite reproduces exactly: softmax weights of masked keys underflow
to 0 in both. A query row whose keys are *all* masked (a fully padded row, as left padding
gives a causal prompt) is where the two can differ: the bias spreads it over the scores plus
the fill, ORT over the scores plus ``mask_filter_value`` (default -10000), and for the causal
part ORT fills the later keys with float32's lowest whatever that value. So the bias must use
one fill value on every masked key, which becomes ``mask_filter_value``, and a causal bias
must fill with lowest (transformers' ``finfo.min``): then a fully masked row is all lowest, an
even spread, in both. Measured on ORT 1.32 (CPU): padding-only fills -10000, -1e9 and lowest,
causal fill lowest exact on all-zero and left-padded rows; causal fill -10000 not.

Probes at a few lengths cannot tell a causal mask from a sliding-window one whose window is
longer than every probe (keep key j for query i when j ≤ i and i - j < 100 looks causal at
lengths 7, 5 and 12, and is not at 150); probing a longer length only moves the limit. Such a
window needs its width as a number in the mask's computation, so before any probe the
computation is audited (:func:`_numbers_are_structural`): only ops that bring in no numbers of
their own, constants that are 0/±1, masking fills (≤ -10000) or axes, and dims read by Shape
that are symbolic (batch, length) or 0/1. What is left is arithmetic on the mask, positions
and lengths with 0/±1, which is what the exporters write for padding and causal masks; a
window would have to be a function of the lengths alone that the probes all miss.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt import editing
from graphopt.inputs import make_inputs

# float32's lowest (transformers' fill): the only fill with which ORT's causal part matches a
# fully masked row.
from graphopt.passes.fusion.attention import LOWEST
from graphopt.passes.fusion.ort._base import MS_DOMAIN
from graphopt.registry import GraphPass, Stage, register

# Attention inputs (com.microsoft): input, weights, bias, mask_index, past, attention_bias.
MASK_INDEX, PAST, ATTENTION_BIAS = 3, 4, 5
# (batch, sequence) of each probe; lengths differ so a bias cached for one length is caught.
PROBE_SHAPES = ((2, 7), (1, 5), (3, 12))
# A masked score must be at least this negative (ORT's default mask_filter_value).
MASKED = -10000.0
MASK_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)
# Ops through which an input's shape, not its values, reaches the bias.
SHAPE_ONLY = ("Shape", "Size")
# Ops a mask computation may contain: they bring in no number beyond their inputs (their
# attributes are axes, permutations, dtypes; ConstantOfShape's value is audited).
MASK_OPS = frozenset(
    (
        *("Add", "Sub", "Mul", "Neg", "Max", "Min"),
        *("And", "Or", "Not", "Xor", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"),
        *("Where", "Cast", "CastLike", "Identity", "Range", "Trilu", "ConstantOfShape"),
        *("Unsqueeze", "Squeeze", "Reshape", "Expand", "Flatten", "Concat", "Transpose", "Tile"),
        *("Gather", "GatherND", "GatherElements", "Slice", *SHAPE_ONLY),
    )
)
# Inputs that are axes (of Unsqueeze, Squeeze, Slice): structural, whatever their values.
AXES_INPUTS = {"Unsqueeze": 1, "Squeeze": 1, "Slice": 3}
# A constant over this many elements could be a table (a banded mask): not audited, refused.
MAX_CONSTANT_ELEMENTS = 16
# Constants this large stand for "no bound" (INT32/INT64 max in Slice ends).
UNBOUNDED = 2**31 - 1


def _value_inputs(value: ir.Value) -> set[ir.Value]:
    """Graph inputs whose values (not only shapes) ``value`` depends on."""
    found: set[ir.Value] = set()
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.is_graph_input():
            found.add(current)
            continue
        node = current.producer()
        if node is None or editing.is_op(node, SHAPE_ONLY):
            continue
        stack.extend(v for v in node.inputs if v is not None)
    return found


def _plain_number(array: np.ndarray) -> bool:
    """0/±1 (or booleans), a masking fill (≤ MASKED, -inf included), or an "unbounded"
    sentinel (|v| ≥ 2³¹ - 1, e.g. a Slice to the end): no usable window width."""
    if array.size > MAX_CONSTANT_ELEMENTS:
        return False
    if array.dtype == np.bool_:
        return True
    if array.dtype.kind not in "iuf" or np.isnan(array).any():
        return False
    values = array.astype(np.float64)
    plain = np.isin(values, (-1.0, 0.0, 1.0)) | (values <= MASKED) | (np.abs(values) >= UNBOUNDED)
    return bool(np.all(plain))


def _selected(shape: ir.Shape, start: int = 0, end: int | None = None) -> tuple:
    """Dims [start, end) of ``shape``, the bounds clamped as ONNX's Shape clamps them."""
    rank = shape.rank()
    bounds = (start, rank if end is None else end)
    low, high = (min(max(b + rank if b < 0 else b, 0), rank) for b in bounds)
    return tuple(shape.dims[low:high])


def _plain_dims(dims) -> bool:
    """Every dim is a named symbol or 0/1 (an unknown one could be any static size)."""
    for dim in dims:
        if isinstance(dim, int) and dim not in (0, 1):
            return False
        if not isinstance(dim, int) and dim.value is None:
            return False
    return True


def _shape_dims(node: ir.Node) -> tuple | None:
    """The dims a Shape node reads (a Size node multiplies them), or None when unknown."""
    source = node.inputs[0].shape if node.inputs[0] is not None else None
    if source is None:
        return None
    if node.op_type == "Size":
        return tuple(source.dims)
    start = node.attributes.get_int("start", 0)
    return _selected(source, start, node.attributes.get_int("end", None))


def _gathered_dims(node: ir.Node) -> bool | None:
    """For Gather(Shape(x), constant indices): whether the picked dims are plain; None when
    ``node`` is not that (then the whole Shape is audited)."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    indices = editing.const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape_node is None or not editing.is_op(shape_node, "Shape") or indices is None:
        return None
    read = _shape_dims(shape_node)
    if read is None or any(not -len(read) <= i < len(read) for i in indices):
        return False
    return _plain_dims(read[i] for i in indices)


def _given(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _sliced_dims(node: ir.Node) -> bool | None:
    """For Slice(Shape(x), constant bounds) on axis 0, step 1 (how exports below opset 15,
    and graphopt's respelling of Shape(start, end), read a range of dims): whether the
    picked dims are plain; None when ``node`` is not that."""
    shape_node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if shape_node is None or not editing.is_op(shape_node, "Shape") or len(node.inputs) < 3:
        return None
    starts, ends = (editing.const_ints(v) for v in node.inputs[1:3])
    axes = editing.const_ints(node.inputs[3]) if _given(node, 3) else [0]
    steps = editing.const_ints(node.inputs[4]) if _given(node, 4) else [1]
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if axes not in ([0], [-1]) or steps != [1]:  # a shape is 1-D: axis -1 is axis 0
        return None
    read = _shape_dims(shape_node)
    if read is None:
        return False
    # Slice clamps its bounds as Python's slicing does for step 1.
    return _plain_dims(read[starts[0] : ends[0]])


def _numbers_are_structural(bias: ir.Value) -> bool:
    """Whether every number the computation of ``bias`` brings in is plain: no constant,
    static dim or attribute that could be a window's width (see the module notes)."""
    stack, seen = [bias], set()
    while stack:
        value = stack.pop()
        node = value.producer()
        if value.is_graph_input() or node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.domain not in ("", "ai.onnx") or node.op_type not in MASK_OPS:
            return False
        if editing.is_op(node, SHAPE_ONLY):
            read = _shape_dims(node)
            if read is None or not _plain_dims(read):
                return False
            continue
        if node.op_type == "ConstantOfShape":
            fill = node.attributes.get("value")
            if fill is not None and not _plain_number(fill.as_tensor().numpy()):
                return False
        if node.op_type == "Slice" and (sliced := _sliced_dims(node)) is not None:
            if not sliced:
                return False
            continue  # the Shape and the bounds only pick plain dims
        gathered = _gathered_dims(node) if node.op_type == "Gather" else None
        if gathered is False:
            return False
        for index, operand in enumerate(node.inputs):
            if operand is None or (gathered and index in (0, 1)):
                continue
            array = editing.constant_array(operand)
            if array is None and editing.is_constant(operand):
                return False  # a constant too large or odd to read
            if array is None:
                stack.append(operand)
            elif AXES_INPUTS.get(node.op_type) != index and not _plain_number(array):
                return False
    return True


def _bias_only_model(model: ir.Model, bias: ir.Value) -> ir.Model:
    """A copy of ``model`` whose only output is the bias, the rest of the graph pruned."""
    probe = model.clone()
    value = next(v for node in probe.graph for v in node.outputs if v.name == bias.name)
    probe.graph.outputs.clear()
    probe.graph.outputs.append(value)
    common_passes.RemoveUnusedNodesPass()(probe)
    return probe


def _probe_masks(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Random 0/1 masks whose first key is always kept (no fully masked query row)."""
    masks = rng.integers(0, 2, size=(batch, length))
    masks[:, 0] = 1
    return masks


def _kind(model: ir.Model, bias: ir.Value, mask: ir.Value) -> tuple[str, float] | None:
    """('padding' or 'causal', the fill) when the probes show which mask ``bias`` is and
    that ORT's mask_index reproduces it on fully masked rows too, else None."""
    from graphopt.verify import run_model  # ORT only when a candidate exists

    probe = _bias_only_model(model, bias)
    rng = np.random.default_rng(0)
    fills: dict[str, set[float]] = {"padding": set(), "causal": set()}
    for batch, length in PROBE_SHAPES:
        shapes = {v.name: (batch, length) for v in probe.graph.inputs if v.shape.rank() == 2}
        if mask.name not in shapes:
            return None
        feeds = make_inputs(probe, shapes, seed=0)
        feeds[mask.name] = _probe_masks(rng, batch, length).astype(feeds[mask.name].dtype)
        try:
            (got,) = run_model(probe, feeds)
        except Exception:  # a bias that does not even run on these shapes is not the mask
            return None
        if got.ndim != 4 or got.shape[3] != length or got.shape[0] not in (1, batch):
            return None
        if got.shape[2] not in (1, length):
            return None
        got = np.broadcast_to(got, (batch, got.shape[1], length, length))  # heads kept
        keep = feeds[mask.name][:, None, None, :] != 0
        causal = np.tril(np.ones((length, length), dtype=bool))
        for kind in list(fills):
            expected = keep & causal if kind == "causal" else np.broadcast_to(keep, got.shape)
            expected = np.broadcast_to(expected, got.shape)
            if not (np.all(got[expected] == 0) and np.all(got[~expected] <= MASKED)):
                del fills[kind]
            else:
                fills[kind].update(float(x) for x in np.unique(got[~expected]))
        if not fills:
            return None
    if len(fills) != 1:
        return None
    ((kind, values),) = fills.items()
    return _exact_fill(kind, values)


def _exact_fill(kind: str, values: set[float]) -> tuple[str, float] | None:
    """(kind, fill) when mask_index with ``mask_filter_value = fill`` gives the bias's
    softmax on a fully masked row as well (see the module notes), else None."""
    if len(values) != 1:
        return None  # two fills weigh a fully masked row's keys differently; ORT has one
    (fill,) = values
    if not np.isfinite(fill) or (kind == "causal" and fill != LOWEST):
        return None
    return kind, fill


@register
class OrtAttentionMaskPass(GraphPass):
    """With --target ort: Attention's additive padding/causal bias → its 2-D mask_index."""

    name = "ort-attention-mask"
    targets = frozenset(("ort",))
    stage = Stage.FUSION
    handles_subgraphs = False

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        groups: dict[int, list[ir.Node]] = {}
        biases: dict[int, ir.Value] = {}
        for node in graph:
            if node.domain != MS_DOMAIN or node.op_type != "Attention" or len(node.inputs) < 6:
                continue
            if any(node.inputs[i] is not None for i in (MASK_INDEX, PAST)):
                continue
            if node.inputs[ATTENTION_BIAS] is None or node.attributes.get("unidirectional"):
                continue
            bias = node.inputs[ATTENTION_BIAS]
            groups.setdefault(id(bias), []).append(node)
            biases[id(bias)] = bias
        hits = 0
        casts: dict[int, ir.Value] = {}
        for key, nodes in groups.items():
            bias = biases[key]
            sources = _value_inputs(bias)
            if len(sources) != 1:
                continue
            (mask,) = sources
            if mask.dtype not in MASK_TYPES or mask.shape is None or mask.shape.rank() != 2:
                continue
            if not _numbers_are_structural(bias):
                continue
            found = _kind(model, bias, mask)
            if found is None:
                continue
            kind, fill = found
            if id(mask) not in casts:
                cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32})
                cast.outputs[0].name = editing.unique_name(graph, f"{mask.name}_int32")
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT32, mask.shape
                graph.insert_before(graph.node(0), [cast])
                casts[id(mask)] = cast.outputs[0]
            for node in nodes:
                node.replace_input_with(MASK_INDEX, casts[id(mask)])
                node.replace_input_with(ATTENTION_BIAS, None)
                node.resize_inputs(MASK_INDEX + 1)  # no trailing empty inputs
                if kind == "causal":
                    node.attributes["unidirectional"] = ir.AttrInt64("unidirectional", 1)
                # ORT's padding fill: the bias's, so fully masked rows agree (module notes).
                node.attributes["mask_filter_value"] = ir.AttrFloat32("mask_filter_value", fill)
                hits += 1
        return hits
