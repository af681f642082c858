"""Training: the book's calc_loss_batch, gradients in the canonical layout, AdamW, one step; and
chapter 5's calc_loss_loader, evaluate_model, generate_and_print_sample and train_model_simple."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt_spec import StateDict
from gpt_spec.checks import bad_device, check_adamw, check_targets, check_trainable, foreign_optimizer, stale_optimizer
from gpt_spec.formats.train_state import AdamWSettings, TrainState
from gpt_spec.layout import in_model_order
from gpt_spec.training import Log, OnEvent, check_dropout_counter, check_num_batches, check_schedule, eval_event

from .generate import generate_text_simple, text_to_token_ids, token_ids_to_text
from .model import _GPT, check_ids, commit
from .weights import canonical_name, dtype_name, load_state_dict, state_dict, to_canonical


def _checked(model: _GPT, input_batch: Any, target_batch: Any) -> tuple[jax.Array, jax.Array]:
    """Inputs, then targets, then their pairing (the torch twin's order). On the host before a
    jitted step's dispatch, where the values are known; in its trace, shapes and dtypes only."""
    input_batch = check_ids(input_batch, model.cfg)
    target_batch = check_ids(target_batch, model.cfg)
    check_targets(tuple(input_batch.shape), tuple(target_batch.shape))
    return input_batch, target_batch


def check_device(device: object) -> jax.Device | None:
    """A `device` argument as JAX takes it: None, a jax.Device or a name ("cpu", "gpu:1": a platform
    and an index), of a device this machine has (refused alike in the torch twin)."""
    if device is None or isinstance(device, jax.Device):
        return device
    if not isinstance(device, str):
        raise bad_device(device, known=False)
    platform, _, index = device.partition(":")
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, ValueError, IndexError):
        raise bad_device(device, known=True) from None


def _on(device: object, input_batch: jax.Array, target_batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A checked batch put on `device` (checked by check_device; None leaves it where it is), as
    the book's functions move each batch to their `device`."""
    device = check_device(device)
    if device is None:
        return input_batch, target_batch
    return jax.device_put((input_batch, target_batch), device)


def calc_loss_batch(
    input_batch: Any, target_batch: Any, model: _GPT, device: jax.Device | str | None = None
) -> jax.Array:
    """Mean next-token cross-entropy of `model` on (batch, seq_len) inputs and targets.

    The inputs are checked first, then the targets (as the torch twin does); ids of any integer
    dtype, as numpy or JAX arrays or nested lists (what the forward takes), are accepted. With
    `device` (a jax.Device), both are put on it first, as the book's calc_loss_batch moves them."""
    input_batch, target_batch = _on(device, *_checked(model, input_batch, target_batch))
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
    commit(model)
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

    Arguments are checked by gpt_spec.checks.check_adamw (optax checks none), so both twins refuse the
    same ones with the same ValueError."""
    lr, weight_decay, betas, eps = check_adamw(lr, weight_decay, betas, eps)
    check_trainable(dtype_name(model))
    optimizer = nnx.Optimizer(model, _adamw_tx(lr, weight_decay, *betas, eps), wrt=nnx.Param)
    _MADE_FOR[optimizer] = (weakref.ref(model), dtype_name(model))
    _SETTINGS[optimizer] = AdamWSettings(lr, weight_decay, betas, eps)
    return optimizer


# The model, and its parameters' dtype, each optimizer of adamw() was made for. nnx.Optimizer does
# not keep its model (its state merely has the same structure, so another model of the same
# config would train on it), and it is kept out of the optimizer itself, whose attributes are part
# of the graph every jitted step is compiled for.
_MADE_FOR: weakref.WeakKeyDictionary[nnx.Optimizer, tuple[weakref.ref, str]] = weakref.WeakKeyDictionary()
# Each adamw() optimizer's settings, which its optax transformation keeps only inside closures.
_SETTINGS: weakref.WeakKeyDictionary[nnx.Optimizer, AdamWSettings] = weakref.WeakKeyDictionary()


def check_optimizer(model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    """Refuse an optimizer adamw() made for another model (its state would train this one as if it
    were that one's), or made before a cast, as the torch twin refuses them."""
    made = _MADE_FOR.get(optimizer)
    if made is None:
        return  # not adamw()'s: nothing recorded to check against
    owner, made_for = made
    if owner() is not model:
        raise foreign_optimizer()
    if made_for != dtype_name(model):
        raise stale_optimizer(made_for, dtype_name(model))


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
    check_optimizer(model, optimizer)
    input_batch, target_batch = _checked(model, input_batch, target_batch)
    commit(model, optimizer)
    return float(np.asarray(_train_step(model, optimizer, input_batch, target_batch)))


def _adam_state(optimizer: nnx.Optimizer) -> optax.ScaleByAdamState:
    """The ScaleByAdamState(count, mu, nu) in an adamw() optimizer's chain state."""
    for part in jax.tree_util.tree_leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(part, optax.ScaleByAdamState):
            return part
    raise ValueError("the optimizer holds no Adam state: make it with adamw(model)")


def _settings(optimizer: nnx.Optimizer) -> AdamWSettings:
    if optimizer not in _SETTINGS:
        raise ValueError("a training state needs an optimizer made by adamw(model), whose settings it records")
    return _SETTINGS[optimizer]


def train_state(
    model: _GPT,
    optimizer: nnx.Optimizer,
    *,
    run: dict[str, Any] | None = None,
    arrays: dict[str, Any] | None = None,
) -> TrainState:
    """The run between two steps in the canonical layout (gpt_spec.formats.train_state): the weights,
    optax's ScaleByAdamState `count`, `mu` and `nu` under canonical names and layouts (the kernels
    transposed, as the weights are), the settings, the parity-dropout counter; `run` and `arrays`
    are the caller's own (the torch twin's train_state, for this twin)."""
    check_optimizer(model, optimizer)
    settings = _settings(optimizer)
    adam = _adam_state(optimizer)
    counter = getattr(model, "dropout_counter", None)
    weights = state_dict(model)
    order = in_model_order(weights, model.cfg)  # the torch twin's (NNX's own is sorted by path)
    mu, nu = to_canonical(adam.mu), to_canonical(adam.nu)
    return TrainState(
        model.cfg,
        {n: weights[n] for n in order},
        {n: mu[n] for n in order},
        {n: nu[n] for n in order},
        int(np.asarray(adam.count[...])),
        settings,
        None if counter is None else int(np.asarray(counter[...])),
        dict(run or {}),
        dict(arrays or {}),
    )


def load_train_state(model: _GPT, optimizer: nnx.Optimizer, state: TrainState) -> None:
    """Continue the run `state` holds: the weights into `model`, the count and moments into the
    optimizer's ScaleByAdamState (transposed where the weights are), the parity-dropout counter. All
    or nothing, refused alike in the torch twin."""
    check_optimizer(model, optimizer)
    state.check_fits(model.cfg, _settings(optimizer))
    counter = getattr(model, "dropout_counter", None)
    check_dropout_counter(state.dropout_counter, counter is not None)
    adam = _adam_state(optimizer)
    updates = []
    for moments, tree in ((state.exp_avg, adam.mu), (state.exp_avg_sq, adam.nu)):
        for path, var in nnx.to_flat_state(tree):
            name, transposed = canonical_name(path)
            moment = np.asarray(moments[name])
            updates.append((var, jnp.asarray(moment.T if transposed else moment, dtype=var.dtype)))
    load_state_dict(model, state.weights)  # checks every tensor before it changes one
    for var, value in updates:
        var[...] = value
    adam.count[...] = jnp.asarray(state.step, dtype=adam.count.dtype)
    optimizer.step[...] = jnp.asarray(state.step, dtype=optimizer.step.dtype)
    if counter is not None:
        counter[...] = jnp.asarray(state.dropout_counter, dtype=counter.dtype)


# Chapter 5: the book's loss over a loader, evaluation and training loop.


@nnx.jit
def _loss_batch(model: _GPT, input_batch: jax.Array, target_batch: jax.Array) -> jax.Array:
    return calc_loss_batch(input_batch, target_batch, model)


def calc_loss_loader(
    data_loader: Iterable, model: _GPT, device: jax.Device | str | None = None, num_batches: int | None = None
) -> float:
    """The book's calc_loss_loader: the mean of calc_loss_batch (compiled once per shape) over the
    first `num_batches` batches (all by default; never more than the loader has); NaN for an
    empty loader. With `device`, each batch is put on it first, as calc_loss_batch puts it."""
    num_batches = check_num_batches(num_batches)
    if len(data_loader) == 0:  # type: ignore[arg-type]
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))  # type: ignore[arg-type]
    total_loss = 0.0
    commit(model)
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += float(_loss_batch(model, *_on(device, *_checked(model, input_batch, target_batch))))
    return total_loss / num_batches


