"""The book's chapter-5 pretraining run in both twins: the same weights, the same batches in the same
order, the same dropout masks (parity dropout) or none, and the two runs' losses, samples and weights
compared step by step against a bound that grows with the steps as the measured divergence does."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, ModelKind, get_tokenizer
from gpt_spec.data import split_text
from gpt_spec.training import CHAPTER5, Chapter5

from . import TWINS
from .environment import versions
from .progress import Progress, silent
from .tolerances import train_loss_bound
from .twins import build_pair, float32_matmuls

DROPOUT_MODES = ("parity", "off")  # each twin's own dropout draws different masks: not one run
MODEL_FILES = {"torch": "torch.safetensors", "flax": "flax.safetensors"}  # each twin's trained model, in out_dir
# After training, both twins continue start_context greedily and by parity sampling (the book's
# §5.3 example settings: top_k 25, temperature 1.4).
SAMPLE_TOKENS = 25
SAMPLE_TOP_K = 25
SAMPLE_TEMPERATURE = 1.4


def chapter5_config(cfg: GPTConfig, settings: Chapter5 = CHAPTER5) -> GPTConfig:
    """The book trains GPT_CONFIG_124M at context 256: a config's context_length is cut to the
    chapter's where it is longer (and a kv_window_size with it, which may not pass it)."""
    context_length = min(cfg.context_length, settings.context_length)
    window = cfg.kv_window_size
    return cfg.replace(
        context_length=context_length, kv_window_size=None if window is None else min(window, context_length)
    )


@dataclasses.dataclass
class TwinRun:
    """One twin's run: each step's training loss, each evaluation, each epoch's greedy sample, and
    the generations after training."""

    step_losses: list[float] = dataclasses.field(default_factory=list)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    samples: list[str] = dataclasses.field(default_factory=list)
    greedy_ids: list[int] = dataclasses.field(default_factory=list)
    sampled_ids: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def record(self, event: dict[str, Any]) -> None:
        if event["event"] == "step":
            self.step_losses.append(event["loss"])
        elif event["event"] == "eval":
            self.evals.append({k: v for k, v in event.items() if k != "event"})
        else:
            self.samples.append(event["text"])


