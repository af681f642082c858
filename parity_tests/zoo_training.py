"""The zoo's optimizer and loss bugs: the twin's adamw() and calc_loss_batch as a porter might have
written them, each bug behind a knob, and the planting that patches them into one twin.

A mutant's `training` knobs name what differs from the book (Mutant in zoo.py); every knob a
mutant names routes the twin through the porter's code, so a knob at its default must give the
book's numbers (tests/parity_tests/test_zoo_training.py holds the porter's code to that). The
torch twin gets torch.optim's optimizers with the porter's arguments, param groups or a patched
step, or a hand-written Optimizer where torch.optim has no knob for the bug; the Flax twin gets
an optax chain. Planting patches the twin's adamw() and calc_loss_batch for the duration of a
context; run_training_parity enters it before it builds the optimizers.

The Flax twin's jitted functions read calc_loss_batch when they are traced, and their compiled
programs are cached per model graph: a loss mutant gets fresh jitted copies of them, bound to
its loss, so it never reuses a clean program, and a clean run afterwards never reuses its own.
An optimizer mutant needs nothing of the kind: its optax transformation is part of the
optimizer's graph, which the jitted step is compiled for.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import torch
import torch.nn.functional as F
from flax import nnx

import gpt_flax
import gpt_flax.train
import gpt_torch
import gpt_torch.train
from gpt_spec.checks import check_targets

from . import twins

TRAINING = "float32 training"  # Mutant.shows_in: the loss, the gradients and the AdamW steps see it

# Where a training mutant is planted, as its row must name it (`located`).
LOSS = "loss"  # the loss, first of all the training evidence
OPTIMIZER = "optimizer"  # the weights after some AdamW step
LATER_STEPS = "optimizer, step 2 on"  # Adam's first update is sign(g) whatever its betas or the gradient's scale
DECAY_MASK = "decay of biases and norms"  # the weights of a bias or a LayerNorm scale or shift
WHERES = (LOSS, OPTIMIZER, LATER_STEPS, DECAY_MASK)
STEPS = 10  # AdamW steps of a zoo run: the weights are checked after step 1 and this one

# The knobs, at the book's values; a mutant sets one (or more) of them.
DEFAULTS: dict[str, Any] = {
    "lr_factor": 1.0,  # the learning rate the porter passes, as a multiple of the book's
    "betas": None,  # betas passed instead of the book's (0.9, 0.999)
    "eps": None,  # eps passed instead of the book's 1e-8
    "coupled_decay": False,  # weight decay added to the gradient (Adam's L2), not decoupled
    "eps_in_sqrt": False,  # sqrt(v_hat + eps), not sqrt(v_hat) + eps
    "bias_correction": True,  # Adam's moments divided by 1 - beta^t
    "decay_lr_scaled": True,  # p -= lr * wd * p, not p -= wd * p
    "decay_matrices_only": False,  # no weight decay for parameters of fewer than 2 dims
    "clip_norm": None,  # gradients clipped to this global norm before the update
    "loss_reduction": "mean",  # the cross-entropy's reduction over the batch's tokens
    "label_shift": 0,  # targets shifted this many positions again inside the loss
}
LOSS_KNOBS = ("loss_reduction", "label_shift")


def knob_values(knobs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    unknown = [k for k, _ in knobs if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown training knob {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **dict(knobs)}


def decays(ndim: int) -> bool:
    """Whether a parameter keeps its weight decay under the mask many codebases use (nanoGPT's
    configure_optimizers): matrices and embeddings do; biases and LayerNorm scales and shifts do not."""
    return ndim >= 2


# --- the torch twin ------------------------------------------------------------------------------


class PaperAdamW(torch.optim.Optimizer):
    """AdamW written out from the paper's Algorithm 2, as a porter writes it where torch.optim has
    no knob for what they want; with both knobs at their defaults it is torch.optim.AdamW."""

    def __init__(
        self,
        params: Any,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        *,
        bias_correction: bool = True,
        eps_in_sqrt: bool = False,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.bias_correction, self.eps_in_sqrt = bias_correction, eps_in_sqrt

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                m, v, t = state["m"], state["v"], state["t"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat, v_hat = (m / (1 - b1**t), v / (1 - b2**t)) if self.bias_correction else (m, v)
                denom = (v_hat + eps).sqrt() if self.eps_in_sqrt else v_hat.sqrt().add_(eps)
                p.mul_(1 - lr * wd)
                p.addcdiv_(m_hat, denom, value=-lr)
        return loss


def _decay_before_step(optimizer: torch.optim.Optimizer, lr_scaled: bool) -> None:
    """Take the decay out of the optimizer and apply it in a patched step, before the update (where
    AdamW applies it), as p -= lr * wd * p or, unscaled, p -= wd * p."""
    for group in optimizer.param_groups:
        group["porter_decay"], group["weight_decay"] = group["weight_decay"], 0.0
    step = optimizer.step

    def patched(closure: Any = None) -> Any:
        with torch.no_grad():
            for group in optimizer.param_groups:
                rate = group["porter_decay"] * (group["lr"] if lr_scaled else 1.0)
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1 - rate)
        return step(closure)

    optimizer.step = patched  # type: ignore[method-assign]


def _clip_before_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """The training loop's clip_grad_norm_, folded into the optimizer's step."""
    step = optimizer.step

    def patched(closure: Any = None) -> Any:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return step(closure)

    optimizer.step = patched  # type: ignore[method-assign]


def torch_adamw(knobs: Mapping[str, Any], named: dict[str, Any]) -> Any:
    """The porter's replacement for gpt_torch.adamw, with `knobs` (all of them, `named` those the
    mutant sets: each routes through the porter's code even at its default)."""

    def adamw(model: torch.nn.Module, lr: float = 4e-4, weight_decay: float = 0.1, betas=(0.9, 0.999), eps=1e-8):
        lr, betas, eps = lr * knobs["lr_factor"], knobs["betas"] or betas, knobs["eps"] or eps
        params: Any = model.parameters()
        if "decay_matrices_only" in named:
            masked = [knobs["decay_matrices_only"] and not decays(p.ndim) for p in model.parameters()]
            groups: list[dict[str, Any]] = [
                {"params": [p for p, m in zip(model.parameters(), masked, strict=True) if not m]},
                {"params": [p for p, m in zip(model.parameters(), masked, strict=True) if m], "weight_decay": 0.0},
            ]
            params = [g for g in groups if g["params"]]
        optimizer: torch.optim.Optimizer
        if knobs["coupled_decay"]:
            optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        elif {"eps_in_sqrt", "bias_correction"} & named.keys():
            optimizer = PaperAdamW(
                params,
                lr,
                betas,
                eps,
                weight_decay,
                bias_correction=knobs["bias_correction"],
                eps_in_sqrt=knobs["eps_in_sqrt"],
            )
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if "decay_lr_scaled" in named:
            _decay_before_step(optimizer, knobs["decay_lr_scaled"])
        if "clip_norm" in named:
            _clip_before_step(optimizer, math.inf if knobs["clip_norm"] is None else knobs["clip_norm"])
        return optimizer

    return adamw


