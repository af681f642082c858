"""Fixtures shared by tests/ (each package alone) and parity_tests/ (the twins against each other),
and the hypothesis profiles every run loads. The configs themselves live in parity_tests/configs.py."""

import os

import pytest
from hypothesis import HealthCheck, settings

from gpt_spec import GPTConfig
from parity_tests.configs import GPT_CONFIG_124M, TINY

# The one place the properties' example count is set (tests/twins/test_fuzz.py keeps its own profiles):
# "default" is small, keeping the suite within its time budget; `HYPOTHESIS_PROFILE=thorough` is a
# long hunt. No deadline: the first example of a shape includes XLA compilation.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=8, deadline=None, suppress_health_check=_HEALTH)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return TINY


@pytest.fixture
def book_cfg() -> dict:
    return dict(GPT_CONFIG_124M)


_NOT_CORE = ("slow", "subprocess", "zoo", "gpu", "tpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`core` is every test that none of the other markers names."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in _NOT_CORE):
            item.add_marker(pytest.mark.core)
