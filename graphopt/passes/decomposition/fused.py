"""Fused QKV projections (GPT-2 style): one ``X @ W (+ b)`` whose columns a Split cuts
into q, k and v.

Finding (:func:`through_split`): a Q/K/V trace that meets a ``Split`` on the last axis goes
on through Reshapes that keep that axis (the exporter's 2-D Gemm → ``[B, S, 3·H·D]``) and a
bias ``Add`` (or a Gemm's C) to the fused ``MatMul``/``Gemm``; the projection is the output's
column range ``offset : offset + size``. Split sizes come from the constant input (opset 13+),
the ``split`` attribute, or an equal split by output count (``num_outputs`` at opset 18).

Writing (:func:`write`): every range of one Split at once, so Q/K and V/O plans that touch
the same fused weight agree: the fused weight's and bias's columns, the fused width in the
Reshapes before the Split, and the Split sizes. The head-split Reshapes after it are fixed
by the caller, as for separate projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.analysis.shape_entries import DimRef, constant_piece, shape_source
from graphopt.editing import add_initializer, attribute, const_ints, constant_array
from graphopt.passes.pruning.channel_removal import set_shape_entry


@dataclass
class FusedSource:
    """Where one of q/k/v sits in a fused projection."""

    split: int  # node index of the Split
    part: int  # which Split output
    offset: int  # first column of the range in the fused weight
    sizes: tuple[int, ...]  # every Split output's width, in order
    reshapes: tuple[int, ...]  # Reshapes between projection and Split with a constant width
    matmul: int  # node index of the fused MatMul/Gemm
    trans_b: bool  # Gemm with transB: the weight is stored [out, in]
    weight: np.ndarray  # the whole fused weight [in, total] (MatMul layout)
    bias_node: int | None  # node index of the bias Add, or the Gemm itself (its C)
    bias_slot: int
    bias: np.ndarray | None  # the whole fused bias [total]


@dataclass
class Range:
    """What a plan writes into one Split output's range: kept columns and their values."""

    keep: np.ndarray  # kept column indices within the range, ascending
    weight: np.ndarray  # [in, size] values of the range (rotated for V)
    bias: np.ndarray | None  # [size] (None: the range's bias is zero)


def readers(value: ir.Value) -> list[ir.Node]:
    """The nodes reading ``value``, less ``Shape``: a shape read at run time follows the new
    width by itself (the TorchScript exporter reads batch and sequence that way), and one
    that feeds a size the rewrite does not change fails the per-module shape check."""
    return [u.node for u in value.uses() if u.node.op_type != "Shape"]


def shared(value: ir.Value) -> bool:
    """Whether anything besides one node reads ``value`` (a model output counts)."""
    return len(readers(value)) != 1 or value.is_graph_output()


