"""The ``sparse-kernels`` pass: sparse constant-weight layers -> graphopt's own kernels.

With ``--target ort --sparse-kernels``, a MatMul or Gemm whose weight is a sparse constant
becomes an op of domain ``graphopt`` (``graphopt/kernels``) holding the packed weight, where
the crossover measured on this machine says the sparse op is faster
(:mod:`graphopt.passes.sparsity.crossover`). The packed weight holds the same numbers, so the
pass is exact: float results differ only by summation order, and the pipeline verifies it in
ONNX Runtime like any exact pass (its sessions register graphopt's library for domain
``graphopt``). The output names the domain and its version, never a library path.

Layers:

- ``MatMul(A, B)``, B a 2-D float32 constant; ``Gemm`` with transA=0, alpha=1, beta=1 (or no
  C; C of N values becomes the bias), transB respected. A following bias ``Add`` (N
  values), ``Relu``, ``Gelu`` (erf) or com.microsoft ``Gelu``/``BiasGelu`` fold into the op.
- int8: ``MatMul(DequantizeLinear(x_q u8, scalar scale, scalar zp), DequantizeLinear(W s8
  constant, per-tensor or per-column scale, zero point 0))`` -> ``SparseQMatMul`` (float out).
- com.microsoft ``Attention`` (what ``ort-attention`` fuses) with a sparse packed Q/K/V
  weight: its three projections are decided as layers; when all three are lowered, the op
  becomes the three sparse ops and a com.microsoft ``MultiHeadAttention`` (same bias, key
  padding mask and attributes), else it stays fused and runs them dense. On MiniLM at seq 128
  and 80% block sparsity the split ran 1.30x faster end to end than the fused dense Q/K/V
  (ORT CPU, 1 thread, median of 61 interleaved pairs).
- Not lowered: 1x1 Conv (NCHW would need a Transpose pair around the op; a note says so).

The note counts every sparse layer (``lowered H of M``) and says why the others stay dense:
weight dtype (float16/bfloat16: the kernels take float32 or int8), form, Q/K/V left fused in
Attention, not faster than dense, and the layers under :data:`MIN_SPARSITY` zeros; so
``--sparse-kernels`` never does nothing without saying why.

Format: 2:4 (``SparseMatMul24``) or BSR (``SparseMatMul``) with the block shape (R outputs
x C inputs) among :data:`BSR_SHAPES` that stores the fewest bytes; the fewest bytes wins
because the kernels stream the packed weight (memory-bound at these sizes), and it is a
deterministic function of the weight. Layers under :data:`MIN_SPARSITY` are not timed
(only to save time: no kernel wins there).

Decision: the crossover times the layer with its epilogue, dense against the op with the
epilogue fused and, with an activation, against the op with the activation left to ORT (a
separate vectorized Gelu beat the fused one 8x on MiniLM's FFN); the faster form is lowered
when it beats dense by ``min_speedup``.

Decisions (per layer: shape, sparsity, format, dense and sparse ms, lowered) are recorded in
the output's ``metadata_props[METADATA_KEY]``, keyed by layer names unique in the graph
(:func:`_name_layers`); ``decisions`` (``--sparse-kernels-decisions``) replays them from such a
model or a JSON file, checked field by field and against the model's layers
(:mod:`graphopt.passes.sparsity.decisions`), so a rerun elsewhere writes the same model.
M, the rows a layer sees, comes from ``--input-shape``; unbound dims count as
:data:`DEFAULT_ROWS` rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt import editing
from graphopt.backends.ort_custom_ops import OWN_DOMAIN, OWN_DOMAIN_VERSION, own_library
from graphopt.errors import UserInputError
from graphopt.passes.sparsity import crossover, decisions
from graphopt.passes.sparsity.crossover import METADATA_KEY
from graphopt.passes.sparsity.decisions import load as load_decisions
from graphopt.registry import GraphPass, PassOption, Stage, register

MIN_SPARSITY = 0.2
DEFAULT_ROWS = 128
# --sparse-kernels-min-speedup: a ratio of times, so > 0 (0 or -1 read as "lower every
# layer, however slow", a typo's meaning). The smallest and largest still say "always" and
# "never" lower (tests force either with them).
MIN_SPEEDUP_BOUNDS = (1e-6, 1e9)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


# --sparse-kernels-threads: at most this machine's CPUs. More threads than CPUs time
# contention rather than the kernels, and ORT spawns every one of them (100000 spawned ~10k
# threads and 16 GB before the kernel refused more).
MAX_THREADS = usable_cpus()
# (R, C): R outputs (N) by C inputs (K) per block. int8 blocks need C % 4 == 0 (VNNI).
BSR_SHAPES = ((1, 4), (4, 1), (16, 1), (4, 4), (1, 1))
S8_SHAPES = ((1, 4), (4, 4), (16, 4), (1, 8))
_SWITCH_ON = frozenset(("", "on", "true", "yes", "1"))
# An epilogue without its activation: (bias, nodes folded besides the anchor, output).
Split = tuple[np.ndarray | None, list[ir.Node], ir.Value]


@dataclass
class Layer:
    """One lowerable layer: its weight [K, N], what it reads and what it replaces."""

    name: str  # unique among the layers and the graph's other nodes (_name_layers)
    op: str  # MatMul, Gemm or QMatMul (the int8 QDQ pattern)
    anchor: ir.Node
    a: ir.Value
    w: np.ndarray
    output: ir.Value
    removed: list[ir.Node]
    bias: np.ndarray | None
    activation: str
    rows: int
    # int8 only: activation scale and zero point, weight scales ([1] or [N]).
    a_scale: np.ndarray | None = None
    a_zero: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    sources: list[ir.Node] = field(default_factory=list)  # DequantizeLinear nodes read
    # Bias, folded nodes and output with the activation left to ORT (None: no activation).
    split: Split | None = None

    def separate(self) -> Layer:
        """This layer with its activation left out of the op (an ORT node after it)."""
        assert self.split is not None
        bias, removed, output = self.split
        folded = [self.anchor, *removed]
        return dataclasses.replace(
            self, activation="none", bias=bias, removed=folded, output=output, split=None
        )

    @property
    def K(self) -> int:
        return int(self.w.shape[0])

    @property
    def N(self) -> int:
        return int(self.w.shape[1])

    @property
    def sparsity(self) -> float:
        return float(1.0 - np.count_nonzero(self.w) / max(self.w.size, 1))


@register
class SparseKernelsPass(GraphPass):
    """Lower sparse-weight MatMul/Gemm to graphopt's sparse kernels where measured faster."""

    name = "sparse-kernels"
    exact = True
    stage = Stage.LOWER
    handles_subgraphs = False
    flag = "--sparse-kernels"
    flag_metavar = None
    flag_help = (
        "with --target ort: sparse constant-weight MatMul/Gemm become graphopt's sparse ops "
        "(domain graphopt) where a crossover measured on this machine says they are faster"
    )
    ops = frozenset({"MatMul", "Gemm", "Conv", "Attention"})
    targets = frozenset({"ort"})
    options = (
        PassOption(
            "decisions",
            str,
            "",
            "replay the crossover decisions recorded in a model lowered before (or a JSON "
            "file of them) instead of measuring",
            flag="--sparse-kernels-decisions",
            metavar="MODEL_OR_JSON",
            nonempty=True,
        ),
        PassOption(
            "min_speedup",
            float,
            1.1,
            "lower a layer when dense time / sparse time is at least this",
            flag="--sparse-kernels-min-speedup",
            metavar="X",
            bounds=MIN_SPEEDUP_BOUNDS,
        ),
        PassOption(
            "threads",
            int,
            1,
            "intra-op threads of the crossover's timing sessions (as the model will run; "
            "1 to this machine's CPU count)",
            flag="--sparse-kernels-threads",
            metavar="N",
            bounds=(1, MAX_THREADS),
        ),
    )

    @classmethod
    def options_from_flag(cls, text: str) -> dict[str, Any]:
        if text.strip().lower() in _SWITCH_ON:
            return {}
        raise UserInputError(f"{cls.flag} is a switch: leave it out not to lower (got {text!r})")

    def rewrite(self, model: ir.Model) -> int:
        if self.settings["threads"] < 1:
            raise UserInputError("--sparse-kernels-threads: must be 1 or more")
        # Read and checked before anything else: a bad file is refused on any model.
        given = load_decisions(self.settings["decisions"])
        record = decisions.recorded(model)
        rows = _dim_values(model, self.context.input_shapes)
        layers, convs = find_layers(model, rows)
        if convs:
            self.context.note(
                f"sparse-kernels: {convs} sparse 1x1 Conv layer(s) not lowered (NCHW would "
                "need a Transpose pair around the op; not implemented)"
            )
        skipped = unlowerable(model, layers)
        layers = [layer for layer in layers if layer.sparsity >= MIN_SPARSITY]
        groups = attention_groups(model.graph, layers, rows)
        if self.settings["decisions"]:
            # Layers lowered by an earlier run or round are in the model's record, not layers.
            known = {layer.name for layer in layers} | set(record)
            known |= {layer.name for group in groups for layer in group.layers}
            decisions.unknown_layers(self._where, given, known)
        if not layers and not groups:
            # Never silently a no-op: say why nothing was lowered.
            self.context.note(skipped.note(0, convs, ""))
            return 0
        library = crossover.library_digest(own_library())  # one line when not built
        cache = crossover.CrossoverCache()
        shared: dict[tuple[str, tuple[int, ...], str], ir.Value] = {}
        sources: dict[str, int] = {}
        hits = 0
        for layer in layers:
            packed, fmt = choose_format(layer)
            entry, source = self._decide(layer, packed, fmt, library, given, cache)
            sources[source] = sources.get(source, 0) + 1
            record[layer.name] = entry
            if entry["lowered"]:
                separate = entry.get("epilogue") == "separate" and layer.split is not None
                lower(model.graph, layer.separate() if separate else layer, packed, fmt, shared)
                hits += 1
        skipped.lowerable = len(layers)
        skipped.slower = len(layers) - hits
        for group in groups:
            # Q/K/V of a com.microsoft Attention: split out (MultiHeadAttention keeps the
            # fused attention core) only when all three are lowered; else the fused op stays.
            if self.settings["decisions"] and any(x.name not in given for x in group.layers):
                continue  # decisions of a graphopt that kept Attention fused: kept so
            entries = []
            for layer in group.layers:
                packed, fmt = choose_format(layer)
                entry, source = self._decide(layer, packed, fmt, library, given, cache)
                sources[source] = sources.get(source, 0) + 1
                record[layer.name] = entry
                entries.append((entry, packed, fmt))
            if all(entry["lowered"] for entry, _, _ in entries):
                split_attention(model.graph, group, entries, rows, shared)
                hits += len(group.layers)
                skipped.lowerable += len(group.layers)
                skipped.add(FUSED_QKV, -len(group.layers))
            else:
                skipped.add(FUSED_QKV, -len(group.layers))
                skipped.add(FUSED_QKV_KEPT, len(group.layers))
        if hits:
            model.graph.opset_imports[OWN_DOMAIN] = OWN_DOMAIN_VERSION
            if any(group.split for group in groups):
                model.graph.opset_imports.setdefault("com.microsoft", 1)
        model.metadata_props[METADATA_KEY] = crossover.canonical(
            {
                "domain": OWN_DOMAIN,
                "version": OWN_DOMAIN_VERSION,
                "layers": [record[name] for name in sorted(record)],
            }
        )
        how = ", ".join(f"{count} {source}" for source, count in sorted(sources.items()))
        self.context.note(
            skipped.note(
                hits,
                convs,
                f" (timings: {how}; cache {cache.path}); decisions in the output's metadata "
                f"{METADATA_KEY}",
            )
        )
        return hits

    @property
    def _where(self) -> str:
        """What starts an error about the decisions file: the flag and the file."""
        return f"{decisions.FLAG} {self.settings['decisions']}"

    def _decide(
        self,
        layer: Layer,
        packed: Any,
        fmt: str,
        library: str,
        given: dict[str, dict[str, Any]],
        cache: crossover.CrossoverCache,
    ) -> tuple[dict[str, Any], str]:
        """The layer's decision record, and where its timing came from."""
        kind = "s8" if layer.op == "QMatMul" else "f32"
        threads = self.settings["threads"]
        epilogue = "+".join(
            part
            for part in ("bias" if layer.bias is not None else "", layer.activation)
            if part and part != "none"
        )
        key = crossover.shape_class(
            kind,
            layer.K,
            layer.N,
            layer.rows,
            fmt,
            layer.sparsity,
            threads,
            library,
            epilogue or "none",
        )
        if self.settings["decisions"]:
            found = {
                "K": layer.K,
                "N": layer.N,
                "format": fmt,
                "op": layer.op,
                "activation": layer.split is not None,
            }
            entry = given.get(layer.name)
            if entry is None:
                raise decisions.missing_layer(self._where, layer.name, found, given)
            decisions.check_match(self._where, layer.name, entry, found)
            entry = dict(entry)
            if "lowered" not in entry:  # timings only (checked: sparse_ms > 0)
                speedup = entry["dense_ms"] / entry["sparse_ms"]
                entry["lowered"] = speedup >= self.settings["min_speedup"]
            return entry, "given"
        timing = cache.get(key)
        source = "from the cache"
        if timing is None:
            models, feeds = crossover.timing_models(
                layer, lambda variant: op_parts(variant, packed, fmt)
            )
            timing = crossover.measure(models, feeds, threads)
            cache.put(key, timing)
            source = "measured"
        return {
            **timing.as_dict(),
            "epilogue": timing.best[0] if layer.activation != "none" else "fused",
            "layer": layer.name,
            "op": layer.op,
            "K": layer.K,
            "N": layer.N,
            "M": layer.rows,
            "sparsity": round(layer.sparsity, 4),
            "format": fmt,
            "speedup": round(timing.speedup, 3),
            "lowered": timing.speedup >= self.settings["min_speedup"],
            "key": key,
        }, source


