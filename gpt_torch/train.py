"""Training pieces: the book's calc_loss_batch, gradients in the canonical layout, AdamW, one step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt_spec import StateDict, check_adamw, check_targets

from .model import _GPT, check_ids


def calc_loss_batch(
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    model: _GPT,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on (batch, seq_len) inputs and targets.

    The inputs are checked first, then the targets (as the Flax twin does); ids of any integer
    dtype are accepted. With `device`, both are moved to it first, as the book's calc_loss_batch
    moves them."""
    input_batch = check_ids(input_batch, model.cfg)
    target_batch = check_ids(target_batch, model.cfg)
    check_targets(tuple(input_batch.shape), tuple(target_batch.shape))
    if device is not None:
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    # cross_entropy takes int64 (or uint8) class indices only.
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten().long())


def loss_and_grads(model: _GPT, input_batch: torch.Tensor, target_batch: torch.Tensor) -> tuple[float, StateDict]:
    """The loss and the gradient of every parameter, as a canonical `{name: numpy array}`.

    A parameter the loss does not reach gets no `.grad` from autograd: its gradient is zero, as the
    Flax twin's value_and_grad gives it."""
    model.zero_grad(set_to_none=True)
    loss = calc_loss_batch(input_batch, target_batch, model)
    loss.backward()
    grads = {
        name: (torch.zeros_like(p) if p.grad is None else p.grad).detach().cpu().numpy().copy()
        for name, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def adamw(
    model: torch.nn.Module,
    lr: float = 4e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over every parameter, the book's chapter-5 settings by default (the Flax twin's adamw).

    Arguments are checked by gpt_spec.check_adamw, before torch.optim's own checks, so both twins
    refuse the same ones with the same ValueError."""
    lr, weight_decay, betas, eps = check_adamw(lr, weight_decay, betas, eps)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def train_step(
    model: _GPT, optimizer: torch.optim.Optimizer, input_batch: torch.Tensor, target_batch: torch.Tensor
) -> float:
    """One optimizer step on one batch; returns the loss before the step."""
    optimizer.zero_grad()
    loss = calc_loss_batch(input_batch, target_batch, model)
    loss.backward()
    optimizer.step()
    return loss.item()
