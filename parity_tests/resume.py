"""The book's chapter-5 run that stops and resumes, in either twin: K steps, a training state saved
(gpt_spec.formats.train_state), then the rest in the same twin or the other.

`advance` is the book's train_model_simple with a position: the same steps (each twin's
train_step), evaluations (evaluate_model every eval_freq steps) and epoch samples
(generate_and_print_sample), on batches from the book's own DataLoaders, whose orders torch's
global generator draws as the book's do. A state holds that generator's state and the order of the
epoch in progress, so a resumed run takes the batches the uninterrupted one takes, in either twin;
with the AdamW moments and the parity-dropout counter it draws the same updates and masks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, ModelKind, get_tokenizer
from gpt_spec.data import split_text
from gpt_spec.formats.train_state import TrainState, load_train_state, save_train_state
from gpt_spec.training import CHAPTER5, Chapter5

from . import twins
from .chapter5 import DROPOUT_MODES, TWINS, Chapter5Report, TwinRun, _generate_after, _quiet, chapter5_config
from .progress import Progress, silent
from .twins import build_pair, float32_matmuls

STATE_FILES = {twin: f"{twin}-state.safetensors" for twin in TWINS}  # what --save-state writes, per twin
SNAPSHOTS = "snapshots"  # --snapshot-every's folder in a run's --out: step-NNNNNN/STATE_FILES


def snapshot_path(run_dir: str | os.PathLike[str], step: int, twin: str) -> Path:
    """Where --snapshot-every keeps `twin`'s state after `step` steps."""
    return Path(run_dir) / SNAPSHOTS / f"step-{step:06d}" / STATE_FILES[twin]


@dataclasses.dataclass
class Position:
    """Where a run stands between two steps."""

    step: int = 0  # steps taken: the next step's global_step
    epoch: int = 0  # the epoch of the next step, from 0
    batch: int = 0  # the next step's batch within its epoch
    tokens_seen: int = 0


