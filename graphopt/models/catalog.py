"""The model catalog: names → builders, and the on-disk cache they fill.

A builder writes one ``.onnx`` file into a scratch folder and returns what it knows about
it (exporter, opset, library versions, test input shapes). ``get`` runs the builder once,
saves the model atomically into ``$GRAPHOPT_CACHE`` (default ``~/.cache/graphopt``) next to
a small JSON sidecar, and afterwards returns the cached path. A model past protobuf's 2 GB
(the exporter then writes external data) is cached as ``NAME.onnx`` plus one data file
beside it (``NAME.onnx.data``, ':' spelt '_'). Cached files are never
committed; deleting the cache folder is always safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

# Bump when a builder changes what it produces: stale cache entries are rebuilt.
CACHE_FORMAT = 1

# mkstemp creates 0600 files; cached models are ordinary readable files.
_FILE_MODE = 0o644

Builder = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry."""

    name: str
    family: str
    description: str
    builder: Builder
    # Extras that must be importable to build (import names, e.g. "torch").
    requires: tuple[str, ...] = ()
    # Heavy to build or to optimize (tests put it under the ``slow`` marker).
    slow: bool = False
    # Anything else the builder wants to pass on (e.g. torchvision constructor name).
    extra: dict[str, Any] = field(default_factory=dict)


_CATALOG: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _CATALOG:
        raise ValueError(f"model {spec.name!r} registered twice")
    _CATALOG[spec.name] = spec
    return spec


def names(family: str | None = None) -> list[str]:
    """Catalog names, in registration order (optionally one family only)."""
    return [n for n, s in _CATALOG.items() if family is None or s.family == family]


def spec(name: str) -> ModelSpec:
    try:
        return _CATALOG[name]
    except KeyError:
        known = ", ".join(_CATALOG)
        raise KeyError(f"unknown model {name!r}; known: {known}") from None


def missing_requirements(name: str) -> list[str]:
    """Import names the builder needs that are not installed (found without importing)."""
    from importlib.util import find_spec

    return [req for req in spec(name).requires if find_spec(req) is None]


def cache_dir() -> Path:
    """``$GRAPHOPT_CACHE`` or ``~/.cache/graphopt``, created on demand."""
    root = os.environ.get("GRAPHOPT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "graphopt"
    )
    path = Path(root) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar written next to a built model."""
    return json.loads(sidecar_path(Path(model_path)).read_text())


def input_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes to run/verify ``name`` with (builds the model if needed)."""
    info = read_sidecar(get(name))
    return {k: tuple(v) for k, v in info.get("test_shapes", {}).items()}


def get(name: str, *, rebuild: bool = False) -> Path:
    """Path of the cached model ``name``, building it first when missing or stale."""
    entry = spec(name)
    target = cache_dir() / f"{name}.onnx"
    with _lock(target):
        if not rebuild and _cached_ok(target):
            return target
        _build_into(entry, target)
    return target


def build(name: str, output: str | os.PathLike | None = None, *, rebuild: bool = False) -> Path:
    """Build ``name`` (through the cache) and copy it to ``output`` when given."""
    cached = get(name, rebuild=rebuild)
    if output is None:
        return cached
    target = Path(os.fspath(output))
    if target.is_dir():
        target = target / cached.name
    data = _external_data(cached)
    if data is not None:
        # Under its own name, which the model file records; copied first, so the model file
        # never appears without it.
        _atomic_copy(data, target.with_name(data.name))
    _atomic_copy(cached, target)
    _atomic_copy(sidecar_path(cached), sidecar_path(target))
    return target


def _external_data(model_path: Path) -> Path | None:
    """The cached model's external-data file, when its sidecar names one."""
    location = read_sidecar(model_path).get("external_data")
    return None if location is None else model_path.with_name(location)