def find_layers(model: ir.Model, dims: dict[str, int]) -> tuple[list[Layer], int]:
    """The lowerable layers of the main graph (any sparsity), and how many sparse 1x1 Convs
    were left alone."""
    layers: list[Layer] = []
    convs = 0
    taken: set[int] = set()
    for node in model.graph:
        if id(node) in taken:
            continue
        layer = _qdq_layer(node, dims) or _float_layer(node, dims)
        if layer is not None:
            layers.append(layer)
            taken.update(id(n) for n in layer.removed)
        elif editing.is_op(node, "Conv") and _sparse_pointwise(node):
            convs += 1
    _name_layers(model.graph, layers)
    return layers, convs


FUSED_QKV = (
    "Q/K/V projection(s) fused into com.microsoft Attention, which runs them dense (zeros and all)"
)
FUSED_QKV_KEPT = (
    "Q/K/V projection(s) left fused in com.microsoft Attention (dense): not all three faster "
    "sparse by --sparse-kernels-min-speedup"
)
# com.microsoft Attention attributes a split into Q/K/V ops and MultiHeadAttention keeps (any
# other must be absent or 0: unidirectional, rotary, a shared past buffer, ...).
_ATTENTION_KEPT = ("num_heads", "mask_filter_value", "scale")


@dataclass
class AttentionGroup:
    """A com.microsoft Attention whose packed Q/K/V weight is sparse: its three projections
    as layers (decided as any other), split out of it when all three are lowered."""

    node: ir.Node
    layers: list[Layer]
    split: bool = False


