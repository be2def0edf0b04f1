"""EoRA: a rank-r path that absorbs a lossy pass's weight change, fitted to the layer's inputs.

EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation"). A layer ``y = x·Wᵀ`` (canonical ``W[N, K]``) that a lossy pass
turned into ``x·W'ᵀ`` loses ``x·ΔWᵀ`` with ``ΔW = W − W'``. A plain truncated SVD of ``ΔW``
keeps the largest *weight* error; what matters is the *output* error ``‖X·ΔWᵀ‖`` on real
inputs. With the input Gram ``H = XᵀX/rows = Q·Λ·Qᵀ``, the output error of a rank-r
approximation ``M`` is ``‖(ΔW − M)·Q·Λ^½‖_F``, so the best one truncates the SVD of
``ΔW·Q·Λ^½ = U·Σ·Vᵀ``: ``B = U_r·Σ_r`` ``[N, r]`` and ``A = V_rᵀ·Λ^-½·Qᵀ`` ``[r, K]``, and
the graph gets ``y + (x·Aᵀ)·Bᵀ``. ``H`` is damped first (``DAMP`` × its mean diagonal added,
GPTQ's damping): directions the calibration data barely visits would otherwise get huge
``Λ^-½`` entries in ``A`` (held-out inputs that do visit them would be amplified); at full
rank ``B·A = ΔW`` whatever the damping, so it only changes which directions a truncated path
keeps.

Generic over the pass that made the change: each pass hands over :class:`ChangedLayer`
entries (``sparsify``, ``quantize``, ``factorize``) and :func:`compensate` inserts the paths
and measures fidelity before and after. The paths are float32 MatMuls, or for a 2-D Conv a
Conv pair with the layer's placement then 1×1 (:mod:`.conv`; ``K`` is then the im2col patch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.editing import NameTable, insert_after, replace_value
from graphopt.errors import UserInputError
from graphopt.passes.compensation.conv import ConvGeometry
from graphopt.passes.compensation.record import CompensationRecord, LayerCompensation

# H + DAMP·mean(diag H)·I (see the module docstring).
DAMP = 1e-2
# Prefix of every value, node and initializer a path adds (later passes recognize paths by it).
PREFIX = "eora"


@dataclass
class ChangedLayer:
    """One layer a lossy pass changed, as the compensation needs it.

    ``x`` is the layer's float input and ``y`` the value the path is added to (the layer's
    output, before anything the layer's consumers do), both in the current model; ``weight``
    is the original canonical ``W[N, K]`` (``y = x·Wᵀ``), ``delta`` is ``W − W'`` in the same
    form (float32) and ``gram`` the input's ``XᵀX / rows`` ``[K, K]`` (float64) from
    calibration data, in ``x``'s last-axis order.
    """

    name: str
    x: ir.Value
    y: ir.Value
    weight: np.ndarray
    delta: np.ndarray
    gram: np.ndarray
    # A 2-D Conv's placement (``K`` is its patch, the Gram its patches'); None: MatMul/Gemm.
    conv: ConvGeometry | None = None
    # ``W − W'`` as the pass left it, where joint EoRA (:mod:`.joint`) rounded again and
    # ``delta`` is the new weight's: the report's "error without" is the pass's.
    pass_delta: np.ndarray | None = None


def parse_compensation(text: str | None, owner: str) -> tuple[int, str]:
    """``--compensation`` for ``owner`` (sparsify, quantize, factorize): (rank, note).

    ``eora:R`` gives rank R; ``none`` (or unset) 0; pruning's ``bias``/``lsq`` 0 with a note
    saying they are pruning's; anything else a one-line :class:`UserInputError`."""
    if text is None:
        return 0, ""
    value = str(text).strip().lower()
    if value in ("", "none"):
        return 0, ""
    if value in ("bias", "lsq"):
        return 0, (
            f"{owner}: --compensation {value} is pruning's (prune's consumer refit); "
            f"{owner} takes none or eora:RANK, so it runs without compensation"
        )
    kind, _, rank = value.partition(":")
    if kind == "eora" and rank.isdigit() and int(rank) > 0:
        return int(rank), ""
    # Pruning takes its own refits too (and reaches here only for an eora... value).
    expected = "none, bias, lsq or eora:RANK" if owner == "prune" else "none or eora:RANK"
    raise UserInputError(
        f"{owner}: --compensation {text!r}: expected {expected} with RANK a positive "
        "integer (eora:16)"
    )


