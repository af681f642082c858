"""Canonical state dict <-> the PyTorch twin: the canonical names are this twin's own, so no renames."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gpt_spec import StateDict, check_state_dict


def state_dict(model: torch.nn.Module) -> StateDict:
    """The model's parameters as the canonical `{name: numpy array}` (copies, on the host)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_state_dict(model: torch.nn.Module, sd: Mapping[str, object]) -> None:
    """Copy a canonical state dict into `model`, all or nothing.

    Unlike `nn.Module.load_state_dict`, which copies the tensors that fit before it reports a
    size mismatch, every key, shape and dtype is checked first; a bad dict raises ValueError
    and leaves the model untouched. Values are cast to each parameter's dtype and device.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arrays = check_state_dict(expected, sd, type(model).__name__)
    # np.require copies read-only views (e.g. of JAX arrays), which torch.from_numpy warns about.
    tensors = {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in arrays.items()}
    model.load_state_dict(tensors, strict=True)
