"""ONNX's light model zoo copies with their uniform weights replaced by seeded random ones.

The light models (shipped in the onnx wheel) build every weight with ``ConstantOfShape(0.02)``:
all-equal weights make a transposed or mis-broadcast weight give the same numbers, so they
prove little about fusions, and an optimizer's constant-folding size limit decides its node
count (graphopt keeps ConstantOfShape outputs over 1 MiB unfolded by default). Here every
such weight, and every float initializer, becomes a deterministic random initializer scaled
for its role, so that activations stay of order one and the final softmax is not saturated
(a one-hot output would hide errors as well):

- Conv/Gemm weights: He normal, std sqrt(2 / fan_in);
- multiplicative parameters (BatchNormalization scale, the scale of Mul-based BN): U(0.5, 1.5);
- BatchNormalization variance: U(0.5, 1.5) (positive);
- everything else (biases, means, shifts): N(0, 0.1).

The models keep their original IR version (3): the new initializers are also listed as graph
inputs, as IR 3 requires, so graphopt's IR upgrade is exercised as well.

Catalog names: ``light_<name>`` (``python -m graphopt.models build light_resnet50``); only
numpy, onnx and onnxruntime are needed to build them.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.models.catalog import ModelSpec, register, versions

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SEED = 20240611


def light_models() -> list[str]:
    """Names (``resnet50``...) of the light models in the installed onnx."""
    # Stems with a dot are not models of the zoo (e.g. an ``.opt.onnx`` someone wrote there).
    stems = (p.stem.removeprefix("light_") for p in LIGHT_DIR.glob("light_*.onnx"))
    return sorted(stem for stem in stems if "." not in stem)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            users[name].append((node, index))
    return users


def _role(name: str, shape: tuple[int, ...], users: dict) -> tuple[str, int]:
    """("weight", fan_in), ("scale", 0), ("variance", 0) or ("shift", 0)."""
    for node, index in users.get(name, []):
        op = node.op_type
        if op == "Unsqueeze" or (op == "Reshape" and index == 0):
            role = _role(node.output[0], shape, users)
            if role[0] != "shift":
                return role
            continue
        if op == "Conv" and index == 1 and len(shape) >= 2:
            return "weight", int(np.prod(shape[1:]))
        if op == "Gemm" and index == 1 and len(shape) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return "weight", shape[1] if trans_b else shape[0]
        if op == "MatMul" and index == 1 and len(shape) >= 2:
            return "weight", shape[-2]
        if (op == "BatchNormalization" and index == 1) or op == "Mul":
            return "scale", 0
        if op == "BatchNormalization" and index == 4:
            return "variance", 0
    return "shift", 0


def _random(name: str, shape: tuple[int, ...], users: dict, dtype: np.dtype) -> np.ndarray:
    # Seeded by the tensor's name: the same tensor gets the same values in every run.
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    kind, fan_in = _role(name, shape, users)
    # float32 draws: vgg19 alone has 144M weights.
    if kind == "weight":
        values = rng.standard_normal(size=shape, dtype=np.float32)
        values *= np.float32(np.sqrt(2.0 / max(fan_in, 1)))
    elif kind in ("scale", "variance"):
        values = rng.random(size=shape, dtype=np.float32) + np.float32(0.5)
    else:
        values = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(0.1)
    return values.astype(dtype, copy=False)


def randomized_light_model(name: str) -> onnx.ModelProto:
    """The light model ``name`` with seeded random weights (see the module docstring)."""
    model = onnx.load(LIGHT_DIR / f"light_{name}.onnx")
    graph = model.graph
    users = _consumers(graph)
    initializers = {t.name: t for t in graph.initializer}
    new_tensors: list[onnx.TensorProto] = []
    kept_nodes = []
    for node in graph.node:
        shape_name = node.input[0] if node.input else ""
        if node.op_type == "ConstantOfShape" and shape_name in initializers:
            shape = tuple(int(d) for d in numpy_helper.to_array(initializers[shape_name]))
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            dtype = numpy_helper.to_array(value).dtype if value is not None else np.float32
            array = _random(node.output[0], shape, users, dtype)
            new_tensors.append(numpy_helper.from_array(array, node.output[0]))
            continue
        kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    still_used = {name for node in graph.node for name in node.input}
    still_used |= {o.name for o in graph.output}
    tensors = []
    for tensor in graph.initializer:
        if tensor.name not in still_used:
            continue  # a ConstantOfShape shape whose node is gone
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            array = numpy_helper.to_array(tensor)
            tensor = numpy_helper.from_array(
                _random(tensor.name, array.shape, users, array.dtype), tensor.name
            )
        tensors.append(tensor)
    tensors += new_tensors
    del graph.initializer[:]
    graph.initializer.extend(tensors)
    # IR 3: every initializer is also a graph input; drop the vanished ones, add the new.
    names = {t.name for t in tensors}
    inputs = [i for i in graph.input if i.name in names or i.name not in initializers]
    listed = {i.name for i in inputs}
    if model.ir_version < 4:
        for tensor in new_tensors:
            if tensor.name not in listed:
                inputs.append(
                    onnx.helper.make_tensor_value_info(
                        tensor.name, tensor.data_type, list(tensor.dims)
                    )
                )
    del graph.input[:]
    graph.input.extend(inputs)
    # Stale shape annotations of the removed nodes' outputs would clash with nothing, but the
    # new initializers carry their own types: drop duplicates from value_info.
    value_info = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    onnx.checker.check_model(model)
    _calibrate_logits(model)
    return model


# Ops through which scaling the logits' producer by c > 0 scales the logits by c.
_POSITIVELY_HOMOGENEOUS = {
    "Relu",
    "GlobalAveragePool",
    "AveragePool",
    "MaxPool",
    "Reshape",
    "Flatten",
    "Dropout",
    "Identity",
    "Squeeze",
    "Unsqueeze",
}
LOGIT_STD = 2.0


def _calibrate_logits(model: onnx.ModelProto) -> None:
    """Scale the layer that feeds each Softmax so its logits have std LOGIT_STD.

    Random weights in a deep net give logits far too large for a 1000-way softmax; the output
    is then one-hot and insensitive to almost any error. The layer is linear, so scaling its
    weight and bias scales the logits.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    tensors = {t.name: t for t in graph.initializer}
    targets = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        name = node.input[0]
        while name in producers and producers[name].op_type in _POSITIVELY_HOMOGENEOUS:
            name = producers[name].input[0]
        layer = producers.get(name)
        if layer is not None and layer.op_type in ("Gemm", "Conv"):
            params = [tensors[i] for i in layer.input[1:3] if i in tensors]
            targets.append((node.input[0], params))
    if not targets:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t, _ in targets)
    logits = _run_once(probe)
    for (_, params), values in zip(targets, logits, strict=True):
        factor = LOGIT_STD / max(float(np.std(values)), 1e-12)
        for tensor in params:
            scaled = numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))


def _run_once(model: onnx.ModelProto) -> list[np.ndarray]:
    import onnxruntime as ort

    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(SEED)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(size=dims, dtype=np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def build_light(name: str, path: Path) -> dict[str, Any]:
    """Catalog builder: write ``randomized_light_model(name)`` to ``path``."""
    onnx.save(randomized_light_model(name), path)
    return {
        "exporter": "onnx light model zoo, ConstantOfShape weights replaced by seeded random",
        "source": f"onnx/backend/test/data/light/light_{name}.onnx",
        "seed": SEED,
        "versions": versions("onnx"),
    }


# 60M-144M weights each (240-580 MB files; 25-60 s to build on two shared cores, vgg19 peaks
# at 3.5 GB of memory): heavy to build and to optimize.
_SLOW = {"bvlc_alexnet", "vgg19", "zfnet512"}

for _name in light_models():
    register(
        ModelSpec(
            name=f"light_{_name}",
            family="light",
            description=f"onnx light zoo {_name}, seeded random weights",
            builder=partial(build_light, _name),
            slow=_name in _SLOW,
        )
    )
