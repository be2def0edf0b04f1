"""Project-wide pytest set-up."""

# Registered here (not only in tests/graphopt_tests/conformance/conftest.py) so that the
# conformance counts are printed by the controller under pytest-xdist too.
pytest_plugins = ["graphopt_tests.conformance.summary"]
