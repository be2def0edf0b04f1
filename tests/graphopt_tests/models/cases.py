"""Catalog names as pytest params, with the markers and skips each needs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphopt.models as gm
from graphopt.inputs import make_inputs
from graphopt_tests.helpers import import_or_skip

TORCH_REASON = "needs torch (pip install 'graphopt[torch]')"


def model_param(name: str):
    """``name`` marked ``torch`` when built with torch and ``slow`` when heavy."""
    entry = gm.spec(name)
    marks = []
    if "torch" in entry.requires:
        marks.append(pytest.mark.torch)
    if entry.slow:
        marks.append(pytest.mark.slow)
    return pytest.param(name, marks=marks, id=name)


def require(name: str) -> None:
    """Skip with a printed reason when a builder's requirements are missing."""
    entry = gm.spec(name)
    if "torch" in entry.requires:
        import_or_skip("torch", reason=TORCH_REASON)
    missing = gm.missing_requirements(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")


# graphopt.inputs draws integer inputs from [0, 10) except names matching "mask"; BERT's
# token_type_ids index a 2-row embedding, so ORT cannot even run the original model on them.
TYPE_IDS_REASON = (
    "graphopt.inputs.make_inputs draws token_type_ids from [0, 10) but type_vocab_size is 2, "
    "so ORT cannot run the original model (fix in graphopt/inputs.py: treat token_type/segment "
    "ids like masks)"
)


def generated_type_ids_out_of_range(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> bool:
    """True while make_inputs still feeds token_type_ids outside {0, 1}."""
    feeds = make_inputs(model, shapes, seed=0)
    ids = feeds.get("token_type_ids")
    return ids is not None and int(ids.max()) > 1


def realistic_feeds(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """make_inputs, with token_type_ids zeroed as a tokenizer does for single sentences."""
    feeds = make_inputs(model, shapes, seed=0)
    if "token_type_ids" in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["token_type_ids"])
    return feeds