@dataclasses.dataclass
class Chapter5Report:
    cfg: GPTConfig
    settings: Chapter5
    dropout: str
    seed: int
    n_train_batches: int
    n_val_batches: int
    precision: str
    runs: dict[str, TwinRun]
    weights_max_abs: float = math.nan
    checkpoints: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def torch(self) -> TwinRun:
        return self.runs["torch"]

    @property
    def flax(self) -> TwinRun:
        return self.runs["flax"]

    def step_deltas(self) -> np.ndarray:
        return np.abs(np.asarray(self.torch.step_losses) - np.asarray(self.flax.step_losses))

    def eval_deltas(self) -> tuple[np.ndarray, np.ndarray]:
        t, f = self.torch.evals, self.flax.evals
        train = np.abs([a["train_loss"] - b["train_loss"] for a, b in zip(t, f, strict=True)])
        val = np.abs([a["val_loss"] - b["val_loss"] for a, b in zip(t, f, strict=True)])
        return train, val

    def failures(self) -> list[str]:
        """What disagrees, each in one line; empty where the two runs are one run."""
        problems = []
        t, f = self.torch, self.flax
        if len(t.step_losses) != len(f.step_losses) or len(t.evals) != len(f.evals):
            return [f"the runs took {len(t.step_losses)} and {len(f.step_losses)} steps"]
        if not all(math.isfinite(x) for x in t.step_losses + f.step_losses):
            problems.append("a training loss is not finite")
        problems += [line for _, line in self.parted()]
        if t.greedy_ids != f.greedy_ids:
            problems.append("after training, greedy generation differs")
        if t.sampled_ids != f.sampled_ids:
            problems.append("after training, parity sampling differs")
        return problems

    def parted(self) -> list[tuple[int, str]]:
        """The first step whose training loss, the first evaluation and the first epoch sample that
        pass their bound (or differ), each with the number of updates behind it: a step's loss is
        taken before that step's update, an evaluation after it, a sample after its epoch's last."""
        t, f = self.torch, self.flax
        found = []
        for step, delta in enumerate(self.step_deltas().tolist()):
            if not delta <= train_loss_bound(step):
                found.append(
                    (
                        step,
                        f"step {step}: |Δ training loss| {delta:.3g} > bound {train_loss_bound(step):.3g}"
                        f" (torch {t.step_losses[step]:.6f}, flax {f.step_losses[step]:.6f})",
                    )
                )
                break
        train, val = self.eval_deltas()
        for point, dt, dv in zip(t.evals, train, val, strict=True):
            bound = train_loss_bound(point["step"])
            if not (dt <= bound and dv <= bound):
                line = f"evaluation at step {point['step']}: |Δ train| {dt:.3g}, |Δ val| {dv:.3g} > bound {bound:.3g}"
                found.append((point["step"] + 1, line))
                break
        for epoch, (a, b) in enumerate(zip(t.samples, f.samples, strict=True), 1):
            if a != b:
                found.append(
                    (epoch * self.n_train_batches, f"epoch {epoch}: the greedy samples differ: torch {a!r}, flax {b!r}")
                )
                break
        return found

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_json(self) -> dict[str, Any]:
        deltas = self.step_deltas()
        return {
            "passed": self.passed,
            "failures": self.failures(),
            "config": self.cfg.to_dict(),
            "settings": dataclasses.asdict(self.settings),
            "dropout": self.dropout,
            "seed": self.seed,
            "batches": {"train": self.n_train_batches, "val": self.n_val_batches},
            "matmul_precision": self.precision,
            "bound": {"per_step": [train_loss_bound(s) for s in range(len(deltas))]},
            "step_loss_abs_diff": deltas.tolist(),
            "weights_max_abs_diff": self.weights_max_abs,
            "runs": {name: dataclasses.asdict(run) for name, run in self.runs.items()},
            "checkpoints": self.checkpoints,
            "versions": versions(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chapter5Report:
        """A report from its `to_json()` (a run's train.json), judged again by today's bound."""
        return cls(
            GPTConfig.from_dict(data["config"]),
            Chapter5(**data["settings"]),
            data["dropout"],
            data["seed"],
            data["batches"]["train"],
            data["batches"]["val"],
            data["matmul_precision"],
            {name: TwinRun(**run) for name, run in data["runs"].items()},
            weights_max_abs=data["weights_max_abs_diff"],
            checkpoints=data["checkpoints"],
        )


def run_chapter5(
    cfg: GPTConfig,
    text: str,
    *,
    dropout: str = "parity",
    seed: int = CHAPTER5.seed,
    settings: Chapter5 = CHAPTER5,
    out_dir: str | None = None,
    progress: Progress = silent,
) -> Chapter5Report:
    """Train the torch twin with the book's train_model_simple, then the Flax twin with its own
    (the same signature) from the same weights on the very batches the torch twin's DataLoader drew (its recorded
    orders); compare the two runs. With `out_dir`, both trained models are saved there."""
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"dropout must be one of {', '.join(DROPOUT_MODES)}, got {dropout!r}")
    cfg = chapter5_config(cfg, settings)
    if dropout == "off":
        cfg = cfg.replace(drop_rate=0.0)
    tokenizer = get_tokenizer()
    train_text, val_text = split_text(text, settings.train_ratio)
    # Windows of context_length tokens, not overlapping, as the book's (stride = max_length).
    size, batch = cfg.context_length, settings.batch_size
    torch_train = gpt_torch.create_dataloader_v1(train_text, batch, size, size, shuffle=True, drop_last=True)
    torch_val = gpt_torch.create_dataloader_v1(val_text, batch, size, size, shuffle=False, drop_last=False)
    assert isinstance(torch_train.sampler, gpt_torch.data.RecordingRandomSampler)
    orders = torch_train.sampler.orders  # filled as the torch run draws; the Flax run replays them
    flax_train = gpt_flax.create_dataloader_v1(
        train_text, batch, size, size, shuffle=True, drop_last=True, orders=orders
    )
    flax_val = gpt_flax.create_dataloader_v1(val_text, batch, size, size, shuffle=False, drop_last=False)
    tm, fm = build_pair(ModelKind.GPT, cfg, source="torch", seed=seed)  # torch.manual_seed(seed), then the model
    if dropout == "parity":
        gpt_torch.use_parity_dropout(tm, seed)
        gpt_flax.use_parity_dropout(fm, seed)
    torch_opt = gpt_torch.adamw(tm, lr=settings.lr, weight_decay=settings.weight_decay)
    flax_opt = gpt_flax.adamw(fm, lr=settings.lr, weight_decay=settings.weight_decay)
    runs = {name: TwinRun() for name in TWINS}
    n_steps = settings.num_epochs * len(torch_train)
    bar = progress(len(TWINS))
    schedule = (settings.num_epochs, settings.eval_freq, settings.eval_iter, settings.start_context, tokenizer)

    def train(name: str) -> None:
        run = runs[name]
        with bar.step(f"{name} twin: {settings.num_epochs} epochs, {n_steps} steps") as status:

            def on_event(event: dict[str, Any]) -> None:
                run.record(event)
                if event["event"] != "sample":
                    shown = (
                        f"epoch {event['epoch']}, step {len(run.step_losses)}/{n_steps}, loss {run.step_losses[-1]:.3f}"
                    )
                    if run.evals:
                        last = run.evals[-1]
                        shown += f"; evaluated: train {last['train_loss']:.3f}, val {last['val_loss']:.3f}"
                    status(shown)

            t0 = time.perf_counter()
            if name == "torch":
                gpt_torch.train_model_simple(
                    tm, torch_train, torch_val, torch_opt, None, *schedule, log=_quiet, on_event=on_event
                )
            else:
                gpt_flax.train_model_simple(
                    fm, flax_train, flax_val, flax_opt, None, *schedule, log=_quiet, on_event=on_event
                )
            run.seconds = time.perf_counter() - t0

    with float32_matmuls() as precision:
        train("torch")
        train("flax")
        _generate_after(tm, fm, runs, settings, tokenizer, seed)
    weights = gpt_torch.state_dict(tm)
    flax_weights = gpt_flax.state_dict(fm)
    report = Chapter5Report(
        cfg,
        settings,
        dropout,
        seed,
        len(torch_train),
        len(torch_val),
        precision,
        runs,
        weights_max_abs=max(float(np.max(np.abs(weights[k] - flax_weights[k]))) for k in weights),
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        report.checkpoints = {twin: os.path.join(out_dir, name) for twin, name in MODEL_FILES.items()}
        gpt_torch.save(tm, report.checkpoints["torch"])
        gpt_flax.save(fm, report.checkpoints["flax"])
    return report


def _quiet(line: str) -> None:
    """The book's printed lines go to the report's table, not to stdout in between."""


def _generate_after(tm, fm, runs: dict[str, TwinRun], settings: Chapter5, tokenizer: Any, seed: int) -> None:
    """After training: start_context continued greedily and by parity sampling, in both twins."""
    tm.eval()
    fm.eval()
    prompt = tokenizer.encode(settings.start_context)
    context = tm.cfg.context_length
    t_ids, f_ids = torch.tensor([prompt]), np.asarray([prompt])
    n, k, temp = SAMPLE_TOKENS, SAMPLE_TOP_K, SAMPLE_TEMPERATURE
    runs["torch"].greedy_ids = gpt_torch.generate(tm, t_ids, n, context)[0].tolist()
    runs["torch"].sampled_ids = gpt_torch.generate(tm, t_ids, n, context, temp, k, parity_seed=seed)[0].tolist()
    runs["flax"].greedy_ids = np.asarray(gpt_flax.generate(fm, f_ids, n, context))[0].tolist()
    runs["flax"].sampled_ids = np.asarray(gpt_flax.generate(fm, f_ids, n, context, temp, k, parity_seed=seed))[
        0
    ].tolist()


def decoded(report: Chapter5Report, tokenizer: Any | None = None) -> dict[str, dict[str, str]]:
    """The generations after training as text, per twin."""
    tokenizer = tokenizer or get_tokenizer()
    return {
        name: {"greedy": tokenizer.decode(run.greedy_ids), "sampled": tokenizer.decode(run.sampled_ids)}
        for name, run in report.runs.items()
    }


__all__ = ["DROPOUT_MODES", "Chapter5Report", "TwinRun", "chapter5_config", "decoded", "run_chapter5"]
