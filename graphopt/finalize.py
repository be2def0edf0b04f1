"""The last touches ``optimize`` gives a result before it is written: a canonical form (so
that ``optimize`` of its own output changes nothing) and the record of what produced it.

- **Constant tensor names.** onnx-ir's ``get_const_tensor`` (called by graphopt's editing
  helpers and by onnxscript) renames a Constant node's tensor after the node's output
  whenever it reads one whose value is not cached. Which Constants a run happens to read
  depends on the state the passes saw, so a second ``optimize`` of the output renamed a few
  more and the bytes changed. Every written Constant tensor is therefore named after its
  output: reading it again changes nothing.
- **Initializer order.** By first use: onnx-ir's shape inference moves every initializer
  over 1 KB to the end, so the order a run leaves depends on when inference last ran.
- **Invented dims.** Symbolic dims that ONNX shape inference makes up (``unk__N``) are
  written unnamed: their numbering and grouping follow the state inference ran on, which a
  second run does not repeat.
- **Provenance** (model ``metadata_props``): ``graphopt.version``, ``graphopt.dependencies``
  (the versions of the libraries whose rewrites end up in the file) and
  ``graphopt.options``, every option that decides the output as canonical JSON. Nothing
  that differs between equal runs is recorded (no time, no host, no absolute path, no
  digest of the input), so equal runs give equal bytes and ``optimize`` of its own output
  with the same options gives the same file. :func:`options_from_metadata` turns the record
  back into options; a calibration file is recorded by name and SHA-256 (its data is not in
  the model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import __version__
from graphopt.backends.ort import CPU, active_providers

if TYPE_CHECKING:
    from graphopt.api import OptimizeOptions

VERSION_KEY = "graphopt.version"
DEPENDENCIES_KEY = "graphopt.dependencies"
OPTIONS_KEY = "graphopt.options"
# The lossy passes of earlier runs on the input (oldest first): a run replaces OPTIONS_KEY,
# which would otherwise forget that an int8 model was quantized or a model pruned twice.
HISTORY_KEY = "graphopt.history"
# Names ONNX shape inference gives the unknown dims it invents.
_GENERATED_DIM = re.compile(r"unk__\d+")
# Libraries whose behaviour shapes the written model (folding, rewriting, serialization,
# the verification that may roll a pass back).
DEPENDENCIES = ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")


def name_constant_tensors(model: ir.Model) -> int:
    """Name every Constant node's ``value`` tensor after the node's output; tensors renamed.

    A renamed tensor is a new object over the same data: tensors may be shared with the
    caller's model (``optimize`` of an ``ir.Model`` works on a clone that shares them).
    """
    renamed = 0
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            attr = node.attributes.get("value")
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or attr is None:
                continue
            if attr.is_ref() or attr.type != ir.AttributeType.TENSOR or len(node.outputs) != 1:
                continue  # a function's reference attribute holds no tensor to name
            name = node.outputs[0].name or ""
            if attr.value.name == name:
                continue
            node.attributes["value"] = ir.AttrTensor("value", _renamed(attr.value, name))
            renamed += 1
    return renamed


def order_initializers(model: ir.Model) -> int:
    """Order each graph's initializers by first use (subgraph uses included); graphs reordered.

    The order a run leaves is its history: onnx-ir's shape inference takes every initializer
    over 1 KB out and puts it back last, and passes add new ones at the end. Ordered by the
    nodes that read them, equal graphs list them equally. Initializers no node reads (graph
    outputs) follow, by name.
    """
    reordered = 0
    for graph in model.graphs():
        first_use: dict[int, int] = {}  # id(value) -> position among all node inputs
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for value in node.inputs:
                if value is not None:
                    first_use.setdefault(id(value), len(first_use))
        current = list(graph.initializers.values())
        wanted = sorted(
            current,
            key=lambda v: (0, first_use[id(v)], "") if id(v) in first_use else (1, 0, v.name),
        )
        if [id(v) for v in wanted] == [id(v) for v in current]:
            continue
        for value in wanted:
            graph.initializers[value.name] = graph.initializers.pop(value.name)
        reordered += 1
    return reordered


def drop_generated_dims(model: ir.Model) -> int:
    """Write the symbolic dims ONNX shape inference invents (``unk__N``) as unnamed dims.

    Their numbers count the unknown dims inference met before, in whatever state of the
    model it ran on, and which of them share a name follows that state too: a second run
    re-infers the smaller model and numbers (and groups) them otherwise. Unnamed, they say
    what they know (a dim nobody can name) the same way every time. The model's own inputs
    and outputs keep their declared shapes (the pipeline restores them).
    """
    main_io = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    changed = 0
    for graph in model.graphs():
        values = [] if graph is model.graph else [*graph.inputs, *graph.outputs]
        values += [out for node in graph for out in node.outputs]
        for value in values:
            shape = value.shape
            if id(value) in main_io or shape is None:
                continue
            dims = [None if _generated(dim) else dim for dim in shape]
            if dims != list(shape):
                denotations = [shape.get_denotation(i) for i in range(len(shape))]
                value.shape = ir.Shape(dims, denotations=denotations)
                changed += 1
    return changed


def _generated(dim: int | ir.SymbolicDim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and bool(_GENERATED_DIM.fullmatch(dim.value or ""))


def _renamed(tensor: ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    if isinstance(tensor, ir.TensorProtoTensor):
        proto = onnx.TensorProto()
        proto.CopyFrom(tensor.raw)
        proto.name = name
        return ir.TensorProtoTensor(proto)
    if isinstance(tensor, ir.ExternalTensor):
        return ir.ExternalTensor(
            tensor.location,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
            base_dir=tensor.base_dir,
        )
    if type(tensor) is ir.Tensor:
        return ir.Tensor(
            tensor.raw,
            dtype=tensor.dtype,
            shape=tensor.shape,
            name=name,
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
        )
    # Other kinds (string, packed, lazy) have no cheap copy: renamed in place, as onnx-ir's
    # own get_const_tensor would do on the next read.
    tensor.name = name
    return tensor


def options_record(options: OptimizeOptions) -> dict[str, Any]:
    """The options as a JSON-able mapping (lossy passes resolved, calibration by name)."""
    lossy = []
    calib_digest = None
    for spec in options.lossy_specs():
        spec_options = dict(spec.options)
        calib = spec_options.get("calib")
        if isinstance(calib, os.PathLike):
            calib = os.fspath(calib)  # options are converted before; a direct caller's Path
        if isinstance(calib, str) and calib not in ("", "random"):
            # The file's name and digest identify the data without the folder it sat in
            # (an absolute path would differ between equal runs and leak the user's tree).
            spec_options["calib"] = _calib_name(calib)
            calib_digest = _sha256(Path(calib))
        decisions = spec_options.get("decisions")
        if decisions:
            # sparse-kernels' replayed decisions: by name, as calibration files are.
            spec_options["decisions"] = Path(decisions).name
        speed_check = spec_options.get("speed_check")
        if isinstance(speed_check, str) and speed_check not in ("on", "off"):
            # factorize's replayed timings (a file): by name too.
            spec_options["speed_check"] = Path(speed_check).name
        lossy.append({"name": spec.name, "options": spec_options})
    record: dict[str, Any] = {
        "passes": None
        if options.passes is None
        else [{"name": s.name, "options": dict(s.options)} for s in options.passes],
        "skip": sorted(options.skip),
        "lossy": lossy,
        "verify": options.verify,
        "tolerance": options.tolerance,
        "seed": options.seed,
        "input_shapes": {k: list(v) for k, v in sorted(options.input_shapes.items())},
        "fold_limit_bytes": options.fold_limit_bytes,
        "external_data": options.external_data,
        "target": options.target,
        "opset": options.opset,
    }
    if calib_digest is not None:
        record["calib_sha256"] = calib_digest
    if options.custom_ops:
        # The libraries decide whether verification can run, hence which passes stand; by
        # name and digest, as data files are (a path would leak the user's folders).
        record["custom_ops"] = [_data_record(Path(library)) for library in options.custom_ops]
    providers = getattr(options, "provider", None) and active_providers()
    if providers and providers != (CPU,):
        # Verification ran there: its numerics decide which passes stand.
        record["providers"] = list(providers)
    verify_inputs = getattr(options, "verify_inputs", None)
    if verify_inputs is not None:
        # Verification data decides which passes are rolled back, hence the output.
        record["verify_inputs"] = _data_record(verify_inputs)
    return record


def _calib_name(calib: str) -> str:
    """A calibration file's recorded name: its name, unless that is a word ``--calib`` reads
    as no file (a file called ``random``, given as ``./random``): then ``./NAME``, so that a
    replay of the record reads the file rather than generating data."""
    name = Path(calib).name
    return f"./{name}" if name == "random" else name


def _data_record(data: Any) -> dict[str, Any]:
    """A data file by name and SHA-256, or in-memory arrays by a digest of their contents."""
    if isinstance(data, Mapping):
        digest = hashlib.sha256()
        for key in sorted(data):
            array = np.ascontiguousarray(data[key])
            digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
        return {"arrays": sorted(str(k) for k in data), "sha256": digest.hexdigest()}
    path = Path(data)
    return {"name": path.name, "sha256": _sha256(path)}


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None  # the pruning pass reports the unreadable file itself
    return digest.hexdigest()


def _dependency_versions() -> dict[str, str]:
    versions = {}
    for name in DEPENDENCIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr)


def stamp(model: ir.Model, options: OptimizeOptions) -> None:
    """Record graphopt's version, its dependencies' and ``options`` in the model metadata.

    Keys already there (an earlier graphopt run) are overwritten in place, so their order in
    the file, and the file, stay the same when the options are the same.
    """
    record = options_record(options)
    # Read before the record is replaced. A rerun with the same lossy options leaves the
    # history as it was: on its own output (sparsify, sparse-kernels: a fixed point) it
    # must give the same file; a pass that compounds instead is warned about in the report.
    history = earlier_lossy_runs(model.metadata_props, unless=record["lossy"])
    if history:
        model.metadata_props[HISTORY_KEY] = _canonical_json(history)
    model.metadata_props[VERSION_KEY] = __version__
    model.metadata_props[DEPENDENCIES_KEY] = _canonical_json(_dependency_versions())
    model.metadata_props[OPTIONS_KEY] = _canonical_json(record)


def earlier_lossy_runs(
    props: Mapping[str, str], unless: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The lossy passes graphopt applied to a model before, oldest first, each run as
    ``{"version": ..., "lossy": [...]}``: the history the model carries plus the run that
    wrote it, unless that run had no lossy passes or its lossy record equals ``unless``, so
    re-optimizing with exact passes only (or the same lossy options) leaves the history, and
    the file, as it was. Unreadable records are skipped."""
    history: list[dict[str, Any]] = []
    try:
        earlier = json.loads(props.get(HISTORY_KEY, "[]"))
        history = [run for run in earlier if isinstance(run, dict)]
    except (TypeError, ValueError):
        pass
    try:
        last = json.loads(props[OPTIONS_KEY])
        lossy = last.get("lossy") if isinstance(last, dict) else None
    except (KeyError, TypeError, ValueError):
        lossy = None
    if isinstance(lossy, list) and lossy and _canonical_json(lossy) != _canonical_json(unless):
        history.append({"version": props.get(VERSION_KEY, "unknown"), "lossy": lossy})
    return history


