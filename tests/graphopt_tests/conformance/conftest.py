"""Registers the conformance summary plugin (unless tests/conftest.py already did)."""

from __future__ import annotations

from graphopt_tests.conformance import summary


def pytest_configure(config) -> None:
    if not config.pluginmanager.has_plugin(summary.__name__):
        config.pluginmanager.register(summary, summary.__name__)