def attention_groups(
    graph: ir.Graph, layers: list[Layer], dims: dict[str, int]
) -> list[AttentionGroup]:
    """The Attention nodes whose Q/K/V the kernels could run (a form MultiHeadAttention
    computes the same), their projections named ``<node>_q``/``_k``/``_v`` past every name
    in use."""
    taken = {node.name for node in graph if node.name} | {layer.name for layer in layers}
    groups = []
    for node in graph:
        weights = _splittable(node)
        if weights is None:
            continue
        x = node.inputs[0]
        assert x is not None
        group = AttentionGroup(node, [])
        for part, w in zip("qkv", weights, strict=True):
            base = f"{node.name or node.outputs[0].name or 'attention'}_{part}"
            name, suffix = base, 1
            while name in taken:
                name, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(name)
            group.layers.append(
                Layer(name, "MatMul", node, x, w, node.outputs[0], [], None, "none", _rows(x, dims))
            )
        groups.append(group)
    return groups


def _splittable(node: ir.Node) -> list[np.ndarray] | None:
    """The Q, K and V weights of a com.microsoft Attention that splits into three MatMuls
    and a MultiHeadAttention computing the same: self-attention, a float32 [H, 3H] weight
    at least MIN_SPARSITY zero, a constant bias, at most a 2-D int32 key padding mask, no
    past or attention bias, one output used."""
    if node.domain != "com.microsoft" or node.op_type != "Attention":
        return None
    inputs = list(node.inputs)
    if len(inputs) < 2 or any(v is not None for v in inputs[4:]):
        return None
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return None
    for name, attr in node.attributes.items():
        if name not in _ATTENTION_KEPT and name != "qkv_hidden_sizes" and attr.value:
            return None
    x, w = inputs[0], editing.constant_array(inputs[1])
    if x is None or x.dtype not in (None, ir.DataType.FLOAT):
        return None
    if w is None or w.dtype != np.float32 or w.ndim != 2 or w.shape[1] % 3:
        return None
    hidden = w.shape[1] // 3
    sizes = editing.attribute(node, "qkv_hidden_sizes")
    if sizes and list(sizes) != [hidden] * 3:
        return None
    if len(inputs) > 2 and inputs[2] is not None:
        bias = editing.constant_array(inputs[2])
        if bias is None or bias.dtype != np.float32 or bias.size != 3 * hidden:
            return None
    if len(inputs) > 3 and inputs[3] is not None:
        mask = inputs[3]
        if mask.dtype != ir.DataType.INT32 or mask.shape is None or len(mask.shape) != 2:
            return None
    if _zero_share(w) < MIN_SPARSITY:
        return None
    return [np.ascontiguousarray(w[:, i * hidden : (i + 1) * hidden]) for i in range(3)]


