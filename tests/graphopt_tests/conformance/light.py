"""The light models with seeded random weights, for the conformance tests.

The generator lives in the model catalog (``graphopt.models.light``: catalog names
``light_<name>``) so that the benchmarks run the same models as these tests.
"""

from __future__ import annotations

from graphopt.models.light import LIGHT_DIR, SEED, light_models, randomized_light_model

__all__ = ["LIGHT_DIR", "SEED", "light_models", "randomized_light_model"]