def require_calibration(rank: int, calib: str | None, owner: str) -> None:
    """EoRA fits to the layer inputs' Gram: without calibration data it has nothing to go by."""
    if rank and not calib:
        raise UserInputError(
            f"{owner}: --compensation eora:{rank} needs calibration data for the layer "
            "inputs' Gram: pass --calib FILE.npz (or --calib random, not recommended)"
        )


def eora_factors(delta: np.ndarray, gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A [r, K], B [N, r])`` float64 with ``B·A`` the rank-r approximation of ``delta``
    that minimizes the output error on inputs with Gram ``gram`` (see the module docstring).

    Computed without ``eigh(H)`` (seconds for a 1536-wide input): any square root of ``H``
    gives ``ΔW·H^½`` the same left singular vectors and values as ``ΔW·Q·Λ^½``, so the
    decomposition is done in ``min(N, K)`` dimensions: with ``N ≤ K`` the eigenvectors of
    ``ΔW·H·ΔWᵀ`` (the output error's covariance) are ``U``, and ``B·A = U_r·U_rᵀ·ΔW``; with
    ``K < N`` those of ``Lᵀ·ΔWᵀ·ΔW·L`` (``H = L·Lᵀ``, Cholesky) are ``V``, and
    ``B·A = ΔW·L·V_r·V_rᵀ·L⁻¹`` (``A = V_rᵀ·L⁻¹`` is the paper's ``V_rᵀ·Λ^-½·Qᵀ`` for this
    root)."""
    delta = np.asarray(delta, np.float64)
    h = np.asarray(gram, np.float64)
    h = (h + h.T) / 2
    k = h.shape[0]
    h = h + np.eye(k) * (DAMP * max(float(np.mean(np.diag(h))), np.finfo(np.float64).tiny))
    n = delta.shape[0]
    r = min(rank, n, k)
    if n <= k:
        values, vectors = np.linalg.eigh((delta @ h) @ delta.T)
        u = _signed(vectors[:, ::-1][:, :r])
        sigma = np.sqrt(np.maximum(values[::-1][:r], 0.0))
        safe = np.where(sigma > 0, sigma, 1.0)
        return (u.T @ delta) / safe[:, None] * (sigma > 0)[:, None], u * sigma
    lower = np.linalg.cholesky(h)
    m = delta @ lower
    _, vectors = np.linalg.eigh(m.T @ m)
    v = _signed(vectors[:, ::-1][:, :r])
    a = np.linalg.solve(lower.T, v).T  # V_rᵀ·L⁻¹
    return a, m @ v


def _signed(vectors: np.ndarray) -> np.ndarray:
    """Eigenvector signs are arbitrary: fix them (largest entry positive) for stable bytes."""
    pick = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    return vectors * np.where(pick < 0, -1.0, 1.0)


def output_error(weight: np.ndarray, residual: np.ndarray, gram: np.ndarray) -> float:
    """``‖X·Rᵀ‖² / ‖X·Wᵀ‖²`` from ``H = XᵀX`` (``R`` the weight error left)."""
    total = _energy(weight, gram)
    return _energy(residual, gram) / total if total > 0 else 0.0


def _energy(m: np.ndarray, gram: np.ndarray) -> float:
    """``‖X·Mᵀ‖² = tr(M·H·Mᵀ)``: two BLAS products, no einsum contraction path."""
    m = np.asarray(m, np.float64)
    return float(np.sum((m @ gram) * m))


def insert_path(
    graph: ir.Graph,
    layer: ChangedLayer,
    a: np.ndarray,
    b: np.ndarray,
    names: NameTable,
    inserted: list[list[ir.Node]] | None = None,
) -> str:
    """``y ← y + (x·Aᵀ)·Bᵀ`` after ``y``'s producer, its consumers (and graph-output name)
    moved to the sum; "" when done, else why not. The path's nodes (the sum last) go on
    ``inserted`` when given, for :func:`remove_paths`."""
    producer = layer.y.producer()
    if producer is None or producer.graph is not graph:
        return "its output is not computed in the main graph"
    if layer.x.dtype not in (None, ir.DataType.FLOAT):
        return f"its input is {layer.x.dtype.name.lower()} (the path is float32)"
    base = f"{PREFIX}_{_safe(layer.name)}"
    conv = layer.conv
    first = a.T if conv is None else conv.first_weight(a)
    second = b.T if conv is None else conv.second_weight(b)
    at = names.add_initializer(graph, f"{base}_A", np.ascontiguousarray(first, np.float32))
    bt = names.add_initializer(graph, f"{base}_B", np.ascontiguousarray(second, np.float32))
    down = ir.Value(name=names.take(f"{base}_down"))
    up = ir.Value(name=names.take(f"{base}_up"))
    total = ir.Value(name=names.take(f"{base}_sum"), type=layer.y.type, shape=layer.y.shape)
    if conv is None:
        pair = [
            ir.node("MatMul", [layer.x, at], outputs=[down], name=names.take(f"{base}_MatMul_A")),
            ir.node("MatMul", [down, bt], outputs=[up], name=names.take(f"{base}_MatMul_B")),
        ]
    else:
        labels = (names.take(f"{base}_Conv_A"), names.take(f"{base}_Conv_B"))
        pair = conv.nodes(layer.x, at, bt, down, up, labels)
    nodes = [
        *pair,
        # Reads ``up`` twice for now: y's uses move to the sum next, and this one must not.
        ir.node("Add", [up, up], outputs=[total], name=names.take(f"{base}_Add")),
    ]
    insert_after(producer, nodes)
    y = layer.y
    if not replace_value(y, total):
        for node in reversed(nodes):
            graph.remove(node, safe=True)
        return "its output could not be rerouted"
    if y.name is None:  # a graph output: the sum took its name
        y.name = names.take(f"{base}_uncompensated")
    nodes[2].replace_input_with(0, y)
    if inserted is not None:
        inserted.append(nodes)
    return ""


def remove_paths(graph: ir.Graph, inserted: list[list[ir.Node]]) -> None:
    """Undo :func:`insert_path` for each path on ``inserted``: the layer's output takes its
    uses (and graph-output name) back from the sum, the path's nodes and factors go."""
    for nodes in reversed(inserted):
        total_node = nodes[-1]
        y, total = total_node.inputs[0], total_node.outputs[0]
        assert y is not None
        total_node.replace_input_with(0, None)  # y must not be read by what it replaces
        replace_value(total, y)
        factors = [v for node in nodes for v in node.inputs if v is not None and v.is_initializer()]
        graph.remove(nodes, safe=True)
        for value in factors:
            if not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name) or "layer"


