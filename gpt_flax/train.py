"""Training pieces: the book's calc_loss_batch, gradients in the canonical layout, AdamW, one step."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from gpt_spec import StateDict, check_adamw, check_targets

from .model import _GPT, check_ids
from .weights import to_canonical


def _checked(model: _GPT, input_batch: Any, target_batch: Any) -> tuple[jax.Array, jax.Array]:
    """Inputs, then targets, then their pairing (the torch twin's order). On the host before a
    jitted step's dispatch, where the values are known; in its trace, shapes and dtypes only."""
    input_batch = check_ids(input_batch, model.cfg)
    target_batch = check_ids(target_batch, model.cfg)
    check_targets(tuple(input_batch.shape), tuple(target_batch.shape))
    return input_batch, target_batch


def calc_loss_batch(input_batch: Any, target_batch: Any, model: _GPT, device: jax.Device | None = None) -> jax.Array:
    """Mean next-token cross-entropy of `model` on (batch, seq_len) inputs and targets.

    The inputs are checked first, then the targets (as the torch twin does); ids of any integer
    dtype, as numpy or JAX arrays or nested lists (what the forward takes), are accepted. With
    `device` (a jax.Device), both are put on it first, as the book's calc_loss_batch moves them."""
    input_batch, target_batch = _checked(model, input_batch, target_batch)
    if device is not None:
        input_batch, target_batch = jax.device_put((input_batch, target_batch), device)
    logits = model(input_batch)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.reshape(-1, logits.shape[-1]), target_batch.reshape(-1)
    ).mean()


@nnx.jit
def _loss_and_grads(model: _GPT, input_batch: jax.Array, target_batch: jax.Array):
    return nnx.value_and_grad(calc_loss_batch, argnums=2)(input_batch, target_batch, model)


def loss_and_grads(model: _GPT, input_batch: Any, target_batch: Any) -> tuple[float, StateDict]:
    """The loss and the gradient of every parameter, as a canonical `{name: numpy array}`."""
    input_batch, target_batch = _checked(model, input_batch, target_batch)
    loss, grads = _loss_and_grads(model, input_batch, target_batch)
    return float(loss), to_canonical(grads)


def adamw(
    model: nnx.Module,
    lr: float = 4e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> nnx.Optimizer:
    """optax.adamw over every parameter, the same update as torch.optim.AdamW with these settings:
    p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p).

    Arguments are checked by gpt_spec.check_adamw (optax checks none), so both twins refuse the
    same ones with the same ValueError."""
    lr, weight_decay, betas, eps = check_adamw(lr, weight_decay, betas, eps)
    return nnx.Optimizer(model, _adamw_tx(lr, weight_decay, *betas, eps), wrt=nnx.Param)


@functools.lru_cache(maxsize=64)
def _adamw_tx(lr: float, weight_decay: float, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """One transformation per setting: it is part of the optimizer's static structure, so a new
    optimizer with the same settings reuses the compiled train step instead of compiling anew."""
    return optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


# Donated: the update writes parameters and optimizer state in place instead of a fresh copy
# of both (2 GB at 124M parameters) per step.
@nnx.jit(donate_argnums=(0, 1))
def _train_step(model: _GPT, optimizer: nnx.Optimizer, input_batch: jax.Array, target_batch: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(calc_loss_batch, argnums=2)(input_batch, target_batch, model)
    optimizer.update(model, grads)
    return loss


def train_step(model: _GPT, optimizer: nnx.Optimizer, input_batch: Any, target_batch: Any) -> float:
    """One optimizer step on one batch (compiled once per shape); returns the loss before the step."""
    input_batch, target_batch = _checked(model, input_batch, target_batch)
    return float(np.asarray(_train_step(model, optimizer, input_batch, target_batch)))
