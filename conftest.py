"""Fixtures shared by tests/ (each package alone) and parity_tests/ (the twins against each other),
and the hypothesis profiles every run loads. The configs themselves live in parity_tests/configs.py."""

import os
import shutil
import tempfile

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


# XLA's compilations shared by every process of the run (xdist workers, the CLI subprocesses):
# most of the suite's time is compiling the same small programs again in each process. A cache of
# this run's own (set before jax is imported; workers and subprocesses inherit it), removed at its
# end; a JAX_COMPILATION_CACHE_DIR already set is used as it is and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt-twins-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker computes on one thread (torch, and XLA's Eigen pool): workers as many
    as the cores, each with a pool as large as the machine, slow each other down (docs/design-notes.md)."""
    workers = getattr(config.option, "numprocesses", None)
    if "PYTEST_XDIST_WORKER" in os.environ or not isinstance(workers, int) or workers < 2:
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return TINY


@pytest.fixture
def book_cfg() -> dict:
    return dict(GPT_CONFIG_124M)


_NOT_CORE = ("slow", "subprocess", "zoo", "gpu", "tpu", "distributed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`core` is every test that none of the other markers names. The modules that hold the others
    (the long ones) are handed to the xdist workers first, so that the two end together rather
    than one waiting on the other's last long module."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in _NOT_CORE):
            item.add_marker(pytest.mark.core)
    items.sort(key=lambda item: item.get_closest_marker("core") is not None)