def _cached_ok(target: Path) -> bool:
    side = sidecar_path(target)
    if not (target.is_file() and side.is_file()):
        return False
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    if info.get("cache_format") != CACHE_FORMAT or info.get("size") != target.stat().st_size:
        return False
    if "external_data" in info:
        data = target.with_name(info["external_data"])
        return data.is_file() and data.stat().st_size == info.get("external_size")
    return True


def _build_into(entry: ModelSpec, target: Path) -> None:
    missing = missing_requirements(entry.name)
    if missing:
        raise ModuleNotFoundError(
            f"model {entry.name!r} needs {', '.join(missing)} (pip install 'graphopt[torch]')"
        )
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".build", dir=target.parent))
    try:
        raw = scratch / "model.onnx"
        start = time.perf_counter()
        info = entry.builder(raw)
        seconds = time.perf_counter() - start
        location = None
        if any(p.name != raw.name for p in scratch.iterdir()):
            # graphopt's loader refuses locations with a ':' (a drive or a Windows stream),
            # which entry names like ``torchvision:NAME@SIDE`` have.
            location = re.sub(r"[^\w.@-]", "_", target.name) + ".data"
            raw = _into_one_data_file(raw, location)
            if not raw.with_name(location).is_file():  # every tensor small enough to inline
                location = None
        proto = onnx.load(raw, load_external_data=False)
        onnx.checker.check_model(str(raw))
        info = {
            "name": entry.name,
            "family": entry.family,
            "description": entry.description,
            **info,
            "opset": _default_opset(proto),
            "ir_version": proto.ir_version,
            "inputs": _io_info(proto.graph, inputs=True),
            "outputs": _io_info(proto.graph, inputs=False),
            "nodes": len(proto.graph.node),
            "build_seconds": round(seconds, 2),
            "versions": {**_versions(("onnx", "onnxruntime")), **info.get("versions", {})},
            "cache_format": CACHE_FORMAT,
        }
        info.setdefault("test_shapes", _default_test_shapes(info["inputs"]))
        # The scratch folder sits beside the target, so this rename is atomic; the builder's
        # bytes are kept as they are (no re-serialization that could touch the graph), except
        # where its external data had to be gathered under the entry's name.
        if location is not None:
            # The data file first: the sidecar is written last, so a crash in between leaves
            # an entry that _cached_ok rejects and the next get() rebuilds.
            data = target.with_name(location)
            os.chmod(raw.with_name(location), _FILE_MODE)
            os.replace(raw.with_name(location), data)
            info["external_data"], info["external_size"] = location, data.stat().st_size
        os.replace(raw, target)
        info["size"] = target.stat().st_size
        _atomic_write_text(sidecar_path(target), json.dumps(info, indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _into_one_data_file(raw: Path, location: str) -> Path:
    """Re-save a builder's model with all its external tensors in one file ``location``
    (the builder names its data files after its scratch file, not after the entry)."""
    proto = onnx.load(raw)
    gathered = raw.with_name("gathered.onnx")
    onnx.save_model(
        proto,
        gathered,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    return gathered


def _default_opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _io_info(graph: onnx.GraphProto, inputs: bool) -> list[dict[str, Any]]:
    initializers = {t.name for t in graph.initializer}
    values = graph.input if inputs else graph.output
    result = []
    for value in values:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str | None] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            else:
                dims.append(dim.dim_param or None)
        result.append(
            {
                "name": value.name,
                "dtype": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(),
                "shape": dims,
            }
        )
    return result


def _default_test_shapes(inputs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Batch 1 for symbolic leading dims; only filled when every other dim is static."""
    shapes: dict[str, list[int]] = {}
    for value in inputs:
        dims = value["shape"]
        concrete = [d if isinstance(d, int) else 1 if i == 0 else None for i, d in enumerate(dims)]
        if None in concrete:
            return {}
        shapes[value["name"]] = concrete
    return shapes


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (absent ones left out), for sidecars."""
    return _versions(packages)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_copy(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """Serialize builds of one model across processes (pytest-xdist workers)."""
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
