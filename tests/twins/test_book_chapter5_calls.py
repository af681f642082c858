"""The book's chapter-5 calls, positional as the book prints them, run against each twin with only the
import changed: `device` sits where the book puts it in calc_loss_batch, calc_loss_loader,
evaluate_model, generate_and_print_sample and train_model_simple, in both twins."""

import importlib
import inspect
import math

import jax
import pytest
import torch
from flax import nnx

from gpt_spec import get_tokenizer
from gpt_spec.data import the_verdict

TWINS = ["gpt_torch", "gpt_flax"]
CHAPTER5 = ["calc_loss_batch", "calc_loss_loader", "evaluate_model", "generate_and_print_sample", "train_model_simple"]
# The book's GPT_CONFIG_124M but tiny; a plain dict, as the book passes it.
GPT_CONFIG_TINY = {
    "vocab_size": 50257,
    "context_length": 16,
    "emb_dim": 8,
    "n_heads": 2,
    "n_layers": 1,
    "drop_rate": 0.1,
    "qkv_bias": False,
}
TEXT_DATA = the_verdict()[:1500]  # 10 training batches of 2 x 16 tokens, 1 validation batch


def _twin(name):
    """The twin's module, then what the book writes in torch and the twin spells its own way: the
    device, the model built after torch.manual_seed(123), and the optimizer."""
    twin = importlib.import_module(name)
    if name == "gpt_torch":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        def build():
            torch.manual_seed(123)
            return twin.GPTModel(GPT_CONFIG_TINY).to(device)

        def optimizer_for(model):
            return torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)

    else:
        device = jax.devices()[0]  # where the model's parameters are made

        def build():
            return twin.GPTModel(GPT_CONFIG_TINY, rngs=nnx.Rngs(123))

        def optimizer_for(model):
            return twin.adamw(model, lr=0.0004, weight_decay=0.1)

    return twin, device, build, optimizer_for


def _loaders(twin):
    """§5.1.3's loaders, as the book makes them."""
    train_ratio = 0.90
    split_idx = int(train_ratio * len(TEXT_DATA))
    train_data = TEXT_DATA[:split_idx]
    val_data = TEXT_DATA[split_idx:]
    torch.manual_seed(123)
    train_loader = twin.create_dataloader_v1(
        train_data,
        batch_size=2,
        max_length=GPT_CONFIG_TINY["context_length"],
        stride=GPT_CONFIG_TINY["context_length"],
        drop_last=True,
        shuffle=True,
        num_workers=0,
    )
    val_loader = twin.create_dataloader_v1(
        val_data,
        batch_size=2,
        max_length=GPT_CONFIG_TINY["context_length"],
        stride=GPT_CONFIG_TINY["context_length"],
        drop_last=False,
        shuffle=False,
        num_workers=0,
    )
    return train_loader, val_loader


@pytest.mark.parametrize("name", TWINS)
def test_the_books_chapter5_calls_run_in_both_twins(name, capsys):
    twin, device, build, optimizer_for = _twin(name)
    tokenizer = get_tokenizer()
    train_loader, val_loader = _loaders(twin)
    assert (len(train_loader), len(val_loader)) == (10, 1)
    model = build()

    # §5.1.3: the loss of one batch, then of both loaders (torch.no_grad() does nothing to JAX).
    input_batch, target_batch = next(iter(train_loader))
    loss = twin.calc_loss_batch(input_batch, target_batch, model, device)
    assert math.isfinite(loss.item())
    with torch.no_grad():
        train_loss = twin.calc_loss_loader(train_loader, model, device)
        val_loss = twin.calc_loss_loader(val_loader, model, device)
    assert abs(train_loss - math.log(50257)) < 1.0 and abs(val_loss - math.log(50257)) < 1.0  # untrained

    # §5.2: the training run.
    model = build()
    optimizer = optimizer_for(model)
    num_epochs = 1
    train_losses, val_losses, tokens_seen = twin.train_model_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        num_epochs=num_epochs,
        eval_freq=5,
        eval_iter=1,
        start_context="Every effort moves you",
        tokenizer=tokenizer,
    )
    assert tokens_seen == [32, 192]  # evaluations after steps 0 and 5, 2 x 16 tokens a step
    assert len(train_losses) == len(val_losses) == 2 and all(map(math.isfinite, train_losses + val_losses))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Ep 1 (Step 000000): Train loss ") and printed[1].startswith("Ep 1 (Step 000005)")
    assert len(printed) == 3 and printed[2].startswith("Every effort moves you")

    # The loop's helpers, called as the loop calls them.
    train_loss, val_loss = twin.evaluate_model(model, train_loader, val_loader, device, eval_iter=1)
    assert math.isfinite(train_loss) and math.isfinite(val_loss)
    twin.generate_and_print_sample(model, tokenizer, device, "Every effort moves you")
    assert capsys.readouterr().out == printed[2] + "\n"  # greedy: the loop's own sample again


@pytest.mark.parametrize("function", CHAPTER5)
def test_the_twins_chapter5_signatures_are_one(function):
    """The same parameter names, order, kinds and defaults in both twins (annotations name each
    framework's device)."""

    def parameters(name):
        signature = inspect.signature(getattr(importlib.import_module(name), function))
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    assert parameters("gpt_torch") == parameters("gpt_flax")
    assert "device" in [p[0] for p in parameters("gpt_torch")]


@pytest.mark.parametrize("function", CHAPTER5)
def test_a_bad_device_in_the_books_position_is_refused_alike(function):
    """Each function checks the `device` in the book's position, with the same words in both twins."""
    tokenizer = get_tokenizer()
    messages = []
    for name in TWINS:
        twin, _, build, optimizer_for = _twin(name)
        train_loader, val_loader = _loaders(twin)
        model = build()
        input_batch, target_batch = next(iter(train_loader))
        calls = {
            "calc_loss_batch": lambda: twin.calc_loss_batch(input_batch, target_batch, model, "bogus"),
            "calc_loss_loader": lambda: twin.calc_loss_loader(train_loader, model, "bogus"),
            "evaluate_model": lambda: twin.evaluate_model(model, train_loader, val_loader, "bogus", 1),
            "generate_and_print_sample": lambda: twin.generate_and_print_sample(model, tokenizer, "bogus", "Every"),
            "train_model_simple": lambda: twin.train_model_simple(
                model, train_loader, val_loader, optimizer_for(model), "bogus", 1, 5, 1, "Every", tokenizer
            ),
        }
        with pytest.raises(ValueError) as err:
            calls[function]()
        messages.append(str(err.value))
    assert messages[0] == messages[1] == "device 'bogus' names no device this framework has here"
