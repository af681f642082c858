"""Fixtures shared by tests/ (each package alone) and parity_tests/ (the twins against each other)."""

import pytest

from gpt_spec import GPTConfig

# The book's dict, exactly as printed in the seeds.
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

# Odd, distinct sizes so that a swapped axis cannot hide (vocab 97, context 11, emb 24, 3 heads).
TINY = GPTConfig(vocab_size=97, context_length=11, emb_dim=24, n_heads=3, n_layers=2,
                 drop_rate=0.1, qkv_bias=False)
TINY_BIAS = GPTConfig(vocab_size=131, context_length=5, emb_dim=10, n_heads=5, n_layers=1,
                      drop_rate=0.0, qkv_bias=True)


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return TINY


@pytest.fixture
def book_cfg() -> dict:
    return dict(GPT_CONFIG_124M)


# Hypothesis: 8 examples per property in the default run (400 each passed in a longer hunt), keeping the suite within its
# time budget; `HYPOTHESIS_PROFILE=thorough` for a long hunt. No deadline: the first example of a
# shape includes XLA compilation.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("default", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