def earlier_lossy_names(props: Mapping[str, str]) -> dict[str, str]:
    """Pass name -> its options as recorded, for every lossy pass applied before."""
    found: dict[str, str] = {}
    for run in earlier_lossy_runs(props):
        for entry in run.get("lossy") or ():
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                options = entry.get("options") or {}
                found[entry["name"]] = ", ".join(
                    f"{k}={v}" for k, v in sorted(options.items()) if v not in (None, "", False)
                )
    return found


def options_from_metadata(props: Mapping[str, str]) -> OptimizeOptions:
    """The options recorded by :func:`stamp` (a calibration file by its recorded name)."""
    from graphopt.api import OptimizeOptions
    from graphopt.pipeline import PassSpec

    if OPTIONS_KEY not in props:
        raise KeyError(f"no {OPTIONS_KEY} in the model metadata")
    data = json.loads(props[OPTIONS_KEY])

    def specs(entries: list[dict[str, Any]]) -> list[PassSpec]:
        return [PassSpec(e["name"], dict(e.get("options") or {})) for e in entries]

    options = OptimizeOptions(
        passes=None if data["passes"] is None else specs(data["passes"]),
        skip=list(data["skip"]),
        lossy=specs(data["lossy"]),
        verify=data["verify"],
        tolerance=data["tolerance"],
        seed=data["seed"],
        input_shapes={k: tuple(v) for k, v in data["input_shapes"].items()},
        fold_limit_bytes=data["fold_limit_bytes"],
        external_data=data["external_data"],
        target=data["target"],
        opset=data["opset"],
    )
    if "verify_inputs" in data and "name" in data["verify_inputs"]:
        # A file, by the name it had; in-memory arrays cannot be restored from a digest.
        options.verify_inputs = data["verify_inputs"]["name"]
    return options