def torch_loss(knobs: Mapping[str, Any]) -> Any:
    """The porter's calc_loss_batch: the cross-entropy with the knobs' reduction and label shift."""
    reduction, shift = knobs["loss_reduction"], knobs["label_shift"]

    def calc_loss_batch(input_batch, target_batch, model, device=None):
        input_batch = gpt_torch.model.check_ids(input_batch, model.cfg)
        target_batch = gpt_torch.model.check_ids(target_batch, model.cfg)
        check_targets(tuple(input_batch.shape), tuple(target_batch.shape))
        device = gpt_torch.train.check_device(device)
        if device is not None:
            input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        logits = model(input_batch)
        if shift:  # a causal LM's own shift (Hugging Face's), on targets the data loader already shifted
            logits, target_batch = logits[:, :-shift], target_batch[:, shift:]
        return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten().long(), reduction=reduction)

    return calc_loss_batch


# --- the Flax twin -------------------------------------------------------------------------------


def scale_by_paper_adam(b1: float, b2: float, eps: float, eps_root: float = 0.0, *, bias_correction: bool = True):
    """Adam's scaling written out as an optax transformation (optax.scale_by_adam's arguments),
    where optax.scale_by_adam has no knob for the bug: its bias correction cannot be turned off."""

    def init(params):
        return {
            "t": jnp.zeros([], jnp.int32),
            "m": jax.tree.map(jnp.zeros_like, params),
            "v": jax.tree.map(jnp.zeros_like, params),
        }

    def update(updates, state, params=None):
        t = state["t"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], updates)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], updates)
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2 + eps_root) + eps), m, v)
        return out, {"t": t, "m": m, "v": v}

    return optax.GradientTransformation(init, update)


def flax_tx(knobs: Mapping[str, Any], named: dict[str, Any], lr: float, wd: float, betas, eps):
    """The porter's optax transformation for these settings."""
    lr, (b1, b2), eps = lr * knobs["lr_factor"], knobs["betas"] or betas, knobs["eps"] or eps
    mask = None
    if "decay_matrices_only" in named:
        only = knobs["decay_matrices_only"]
        mask = lambda params: jax.tree.map(lambda p: decays(p.ndim) or not only, params)  # noqa: E731
    if knobs["coupled_decay"]:
        tx = optax.chain(optax.add_decayed_weights(wd, mask), optax.adam(lr, b1, b2, eps))
    elif {"eps_in_sqrt", "bias_correction", "decay_lr_scaled"} & named.keys():
        eps, eps_root = (0.0, eps) if knobs["eps_in_sqrt"] else (eps, 0.0)
        if "bias_correction" in named:
            adam = scale_by_paper_adam(b1, b2, eps, eps_root, bias_correction=knobs["bias_correction"])
        else:
            adam = optax.scale_by_adam(b1, b2, eps=eps, eps_root=eps_root)
        if knobs["decay_lr_scaled"]:
            tx = optax.chain(adam, optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))
        else:  # the decay added after the learning rate: p -= wd * p (TF Addons' AdamW convention)
            tx = optax.chain(adam, optax.scale_by_learning_rate(lr), optax.add_decayed_weights(-wd, mask))
    else:
        tx = optax.adamw(lr, b1, b2, eps, weight_decay=wd, mask=mask)
    if "clip_norm" in named:
        tx = optax.chain(optax.clip_by_global_norm(math.inf if knobs["clip_norm"] is None else knobs["clip_norm"]), tx)
    return tx


