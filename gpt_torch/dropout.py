"""Parity dropout: masks both twins draw alike (gpt_spec.randomness), for training runs that are the
same run in torch and in Flax. The default stays torch's own nn.Dropout, as the book's."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt_spec.randomness import (
    KEEP_BITS,
    MASK32,
    MIX_M1,
    MIX_M2,
    call_key,
    check_elements,
    check_seed,
    drop_threshold,
    keep_scale,
)


class DropoutCounter:
    """The count of parity-dropout calls a model's sites share (its value: the next call's)."""

    def __init__(self, value: int = 0):
        self.value = value


def _mix(x: torch.Tensor) -> torch.Tensor:
    """gpt_spec.randomness's mix in int64 holding 32-bit words: each product is masked back to its
    low 32 bits (an int64 product that wraps keeps them), every shift is of a non-negative word."""
    x = x ^ (x >> 16)
    x = (x * MIX_M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_M2) & MASK32
    return x ^ (x >> 16)


class ParityDropout(nn.Module):
    """Dropout at rate `p` whose mask is gpt_spec.randomness.keep_mask(shape, p, seed, counter): in
    training, each call takes the shared counter's next value; in eval, the identity."""

    def __init__(self, p: float, counter: DropoutCounter, seed: int):
        super().__init__()
        drop_threshold(p)
        self.p = p
        self.counter = counter
        self.seed = check_seed(seed)
        # (dim, index, count): this input is part `index` of `count` equal parts of the whole along
        # `dim` (a data-parallel rank's rows, a tensor-parallel rank's heads). Masks are drawn by
        # the element's index in the whole, so a distributed run draws the one-device run's masks.
        self.shards: tuple[tuple[int, int, int], ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        count = self.counter.value
        self.counter.value = count + 1
        key = int(call_key(self.seed, count))
        h = global_index(tuple(x.shape), self.shards, x.device)
        h = _mix((_mix(h ^ key) + key) & MASK32)
        keep = (h >> (32 - KEEP_BITS)) >= drop_threshold(self.p)
        scale = torch.tensor(keep_scale(self.p), dtype=x.dtype, device=x.device)
        return torch.where(keep.view(x.shape), x * scale, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}"


def global_index(shape: tuple[int, ...], shards: tuple[tuple[int, int, int], ...], device) -> torch.Tensor:
    """The row-major index, in the whole tensor, of each element of a part of shape `shape`
    (flat, int64); with no shards, 0..numel-1."""
    whole = list(shape)
    offset = [0] * len(shape)
    for dim, index, count in shards:
        whole[dim] = shape[dim] * count
        offset[dim] = shape[dim] * index
    check_elements(math.prod(whole))
    if not shards:
        return torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    h = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(shape))):
        i = torch.arange(offset[dim], offset[dim] + shape[dim], dtype=torch.int64, device=device)
        h = h + (i * stride).view([-1] + [1] * (len(shape) - 1 - dim))
        stride *= whole[dim]
    return h.flatten()


def use_parity_dropout(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every dropout of `model` (nn.Dropout, or ParityDropout from an earlier call) with a
    ParityDropout of the same rate, all sharing one counter from 0 (`model.dropout_counter`).
    The Flax twin's use_parity_dropout with the same seed draws the same masks. Returns `model`."""
    seed = check_seed(seed)
    counter = DropoutCounter()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout | ParityDropout):
                parity = ParityDropout(child.p, counter, seed)
                parity.train(child.training)
                setattr(module, name, parity)
    model.dropout_counter = counter  # type: ignore[assignment]  # a plain attribute, not a submodule
    return model


__all__ = ["DropoutCounter", "ParityDropout", "use_parity_dropout"]
