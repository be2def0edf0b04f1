"""The ``sparse-kernels`` pass: sparse constant-weight layers -> graphopt's own kernels.

With ``--target ort --sparse-kernels``, a MatMul or Gemm whose weight is a sparse constant
becomes an op of domain ``graphopt`` (``graphopt/kernels``) holding the packed weight, where
the crossover measured on this machine says the sparse op is faster
(:mod:`graphopt.passes.sparsity.crossover`). The packed weight holds the same numbers, so the
pass is exact: float results differ only by summation order, and the pipeline verifies it in
ONNX Runtime like any exact pass (its sessions register graphopt's library for domain
``graphopt``). The output names the domain and its version, never a library path.

The pass finds the layers the kernels take (:mod:`graphopt.passes.sparsity.lowerable_layers`)
and the com.microsoft Attention nodes whose Q/K/V projections it could split out
(:mod:`graphopt.passes.sparsity.attention_split`), decides each, lowers those it decides to
in the packed format with the fewest bytes (:mod:`graphopt.passes.sparsity.packed_ops`), and
notes ``lowered H of M`` sparse layers and why the others stay dense
(:mod:`graphopt.passes.sparsity.lowering_notes`). Layers under :data:`MIN_SPARSITY` zeros are
not timed (only to save time: no kernel wins there).

Decision: the crossover times the layer with its epilogue, dense against the op with the
epilogue fused and, with an activation, against the op with the activation left to ORT (a
separate vectorized Gelu beat the fused one 8x on MiniLM's FFN); the faster form is lowered
when it beats dense by ``min_speedup``.

Decisions (per layer: shape, sparsity, format, dense and sparse ms, lowered) are recorded in
the output's ``metadata_props[METADATA_KEY]``, keyed by layer names unique in the graph
(:func:`~graphopt.passes.sparsity.lowerable_layers.find_layers` names them); ``decisions``
(``--sparse-kernels-decisions``) replays them from such a model or a JSON file, checked
field by field and against the model's layers (:mod:`graphopt.passes.sparsity.decisions`), so
a rerun elsewhere writes the same model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import onnx_ir as ir

from graphopt.backends.ort_custom_ops import OWN_DOMAIN, OWN_DOMAIN_VERSION, own_library
from graphopt.errors import UserInputError
from graphopt.passes.sparsity import crossover, decisions
from graphopt.passes.sparsity.attention_split import attention_groups, split_attention
from graphopt.passes.sparsity.crossover import METADATA_KEY
from graphopt.passes.sparsity.decisions import load as load_decisions
from graphopt.passes.sparsity.lowerable_layers import MIN_SPARSITY, Layer, bound_dims, find_layers
from graphopt.passes.sparsity.lowering_notes import FUSED_QKV, FUSED_QKV_KEPT, unlowerable
from graphopt.passes.sparsity.packed_ops import choose_format, lower, op_parts
from graphopt.registry import GraphPass, PassOption, Stage, register

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
_SWITCH_ON = frozenset(("", "on", "true", "yes", "1"))


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
        rows = bound_dims(model, self.context.input_shapes)
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
        # Outputs a lowered layer replaced, by id: the layers were found before any was
        # lowered, so a later one may still name the old value as its input (an FFN's second
        # MatMul reads the Gelu the first one's op took in; lowered on the stale value, it
        # read a node no longer in the graph).
        replaced: dict[int, ir.Value] = {}
        for layer in layers:
            while id(layer.a) in replaced:
                layer = dataclasses.replace(layer, a=replaced[id(layer.a)])
            packed, fmt = choose_format(layer)
            entry, source = self._decide(layer, packed, fmt, library, given, cache)
            sources[source] = sources.get(source, 0) + 1
            record[layer.name] = entry
            if entry["lowered"]:
                separate = entry.get("epilogue") == "separate" and layer.split is not None
                target = layer.separate() if separate else layer
                old, new = lower(model.graph, target, packed, fmt, shared)
                replaced[id(old)] = new
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
