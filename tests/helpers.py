"""What several test modules share: where the repository and the test data are, and the devices
this machine has."""

import collections
import contextlib
import logging
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def _jax_platforms() -> list[str]:
    import jax

    present = []
    for platform in ("cpu", "gpu", "tpu"):
        try:
            jax.devices(platform)
        except RuntimeError:
            continue
        present.append(platform)
    return present


def platforms() -> list[Any]:
    """The JAX platforms this machine has, as parameters: a GPU or TPU case exists only where
    one does, marked `gpu` or `tpu` (so `-m gpu` selects them)."""
    return [pytest.param(p, marks=getattr(pytest.mark, p)) if p != "cpu" else p for p in _jax_platforms()]


def torch_devices() -> list[Any]:
    """ "cpu", and "cuda" (marked `gpu`) where torch sees a CUDA device."""
    import torch

    return ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def shell_lines(page: Path) -> list[str]:
    """The commands of a Markdown page's ```sh blocks, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def simulated_device_commands() -> list[list[str]]:
    """The docs' `gpt-parity` lines that simulate CPU devices (--cpu-devices), as argument lists
    with examples/ resolved: JAX fixes its device count when it starts, so these run in the
    8-device process of tests/parity_tests/sharded_cases.py rather than one process each."""
    lines = [line for page in sorted((ROOT / "docs").glob("*.md")) for line in shell_lines(page)]
    return [
        shlex.split(line.replace("examples/", str(ROOT / "examples") + "/"))[1:]
        for line in lines
        if line.startswith("gpt-parity ") and "--cpu-devices" in line
    ]


@contextlib.contextmanager
def compilations() -> Iterator[collections.Counter[str]]:
    """How many XLA programs each jitted function compiled inside the block, by its name: the
    "Compiling jit(NAME)" records that jax.log_compiles() turns on (a public switch)."""
    import jax

    counts: collections.Counter[str] = collections.Counter()

    class _Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
            if m:
                counts[m.group(1)] += 1

    handler, logger = _Count(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield counts
    finally:
        logger.removeHandler(handler)


def hf_gpt2(
    vocab: int, positions: int, width: int, heads: int, layers: int, tied: bool = True, *, seed: int = 0, **config
):
    """transformers' GPT2LMHeadModel with GPT-2's init under `torch.manual_seed(seed)`, in eval mode;
    `config`: more GPT2Config fields."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_head=heads,
        n_layer=layers,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        **config,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2's init leaves LayerNorm at 1/0 and biases at 0: move them
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model
