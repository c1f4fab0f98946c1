"""Every example configuration under deploy/examples is valid (pure validation: no peer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.kernel.settings import load_config

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "deploy" / "examples").glob("*.yaml"))


def test_there_are_examples():
    """The examples folder holds the documented configurations."""
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "production.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    """Each example loads, and every rule forwards to configured destinations."""
    config = load_config(path)
    for rule in config.rules:
        assert set(rule.forward) <= set(config.destinations)
