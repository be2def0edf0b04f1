"""FLOPs of the recurrent ops (LSTM, GRU, RNN) and of Einsum.

Recurrent ops, per direction, per batch item and per time step (the sequence length is X's
dim 0, or dim 1 with ``layout=1``), with ``I`` the input size and ``H`` the hidden size (W is
``[directions, gates·H, I]``, R is ``[directions, gates·H, H]``):

- the gate matmuls ``X_t·Wᵀ + H_{t-1}·Rᵀ``: ``gates·H·(I + H)`` multiply-adds (the sum of the
  two products is one dot product of length ``I + H``), 2 FLOPs each, as MatMul counts;
- the bias: 1 per gate element (``Wb + Rb`` is a constant sum a runtime adds once, as a
  Gemm's ``C`` counts one add); GRU's ``linear_before_reset`` multiplies the reset gate into
  ``H_{t-1}·Rhᵀ + Rbh``, so there ``Rbh`` and the sum of the input and recurrent products
  are 2 more adds per hidden element;
- 1 per element for every activation applied (sigmoid, tanh, ... whatever the
  ``activations`` attribute names, as an elementwise op counts) and for every elementwise
  multiply, add or ``1 - z`` of the state update, as the unfused ops would count them:
  LSTM 5H activations (i, f, o, cell candidate, output) + 4H (``f⊙C + i⊙c̃``, ``o⊙h(C)``),
  2 per peephole element (3H) when P is given, and 5H for ``clip``; GRU 3H activations + H
  for the reset gate's product + 4H for ``(1 - z)⊙h̃ + z⊙H``; RNN H activations.

The sequence length is X's: ``sequence_lens`` may end some batch items earlier, which only
the data tells, so the count is an upper bound where it is given (as a Loop's trip count is
with a condition).

Einsum: the equation is parsed (implicit output: the labels that occur once, sorted, after the
``...`` dims; ``...`` broadcasts as numpy does). Two operands: when an index is summed, one
multiply-add per combination of every distinct index (a MatMul's ``M·N·K``), 2 FLOPs each;
with none summed (an outer or elementwise product), 1 FLOP per combination, as Mul counts.
More operands are contracted pairwise, left to right, each pair counted so, the result
keeping the indices a later operand or the output uses (an upper bound: runtimes may sum an
index one operand alone holds before the product). One operand: a transpose or diagonal
moves data (0); a sum over an index is a reduction, 1 per element of the (diagonal) view.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from graphopt.analysis.flops_terms import Cost, UnknownShape, has_input, in_shape
from graphopt.editing import attribute

# Per gate element, per step: activations and elementwise updates (see the docstring).
_LSTM_ELEMENTWISE = 5 + 4  # i, f, o, c̃, h(C) activations; f⊙C, i⊙c̃, their sum, o⊙h(C)
_LSTM_PEEPHOLE = 3 * 2  # P_i⊙C, P_f⊙C, P_o⊙C and their adds, on H elements each
_LSTM_CLIP = 5  # clip applies to the input of each of the 5 activations
_GRU_ELEMENTWISE = 3 + 1 + 4  # z, r, h̃ activations; r⊙(...); (1 - z)⊙h̃ + z⊙H
_RNN_ELEMENTWISE = 1  # the activation
RECURRENT = {"LSTM": 4, "GRU": 3, "RNN": 1}  # gates per hidden unit


def recurrent(node: ir.Node) -> Cost:
    """LSTM / GRU / RNN: every direction's every time step (see the module docstring)."""
    x, w, r = in_shape(node, 0), in_shape(node, 1), in_shape(node, 2)
    if len(x) != 3 or len(w) != 3 or len(r) != 3:
        raise UnknownShape
    steps, batch = (x[1], x[0]) if attribute(node, "layout", 0) else (x[0], x[1])
    directions, hidden, inputs = w[0], r[2], w[2]
    gates = RECURRENT[node.op_type]
    macs_per_step = gates * hidden * (inputs + hidden)
    per_step = 2 * macs_per_step
    if has_input(node, 3):  # B
        per_step += gates * hidden
    if node.op_type == "LSTM":
        per_step += _LSTM_ELEMENTWISE * hidden
        if has_input(node, 7):  # P
            per_step += _LSTM_PEEPHOLE * hidden
    elif node.op_type == "GRU":
        per_step += _GRU_ELEMENTWISE * hidden
        if attribute(node, "linear_before_reset", 0):
            # r⊙(H·Rhᵀ + Rbh) + X·Whᵀ: the products are no longer one dot product, and
            # Rbh is added apart from Wbh.
            per_step += (1 + has_input(node, 3)) * hidden
    else:
        per_step += _RNN_ELEMENTWISE * hidden
    if node.op_type == "LSTM" and attribute(node, "clip") is not None:
        per_step += _LSTM_CLIP * hidden
    runs = steps * batch * directions
    return Cost(per_step * runs, macs_per_step * runs)


def einsum(node: ir.Node) -> Cost:
    """Einsum from its equation and its operands' shapes (see the module docstring)."""
    equation = attribute(node, "equation", "")
    equation = equation.decode() if isinstance(equation, bytes) else equation
    shapes = [in_shape(node, i) for i in range(len(node.inputs))]
    operands, output, sizes = parse_einsum(equation, shapes)
    if len(operands) == 1:
        (labels,) = operands
        view = math.prod(sizes[c] for c in set(labels))  # a diagonal view has each once
        return Cost(view if set(labels) - set(output) else 0)
    flops = macs = 0
    held = set(operands[0])
    for position, labels in enumerate(operands[1:], start=2):
        needed = set(output).union(*map(set, operands[position:]))
        combined = held | set(labels)
        product = math.prod(sizes[c] for c in combined)
        if combined - needed:  # an index is summed: multiply-adds
            macs += product
            flops += 2 * product
        else:
            flops += product
        held = combined & needed
    return Cost(flops, macs)


def parse_einsum(
    equation: str, shapes: list[tuple[int, ...]]
) -> tuple[list[str], str, dict[str, int]]:
    """Each operand's labels and the output's, with ``...`` spelled as one label per
    broadcast dim (right-aligned, as numpy aligns them), and every label's
    size (the largest of its operands': a 1 broadcasts)."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(shapes):
        raise UnknownShape
    ellipsis_rank = max(
        (
            len(s) - len(t.replace("...", ""))
            for t, s in zip(terms, shapes, strict=True)
            if "..." in t
        ),
        default=0,
    )
    # One label per broadcast dim: characters an equation's labels (ASCII letters) are not.
    broadcast = "".join(chr(0x100 + i) for i in range(ellipsis_rank))
    operands = []
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        rank = len(shape) - len(term.replace("...", ""))
        labels = term.replace("...", broadcast[ellipsis_rank - rank :] if rank else "")
        if len(labels) != len(shape):
            raise UnknownShape
        for label, dim in zip(labels, shape, strict=True):
            sizes[label] = max(sizes.get(label, 1), dim)
        operands.append(labels)
    if arrow:
        output = output.replace("...", broadcast)
    else:  # implicit: the broadcast dims, then the labels that occur once, sorted
        letters = "".join(t.replace("...", "") for t in terms)
        output = broadcast + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return operands, output, sizes
