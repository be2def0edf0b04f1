"""Differential fuzzing: random valid graphs keep their ORT outputs through the default
pipeline (verification off, so a wrong rewrite is not silently rolled back). Models are drawn
over opsets 7..18, float32/float16/bfloat16/int8/uint8/int32/int64 (bool inside), symbolic
batch / axis-2 dims (checked at two bindings) and If/Loop subgraphs.

CI runs a small derandomized set; ``python bench/fuzz.py --examples 10000`` is the long run.
"""

from __future__ import annotations

import onnx
from hypothesis import HealthCheck, given, settings

from graphopt_tests.robustness.fuzzgraphs import (
    DTYPES,
    OPSETS,
    check_optimize_preserves,
    models,
)

CI_EXAMPLES = 150


@settings(
    max_examples=CI_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
@given(models(opsets=OPSETS, dtypes=DTYPES, dynamic=("N", "S")))
def test_default_pipeline_keeps_outputs(proto: onnx.ModelProto) -> None:
    check_optimize_preserves(proto)


def test_the_property_catches_a_wrong_rewrite(monkeypatch) -> None:
    """A pass that claims to be exact but turns Add into Sub must fail the property."""
    import numpy as np
    import pytest
    from onnx import TensorProto, helper

    from graphopt_tests.helpers import AddToSubPass, register_for_test

    bias = onnx.numpy_helper.from_array(np.full((1, 2, 1, 1), 0.5, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
        [bias],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    check_optimize_preserves(proto)  # the real pipeline keeps it
    register_for_test(monkeypatch, AddToSubPass)
    with pytest.raises(AssertionError, match="relative error"):
        check_optimize_preserves(proto)
