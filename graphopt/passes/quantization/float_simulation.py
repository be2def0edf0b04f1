"""Fidelity of a model in a lower float type, on ONNX Runtime's CPU provider or, where that
cannot run it, on a float simulation of its rounding.

ORT's CPU provider computes float16 ops without fp16 kernels in float32 behind Casts it
inserts itself, so an fp16 model runs; it has no such fallback for bfloat16, and no bf16
MatMul/Conv/Add kernels. The simulation is built from the emitted model, not from the
original: each node that reads or writes the lower type computes in float32 between Casts that
round its inputs and outputs to that type (Casts to and from bf16 run on CPU). That is the
emitted model's storage rounding with float32 arithmetic inside each op, what bf16 hardware
does with its float32 accumulators.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from graphopt import editing
from graphopt.passes.calibration.samples import CalibrationSet
from graphopt.passes.quantization.float_plan import FLOAT
from graphopt.passes.quantization.float_rewrite import cast_node
from graphopt.passes.quantization.record import measure_fidelity


def fidelity_on_runnable(
    original: ir.Model,
    converted: ir.Model,
    sets: dict[str, CalibrationSet],
    low: ir.DataType,
) -> tuple[dict, str, str]:
    """Fidelity on ``converted`` when ONNX Runtime (CPU) runs it, else, when ORT only lacks a
    kernel for one of its ``low`` ops, on its float simulation (:func:`simulation`); the
    note says which; the last item is why ORT cannot run ``converted`` ("" when it can).
    Any other refusal is raised."""
    from graphopt.sessions import make_session

    kind = low.name.lower()
    unrunnable = ""
    try:
        make_session(converted)
    except Exception as exc:
        op_type = missing_low_kernel(exc, converted, low)
        if not op_type:
            # Anything else (a type error, an invalid graph) is the converted model's fault:
            # measuring a simulation of it would report a model no runtime loads.
            raise
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        short = "bf16" if low == ir.DataType.BFLOAT16 else kind
        # One row per set, named for what it is: "ORT optimized" rows repeated the same
        # simulation's numbers as if they were ORT's fused kernels, which cannot run it (and
        # ORT's optimizer may drop the simulation's rounding Casts).
        simulated = measure_fidelity(
            original, simulation(converted, low), sets, unoptimized_only=True
        )
        fidelity = {f"{label}, {short} simulated": rows for label, rows in simulated.items()}
        unrunnable = f"ORT CPU cannot run {short} {op_type}: {line[:160]}"
        return (
            fidelity,
            f"{short}: fidelity measured on a float simulation of its rounding; {unrunnable}",
            unrunnable,
        )
    fidelity = measure_fidelity(original, converted, sets)
    return (
        fidelity,
        f"{kind}: runs in ONNX Runtime CPU (which computes ops lacking {kind} CPU kernels in "
        "float32 behind Casts); fidelity measured on the emitted model",
        unrunnable,
    )


# ORT's words for a kernel it has no implementation of: "Could not find an implementation
# for MatMul(13) node with name 'mm'".
_MISSING_KERNEL = re.compile(
    r"Could not find an implementation for (\w+)\(\d+\) node with name '(.*?)'"
)


def missing_low_kernel(exc: BaseException, model: ir.Model, low: ir.DataType) -> str:
    """The op type when ``exc`` is ORT's NOT_IMPLEMENTED for a node of ``model`` that reads
    or writes ``low`` (the one refusal the float simulation stands in for), else ""."""
    # onnxruntime's pybind error classes are named after its status codes.
    if type(exc).__name__ != "NotImplemented":
        return ""
    found = _MISSING_KERNEL.search(str(exc))
    if found is None:
        return ""
    op_type, name = found.groups()
    lowered = any(
        node.op_type == op_type
        and (node.name or "") == name
        and any(v is not None and v.dtype == low for v in (*node.inputs, *node.outputs))
        for node in model.graph
    )
    return op_type if lowered else ""


def simulation(model: ir.Model, low: ir.DataType) -> ir.Model:
    """A float32-computing copy of ``model``: each node that reads or writes ``low`` computes
    in float32 between Casts that round its inputs and outputs to ``low`` (Cast to and from
    bf16/fp16 runs on ORT's CPU provider), which is the emitted model's rounding."""
    sim = model.clone()
    graph = sim.graph
    names = editing.NameTable(graph)
    for node in list(graph):
        if editing.is_op(node, ("Cast", "Constant")) or node.domain not in editing.DEFAULT_DOMAINS:
            continue
        if not any(v is not None and v.dtype == low for v in (*node.inputs, *node.outputs)):
            continue
        for index, value in enumerate(node.inputs):
            if value is not None and value.dtype == low:
                cast = cast_node(value, FLOAT, names.take(f"{value.name}_sim_f32"), names)
                graph.insert_before(node, cast)
                node.replace_input_with(index, cast.outputs[0])
        outputs = []
        for out in node.outputs:
            if out.dtype == low:
                wide = ir.Value(name=names.take(f"{out.name}_sim_f32"), type=ir.TensorType(FLOAT))
                wide.shape = out.shape
                outputs.append(wide)
            else:
                outputs.append(ir.Value(name=names.take(f"{out.name}_sim"), type=out.type))
        twin = ir.Node(
            node.domain,
            node.op_type,
            list(node.inputs),
            attributes=list(node.attributes.values()),
            outputs=outputs,
            name=node.name,
            overload=node.overload,
            version=node.version,
        )
        graph.insert_before(node, twin)
        for old, new in zip(node.outputs, twin.outputs, strict=True):
            replacement = new
            if old.dtype == low:
                cast = cast_node(new, low, names.take(f"{old.name}_sim_round"), names)
                graph.insert_before(node, cast)
                replacement = cast.outputs[0]
            editing.replace_value(old, replacement)
        graph.remove(node, safe=True)
    return sim