def compensate(
    model: ir.Model,
    layers: list[ChangedLayer],
    rank: int,
    owner: str,
    measure: Callable[[ir.Model], dict] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    before: dict | None = None,
    shapes_of: ir.Model | None = None,
    inserted: list[list[ir.Node]] | None = None,
) -> CompensationRecord:
    """Insert a rank-``rank`` EoRA path for each of ``layers`` into ``model`` (in place).

    ``measure(model)`` (fidelity against the pass's input model, e.g. a partial
    :func:`~graphopt.passes.quantization.record.measure_fidelity`) is called before the paths
    go in (unless ``before`` holds that already) and after. FLOPs are counted at
    ``input_shapes`` (the run's) on ``shapes_of`` (the pass's float input model; default
    ``model`` as it was): its total, and each path's ``2·r·(N + K) + N`` per row of its input
    (a Conv's: per output position; contrib ops such as MatMulNBits leave shapes after them
    unknown to ONNX inference, so the paths are counted from the float model's shapes, not
    the edited model's)."""
    record = CompensationRecord(owner=owner, rank=rank)
    if before is not None:
        record.fidelity_before = before
    elif measure is not None:
        record.fidelity_before = measure(model)
    rows, record.flops_before = rows_and_flops(shapes_of or model, layers, input_shapes)
    missing = [layer for layer in layers if _row_key(layer) not in rows]
    if missing and shapes_of is not None:  # inputs the pass renamed (SmoothQuant, AWQ's Mul)
        rows.update(rows_and_flops(model, missing, input_shapes)[0])
    keys = {id(layer): _row_key(layer) for layer in layers}  # before paths rename outputs
    names = NameTable(model.graph)
    uncounted = 0
    for layer in layers:
        n, k = layer.delta.shape
        total = max(_energy(layer.weight, layer.gram), np.finfo(np.float64).tiny)
        left = layer.delta if layer.pass_delta is None else layer.pass_delta
        # Recorded as relative errors ‖XΔWᵀ‖/‖XWᵀ‖ (square roots of the energy ratios): the
        # report shows them as such, and the squared ratios understated them.
        error_before = float(np.sqrt(_energy(left, layer.gram) / total))
        a, b = eora_factors(layer.delta, layer.gram, rank)
        error_after = float(np.sqrt(_energy(layer.delta - b @ a, layer.gram) / total))
        why = insert_path(model.graph, layer, a, b, names, inserted)
        if why:
            record.skipped.append((layer.name, why))
            continue
        r = a.shape[0]
        per_row = 2 * r * (n + k) + n
        record.layers.append(
            LayerCompensation(layer.name, n, k, r, error_before, error_after, r * (n + k), per_row)
        )
        count = rows.get(keys[id(layer)])
        if count is None:
            uncounted += 1
        else:
            record.flops_added += per_row * count
    if uncounted:
        record.notes.append(f"FLOPs of {uncounted} path(s) not counted: input shape unknown")
    if measure is not None and record.layers:
        record.fidelity_after = measure(model)
    return record


