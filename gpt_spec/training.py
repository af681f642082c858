"""Chapter 5's training, framework-free: its settings, the checks both twins' loops make, and the
events their loops report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .data import check_integer

Log = Callable[[str], None]
OnEvent = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class Chapter5:
    """The settings of the book's chapter-5 pretraining run (GPT_CONFIG_124M at context 256)."""

    context_length: int = 256
    batch_size: int = 2
    stride: int = 256  # windows of context_length tokens, not overlapping
    train_ratio: float = 0.90
    lr: float = 4e-4
    weight_decay: float = 0.1
    num_epochs: int = 10
    eval_freq: int = 5
    eval_iter: int = 5
    start_context: str = "Every effort moves you"
    seed: int = 123  # torch.manual_seed before the model is built (and the loaders draw)


CHAPTER5 = Chapter5()


def check_num_batches(num_batches: object) -> int | None:
    """calc_loss_loader's num_batches: None (every batch) or an integer >= 1."""
    return None if num_batches is None else check_integer("num_batches", num_batches, 1)


def check_schedule(num_epochs: object, eval_freq: object, eval_iter: object) -> tuple[int, int, int]:
    """train_model_simple's schedule: epochs >= 0, an evaluation every eval_freq >= 1 steps over
    eval_iter >= 1 batches."""
    return (
        check_integer("num_epochs", num_epochs, 0),
        check_integer("eval_freq", eval_freq, 1),
        check_integer("eval_iter", eval_iter, 1),
    )


def eval_event(epoch: int, step: int, train_loss: float, val_loss: float, tokens_seen: int) -> dict[str, Any]:
    return {
        "event": "eval",
        "epoch": epoch,
        "step": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_seen": tokens_seen,
    }


def check_dropout_counter(counter: int | None, model_has_one: bool) -> None:
    """A training state's parity-dropout counter resumes a model with parity dropout, and only such
    a model: either way round, the resumed run would draw other masks than the one it continues."""
    if counter is None and model_has_one:
        raise ValueError(
            "training state: it has no dropout_counter (its run drew no parity dropout), the model draws parity dropout"
        )
    if counter is not None and not model_has_one:
        raise ValueError(
            f"training state: its dropout_counter is {counter} (its run drew parity dropout), the model draws none; "
            "call use_parity_dropout(model, seed) first"
        )


__all__ = [
    "CHAPTER5",
    "Chapter5",
    "Log",
    "OnEvent",
    "check_dropout_counter",
    "check_num_batches",
    "check_schedule",
    "eval_event",
]