def evaluate_model(
    model: _GPT, train_loader: Iterable, val_loader: Iterable, device: jax.Device | str | None, eval_iter: int
) -> tuple[float, float]:
    """The book's evaluate_model: both losses over `eval_iter` batches, in eval mode (no gradient
    is taken); the model is left in training mode."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(
    model: _GPT, tokenizer: Any, device: jax.Device | str | None, start_context: str, *, log: Log = print
) -> str:
    """The book's generate_and_print_sample: 50 greedy tokens after `start_context`, printed on
    one line (through `log`); returned too."""
    model.eval()
    context_size = model.pos_emb.embedding.shape[0]
    device = check_device(device)
    encoded = text_to_token_ids(start_context, tokenizer)
    if device is not None:
        encoded = jax.device_put(encoded, device)
    token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    decoded_text = token_ids_to_text(token_ids, tokenizer).replace("\n", " ")
    log(decoded_text)
    model.train()
    return decoded_text


def train_model_simple(
    model: _GPT,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: nnx.Optimizer,
    device: jax.Device | str | None,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: Any,
    *,
    log: Log = print,
    on_event: OnEvent | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """The book's train_model_simple, with the torch twin's signature: `num_epochs` passes over
    `train_loader`, one compiled train step (buffers donated) per batch, put on `device` first;
    every `eval_freq` steps both losses over `eval_iter` batches (printed as the book prints them,
    through `log`); after each epoch a greedy sample of `start_context`. Returns (train losses,
    validation losses, tokens seen) at the evaluations; `on_event` is called with the torch twin's
    events."""
    num_epochs, eval_freq, eval_iter = check_schedule(num_epochs, eval_freq, eval_iter)
    check_optimizer(model, optimizer)
    device = check_device(device)
    emit = on_event or (lambda event: None)
    train_losses: list[float] = []
    val_losses: list[float] = []
    track_tokens_seen: list[int] = []
    tokens_seen, global_step = 0, -1
    commit(model, optimizer)
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            inputs, targets = _on(device, *_checked(model, input_batch, target_batch))
            loss = float(np.asarray(_train_step(model, optimizer, inputs, targets)))
            tokens_seen += int(np.size(input_batch))
            global_step += 1
            emit({"event": "step", "epoch": epoch + 1, "step": global_step, "loss": loss})
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
                emit(eval_event(epoch + 1, global_step, train_loss, val_loss, tokens_seen))
        text = generate_and_print_sample(model, tokenizer, device, start_context, log=log)
        emit({"event": "sample", "epoch": epoch + 1, "text": text})
    return train_losses, val_losses, track_tokens_seen
