"""Test models for graphopt, built locally and cached (never committed, never downloaded).

``get(name) -> Path`` builds a model once into ``$GRAPHOPT_CACHE`` (default
``~/.cache/graphopt``) with a JSON sidecar (exporter, opset, versions, inputs, test shapes)
and returns the cached path afterwards. ``python -m graphopt.models list|build|info``
does the same from the shell. Families: ``demo`` (numpy + onnx only), ``torchvision``,
``transformers`` (small seeded configs and MiniLM with real weights), ``ppocr`` (copied from
rapidocr_onnxruntime). torch is only imported when a torch model is built.
"""

from __future__ import annotations

# Importing the family modules registers their entries; import order is `list` order.
from graphopt.models import demo, digits, light, ocr, text, vision  # noqa: F401
from graphopt.models.catalog import (
    ModelSpec,
    build,
    cache_dir,
    get,
    input_shapes,
    missing_requirements,
    names,
    read_sidecar,
    register,
    spec,
)
from graphopt.models.demo import make_demo, write_demo

__all__ = [
    "ModelSpec",
    "build",
    "cache_dir",
    "get",
    "input_shapes",
    "make_demo",
    "missing_requirements",
    "names",
    "read_sidecar",
    "register",
    "spec",
    "write_demo",
]