class Feed:
    """The book's loaders (windows of context_length tokens, stride context_length; the training
    loader shuffled by torch's global generator, drop_last) and the order of the epoch in progress."""

    def __init__(self, text: str, cfg: GPTConfig, settings: Chapter5):
        train_text, val_text = split_text(text, settings.train_ratio)
        size, batch = cfg.context_length, settings.batch_size
        self.train = gpt_torch.create_dataloader_v1(train_text, batch, size, size, shuffle=True, drop_last=True)
        self.val = gpt_torch.create_dataloader_v1(val_text, batch, size, size, shuffle=False, drop_last=False)
        self.epoch_order: list[int] = []
        self.batch_size = batch

    @property
    def n_batches(self) -> int:
        return len(self.train)

    def epoch(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `start`: a new epoch iterates the loader (which draws its order),
        one under way takes its recorded order."""
        if start == 0:
            sampler = self.train.sampler
            assert isinstance(sampler, gpt_torch.data.RecordingRandomSampler)
            it = iter(self.train)
            first = next(it)  # the sampler draws the pass's order here
            self.epoch_order = list(sampler.orders[-1])
            yield first
            yield from it
            return
        data = self.train.dataset
        for i in range(start, self.n_batches):
            rows = self.epoch_order[i * self.batch_size : (i + 1) * self.batch_size]
            yield torch.stack([data[r][0] for r in rows]), torch.stack([data[r][1] for r in rows])

    def evaluation(self, eval_iter: int) -> tuple[list, list]:
        """The batches evaluate_model takes from each loader: iterating them draws as the book's does."""
        return _first(self.train, eval_iter), _first(self.val, eval_iter)


def _first(loader, n: int) -> list:
    out: list = []
    for batch in loader:
        if len(out) == n:
            break
        out.append(batch)
    return out


def _numpy(batches: list) -> list:
    return [(x.numpy(), y.numpy()) for x, y in batches]


@dataclasses.dataclass
class Trainer:
    """One twin's model and optimizer in a chapter-5 run, and what it recorded."""

    twin: str
    model: Any
    optimizer: Any
    settings: Chapter5
    record: TwinRun

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.twin == "torch":
            return gpt_torch.train_step(self.model, self.optimizer, x, y)
        return gpt_flax.train_step(self.model, self.optimizer, x.numpy(), y.numpy())

    def evaluate(self, feed: Feed) -> tuple[float, float]:
        train, val = feed.evaluation(self.settings.eval_iter)
        if self.twin == "torch":
            return gpt_torch.evaluate_model(self.model, train, val, None, self.settings.eval_iter)
        return gpt_flax.evaluate_model(self.model, _numpy(train), _numpy(val), None, self.settings.eval_iter)

    def sample(self, tokenizer: Any) -> str:
        package = twins.package(self.twin)
        return package.generate_and_print_sample(self.model, tokenizer, None, self.settings.start_context, log=_quiet)

    def state(self, **kwargs: Any) -> TrainState:
        package = twins.package(self.twin)
        return package.train_state(self.model, self.optimizer, **kwargs)


def advance(
    trainer: Trainer,
    feed: Feed,
    position: Position,
    stop: int,
    tokenizer: Any,
    status: Callable[[str], None] = lambda line: None,
) -> Position:
    """train_model_simple from `position` until `stop` steps are taken (or the schedule ends);
    `trainer.record` gets the book's events. Returns the new position."""
    s, run = trainer.settings, trainer.record
    total = s.num_epochs * feed.n_batches
    p = dataclasses.replace(position)
    trainer.model.train()
    while p.step < min(stop, total):
        for x, y in feed.epoch(p.batch):
            loss = trainer.step(x, y)
            p.tokens_seen += x.numel()
            run.record({"event": "step", "epoch": p.epoch + 1, "step": p.step, "loss": loss})
            if p.step % s.eval_freq == 0:
                train_loss, val_loss = trainer.evaluate(feed)
                run.record(
                    {
                        "event": "eval",
                        "epoch": p.epoch + 1,
                        "step": p.step,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        "tokens_seen": p.tokens_seen,
                    }
                )
            p.step += 1
            p.batch += 1
            status(f"epoch {p.epoch + 1}, step {p.step}/{total}, loss {loss:.3f}")
            if p.step >= stop and p.batch < feed.n_batches:
                return p
        run.record({"event": "sample", "text": trainer.sample(tokenizer)})
        p.epoch, p.batch = p.epoch + 1, 0
    return p


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _run_fields(position: Position, settings: Chapter5, dropout: str, seed: int, text: str, record: TwinRun) -> dict:
    return {
        "trainer": "chapter5",
        "position": dataclasses.asdict(position),
        "settings": dataclasses.asdict(settings),
        "dropout": dropout,
        "seed": seed,
        "text_sha256": text_digest(text),
        "history": dataclasses.asdict(record),
    }


def save_state(
    path: str | os.PathLike[str],
    trainer: Trainer,
    feed: Feed,
    position: Position,
    generator: torch.Tensor,
    dropout: str,
    seed: int,
    text: str,
) -> None:
    """The run as it stands, in the canonical training state, with what `resume` needs: the position,
    the schedule, torch's generator (the data order to come) and the order of the epoch under way."""
    state = trainer.state(
        run=_run_fields(position, trainer.settings, dropout, seed, text, trainer.record),
        arrays={
            "torch_rng_state": generator.numpy().copy(),
            "epoch_order": np.asarray(feed.epoch_order if position.batch else [], dtype=np.int64),
        },
    )
    save_train_state(path, state)


@dataclasses.dataclass
class Resumed:
    """A run restored from a state: where it stands and how it was set up."""

    cfg: GPTConfig
    settings: Chapter5
    dropout: str
    seed: int
    position: Position
    history: TwinRun
    state: TrainState


def read_state(path: str | os.PathLike[str], text: str) -> Resumed:
    """A chapter-5 training state, refused in one line where it is not one, or was made on another text."""
    state = load_train_state(path)
    source = f"training state {os.fspath(path)!r}"
    run = state.run
    if run.get("trainer") != "chapter5":
        raise ValueError(f"{source} was not written by gpt-parity train (it has no chapter-5 position)")
    if run.get("text_sha256") != text_digest(text):
        raise ValueError(f"{source} was trained on another text than the one given (its sha256 differs)")
    for key in ("torch_rng_state", "epoch_order"):
        if key not in state.arrays:
            raise ValueError(f"{source}: it has no {key!r}")
    try:
        settings = Chapter5(**run["settings"])
        position = Position(**run["position"])
        history = TwinRun(**run["history"])
        dropout, seed = run["dropout"], int(run["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: its run metadata is damaged: {e}") from None
    if dropout not in DROPOUT_MODES:
        raise ValueError(f"{source}: its dropout {dropout!r} is not one of {', '.join(DROPOUT_MODES)}")
    if settings.lr != state.adamw.lr or settings.weight_decay != state.adamw.weight_decay:
        raise ValueError(f"{source}: its schedule's lr/weight_decay differ from its optimizer's")
    return Resumed(state.cfg, settings, dropout, seed, position, history, state)


def _trainer(twin: str, model: Any, settings: Chapter5, dropout: str, seed: int, record: TwinRun) -> Trainer:
    package = twins.package(twin)
    if dropout == "parity":
        package.use_parity_dropout(model, seed)
    optimizer = package.adamw(model, lr=settings.lr, weight_decay=settings.weight_decay)
    return Trainer(twin, model, optimizer, settings, record)


def restore(resumed: Resumed, twin: str, text: str) -> tuple[Trainer, Feed]:
    """`twin`'s model and optimizer continuing the state, and the book's loaders where it left them."""
    package = twins.package(twin)
    model = package.GPTModel(resumed.cfg) if twin == "torch" else package.GPTModel(resumed.cfg, rngs=_rngs())
    trainer = _trainer(
        twin, model, resumed.settings, resumed.dropout, resumed.seed, dataclasses.replace(resumed.history)
    )
    package.load_train_state(trainer.model, trainer.optimizer, resumed.state)
    return trainer, restore_feed(resumed, text)


def restore_feed(resumed: Resumed, text: str) -> Feed:
    """The book's loaders where the state left them, and torch's generator set as it was."""
    feed = Feed(text, resumed.cfg, resumed.settings)
    torch.set_rng_state(torch.from_numpy(np.asarray(resumed.state.arrays["torch_rng_state"], dtype=np.uint8)))
    feed.epoch_order = [int(i) for i in resumed.state.arrays["epoch_order"]]
    if resumed.position.batch and len(feed.epoch_order) != feed.n_batches * feed.batch_size:
        raise ValueError("training state: its epoch_order does not fit the text's batches")
    return feed


def _rngs():
    from flax import nnx

    return nnx.Rngs(0)  # every parameter is overwritten by the state


@dataclasses.dataclass
class SegmentReport:
    """Both twins (or one) run over steps [start, stop) of a chapter-5 schedule."""

    report: Chapter5Report
    start: int
    stop: int
    twins: tuple[str, ...]
    states: dict[str, str] = dataclasses.field(default_factory=dict)


def run_segment(
    cfg: GPTConfig | None,
    text: str,
    *,
    twins: tuple[str, ...] = TWINS,
    steps: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    dropout: str = "parity",
    seed: int = CHAPTER5.seed,
    settings: Chapter5 = CHAPTER5,
    save_dir: str | os.PathLike[str] | None = None,
    snapshot_every: int | None = None,
    snapshot_dir: str | os.PathLike[str] | None = None,
    progress: Progress = silent,
) -> SegmentReport:
    """Run `twins` from the start (`cfg`, `dropout`, `seed`, `settings`) or from the state at `resume`
    (which sets all four) for `steps` steps (default: to the end of the schedule); with `save_dir`,
    each twin's state is saved there (STATE_FILES); with `snapshot_every` K, each twin's state at
    every step that is a multiple of K, from the first, in `snapshot_dir` (snapshot_path). Generation
    after training runs where the schedule ends."""
    if snapshot_every is not None and (snapshot_every < 1 or snapshot_dir is None):
        raise ValueError("snapshot_every needs a number of steps >= 1 and a snapshot_dir")
    tokenizer = get_tokenizer()
    resumed = None if resume is None else read_state(resume, text)
    if resumed is not None:
        cfg, settings, dropout, seed, start = (
            resumed.cfg,
            resumed.settings,
            resumed.dropout,
            resumed.seed,
            resumed.position,
        )
    else:
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {', '.join(DROPOUT_MODES)}, got {dropout!r}")
        assert cfg is not None
        cfg = chapter5_config(cfg, settings)
        if dropout == "off":
            cfg = cfg.replace(drop_rate=0.0)
        start = Position()
    trainers: dict[str, tuple[Trainer, Feed]] = {}
    with float32_matmuls() as precision:
        if resumed is None:
            tm, fm = build_pair(
                ModelKind.GPT, cfg, source="torch", seed=seed
            )  # torch.manual_seed(seed), then the model
            rng = torch.get_rng_state()  # what the loaders draw from, for each twin alike
            for twin, model in (("torch", tm), ("flax", fm)):
                if twin in twins:
                    trainers[twin] = (
                        _trainer(twin, model, settings, dropout, seed, TwinRun()),
                        Feed(text, cfg, settings),
                    )
        else:
            for twin in twins:
                trainers[twin] = restore(resumed, twin, text)
            rng = torch.get_rng_state()
        n_batches = next(iter(trainers.values()))[1].n_batches
        total = settings.num_epochs * n_batches
        stop = total if steps is None else min(total, start.step + steps)
        bar = progress(len(trainers))
        ends: dict[str, tuple[Position, torch.Tensor]] = {}
        for twin, (trainer, feed) in trainers.items():
            torch.set_rng_state(rng)
            with bar.step(f"{twin} twin: steps {start.step + 1}-{stop} of {total}") as status:
                t0 = time.perf_counter()
                position = start
                while True:
                    if snapshot_every and position.step % snapshot_every == 0:
                        path = snapshot_path(snapshot_dir or ".", position.step, twin)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_state(path, trainer, feed, position, torch.get_rng_state(), dropout, seed, text)
                    if position.step >= stop:
                        break
                    until = (
                        stop
                        if not snapshot_every
                        else min(stop, (position.step // snapshot_every + 1) * snapshot_every)
                    )
                    position = advance(trainer, feed, position, until, tokenizer, status)
                ends[twin] = position, torch.get_rng_state()
                trainer.record.seconds += time.perf_counter() - t0
        runs = {twin: trainers[twin][0].record for twin in trainers}
        if stop == total and set(trainers) == set(TWINS):
            _generate_after(trainers["torch"][0].model, trainers["flax"][0].model, runs, settings, tokenizer, seed)
    report = Chapter5Report(
        cfg, settings, dropout, seed, n_batches, len(next(iter(trainers.values()))[1].val), precision, runs
    )
    if set(trainers) == set(TWINS):
        t, f = gpt_torch.state_dict(trainers["torch"][0].model), gpt_flax.state_dict(trainers["flax"][0].model)
        report.weights_max_abs = max(float(np.max(np.abs(t[k] - f[k]))) for k in t)
    out = SegmentReport(report, start.step, stop, tuple(trainers))
    if save_dir is not None:
        for twin, (trainer, feed) in trainers.items():
            path = Path(save_dir) / STATE_FILES[twin]
            position, generator = ends[twin]
            save_state(path, trainer, feed, position, generator, dropout, seed, text)
            out.states[twin] = str(path)
    return out


__all__ = [
    "SNAPSHOTS",
    "STATE_FILES",
    "Feed",
    "Position",
    "Resumed",
    "SegmentReport",
    "Trainer",
    "advance",
    "read_state",
    "restore",
    "restore_feed",
    "run_segment",
    "save_state",
    "snapshot_path",
]