def flax_adamw(knobs: Mapping[str, Any], named: dict[str, Any]) -> Any:
    """The porter's replacement for gpt_flax.adamw: a new transformation per optimizer, so the
    jitted step compiles it anew (it is part of the optimizer's graph)."""

    def adamw(model: nnx.Module, lr: float = 4e-4, weight_decay: float = 0.1, betas=(0.9, 0.999), eps=1e-8):
        return nnx.Optimizer(model, flax_tx(knobs, named, lr, weight_decay, betas, eps), wrt=nnx.Param)

    return adamw


def flax_loss(knobs: Mapping[str, Any]) -> Any:
    """The porter's calc_loss_batch: the cross-entropy with the knobs' reduction and label shift."""
    reduction, shift = knobs["loss_reduction"], knobs["label_shift"]

    def calc_loss_batch(input_batch, target_batch, model, device=None):
        input_batch = gpt_flax.model.check_ids(input_batch, model.cfg)
        target_batch = gpt_flax.model.check_ids(target_batch, model.cfg)
        check_targets(tuple(input_batch.shape), tuple(target_batch.shape))
        device = gpt_flax.train.check_device(device)
        if device is not None:
            input_batch, target_batch = jax.device_put((input_batch, target_batch), device)
        logits = model(input_batch)
        if shift:  # a causal LM's own shift (Hugging Face's), on targets the data loader already shifted
            logits, target_batch = logits[:, :-shift], target_batch[:, shift:]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, target_batch)
        return losses.sum() if reduction == "sum" else losses.mean()

    return calc_loss_batch


def _rejitted(module: types.ModuleType, name: str, value: Any) -> dict[str, Any]:
    """Fresh nnx.jit copies of every jitted function of `module` that reads `name`, each reading
    `value` instead: new functions, so no compiled program of the originals is reused or touched."""
    copies = {}
    scope = {**vars(module), name: value}
    for attr, obj in vars(module).items():
        fun = getattr(obj, "fun", None)
        if hasattr(obj, "jitted_fn") and isinstance(fun, types.FunctionType) and name in fun.__code__.co_names:
            rebound = types.FunctionType(fun.__code__, scope, fun.__name__, fun.__defaults__, fun.__closure__)
            copies[attr] = nnx.jit(rebound)  # not donated: the mutant's step keeps a copy of its buffers
    return copies


# --- planting --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(targets: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    try:
        for obj, attr, value in targets:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def patched(twin: str, knobs: tuple[tuple[str, Any], ...]) -> contextlib.AbstractContextManager:
    """The twin's adamw() (package and module) and, for a loss knob, its calc_loss_batch replaced by
    the porter's, until the context ends."""
    values, named = knob_values(knobs), dict(knobs)
    package = twins.package(twin)
    module: Any = gpt_torch.train if twin == "torch" else gpt_flax.train
    targets: list[tuple[Any, str, Any]] = []
    if set(named) - set(LOSS_KNOBS):
        adamw = torch_adamw(values, named) if twin == "torch" else flax_adamw(values, named)
        targets += [(package, "adamw", adamw), (module, "adamw", adamw)]
    if set(named) & set(LOSS_KNOBS):
        loss = torch_loss(values) if twin == "torch" else flax_loss(values)
        targets += [(package, "calc_loss_batch", loss), (module, "calc_loss_batch", loss)]
        if twin == "flax":
            targets += [(module, attr, fn) for attr, fn in _rejitted(module, "calc_loss_batch", loss).items()]
    return _patched(targets)


# --- where a training mutant's row must name it -----------------------------------------------------


def _is_decay_masked(name: str) -> bool:
    param = name.removeprefix("weights ").split(" after step ")[0]
    return param.endswith(".bias") or param.rsplit(".", 1)[-1] in ("scale", "shift")


def located(where: str, first: str) -> bool:
    """Whether a training mutant's first failure is where it was planted."""
    if where == LOSS:
        return first == "loss"
    if not first.startswith("weights "):
        return False
    if where == LATER_STEPS:
        return not first.endswith(" after step 1")
    if where == DECAY_MASK:
        return _is_decay_masked(first)
    return where == OPTIMIZER