def split_attention(
    graph: ir.Graph,
    group: AttentionGroup,
    entries: list[tuple[dict[str, Any], Any, str]],
    dims: dict[str, int],
    shared: dict[tuple[str, tuple[int, ...], str], ir.Value],
) -> None:
    """Replace the group's Attention by its three projections, lowered, and a
    com.microsoft MultiHeadAttention (the same bias, mask and attributes)."""
    node = group.node
    x = node.inputs[0]
    assert x is not None
    matmuls = []
    for layer in group.layers:
        weight = editing.register_array(
            graph, editing.unique_name(graph, f"{layer.name}.weight"), layer.w
        )
        matmul = ir.node("MatMul", [x, weight], name=layer.name, num_outputs=1)
        matmul.outputs[0].name = editing.unique_name(graph, f"{layer.name}.output")
        matmul.outputs[0].dtype = ir.DataType.FLOAT
        if x.shape is not None:
            matmul.outputs[0].shape = ir.Shape([*list(x.shape)[:-1], layer.N])
        matmuls.append(matmul)
    editing.insert_before(node, matmuls)
    inputs = [m.outputs[0] for m in matmuls]
    extra = list(node.inputs[2:4]) + [None] * (4 - len(node.inputs))
    bias, mask = extra[0], extra[1]
    values = editing.constant_array(bias)
    if values is not None and not values.any():
        bias = None  # an all-zero bias (packed Q/K/V that had none) adds nothing
    inputs += [bias, mask]
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = {name: attr.value for name, attr in node.attributes.items() if name in _ATTENTION_KEPT}
    mha = ir.node(
        "MultiHeadAttention",
        inputs,
        attrs,
        domain="com.microsoft",
        name=editing.unique_name(graph, f"{node.name or 'attention'}_mha"),
        num_outputs=1,
    )
    editing.insert_before(node, [mha])
    old, new = node.outputs[0], mha.outputs[0]
    new.type, new.shape = old.type, old.shape
    name = old.name
    reads = [v for v in node.inputs if v is not None]
    if not editing.replace_value(old, new):
        raise AssertionError("MultiHeadAttention's output is a fresh node output")
    editing.remove_node(node)
    if not new.is_graph_output():
        new.name = name
    _drop_unused(graph, reads)
    for matmul, layer, (entry, packed, fmt) in zip(matmuls, group.layers, entries, strict=True):
        found = _float_layer(matmul, dims)
        assert found is not None and entry["lowered"]
        found.name = layer.name
        lower(graph, found, packed, fmt, shared)
    group.split = True


