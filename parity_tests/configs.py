"""The configs the tests share: the book's 124M dict and two tiny GPTConfigs of odd, distinct sizes.

Both test folders import them from here (`from parity_tests.configs import TINY`); the root
conftest.py turns them into the `tiny_cfg` and `book_cfg` fixtures.
"""

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
TINY = GPTConfig(vocab_size=97, context_length=11, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.1, qkv_bias=False)
TINY_BIAS = GPTConfig(vocab_size=131, context_length=5, emb_dim=10, n_heads=5, n_layers=1, drop_rate=0.0, qkv_bias=True)
