"""AWQ for ``--int4-method awq``: activation-aware per-input-channel scales, folded back.

Input channels that carry large activations matter most to the output, yet RTN gives their
weights the same relative precision as any other. AWQ (Lin et al. 2023) multiplies weight
row ``k`` by ``s_k`` before rounding and divides the input channel by ``s_k``, which leaves
the float product unchanged and gives the salient rows finer levels. ``s = rms(x)^α``, with
``α`` searched on a grid per layer input: the one whose output error ``tr(Δᵀ H Δ)``
(``H = XᵀX`` from calibration) is lowest wins; α = 0 is plain RTN, so AWQ never does worse
than RTN on the calibration data.

Layers reading the same input (Q, K and V) share one ``s``, searched on their summed error.
``1/s`` goes into the LayerNormalization that produces the input when it feeds only these
layers (free at run time), else into a ``Mul`` in front of them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.editing import insert_before, unique_name
from graphopt.passes.quantization.gptq import InputStatistics, output_error, rtn

ALPHAS = np.linspace(0.0, 1.0, 11)


def search_scales(
    weights: list[np.ndarray],
    hessian: np.ndarray | None,
    energy: np.ndarray,
    block: int,
    asymmetric: bool,
    signed: bool = False,
) -> np.ndarray | None:
    """The per-input-channel scales [K] of the best α, or None when α = 0 (RTN) is best."""
    rms = np.sqrt(np.maximum(energy, 0.0))
    rms = np.where(rms > 0, rms, rms[rms > 0].min() if (rms > 0).any() else 1.0)
    gram = hessian if hessian is not None else np.diag(energy)
    best, best_error = None, np.inf
    for alpha in ALPHAS:
        s = rms**alpha
        s = s / np.sqrt(s.max() * s.min())
        error = 0.0
        for w in weights:
            scaled = rtn(w * s[:, None], block, asymmetric, energy / s**2, signed)
            error += output_error(w, scaled.dequantize() / s[:, None], gram)
        if error < best_error:
            best, best_error = (None if alpha == 0 else s.astype(np.float32)), error
    return best


def apply_awq(
    model: ir.Model, sites: list, stats: InputStatistics, settings
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Search and fold AWQ scales; per weight name, (scaled weight [K, N], input energy
    after scaling) for the layers whose input was rescaled."""
    from graphopt.passes.quantization.int4 import weight_matrix

    groups: dict[str, list] = {}
    for site in sites:
        if site.kind != "gather":
            groups.setdefault(site.activation.name, []).append(site)
    scaled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, group in groups.items():
        energy = stats.energy.get(name)
        if energy is None:
            continue
        weights = [weight_matrix(site) for site in group]
        s = search_scales(
            weights,
            stats.hessians.get(name),
            energy,
            settings.block_size,
            settings.int4_asymmetric,
            signed=settings.target == "ort",  # as int4.py rounds for the target
        )
        if s is None:
            continue
        _fold_inverse(model.graph, group, s)
        for site, w in zip(group, weights, strict=True):
            scaled[site.weight.name] = (w * s[:, None], energy / s.astype(np.float64) ** 2)
    return scaled


def _fold_inverse(graph: ir.Graph, group: list, s: np.ndarray) -> None:
    """Divide the group's shared input by ``s``: in its LayerNormalization, or by a Mul."""
    x = group[0].node.inputs[0]
    dtype = group[0].tensor.dtype.numpy()
    nodes = {id(site.node) for site in group}
    producer = x.producer()
    if (
        producer is not None
        and producer.op_type == "LayerNormalization"
        and producer.domain in ("", "ai.onnx")
        and producer.outputs[0] is x
        and not x.is_graph_output()
        and all(id(use.node) in nodes for use in x.uses())
        and _fold_into_norm(graph, producer, s)
    ):
        return
    inverse = ir.Value(
        name=unique_name(graph, f"{x.name}_awq_inverse"),
        shape=ir.Shape([len(s)]),
        type=ir.TensorType(ir.DataType.from_numpy(dtype)),
        const_value=ir.Tensor((1.0 / s).astype(dtype)),
    )
    inverse.const_value.name = inverse.name
    graph.register_initializer(inverse)
    out = ir.Value(name=unique_name(graph, f"{x.name}_awq"), shape=x.shape, type=x.type)
    insert_before(group[0].node, [ir.Node("", "Mul", [x, inverse], outputs=[out])])
    for site in group:
        site.node.replace_input_with(0, out)


def _fold_into_norm(graph: ir.Graph, norm: ir.Node, s: np.ndarray) -> bool:
    """LayerNormalization's scale and bias divided by ``s`` (new initializers), if they are
    constants of the channel width."""
    replacements = {}
    for index in (1, 2):
        value = norm.inputs[index] if len(norm.inputs) > index else None
        if value is None:
            continue
        tensor = None if value.is_graph_input() else ir.convenience.get_const_tensor(value)
        if tensor is None or tuple(tensor.shape) != (len(s),):
            return False
        array = tensor.numpy()
        replacements[index] = (array / s).astype(array.dtype)
    for index, array in replacements.items():
        name = unique_name(graph, f"{norm.inputs[index].name}_awq")
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.Tensor(array, name=name),
        )
        graph.register_initializer(value)
        old = norm.inputs[index]
        norm.replace_input_with(index, value)
        if not old.uses() and old.is_initializer() and not old.is_graph_output():
            del graph.initializers[old.name]
    return True