# Weight dtypes the kernels take: float32 (SparseMatMul*) and int8 (SparseQMatMul).
_KERNEL_DTYPES = (np.float32, np.int8)


@dataclass
class Unlowerable:
    """The sparse layers (weights at least MIN_SPARSITY zero) the pass cannot lower, by
    reason, and the layers too dense to consider: what its note says besides "lowered"."""

    reasons: dict[str, int] = field(default_factory=dict)  # reason -> layers
    dense: int = 0  # constant-weight layers under MIN_SPARSITY zeros
    densest: float = 0.0  # the largest zero share among those
    lowerable: int = 0  # sparse layers the kernels take (timed or replayed)
    slower: int = 0  # of those, not lowered: not faster than dense by min_speedup

    def add(self, reason: str, count: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + count
        if not self.reasons[reason]:
            del self.reasons[reason]

    def note(self, hits: int, convs: int, tail: str) -> str:
        """``lowered H of M sparse layer(s)``, M counting every sparse layer, and why the
        others were not lowered."""
        total = self.lowerable + sum(self.reasons.values()) + convs
        parts = [f"{count} {reason}" for reason, count in self.reasons.items()]
        if convs:
            parts.append(f"{convs} 1x1 Conv (not implemented)")
        if self.slower:
            parts.append(f"{self.slower} not faster than dense by --sparse-kernels-min-speedup")
        dense = (
            f"under the {MIN_SPARSITY:.0%} zeros the kernels need (the sparsest "
            f"{self.densest:.1%} zero)"
        )
        if not total:
            return (
                f"sparse-kernels: nothing lowered: no sparse layer; the {self.dense} "
                f"constant-weight layer(s) are {dense}"
            )
        if self.dense:
            parts.append(f"{self.dense} other layer(s) {dense}")
        why = f"; not lowered: {'; '.join(parts)}" if parts else ""
        return f"sparse-kernels: lowered {hits} of {total} sparse layer(s){tail}{why}"


def unlowerable(model: ir.Model, layers: list[Layer]) -> Unlowerable:
    """Why the main graph's constant-weight layers other than ``layers`` (and those of
    ``layers`` under MIN_SPARSITY zeros) are not lowered: a note per reason, so that
    ``--sparse-kernels`` never does nothing without saying why."""
    found = Unlowerable()

    def dense(share: float, count: int = 1) -> None:
        found.dense += count
        found.densest = max(found.densest, share)

    taken: set[int] = set()
    for layer in layers:
        taken.update(id(node) for node in layer.removed)
        if layer.sparsity < MIN_SPARSITY:
            dense(layer.sparsity)
    for node in model.graph:
        if id(node) in taken:
            continue
        if node.domain == "com.microsoft" and node.op_type == "Attention":
            w = editing.constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
            if w is None or w.ndim != 2:
                continue
            share = _zero_share(w)
            sizes = editing.attribute(node, "qkv_hidden_sizes")
            count = len(sizes) if sizes else 3  # one projection each for Q, K and V
            if share < MIN_SPARSITY:
                dense(share, count)
                continue
            found.add(FUSED_QKV, count)
            continue
        if not (editing.is_op(node, "MatMul") or editing.is_op(node, "Gemm")):
            continue
        w, quantized = _weight(node)
        if w is None:
            continue
        share = _zero_share(w)
        if share < MIN_SPARSITY:
            dense(share)
            continue
        found.add(_why_not(node, w, quantized))
    return found


def _weight(node: ir.Node) -> tuple[np.ndarray | None, bool]:
    """A MatMul/Gemm's constant 2-D weight (through a DequantizeLinear), and whether it is
    quantized."""
    b = node.inputs[1] if len(node.inputs) > 1 else None
    if b is None:
        return None, False
    producer = b.producer()
    quantized = producer is not None and editing.is_op(producer, "DequantizeLinear")
    w = editing.constant_array(producer.inputs[0] if quantized else b)
    if w is None or w.ndim != 2:
        return None, quantized
    return w, quantized


def _zero_share(w: np.ndarray) -> float:
    return float(1.0 - np.count_nonzero(w) / max(w.size, 1))


def _why_not(node: ir.Node, w: np.ndarray, quantized: bool) -> str:
    """Why a sparse MatMul/Gemm is not one of the layers :func:`find_layers` takes."""
    a = node.inputs[0]
    if w.dtype not in _KERNEL_DTYPES:
        return (
            f"with {w.dtype} weights (the kernels take float32 weights, or int8 QDQ: "
            "--quantize fp16/bf16 leaves sparse layers dense)"
        )
    if quantized:
        from graphopt.kernels.packing import S8_MAX_K

        if w.dtype == np.int8 and w.shape[0] > S8_MAX_K:
            return f"int8 with K over {S8_MAX_K} (the kernel's int32 sums could overflow)"
        return (
            "int8 in a form the kernel does not take (it needs uint8 activations with a "
            "scalar scale and zero point, symmetric int8 weights, no block_size)"
        )
    if a is not None and a.dtype not in (None, ir.DataType.FLOAT):
        return f"with {a.dtype.name.lower()} inputs (the kernels take float32)"
    return "in a form the kernels do not take (Gemm with transA, alpha or beta other than 1)"


def _name_layers(graph: ir.Graph, layers: list[Layer]) -> None:
    """Give each layer a name no other layer and no other node of the graph has: the key of
    its decision and the name of its op once lowered.

    A layer is called by its node's name, else its output's. Both can collide (a node named
    ``y`` and an unnamed one writing ``y``; names are optional and need not be unique in
    ONNX), and then two ops had one name, which ORT refuses, and one decision overwrote the
    other. Named nodes keep their names first (the first of duplicates), in graph order;
    the others take ``base_1``, ``base_2``, ... past every name in use: the names of all
    other nodes, the bias Adds and activations layers fold in included (a layer left dense
    keeps them). A lowered layer's op takes its name, so a rerun on the output gives the
    layers left the same names and replays their decisions; the one exception is a name
    shared with a node another, lowered, layer folded in, which is gone on the rerun.
    """
    anchors = {id(layer.anchor) for layer in layers}
    taken = {node.name for node in graph if node.name and id(node) not in anchors}
    named: dict[int, str] = {}
    for index, layer in enumerate(layers):
        own = layer.anchor.name
        if own and own not in taken:
            named[index] = own
            taken.add(own)
    for index, layer in enumerate(layers):
        name = named.get(index)
        if name is None:
            base = layer.anchor.name or layer.anchor.outputs[0].name or "matmul"
            name, suffix = base, 1
            while name in taken:
                name, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(name)
        layer.name = name


def _float_layer(node: ir.Node, dims: dict[str, int]) -> Layer | None:
    bias = None
    if editing.is_op(node, "MatMul"):
        a, b = node.inputs[0], node.inputs[1]
        w = editing.constant_array(b)
    elif editing.is_op(node, "Gemm"):
        a, b = node.inputs[0], node.inputs[1]
        if editing.attribute(node, "transA", 0) or editing.attribute(node, "alpha", 1.0) != 1.0:
            return None
        w = editing.constant_array(b)
        if w is not None and w.ndim == 2 and editing.attribute(node, "transB", 0):
            w = w.T
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            if editing.attribute(node, "beta", 1.0) != 1.0:
                return None
            bias = _vector(editing.constant_array(c), None if w is None else w.shape[1], 2)
            if bias is None:
                return None
    else:
        return None
    # A's type may be unknown (no inference yet): MatMul/Gemm make it the weight's, float32.
    if a is None or a.dtype not in (None, ir.DataType.FLOAT) or w is None or w.ndim != 2:
        return None
    if w.dtype != np.float32:
        return None
    w = np.ascontiguousarray(w)
    bias, act, removed, output, split = _epilogue(node.outputs[0], w.shape[1], bias)
    rows = _rows(a, dims)
    layer = Layer("", node.op_type, node, a, w, output, [node, *removed], bias, act, rows)
    layer.split = split
    return layer


def _qdq_layer(node: ir.Node, dims: dict[str, int]) -> Layer | None:
    if not editing.is_op(node, "MatMul"):
        return None
    dq_a, dq_w = (v.producer() if v is not None else None for v in node.inputs[:2])
    if dq_a is None or dq_w is None:
        return None
    if not (editing.is_op(dq_a, "DequantizeLinear") and editing.is_op(dq_w, "DequantizeLinear")):
        return None
    if editing.attribute(dq_a, "block_size", 0) or editing.attribute(dq_w, "block_size", 0):
        return None
    x_q = dq_a.inputs[0]
    if x_q is None or editing.is_constant(x_q):
        return None
    dtype = x_q.dtype
    if dtype is None and x_q.producer() is not None and x_q.producer().op_type == "QuantizeLinear":
        zero = editing.constant_array(dq_a.inputs[2]) if len(dq_a.inputs) > 2 else None
        dtype = ir.DataType.UINT8 if zero is not None and zero.dtype == np.uint8 else None
    if dtype != ir.DataType.UINT8:
        return None
    a_scale = editing.constant_array(dq_a.inputs[1])
    a_zero = editing.constant_array(dq_a.inputs[2]) if len(dq_a.inputs) > 2 else None
    if a_scale is None or a_scale.size != 1 or a_scale.dtype != np.float32:
        return None
    if a_zero is None or a_zero.size != 1 or a_zero.dtype != np.uint8:
        return None
    w = editing.constant_array(dq_w.inputs[0])
    if w is None or w.dtype != np.int8 or w.ndim != 2:
        return None
    from graphopt.kernels.packing import S8_MAX_K

    if w.shape[0] > S8_MAX_K:
        return None  # its int32 sums could overflow: the kernel refuses it (kernels.h)
    w_scale = editing.constant_array(dq_w.inputs[1])
    w_zero = editing.constant_array(dq_w.inputs[2]) if len(dq_w.inputs) > 2 else None
    axis = editing.attribute(dq_w, "axis", 1)
    if w_scale is None or w_scale.dtype != np.float32:
        return None
    if not (w_scale.size == 1 or (w_scale.size == w.shape[1] and axis in (1, -1))):
        return None
    has_zero = len(dq_w.inputs) > 2 and dq_w.inputs[2] is not None
    if has_zero and (w_zero is None or np.any(w_zero)):
        return None  # asymmetric weights: the kernel's weights are symmetric
    bias, act, removed, output, split = _epilogue(node.outputs[0], w.shape[1], None)
    return Layer(
        "",  # named with the others (_name_layers)
        "QMatMul",
        node,
        x_q,
        np.ascontiguousarray(w),
        output,
        [node, *removed],
        bias,
        act,
        _rows(x_q, dims),
        a_scale=a_scale.reshape(()).astype(np.float32),
        a_zero=a_zero.reshape(()).astype(np.uint8),
        w_scale=w_scale.reshape(-1).astype(np.float32),
        sources=[dq_a, dq_w],
        split=split,
    )


def _epilogue(
    y: ir.Value, n: int, bias: np.ndarray | None
) -> tuple[np.ndarray | None, str, list[ir.Node], ir.Value, Split | None]:
    """What folds into the op after ``y``: a bias Add, then Relu/Gelu (or a BiasGelu); and
    the same without the activation (bias, nodes, output), which then stays an ORT node."""
    removed: list[ir.Node] = []
    user = editing.single_user(y)
    if bias is None and user is not None and editing.is_op(user, "Add"):
        other = user.inputs[1] if user.inputs[0] is y else user.inputs[0]
        vector = _vector(editing.constant_array(other), n, _rank(y))
        if vector is not None and other is not y:
            bias, y = vector, user.outputs[0]
            removed.append(user)
            user = editing.single_user(y)
    if user is None:
        return bias, "none", removed, y, None
    split = (bias, list(removed), y)
    microsoft = user.domain == "com.microsoft"
    if bias is None and microsoft and user.op_type == "BiasGelu" and user.inputs[0] is y:
        vector = _vector(editing.constant_array(user.inputs[1]), n, 1)
        if vector is not None:
            return vector, "gelu", [*removed, user], user.outputs[0], split
    if editing.is_op(user, "Relu"):
        return bias, "relu", [*removed, user], user.outputs[0], split
    erf_gelu = editing.is_op(user, "Gelu") and editing.attribute(user, "approximate", "none") in (
        "none",
        "",
    )
    if erf_gelu or (microsoft and user.op_type == "Gelu"):
        return bias, "gelu", [*removed, user], user.outputs[0], split
    return bias, "none", removed, y, None


def _vector(array: np.ndarray | None, n: int | None, rank: int | None) -> np.ndarray | None:
    """``array`` as N float32 bias values when adding it to [..., N] keeps the shape."""
    if array is None or n is None or array.dtype != np.float32:
        return None
    # A [1, N] bias would make a [N] result [1, N]: only when the rank is known to allow it.
    if array.ndim > max(rank or 1, 1) or any(d != 1 for d in array.shape[:-1]):
        return None
    if array.size == n:
        return np.ascontiguousarray(array.reshape(n))
    if array.size == 1:
        return np.full(n, array.reshape(()), dtype=np.float32)
    return None


def _sparse_pointwise(node: ir.Node) -> bool:
    w = editing.constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1):
        return False
    return 1.0 - np.count_nonzero(w) / max(w.size, 1) >= MIN_SPARSITY


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _dim_values(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dim names bound by ``--input-shape`` (``batch`` -> 8)."""
    bound: dict[str, int] = {}
    for value in model.graph.inputs:
        given = shapes.get(value.name or "")
        if given is None or value.shape is None or len(given) != len(value.shape):
            continue
        for dim, size in zip(value.shape, given, strict=True):
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                bound[dim.value] = int(size)
    return bound


def _rows(a: ir.Value, dims: dict[str, int]) -> int:
    """M: the product of A's leading dims; unbound ones count as DEFAULT_ROWS in all."""
    if a.shape is None:
        return DEFAULT_ROWS
    rows, unbound = 1, False
    for dim in list(a.shape)[:-1]:
        if isinstance(dim, int):
            rows *= dim
        elif isinstance(dim, ir.SymbolicDim) and dim.value in dims:
            rows *= dims[dim.value]
        else:
            unbound = True
    return rows * DEFAULT_ROWS if unbound else rows


def choose_format(layer: Layer) -> tuple[Any, str]:
    """The packed weight and its format name (``2:4`` or ``bsrRxC``): fewest stored bytes."""
    from graphopt.kernels import packing

    w = layer.w
    if layer.op == "QMatMul":
        r, c = min(S8_SHAPES, key=lambda shape: _bsr_bytes(w, *shape, itemsize=1))
        assert layer.w_scale is not None
        return packing.pack_bsr_s8(w, layer.w_scale, r, c), f"bsr{r}x{c}"
    r, c = min(BSR_SHAPES, key=lambda shape: _bsr_bytes(w, *shape, itemsize=4))
    best = _bsr_bytes(w, r, c, itemsize=4)
    K, N = w.shape
    bytes_24 = N * (K // 2) * 4 + N * -(-K // 8)
    if K % 4 == 0 and bytes_24 <= best and _fits_24(w):
        return packing.pack_24(w), "2:4"
    return packing.pack_bsr(w, r, c), f"bsr{r}x{c}"


def _bsr_bytes(w: np.ndarray, r: int, c: int, itemsize: int) -> int:
    """Bytes of ``w`` in BSR with R x C blocks: values, col_idx and row_ptr."""
    K, N = w.shape
    kb, nb = -(-K // c), -(-N // r)
    nonzero = np.zeros((kb * c, nb * r), dtype=bool)
    nonzero[:K, :N] = w != 0
    blocks = int(nonzero.reshape(kb, c, nb, r).any(axis=(1, 3)).sum())
    return blocks * (r * c * itemsize + 4) + (nb + 1) * 4


def _fits_24(w: np.ndarray) -> bool:
    K, N = w.shape
    return bool(((w != 0).reshape(K // 4, 4, N).sum(axis=1) <= 2).all())


def op_parts(layer: Layer, packed: Any, fmt: str) -> tuple[str, list[tuple[str, Any]], dict]:
    """The op type, its constant inputs after A (name suffix, array; the bias last, if any)
    and its attributes."""
    attrs: dict[str, Any] = {"K": layer.K, "N": layer.N, "activation": layer.activation}
    bias = [] if layer.bias is None else [("bias", layer.bias)]
    if fmt == "2:4":
        consts = [("values", packed.values), ("indices", packed.indices), *bias]
        return "SparseMatMul24", consts, attrs
    attrs.update(block_r=int(packed.R), block_c=int(packed.C))
    bsr = [("values", packed.values), ("col_idx", packed.col_idx), ("row_ptr", packed.row_ptr)]
    if layer.op != "QMatMul":
        return "SparseMatMul", [*bsr, *bias], attrs
    assert layer.a_scale is not None and layer.a_zero is not None
    consts = [("a_scale", layer.a_scale), ("a_zero_point", layer.a_zero), *bsr]
    consts += [("w_scale", packed.w_scale), ("w_rowsum", packed.w_rowsum), *bias]
    return "SparseQMatMul", consts, attrs


def lower(
    graph: ir.Graph,
    layer: Layer,
    packed: Any,
    fmt: str,
    shared: dict[tuple[str, tuple[int, ...], str], ir.Value] | None = None,
) -> None:
    """Replace the layer's nodes by the sparse op (through :mod:`graphopt.editing`).

    ``shared``: the arrays this run added, by content. Equal ones (the row_ptr of layers
    sparsified alike) are one initializer, as the cleanup passes would make them on the next
    run: so ``optimize`` of the output changes nothing."""
    shared = {} if shared is None else shared
    op_type, consts, attrs = op_parts(layer, packed, fmt)
    inputs = [layer.a]
    for suffix, array in consts:
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if key not in shared:
            name = editing.unique_name(graph, f"{layer.name}.sparse_{suffix}")
            shared[key] = editing.register_array(graph, name, array)
        inputs.append(shared[key])
    node = ir.node(op_type, inputs, attrs, domain=OWN_DOMAIN, name=layer.name, num_outputs=1)
    editing.insert_before(layer.anchor, [node])
    old, new = layer.output, node.outputs[0]
    new.type, new.shape = old.type, old.shape
    name = old.name
    # What the replaced nodes read, collected before they go: removing a node detaches its
    # inputs (onnx_ir's safe removal sets them to None), so reading them afterwards finds
    # nothing, and the int8 weights, scales and zero points stayed as dead initializers.
    reads = [v for n in (*layer.removed, *layer.sources) for v in n.inputs if v is not None]
    if not editing.replace_value(old, new):
        raise AssertionError("the sparse op's output is a fresh node output")
    for dead in reversed(layer.removed):
        editing.remove_node(dead)
    if not new.is_graph_output():
        new.name = name
    for source in layer.sources:
        editing.remove_if_dead(source)  # a DequantizeLinear other nodes read stays
    _drop_unused(graph, reads)


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the constants among ``values`` that nothing reads any more (initializers, and
    Constant nodes), so that the output holds no dead weight: the cleanup passes, which run
    before this pass, would remove them on the next ``optimize`` and the output would not be
    a fixed point. A constant something else still reads is kept."""
    for value in dict.fromkeys(values):  # a value read twice: once, in order
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            if graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
            continue
        producer = value.producer()
        if producer is not None and editing.is_op(producer, "Constant"):
            editing.remove_if_dead(producer)
