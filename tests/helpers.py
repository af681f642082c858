"""What several test modules share: where the repository and the test data are, and the devices
this machine has."""

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