def split_sizes(ctx, node: ir.Node) -> list[int] | None:
    """Output widths of a Split along its axis, when every one is known without running."""
    shape = ctx.shape(node.inputs[0])
    if shape is None:
        return None
    rank = len(shape)
    axis = attribute(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    if axis != rank - 1 or not isinstance(shape[axis], int):
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = const_ints(node.inputs[1])
    elif attribute(node, "split") is not None:
        sizes = list(attribute(node, "split"))
    else:
        # Equal chunks; at opset 18 (num_outputs) the last one may be smaller.
        count = len(node.outputs)
        chunk = -(-shape[axis] // count)
        sizes = [chunk] * (count - 1) + [shape[axis] - chunk * (count - 1)]
    if sizes is None or sum(sizes) != shape[axis] or min(sizes) < 0:
        return None
    return [int(s) for s in sizes]


def through_split(ctx, split: ir.Node, value: ir.Value, heads: int, dim: int, index):
    """The fused projection behind ``split``'s output ``value``: ((source, data input
    name), "") or (None, why)."""
    sizes = split_sizes(ctx, split)
    if sizes is None:
        return None, "fused QKV Split is not along the last axis with constant sizes"
    part = next(i for i, out in enumerate(split.outputs) if out is value)
    if sizes[part] != heads * dim:
        return None, "fused QKV Split output is not heads*head_dim wide"
    offset, total = sum(sizes[:part]), sum(sizes)
    reshapes = []
    current = split.inputs[0]
    while True:
        if shared(current):
            return None, "fused QKV projection output has other readers"
        node = current.producer()
        if node is None:
            return None, "fused QKV Split does not read a projection"
        if node.op_type != "Reshape":
            break
        before, after = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        if not before or not after or before[-1] != total or after[-1] != total:
            return None, "Reshape before the fused QKV Split changes its last axis"
        entry = shape_source(ctx, node.inputs[1], len(after) - 1)
        if entry == total and constant_piece(ctx, node.inputs[1], len(after) - 1) is not None:
            reshapes.append(index[id(node)])
        elif entry != -1 and not isinstance(entry, DimRef):
            # -1 and a dim read by Shape at run time follow the new width by themselves.
            return None, "fused QKV width of a Reshape is computed at run time"
        current = node.inputs[0]
    bias_node, bias_slot, bias = None, 1, None
    if node.op_type == "Add":
        for slot in (1, 0):
            array = constant_array(node.inputs[slot])
            if array is not None and array.shape == (total,):
                bias_node, bias_slot, bias = node, slot, array.astype(np.float64)
                break
        if bias_node is None:
            return None, "Add after the fused QKV projection is not a bias"
        data = node.inputs[1 - bias_slot]
        if shared(data):
            return None, "fused QKV projection output has other readers"
        node = data.producer()
        if node is None:
            return None, "no fused QKV projection before the bias"
    weight, trans_b, why = _weight(node, total)
    if weight is None:
        return None, why
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        if bias_node is not None:
            return None, "fused QKV projection has two biases"
        array = constant_array(node.inputs[2])
        if array is None or array.shape != (total,):
            return None, "fused QKV Gemm bias is not a constant vector"
        bias_node, bias_slot, bias = node, 2, array.astype(np.float64)
    source = FusedSource(
        index[id(split)], part, offset, tuple(sizes), tuple(reshapes), index[id(node)], trans_b,
        weight, None if bias_node is None else index[id(bias_node)], bias_slot, bias,
    )  # fmt: skip
    return (source, node.inputs[0].name), ""


def _weight(node: ir.Node, total: int) -> tuple[np.ndarray | None, bool, str]:
    """The fused weight in MatMul layout ``[in, total]``, whether it is stored transposed."""
    trans_b = False
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0:
            return None, False, "fused QKV Gemm with transA or alpha"
        if attribute(node, "beta", 1.0) != 1.0 and len(node.inputs) > 2:
            return None, False, "fused QKV Gemm with beta"
        trans_b = bool(attribute(node, "transB", 0))
    elif node.op_type != "MatMul":
        return None, False, f"{node.op_type} before the fused QKV Split"
    array = constant_array(node.inputs[1])
    if array is None or array.ndim != 2:
        return None, False, "fused QKV weight is not a constant matrix"
    array = array.T if trans_b else array
    if array.shape[1] != total:
        return None, False, "fused QKV weight is not as wide as the Split"
    return array.astype(np.float64), trans_b, ""


def write(
    g, tagged, analysed, report, source: FusedSource, ranges: dict[int, Range], padded: bool
) -> None:
    """Write ``ranges`` (Split output → kept columns and values) into the fused projection;
    outputs without a range keep every column as they are."""
    weights, biases, sizes = [], [], []
    for part, size in enumerate(source.sizes):
        cols = slice(sum(source.sizes[:part]), sum(source.sizes[: part + 1]))
        chosen = ranges.get(part)
        if chosen is None:
            chosen = Range(
                np.arange(size),
                source.weight[:, cols],
                None if source.bias is None else source.bias[cols],
            )
        bias = np.zeros(size) if chosen.bias is None else chosen.bias
        if padded:
            mask = np.zeros(size, dtype=bool)
            mask[chosen.keep] = True
            weights.append(np.where(mask, chosen.weight, 0.0))
            biases.append(np.where(mask, bias, 0.0))
        else:
            weights.append(chosen.weight[:, chosen.keep])
            biases.append(bias[chosen.keep])
        sizes.append(len(chosen.keep))
    weight = np.concatenate(weights, axis=1)
    _set(g, tagged[source.matmul], 1, weight.T if source.trans_b else weight)
    if source.bias_node is not None:
        _set(g, tagged[source.bias_node], source.bias_slot, np.concatenate(biases))
    if padded:
        return
    total = sum(sizes)
    for i in source.reshapes:
        node = tagged[i]
        rank = len(report.graph.context.shape(analysed[i].outputs[0]))
        set_shape_entry(g, node, analysed[i], report.graph, 1, rank - 1, total)
    _set_sizes(g, tagged[source.split], sizes)


def _set_sizes(g, split: ir.Node, sizes: list[int]) -> None:
    """New Split sizes: the ``split`` attribute before opset 13 (or where the node has it),
    else a constant second input (dropping ``num_outputs``)."""
    if "split" in split.attributes or g.opset_imports.get("", 13) < 13:
        split.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    fresh = add_initializer(g, f"{split.name or 'split'}_sizes", np.array(sizes, dtype=np.int64))
    if len(split.inputs) < 2:
        split.resize_inputs(2)
    split.replace_input_with(1, fresh)
    split.attributes.pop("num_outputs", None)


def _set(g, node: ir.Node, slot: int, array: np.ndarray) -> None:
    """A fresh initializer (exporters share constants: never edit one in place)."""
    name = f"{node.inputs[slot].name}_decomposed"
    node.replace_input_with(slot, add_initializer(g, name, np.ascontiguousarray(array, np.float32)))
