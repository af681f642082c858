"""Training: the book's calc_loss_batch, gradients in the canonical layout, AdamW, one step; and
chapter 5's calc_loss_loader, evaluate_model, generate_and_print_sample and train_model_simple."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from gpt_spec import StateDict
from gpt_spec.checks import bad_device, check_adamw, check_targets, check_trainable, foreign_optimizer, stale_optimizer
from gpt_spec.formats.train_state import AdamWSettings, TrainState, from_torch_optimizer
from gpt_spec.training import Log, OnEvent, check_dropout_counter, check_num_batches, check_schedule, eval_event

from .generate import generate_text_simple, text_to_token_ids, token_ids_to_text
from .model import _GPT, check_ids
from .weights import _tensor, dtype_name, load_state_dict, state_dict


def check_device(device: object) -> torch.device | None:
    """A `device` argument as torch takes it: None, a torch.device or its name ("cpu", "cuda:0"),
    of a device this machine has (refused alike in the Flax twin)."""
    if device is None:
        return None
    if not isinstance(device, torch.device | str):
        raise bad_device(device, known=False)
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)  # a device torch knows the name of may still be absent
    except (RuntimeError, AssertionError):
        raise bad_device(device, known=True) from None
    return parsed


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
    device = check_device(device)
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
        name: (torch.zeros_like(p) if p.grad is None else p.grad).detach().cpu().float().numpy().copy()
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

    Arguments are checked by gpt_spec.checks.check_adamw, before torch.optim's own checks, so both twins
    refuse the same ones with the same ValueError."""
    lr, weight_decay, betas, eps = check_adamw(lr, weight_decay, betas, eps)
    check_trainable(dtype_name(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    _MADE_FOR[optimizer] = dtype_name(model)
    return optimizer


# The parameters' dtype each optimizer of adamw() was made for: one made before a cast is refused
# alike in both twins (torch would mix its float32 moments with bfloat16 gradients, or fail).
_MADE_FOR: weakref.WeakKeyDictionary[torch.optim.Optimizer, str] = weakref.WeakKeyDictionary()


def check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that does not hold exactly `model`'s parameters (its step would train
    another model and leave this one's gradients to pile up), or one adamw() made before a cast."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if held != {id(p) for p in model.parameters()}:
        raise foreign_optimizer()
    made_for = _MADE_FOR.get(optimizer)
    if made_for is not None and made_for != dtype_name(model):
        raise stale_optimizer(made_for, dtype_name(model))


def train_step(
    model: _GPT, optimizer: torch.optim.Optimizer, input_batch: torch.Tensor, target_batch: torch.Tensor
) -> float:
    """One optimizer step on one batch; returns the loss before the step."""
    check_optimizer(model, optimizer)
    optimizer.zero_grad()
    loss = calc_loss_batch(input_batch, target_batch, model)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_state(
    model: _GPT,
    optimizer: torch.optim.Optimizer,
    *,
    run: dict[str, Any] | None = None,
    arrays: dict[str, Any] | None = None,
) -> TrainState:
    """The run between two steps in the canonical layout (gpt_spec.formats.train_state): the weights,
    AdamW's `step`, `exp_avg` and `exp_avg_sq` from `optimizer.state_dict()` under canonical names,
    its settings, the parity-dropout counter; `run` and `arrays` are the caller's own."""
    check_optimizer(model, optimizer)
    sd = optimizer.state_dict()
    numpy_state = {
        "state": {
            i: {k: v.detach().cpu().float().numpy().copy() for k, v in s.items()} for i, s in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
    }
    weights = state_dict(model)  # in model.parameters() order, as the optimizer's indices count
    step, exp_avg, exp_avg_sq, settings = from_torch_optimizer(weights, numpy_state)
    counter = getattr(model, "dropout_counter", None)
    return TrainState(
        model.cfg,
        weights,
        exp_avg,
        exp_avg_sq,
        step,
        settings,
        None if counter is None else int(counter.value),
        dict(run or {}),
        dict(arrays or {}),
    )


def load_train_state(model: _GPT, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Continue the run `state` holds: the weights into `model`, the step and moments into
    `optimizer` (as `optimizer.load_state_dict` takes them), the parity-dropout counter. All or
    nothing: a state for another config, other AdamW settings, or a model with(out) parity dropout
    where the state has none (one) is refused naming the field, before anything changes."""
    check_optimizer(model, optimizer)
    group = optimizer.param_groups[0]
    state.check_fits(model.cfg, AdamWSettings(group["lr"], group["weight_decay"], group["betas"], group["eps"]))
    counter = getattr(model, "dropout_counter", None)
    check_dropout_counter(state.dropout_counter, counter is not None)
    names = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    moments = {
        i: {
            "step": torch.tensor(float(state.step)),
            # copies: torch.from_numpy shares the array's memory, which the steps would update in place
            "exp_avg": _tensor(state.exp_avg[name], params[name].dtype).clone(),
            "exp_avg_sq": _tensor(state.exp_avg_sq[name], params[name].dtype).clone(),
        }
        for i, name in enumerate(names)
    }
    loaded = {"state": moments if state.step else {}, "param_groups": optimizer.state_dict()["param_groups"]}
    load_state_dict(model, state.weights)  # checks every tensor before it changes one
    optimizer.load_state_dict(loaded)
    if counter is not None:
        counter.value = int(state.dropout_counter)  # type: ignore[arg-type]


# Chapter 5: the book's loss over a loader, evaluation and training loop.


def calc_loss_loader(
    data_loader: Iterable, model: _GPT, device: torch.device | str | None = None, num_batches: int | None = None
) -> float:
    """The book's calc_loss_loader: the mean of calc_loss_batch over the first `num_batches`
    batches (all by default; never more than the loader has); NaN for an empty loader."""
    num_batches = check_num_batches(num_batches)
    if len(data_loader) == 0:  # type: ignore[arg-type]
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))  # type: ignore[arg-type]
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(
    model: _GPT, train_loader: Iterable, val_loader: Iterable, device: torch.device | str | None, eval_iter: int
) -> tuple[float, float]:
    """The book's evaluate_model: both losses over `eval_iter` batches, in eval mode without
    gradients; the model is left in training mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(
    model: _GPT, tokenizer: Any, device: torch.device | str | None, start_context: str, *, log: Log = print
) -> str:
    """The book's generate_and_print_sample: 50 greedy tokens after `start_context`, printed on
    one line (through `log`); returned too."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    device = check_device(device)
    encoded = text_to_token_ids(start_context, tokenizer)
    if device is not None:
        encoded = encoded.to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    decoded_text = token_ids_to_text(token_ids, tokenizer).replace("\n", " ")
    log(decoded_text)
    model.train()
    return decoded_text


def train_model_simple(
    model: _GPT,
    train_loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str | None,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: Any,
    *,
    log: Log = print,
    on_event: OnEvent | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """The book's train_model_simple: `num_epochs` passes over `train_loader`, one optimizer step
    per batch; every `eval_freq` steps both losses over `eval_iter` batches (printed as the book
    prints them, through `log`); after each epoch a greedy sample of `start_context`. Returns
    (train losses, validation losses, tokens seen) at the evaluations.

    `on_event`, if given, is called with each step's training loss ({"event": "step", "epoch",
    "step", "loss"}), each evaluation ({"event": "eval", "epoch", "step", "train_loss",
    "val_loss", "tokens_seen"}) and each sample ({"event": "sample", "epoch", "text"})."""
    num_epochs, eval_freq, eval_iter = check_schedule(num_epochs, eval_freq, eval_iter)
    check_optimizer(model, optimizer)
    device = check_device(device)
    emit = on_event or (lambda event: None)
    train_losses: list[float] = []
    val_losses: list[float] = []
    track_tokens_seen: list[int] = []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            emit({"event": "step", "epoch": epoch + 1, "step": global_step, "loss": loss.item()})
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
