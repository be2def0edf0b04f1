"""``--calib-method auto``: per tensor, the range whose quantized consumers move least.

A range is only as good as what the next layer makes of it: clipping an outlier that the
next convolution ignores costs nothing, clipping one it amplifies costs a lot. So for each
tensor every method's range is tried: the tensor's kept calibration samples are
fake-quantized with it, each consumer node runs alone in ONNX Runtime on them (its other
inputs at their float values), and the method whose consumer outputs are closest to the
float ones (summed relative squared error) wins. Ties go to the earlier method in
:data:`~graphopt.passes.quantization.ranges.METHODS` (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantization.placement import is_weight
from graphopt.passes.quantization.ranges import (
    METHODS,
    QuantParams,
    Range,
    TensorStats,
    calibrate,
    fake_quantize,
)


class ConsumerRunner:
    """Runs single nodes of ``model`` alone (one ORT session per node, cached)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.sessions: dict[str, object | None] = {}

    def inputs_needed(self, node: ir.Node) -> list[str]:
        return [v.name for v in node.inputs if v is not None and not is_weight(v)]

    def run(self, node: ir.Node, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        session = self._session(node)
        if session is None:
            return None
        try:
            outputs = session.run(None, feeds)
        except Exception:  # a shape the lone node cannot take: no verdict from it
            return None
        # A sequence/optional/map output (SequenceConstruct reading the tensor) is no measure
        # of rounding error here: no verdict from that consumer either.
        return outputs if all(isinstance(o, np.ndarray) for o in outputs) else None

    def _session(self, node: ir.Node):
        if node.name not in self.sessions:
            self.sessions[node.name] = _single_node_session(self.model, node)
        return self.sessions[node.name]


def _single_node_session(model: ir.Model, node: ir.Node):
    from graphopt.sessions import make_session

    inputs, initializers = [], []
    seen: dict[str, ir.Value] = {}
    new_inputs: list[ir.Value | None] = []
    for value in node.inputs:
        if value is None:
            new_inputs.append(None)
            continue
        if value.name in seen:
            new_inputs.append(seen[value.name])
            continue
        if is_weight(value):
            from graphopt.editing import constant_array

            array = constant_array(value)
            if array is None:
                return None
            copy = ir.Value(
                name=value.name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.Tensor(array, name=value.name),
            )
            initializers.append(copy)
        else:
            copy = ir.Value(name=value.name, type=value.type)
            inputs.append(copy)
        seen[value.name] = copy
        new_inputs.append(copy)
    outputs = [ir.Value(name=f"out_{i}", type=out.type) for i, out in enumerate(node.outputs)]
    lone = ir.Node(
        node.domain,
        node.op_type,
        new_inputs,
        attributes=list(node.attributes.values()),
        outputs=outputs,
        name=node.name,
        version=node.version,
    )
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=[lone],
        initializers=initializers,
        opset_imports=dict(model.opset_imports),
    )
    lone_model = ir.Model(graph, ir_version=max(model.ir_version, 7))
    try:
        return make_session(lone_model, threads=1)
    except Exception:
        return None


def choose(
    tensor: str,
    stats: dict[str, TensorStats],
    consumers: list[ir.Node],
    runner: ConsumerRunner,
    params: Callable[[Range], QuantParams],
    activation_type: str,
) -> tuple[Range, dict[str, float]]:
    """The best method's range for ``tensor`` and every method's consumer error."""
    own = stats[tensor]
    candidates = {m: calibrate(own, m, activation_type) for m in METHODS}
    if own.samples is None:
        return candidates["entropy"], {}
    references: list[tuple[ir.Node, dict[str, np.ndarray], list[np.ndarray]]] = []
    for node in consumers:
        needed = runner.inputs_needed(node)
        if any(stats.get(n) is None or stats[n].samples is None for n in needed):
            continue
        feeds = {n: stats[n].samples for n in needed}
        outputs = runner.run(node, feeds)
        if outputs is not None:
            references.append((node, feeds, outputs))
    errors: dict[str, float] = {}
    tried: dict[tuple[float, float], float] = {}
    for method, candidate in candidates.items():
        key = (candidate.lo, candidate.hi)
        if key not in tried:
            tried[key] = _error(tensor, own.samples, params(candidate), references, runner)
        errors[method] = tried[key]
    best = min(METHODS, key=lambda m: (errors[m], METHODS.index(m)))
    return candidates[best], errors


def _error(
    tensor: str,
    samples: np.ndarray,
    p: QuantParams,
    references: list[tuple[ir.Node, dict[str, np.ndarray], list[np.ndarray]]],
    runner: ConsumerRunner,
) -> float:
    """Summed relative squared error of the consumers' outputs (of the tensor itself when
    no consumer can run alone)."""
    quantized = fake_quantize(samples, p)
    if not references:
        return _relative(samples, quantized)
    total = 0.0
    for node, feeds, expected in references:
        got = runner.run(node, {**feeds, tensor: quantized})
        if got is None:
            return _relative(samples, quantized)
        total += sum(_relative(e, g) for e, g in zip(expected, got, strict=True))
    return total


def _relative(expected: np.ndarray, got: np.ndarray) -> float:
    if expected.dtype.kind != "f":
        return 0.0 if np.array_equal(expected, got) else 1.0
    a, b = expected.astype(np.float64), got.astype(np.float64)
    norm = float(np.sum(a * a))
    return float(np.sum((a - b) ** 2)) / (norm if norm > 0 else 1.0)
