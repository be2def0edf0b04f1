"""The default pipeline on ONNX's nine light zoo models, with seeded random weights.

graphopt's own verification must pass without rolling anything back, and, checked here
independently, on two other random inputs every output stays within 1e-4 (relative to the
output's largest magnitude) of the original, with the same names and shapes.
"""

from __future__ import annotations

import pytest

from graphopt import io
from graphopt.analysis.stats import count_nodes
from graphopt.api import OptimizeOptions, optimize
from graphopt.inputs import make_inputs
from graphopt.output_errors import compare
from graphopt.sessions import make_session
from graphopt_tests.conformance.light import light_models, randomized_light_model

TOLERANCE = 1e-4
INPUT_SEEDS = (11, 12)
# All nine run by default: the biggest (vgg19, 144M weights) takes about 20 s on two cores.
LIGHT_MODELS = light_models()


def test_light_models_are_shipped() -> None:
    assert len(LIGHT_MODELS) >= 9, f"onnx ships only {LIGHT_MODELS} in backend/test/data/light"


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_random_weights(name: str, record_property) -> None:
    # Bytes, so that graphopt's model and the reference share no tensor with each other.
    data = randomized_light_model(name).SerializeToString()
    original = io.load(data).model
    nodes_before = count_nodes(original)

    result = optimize(data, None, OptimizeOptions())
    report = result.report
    record_property(
        "light_model",
        {
            "model": name,
            "nodes_before": nodes_before,
            "nodes_after": report.nodes_after,
            "rolled_back": list(report.rolled_back),
            "worst_rel": report.verification.worst_rel if report.verification else None,
        },
    )
    assert report.verification is not None, report.verification_skipped
    assert report.verification.ok, report.verification.reason
    assert not report.rolled_back, f"passes rolled back: {report.rolled_back}"
    assert [v.name for v in result.model.graph.outputs] == [v.name for v in original.graph.outputs]

    before = make_session(original)
    after = make_session(result.model)
    names = [o.name for o in before.get_outputs()]
    for seed in INPUT_SEEDS:
        feeds = make_inputs(original, seed=seed)
        for out, ref, got in zip(
            names, before.run(names, feeds), after.run(names, feeds), strict=True
        ):
            error = compare(out, ref, got)
            assert error.shape_ok, f"{name} seed {seed} {out}: {error.detail}"
            assert error.max_rel <= TOLERANCE, (
                f"{name} seed {seed} {out}: relative error {error.max_rel:.3g}"
            )
    assert report.nodes_after <= nodes_before