def _row_key(layer: ChangedLayer) -> str:
    """The value whose shape counts the path's rows: a MatMul's input, a Conv's output."""
    return (layer.x.name if layer.conv is None else layer.y.name) or ""


def rows_and_flops(
    model: ir.Model, layers: list[ChangedLayer], shapes: dict[str, tuple[int, ...]] | None
) -> tuple[dict[str, int], int]:
    """Rows of each layer's path at ``shapes`` (by :func:`_row_key`), and ``model``'s FLOPs."""
    from graphopt.analysis.flops import flops_of_inferred
    from graphopt.analysis.shapes import infer_shapes
    from graphopt.editing import static_shape

    try:
        inferred, _ = infer_shapes(model, shapes or None)
    except Exception:  # FLOPs are informational: shapes inference cannot bind
        return {}, 0
    spatial = {layer.y.name for layer in layers if layer.conv is not None}
    wanted = {_row_key(layer) for layer in layers} - {""}
    values = {v.name: v for v in inferred.graph.inputs if v.name in wanted}
    values.update({o.name: o for node in inferred.graph for o in node.outputs if o.name in wanted})
    rows = {}
    for name, value in values.items():
        shape = static_shape(value)
        if shape:
            # [B, C, OH, OW] for a Conv's output: a row per output position.
            kept = [shape[0], *shape[2:]] if name in spatial else shape[:-1]
            rows[name] = int(np.prod(kept))
    return rows, int(flops_of_inferred(inferred).total)
