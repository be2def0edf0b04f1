"""What a quantization run did, and how far it moved the outputs: the pass's report section.

Every mode fills one :class:`QuantRecord`: the settings it ran with, each layer's precision,
every tensor whose element type changed, the weight bytes before and after, and fidelity
against the float original on calibration and held-out samples, measured with ONNX Runtime's
graph optimizations off and on (deployed, ORT fuses Q/DQ into integer kernels whose numerics
differ from the Q/DQ reference).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from graphopt.passes.calibration.fidelity import Fidelity, fidelity_table, measure
from graphopt.passes.calibration.report import fidelity_json
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.refusals import unchanged_message

if TYPE_CHECKING:
    from graphopt.registry import PassContext


@dataclass
class LayerPrecision:
    """One compute node and the precision it runs in after quantization."""

    node: str
    op_type: str
    precision: str  # "int8", "int4", "fp16", "float" (kept), ...
    reason: str = ""  # why it stayed in float, or how it was quantized


# The ops that hold a layer's weight: what "layers quantized" counts.
LAYER_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Gather",
        "Attention",
        "MultiHeadAttention",
        # --requantize's entries: re-rounded weight and activation tensors, ORT's dynamic form.
        "weight",
        "activation",
        "MatMulInteger",
        "ConvInteger",
    }
)


# Distinct kept-float reasons a note shows; the rest are in details["quantize"].layers.
KEPT_REASONS_SHOWN = 12


def kept_float_summary(layers: list[LayerPrecision], limit: int) -> str:
    """``MatMul x2: weight shared with other nodes; Softmax: numerically sensitive`` for the
    layers kept float, reasons in a fixed order, at most ``limit`` of them."""
    by_reason: dict[str, Counter[str]] = {}
    for layer in layers:
        if layer.precision == "float":
            reason = layer.reason or "no reason recorded"
            by_reason.setdefault(reason, Counter())[layer.op_type] += 1
    parts = []
    for reason, ops in sorted(by_reason.items()):
        what = ", ".join(op if n == 1 else f"{op} x{n}" for op, n in sorted(ops.items()))
        parts.append(f"{what}: {reason}")
    more = len(parts) - limit
    shown = "; ".join(parts[:limit])
    return shown + (
        f"; and {more} more reason(s) (details: the per-layer list)" if more > 0 else ""
    )


# Layers the report names (the rest are counted).
LAYERS_SHOWN = 12


@dataclass
class TypeChange:
    tensor: str
    before: str
    after: str


@dataclass
class CurvePoint:
    """One step of a mixed-precision search: layers kept in float, fidelity, speed."""

    kept_float: int
    cosine: float
    max_rel: float
    speedup: float | None = None
    # The layer this step returned to float, or "quantized only: …" (the walk up from float)
    layer: str = ""
    agreement: float | None = None  # worst output's argmax agreement, where one has classes


@dataclass
class QuantRecord:
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerPrecision] = field(default_factory=list)
    type_changes: list[TypeChange] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0  # as written: EoRA's paths included
    path_bytes: int = 0  # of weight_bytes_after, EoRA's float32 paths (--compensation)
    # {"calibration": [...], "held-out": [...], "held-out, ORT optimized": [...]}
    fidelity: dict[str, list[Fidelity]] = field(default_factory=dict)
    fidelity_source: str = ""  # "N held-out samples of FILE", "generated inputs", ...
    # What the fidelity is measured against, as the table's title says it: --requantize
    # measures against the quantized model it was given, which has no float original.
    fidelity_against: str = "the float original"
    curve: list[CurvePoint] = field(default_factory=list)
    # Mixed precision: what the curve's fidelity is measured on (its table's title), the
    # verdict when every layer stayed float (what a refusal of that run says), and the one
    # line a missed target ends the run with (the CLI's exit 1; "" when met).
    curve_source: str = ""
    target_verdict: str = ""
    target_missed: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: str = ""  # the headline, also the report note it stands for
    # Why ONNX Runtime's CPU provider cannot run the result ("" when it can): the pipeline
    # then leaves the exact passes after it unverified instead of failing (bf16).
    ort_unrunnable: str = ""
    # The tolerance the exact passes after quantization are verified at: a result that rounds
    # at run time (int8 activations) can move by a quantization step under an exact rewrite
    # (pipeline._widen_for_rounding). 0: the default tolerance.
    exact_tolerance_after: float = 0.0
    # The same per float output (name -> its own max rel error), where this pass's fidelity is
    # its own: a detector's boxes, reordered by near-tied scores, moved by 0.9 and loosened
    # the check of its scores (moved by 0.003) to 0.9 as well.
    exact_tolerances_after: dict[str, float] = field(default_factory=dict)
    # In a chained run (fidelity against the run's original, which includes the earlier lossy
    # passes' change): this pass's own worst max rel error against the model it was given, the
    # floor above. None: the fidelity is already its own.
    own_max_rel: float | None = None
    # --compensation eora:R: the float model right before rounding (the modes that support it
    # keep it for the compensation, which drops it), and what the compensation did.
    float_model: ir.Model | None = None
    compensation: Any = None  # a compensation.record.CompensationRecord

    @property
    def quantized(self) -> int:
        return sum(1 for layer in self.layers if layer.precision != "float")

    def kept_float_note(self, limit: int = KEPT_REASONS_SHOWN) -> str:
        """Every node left float, grouped by reason, as one note ("" when none): the
        README's promise for every mode, written here once so that no mode leaves it out."""
        return "kept in float: " + kept_float_summary(self.layers, limit) if self.kept else ""

    @property
    def kept(self) -> list[LayerPrecision]:
        return [layer for layer in self.layers if layer.precision == "float"]

    def unchanged_refusal(self) -> str:
        """The one-line refusal of a run that quantized nothing (the model would come back
        as it was given): what the mode looked at and why each stayed float."""
        why = (
            f"every candidate stays float ({kept_float_summary(self.layers, 3)})"
            if self.kept
            else "no layer it rewrites"
        )
        if self.target_verdict:
            # Mixed precision chose that: the target is why (met only in float, or not even
            # there), not the per-layer reasons, which all read "kept in float".
            why = f"mixed precision keeps every layer float: {self.target_verdict}"
        return unchanged_message(f"quantize {self.mode}", "quantize", why)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "settings": self.settings,
            "layers": [layer.__dict__ for layer in self.layers],
            "type_changes": [change.__dict__ for change in self.type_changes],
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            **({"path_bytes": self.path_bytes} if self.path_bytes else {}),
            "fidelity": fidelity_json(self.fidelity),
            "fidelity_source": self.fidelity_source,
            "curve": [point.__dict__ for point in self.curve],
            **({"curve_source": self.curve_source} if self.curve_source else {}),
            **({"target_missed": self.target_missed} if self.target_missed else {}),
            "notes": self.notes,
            **({"compensation": self.compensation.to_json()} if self.compensation else {}),
        }

    def layers_line(self, limit: int = LAYERS_SHOWN) -> str:
        """The layers by name with their precision: the names ``--exclude`` takes (an
        unnamed node's ``OpType_index`` is its position in the model given), which no line
        of the report used to print."""
        layers = [x for x in self.layers if x.op_type in LAYER_OPS and x.node]
        if not layers:
            return ""
        shown = ", ".join(f"{x.node} ({x.op_type}) {x.precision}" for x in layers[:limit])
        more = f" and {len(layers) - limit} more" if len(layers) > limit else ""
        return f"layers (names as --exclude takes them): {shown}{more}"

    def headline(self) -> str:
        # Layers are the weighted ops; the ops lowered with them (Relu, pooling, Add, Reshape
        # kept in int8 between them; every op in fp16) are counted apart: counted as layers,
        # "122 layers quantized" on a ResNet-50 of 54 layers overstated the work.
        layers = [x for x in self.layers if x.op_type in LAYER_OPS]
        quantized = sum(1 for x in layers if x.precision != "float")
        kept = sum(1 for x in layers if x.precision == "float")
        others = sum(
            1 for x in self.layers if x.op_type not in LAYER_OPS and x.precision != "float"
        )
        with_them = f", {_count(others, 'other op')} lowered with them" if others else ""
        size = ""
        if self.weight_bytes_before:
            ratio = self.weight_bytes_after / self.weight_bytes_before
            paths = f", EoRA paths {_mib(self.path_bytes)} of it" if self.path_bytes else ""
            size = (
                f"; weights {_mib(self.weight_bytes_before)} -> "
                f"{_mib(self.weight_bytes_after)} ({ratio:.0%}{paths})"
            )
        return (
            f"quantization {self.mode}: {_count(quantized, 'layer')} quantized, {kept} kept in "
            f"float{with_them}{size}"
        )

    def render(self, console: Console) -> bool:
        console.print(self.headline(), markup=False)
        for note in self.notes:
            console.print(f"  {note}", markup=False)
        listed = self.layers_line()
        if listed:
            console.print(f"  {listed}", markup=False)
        if self.fidelity:
            console.print(
                fidelity_table(
                    # After a colon, not in parentheses: sources carry their own ("32
                    # generated inputs (no --calib file)" read as "((...))").
                    f"quantization fidelity against {self.fidelity_against}: "
                    f"{self.fidelity_source}",
                    self.fidelity,
                )
            )
        if self.curve:
            console.print(curve_table(self))
        if self.compensation is not None:
            self.compensation.render(console)
        changed = [c for c in self.type_changes]
        if changed:
            shown = ", ".join(f"{c.tensor} {c.before}->{c.after}" for c in changed[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            console.print(
                f"  tensors whose element type changed ({len(changed)}): {shown}{more}",
                markup=False,
            )
        return True


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def curve_table(record: QuantRecord) -> Table:
    # Said in the title: the curve is judged on other samples and numerics (the worst of
    # held-out and calibration, ORT optimized) than some rows of the fidelity table above.
    source = f"; fidelity on {record.curve_source}" if record.curve_source else ""
    table = Table(
        title="mixed precision: the sets tried (layers returned to float most sensitive "
        "first; rows 'quantized only': up from all float, least sensitive first; the last "
        f"row is the set written){source}",
        title_justify="left",
        show_edge=False,
    )
    agreement = any(p.agreement is not None for p in record.curve)
    columns = ["kept in float", "layer", "mean cosine", "max rel err"]
    columns += ["argmax agree"] if agreement else []
    for column in (*columns, "speed-up"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for p in record.curve:
        speed = "" if p.speedup is None else f"{p.speedup:.2f}x"
        cells = [str(p.kept_float), p.layer, f"{p.cosine:.4f}", f"{p.max_rel:.3g}"]
        if agreement:
            cells.append("" if p.agreement is None else f"{p.agreement:.2%}")
        table.add_row(*cells, speed)
    return table


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer and Constant tensor something reads, subgraphs included.

    Dead ones do not count: a rewrite that replaces a weight held in a Constant node (as
    paddle2onnx exports hold them) leaves the node for the pipeline's final cleanup, and
    the file written has no such bytes."""
    total = 0
    seen: set[int] = set()
    graphs = (model.graph, *model.graph.subgraphs())
    outputs = {id(v) for g in graphs for v in g.outputs}

    def live(value: ir.Value) -> bool:
        return bool(value.uses()) or id(value) in outputs

    for graph in graphs:
        for value in graph.initializers.values():
            if value.const_value is not None and id(value.const_value) not in seen and live(value):
                seen.add(id(value.const_value))
                total += value.const_value.nbytes
        for node in graph:
            if node.op_type == "Constant" and node.domain == "" and live(node.outputs[0]):
                attr = node.attributes.get("value")
                if attr is not None and isinstance(attr.value, ir.TensorProtocol):
                    total += attr.value.nbytes
    return total


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def measure_fidelity(
    original: ir.Model,
    quantized: ir.Model,
    sets: dict[str, CalibrationSet],
    *,
    optimized_too: bool = True,
    unoptimized_only: bool = False,
) -> dict[str, list[Fidelity]]:
    """Fidelity of ``quantized`` against ``original`` on each named sample set, with ORT's
    graph optimizations off (the Q/DQ reference numerics) and, with ``optimized_too``, on
    (the integer kernels ORT fuses the model into: what a deployment runs). Without
    ``optimized_too`` only the optimized run; with ``unoptimized_only`` only the reference
    one (for forms ORT's optimizer gets wrong)."""
    from graphopt.passes.calibration.fidelity import outputs_on, padding_mask

    results: dict[str, list[Fidelity]] = {}
    for label, samples in sets.items():
        reference = outputs_on(original, samples, reference=True)
        names = [v.name for v in original.graph.outputs]
        mask = padding_mask(samples)
        levels = ((False, ""), (True, ", ORT optimized")) if optimized_too else ((True, ""),)
        if unoptimized_only:
            levels = ((False, ""),)
        for optimize, suffix in levels:
            got = outputs_on(quantized, samples, optimize=optimize)
            results[label + suffix] = measure(names, reference, got, mask)
    return results


def own_max_rel(
    context: PassContext,
    given: ir.Model,
    quantized: ir.Model,
    sets: dict[str, CalibrationSet],
    measure_fn: Callable[..., dict[str, list[Fidelity]]] | None = None,
) -> float | None:
    """The pass's own worst max rel error against the model it was ``given``, on the first
    sample set (ORT optimizations off), when its reported fidelity is against the run's
    original (an earlier lossy pass moved the model); None otherwise. The exact passes after
    it are verified at this floor: the earlier passes' error must not loosen their check."""
    if context.reference_model is None or not sets:
        return None
    label, first = next(iter(sets.items()))
    if measure_fn is None:
        measured = measure_fidelity(given, quantized, {label: first}, unoptimized_only=True)
    else:
        measured = measure_fn(given, quantized, {label: first})
    return float_max_rel(next(iter(measured.values())))


def worst_cosine(fidelities: list[Fidelity]) -> float:
    """The worst mean cosine of the float outputs (of every output when none is float): a
    cosine of class ids or flags says nothing, and a flipped flag's 0 made a --min-cosine
    target unreachable."""
    return float(min((f.mean_cosine for f in _judged(fidelities)), default=1.0))


def worst_max_rel(fidelities: list[Fidelity]) -> float:
    """The worst max rel error of the float outputs (of every output when none is float)."""
    return float(max((f.max_rel for f in _judged(fidelities)), default=0.0))


def _judged(fidelities: list[Fidelity]) -> list[Fidelity]:
    floats = [f for f in fidelities if f.equal_share is None]
    return floats or fidelities


def float_max_rel(fidelities: list[Fidelity]) -> float:
    """The worst max rel error of the float outputs: what the exact passes after a pass that
    rounds at run time are verified at. An integer or bool output (a ``Greater`` of a float
    output) is right only where equal: its "max rel" is 1 as soon as one element flips, and
    it made that tolerance 1 (every exact rewrite after int8 passed at 100% error).
    Verification compares those outputs by their own rule
    (:func:`graphopt.output_errors.compare`)."""
    return float(max((f.max_rel for f in fidelities if f.equal_share is None), default=0.0))


def dtype_name(dtype: ir.DataType | np.dtype | None) -> str:
    if dtype is None:
        return "?"
    if isinstance(dtype, ir.DataType):
        return dtype.name.lower()
    return str(dtype)
