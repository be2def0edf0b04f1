"""Terminal rendering of a pruning record."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from graphopt.passes.calibration.fidelity import Fidelity
from graphopt.passes.pruning.rendering import pruning_table


def _rendered(fidelities: list[Fidelity]) -> str:
    prune = SimpleNamespace(
        heldout_samples=8,
        calibration="random",
        fidelity_pruned=fidelities,
        fidelity_compensated=[],
        compensation="none",
    )
    console = Console(width=200, record=True)
    console.print(pruning_table(prune))  # type: ignore[arg-type]
    return console.export_text()


def test_an_integer_output_shows_its_share_of_equal_values_not_a_cosine() -> None:
    """Class ids read "mean abs err 17.8, mean cosine 0.8844" beside 55% of them equal."""
    text = _rendered(
        [
            Fidelity("scores", 0.148, 0.0029, 0.9994),
            Fidelity("labels", 0.944, 17.8, 0.8844, equal_share=0.547),
        ]
    )
    labels = next(line for line in text.splitlines() if "labels" in line)
    assert "54.7%" in labels and "0.8844" not in labels and "17.8" not in labels
    scores = next(line for line in text.splitlines() if "scores" in line)
    assert "0.9994" in scores and "equal" in text


def test_float_outputs_alone_get_no_equal_column() -> None:
    text = _rendered([Fidelity("y", 0.01, 0.001, 0.999)])
    assert "equal" not in text and "0.9990" in text
