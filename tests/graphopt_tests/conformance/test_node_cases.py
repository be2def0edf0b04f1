"""Every ONNX backend node test that ORT passes must still pass after graphopt.

One test per op family and mode: ``default`` runs the default pipeline on the case model,
``baked`` first turns the case inputs into initializers so constant folding can compute the
whole graph. A failing test lists each regressed case with its symptom and the pass found
responsible (see :func:`graphopt_tests.conformance.cases.blame`). The counts of all families are
printed at the end of the run by this folder's conftest.
"""

from __future__ import annotations

import pytest

from graphopt_tests.conformance.cases import families

# Constant folding evaluates the cases' deliberately odd inputs (log(0), NaN) with numpy.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FAMILIES = families()
MODES = ("default", "baked")


def test_cases_were_generated() -> None:
    # onnx 1.23 ships ~1,900 node cases in ~200 op families; far fewer means generation broke.
    assert sum(len(cases) for cases in FAMILIES.values()) > 1000
    assert len(FAMILIES) > 150


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_node_cases(family: str, mode: str, record_property) -> None:
    from graphopt_tests.conformance.cases import run_family

    result = run_family(family, FAMILIES[family], mode)
    record_property("conformance", result.as_dict())
    if result.regressions:
        lines = "\n".join(f"  {r.line()}" for r in result.regressions)
        pytest.fail(
            f"{len(result.regressions)} of {result.checked} {family} cases that pass in ORT "
            f"regress after graphopt ({mode}):\n{lines}",
            pytrace=False,
        )
    if result.passing_before == 0:
        reasons = "; ".join(f"{n}x {r}" for r, n in result.not_before.items())
        pytest.skip(f"ORT passes none of the {result.cases} {family} cases before: {reasons}")
    assert result.passing_after == result.checked
