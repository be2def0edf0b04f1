"""The exactness target: the default exact pipeline keeps every output within 1e-4 (relative
to the output's largest magnitude) and never changes a shape, on real and exported models.

Run ``pytest tests/graphopt_tests/models/test_exactness.py -m slow -rA`` for the full table.
"""

from __future__ import annotations

import pytest

import graphopt.models as gm
from graphopt.io import load
from graphopt_tests.models.cases import (
    TYPE_IDS_REASON,
    generated_type_ids_out_of_range,
    model_param,
    require,
)
from graphopt_tests.models.exactness import TOLERANCE, check_exactness

# Smoke subset (fast): the demo, one small torchvision model and the PP-OCR classifier.
SMOKE = ["demo", "squeezenet1_0", "ppocr_cls"]
TARGET = [
    "minilm",
    "ppocr_det",
    "ppocr_rec",
    "ppocr_cls",
    *gm.names("torchvision"),
    # Beyond the target list, for information: the small transformers configs.
    *(
        n
        for n in gm.names("transformers")
        if n != "minilm" and not gm.spec(n).extra.get("bench_only")
    ),
]


def _param(name: str):
    param = model_param(name)
    if name in SMOKE:
        return pytest.param(name, marks=[m for m in param.marks if m.name != "slow"], id=name)
    return pytest.param(name, marks=[*param.marks, pytest.mark.slow], id=name)


@pytest.mark.parametrize("name", [_param(n) for n in dict.fromkeys([*SMOKE, *TARGET])])
def test_default_pipeline_is_exact(name, record_property):
    require(name)
    if generated_type_ids_out_of_range(load(gm.get(name)).model, gm.input_shapes(name)):
        pytest.xfail(TYPE_IDS_REASON)
    result = check_exactness(name)
    record_property("exactness_row", result.row())
    print(result.row())
    assert not result.problems, f"{name}: {result.problems}"
    assert result.worst_rel <= TOLERANCE
