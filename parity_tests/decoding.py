"""The generation check: both twins' KV cache and parity sampling, position by position.

(a) Cached generation. Both twins, from the same weights, generate greedily through their KV cache,
PROMPTS prompts in a row through the same model (each after reset_kv_cache), once with the full
cache ("cached") and once with a sliding window of WINDOW positions ("sliding"). Each position fed
through the cache is held, stage by stage (drop_emb ... out_head), to the twin's own uncached
forward over the same tokens (FP32_FORWARD, as tests/parity_tests/test_kv_cache.py); with a window,
to that forward with the band the window leaves (each query sees its last WINDOW keys). The greedy
tokens must be the uncached forward's, the twins' logits and tokens each other's, and each twin's
generate_text_simple_cached (its compiled decoding loop) must give the tokens of the steps above.

(b) Sampling. The logits the torch twin computed at each position of each prompt, and rows built
with ties at the k-th largest value, go to both twins' parity sampling (the `pick_token` their
generate calls with parity_seed): the probabilities after top-k and temperature are held to an exact
float64 evaluation and to each other (FP32_FORWARD: a float32 computation, 64 ulps of the row's
largest probability), and the tokens drawn must be the reference's and each other's; then both
twins' generate(..., parity_seed=) on the models must draw the same tokens.

Each finding names its part, the prompt (or the built rows), the token position and, for the
cache, the stage (the layer's cache) where the cached forward first leaves the uncached one.

Long on purpose: the three parts share one Finding, one report and one set of models, which
zoo_decoding.py plants into; split, each part would import the others' types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from gpt_spec.randomness import pick_token
from gpt_spec.stages import stage_names

from . import TWINS
from .compare import compare
from .environment import versions
from .tolerances import FP32_FORWARD
from .twins import build_pair, float32_matmuls

PARTS = ("cached", "sliding", "sampling")
PROMPTS = 3  # in a row through the same model: a cache not reset between them shows at the second
PROMPT_LEN = 3
NEW_TOKENS = 4
BATCH = 2
WINDOW = 4  # PROMPT_LEN + NEW_TOKENS - 1 = 6 positions fed: the window slides from position WINDOW on
TEMPERATURE = 0.7  # not 1: a temperature lost anywhere changes the probabilities
TOP_K = 5
TIES = 3  # logits equal to the k-th largest in the built rows: the book keeps them all
# Positions the check needs: one past the last fed, so a position one off stays inside the table.
POSITIONS = PROMPT_LEN + NEW_TOKENS


def setup_text() -> str:
    """The check's setup in words, as the command lines print it."""
    return (
        f"{PROMPTS} prompts of {BATCH} x {PROMPT_LEN} tokens + {NEW_TOKENS} new, full cache and window {WINDOW}, "
        f"sampling at temperature {TEMPERATURE:g}, top-k {TOP_K}"
    )


Plant = Callable[[dict[str, Any]], contextlib.AbstractContextManager]
_NO_PLANT: Plant = lambda models: contextlib.nullcontext()  # noqa: E731


@dataclasses.dataclass(frozen=True)
class Finding:
    part: str  # cached, sliding, sampling
    rows: str  # "prompt 1", or "ties" (the sampling rows built with ties)
    position: int  # the token position: the token fed (cache), the step drawn (sampling)
    what: str  # a stage (the layer's cache), or logits, tokens, probabilities, draws, generate, raised
    twin: str  # torch or flax (against its reference), or "torch vs flax"
    passed: bool
    margin: float  # |Δ| / allowed at the worst element; 1 or inf for a token or a refusal
    detail: str
    refused: bool = False  # the twin raised here: nothing after it in its part ran on the same state

    @property
    def name(self) -> str:
        return f"{self.part} {self.rows} position {self.position} {self.what}"

    @property
    def bounded(self) -> bool:
        """Held to a bound (a stage, the logits, the probabilities), not an equality or a refusal."""
        return self.what not in ("tokens", "draws", "generate", "raised")

    def describe(self) -> str:
        return f"{self.name} ({self.twin}): {'ok' if self.passed else 'FAILED'}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "part": self.part,
            "rows": self.rows,
            "position": self.position,
            "what": self.what,
            "twin": self.twin,
            "passed": self.passed,
            "margin": self.margin,
            "detail": self.detail,
            "refused": self.refused,
        }


_LATER = ("logits", "tokens", "probabilities", "draws", "generate")


def history(f: Finding) -> tuple[tuple[int, int], int]:
    """When a finding happened in its part's run: the rows (prompts in the order the models saw
    them, the built rows last), then the token position."""
    return ((1, 0) if f.rows == "ties" else (0, int(f.rows.split()[-1])), f.position)


def order(f: Finding, stages: list[str]) -> tuple:
    """Where a finding sits: part, history, then forward order within it (a refusal first: nothing
    after it ran), then the twin."""
    what = -1 if f.what == "raised" else stages.index(f.what) if f.what in stages else 100 + _LATER.index(f.what)
    return (PARTS.index(f.part), *history(f), what, (*TWINS, "torch vs flax").index(f.twin))


@dataclasses.dataclass
class DecodingReport:
    config: GPTConfig
    findings: list[Finding]

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    @property
    def first_failure(self) -> Finding | None:
        stages = stage_names(self.config.n_layers)
        failed = [f for f in self.findings if not f.passed]
        return min(failed, key=lambda f: order(f, stages)) if failed else None

    @property
    def closest(self) -> Finding | None:
        """The passing finding nearest its bound."""
        bounded = [f for f in self.findings if f.passed and np.isfinite(f.margin)]
        return max(bounded, key=lambda f: f.margin) if bounded else None

    def to_json(self) -> dict[str, Any]:
        first, closest = self.first_failure, self.closest
        return {
            "config": self.config.to_dict(),
            "setup": {
                "prompts": PROMPTS,
                "batch": BATCH,
                "prompt_len": PROMPT_LEN,
                "new_tokens": NEW_TOKENS,
                "window": WINDOW,
                "temperature": TEMPERATURE,
                "top_k": TOP_K,
            },
            "passed": self.passed,
            "first_failure": first.to_json() if first else None,
            "closest": closest.to_json() if closest else None,
            "parts": {
                part: {
                    "checked": sum(f.part == part for f in self.findings),
                    "failed": sum(f.part == part and not f.passed for f in self.findings),
                }
                for part in PARTS
            },
            "failures": [f.to_json() for f in self.findings if not f.passed],
            "versions": versions(),
        }


# --- (a) the KV cache ----------------------------------------------------------------------------------


@nnx.jit
def _flax_cached_call(model, ids):
    """One cached call with every stage's output, compiled once per graph definition and shape."""
    return model(ids, use_cache=True, return_activations=True)


def _torch_call(tm) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def call(ids: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.numpy() for k, v in tm(torch.from_numpy(ids), use_cache=True, return_activations=True).items()}

    return call


def _flax_call(fm) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    return lambda ids: {k: np.asarray(v) for k, v in _flax_cached_call(fm, jnp.asarray(ids, jnp.int32)).items()}


@dataclasses.dataclass
class _Run:
    """One prompt generated through a twin's cache: the tokens, every stage at every position fed
    (batch, fed, ...), and the refusal that stopped it (position, message), if one did."""

    tokens: np.ndarray
    stages: dict[str, np.ndarray]
    error: tuple[int, str] | None = None

    @property
    def fed(self) -> int:
        return self.stages["out_head"].shape[1] if self.stages else 0


def _drive(model, call, prompt: np.ndarray) -> _Run:
    """Greedy generation through the cache: the prompt in one call, then one token per call."""
    tokens, chunks, fed = prompt, [], 0
    feed = prompt
    error = None
    try:
        model.reset_kv_cache(batch_size=prompt.shape[0])
        for _ in range(NEW_TOKENS):
            out = call(feed)
            chunks.append(out)
            fed += feed.shape[1]
            feed = out["out_head"][:, -1].argmax(-1)[:, None].astype(prompt.dtype)
            tokens = np.concatenate([tokens, feed], axis=1)
    except Exception as e:  # a refusal or a crash: a finding at the position it was fed
        error = (fed, f"{type(e).__name__}: {e}".splitlines()[0])
    stages = {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]} if chunks else {}
    return _Run(tokens, stages, error)


def _band(n: int, window: int | None) -> np.ndarray:
    """(n, n) True where a key is hidden from a query: the future, and with a window the keys that
    left it (a query fed one token per step after a prompt of at most `window` sees its last
    `window` keys)."""
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    hidden = k > q
    return hidden | (k <= q - window) if window is not None else hidden


class _BandedAttention(gpt_flax.MultiHeadAttention):
    """The Flax attention's own _attend, with the window's band added to its mask (uncached only)."""

    band: int = 0

    def _attend(self, queries, keys, values, mask_bool):
        n_q, n_k = queries.shape[-2], keys.shape[-2]
        q, k = jnp.arange(n_q)[:, None] + (n_k - n_q), jnp.arange(n_k)[None, :]
        return super()._attend(queries, keys, values, mask_bool | (k <= q - self.band))


@functools.cache
def _banded_class(cls: type, window: int) -> type:
    bases = (_BandedAttention,) if issubclass(_BandedAttention, cls) else (_BandedAttention, cls)
    return type(f"{cls.__name__}[band={window}]", bases, {"band": window})


@contextlib.contextmanager
def _banded(twin: str, model, window: int | None) -> Iterator[None]:
    """The twin's uncached forward with the window's band: torch's mask buffer, Flax's _attend."""
    if window is None:
        yield
        return
    attention = [b.att for b in model.trf_blocks]
    if twin == "torch":
        saved = [att.mask for att in attention]
        for att in attention:
            att.mask = torch.from_numpy(_band(att.mask.shape[0], window).astype(np.float32))
        try:
            yield
        finally:
            for att, mask in zip(attention, saved, strict=True):
                att.mask = mask
        return
    classes: list[type] = [type(att) for att in attention]
    for att, cls in zip(attention, classes, strict=True):
        object.__setattr__(att, "__class__", _banded_class(cls, window))
    try:
        yield
    finally:
        for att, cls in zip(attention, classes, strict=True):
            object.__setattr__(att, "__class__", cls)


def _uncached(twin: str, model, ids: np.ndarray, window: int | None) -> dict[str, np.ndarray]:
    with _banded(twin, model, window):
        if twin == "torch":
            with torch.no_grad():
                return {k: v.numpy() for k, v in model(torch.from_numpy(ids), return_activations=True).items()}
        return {k: np.asarray(v) for k, v in gpt_flax.jit_forward(model, return_activations=True)(ids).items()}


def _production_tokens(twin: str, model, prompt: np.ndarray) -> np.ndarray:
    if twin == "torch":
        return gpt_torch.generate_text_simple_cached(model, torch.from_numpy(prompt), NEW_TOKENS).numpy()
    return np.asarray(gpt_flax.generate_text_simple_cached(model, prompt, NEW_TOKENS))


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    n = min(a.shape[1], b.shape[1])
    differ = np.flatnonzero((a[:, :n] != b[:, :n]).any(axis=0))
    return int(differ[0]) if differ.size else (None if a.shape == b.shape else n)


def _cache_part(
    part: str, models: dict[str, Any], prompts: np.ndarray, window: int | None, production: bool
) -> list[Finding]:
    stages = stage_names(models["torch"].cfg.n_layers)
    calls = {"torch": _torch_call(models["torch"]), "flax": _flax_call(models["flax"])}
    findings: list[Finding] = []
    runs: dict[str, list[_Run]] = {twin: [] for twin in TWINS}
    for twin in TWINS:
        model = models[twin]
        for p, prompt in enumerate(prompts):
            rows = f"prompt {p}"
            run = _drive(model, calls[twin], prompt)
            runs[twin].append(run)
            if run.error is not None:
                findings.append(Finding(part, rows, run.error[0], "raised", twin, False, np.inf, run.error[1], True))
            if not run.fed:
                continue
            ref = _uncached(twin, model, run.tokens[:, : run.fed], window)
            for j in range(run.fed):
                for stage in stages:
                    c = compare(stage, ref[stage][:, j], run.stages[stage][:, j], FP32_FORWARD)
                    findings.append(Finding(part, rows, j, stage, twin, c.passed, c.margin, c.describe()))
            greedy = ref["out_head"].argmax(-1)  # (batch, fed): the token after each position
            for j in range(PROMPT_LEN, run.tokens.shape[1]):
                ok = bool((run.tokens[:, j] == greedy[:, j - 1]).all())
                detail = f"cached {run.tokens[:, j].tolist()}, uncached greedy {greedy[:, j - 1].tolist()}"
                findings.append(Finding(part, rows, j, "tokens", twin, ok, 0.0 if ok else np.inf, detail))
        # Then the twin's own decoding loop on the same prompts again (prompts PROMPTS.. in the row the
        # model sees) must give the tokens of the steps above.
        for p, prompt in enumerate(prompts if production else ()):
            rows = f"prompt {PROMPTS + p}"
            try:
                made = _production_tokens(twin, model, prompt)
            except Exception as e:  # a refusal of the production loop is a finding too
                msg = f"generate_text_simple_cached raised {type(e).__name__}: {e}".splitlines()[0]
                findings.append(Finding(part, rows, PROMPT_LEN, "generate", twin, False, np.inf, msg, True))
                continue
            at = _first_difference(runs[twin][p].tokens, made)
            ok = at is None
            pos = runs[twin][p].tokens.shape[1] - 1 if ok else int(at)  # type: ignore[arg-type]
            detail = (
                "generate_text_simple_cached gives the tokens above" if ok else "generate_text_simple_cached differs"
            )
            findings.append(Finding(part, rows, pos, "generate", twin, ok, 0.0 if ok else np.inf, detail))
    for p in range(len(prompts)):  # the twins against each other, while their tokens agree
        t, f = runs["torch"][p], runs["flax"][p]
        rows = f"prompt {p}"
        same = min(t.fed, f.fed)
        at = _first_difference(t.tokens, f.tokens)
        if at is not None:
            same = min(same, at)
            detail = (
                f"torch {t.tokens[:, at].tolist()}, flax {f.tokens[:, at].tolist()}"
                if at < min(t.tokens.shape[1], f.tokens.shape[1])
                else "one twin stopped"
            )
            findings.append(Finding(part, rows, at, "tokens", "torch vs flax", False, np.inf, detail))
        for j in range(same):
            c = compare("out_head", t.stages["out_head"][:, j], f.stages["out_head"][:, j], FP32_FORWARD)
            findings.append(Finding(part, rows, j, "logits", "torch vs flax", c.passed, c.margin, c.describe()))
    return findings


# --- (b) sampling --------------------------------------------------------------------------------------


def reference_probabilities(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """The book's sampling distribution, in float64: logits below the k-th largest dropped, the rest
    divided by the temperature, softmax."""
    x = np.asarray(logits, dtype=np.float64)
    if top_k is not None:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    e = np.exp((x - x.max(axis=-1, keepdims=True)) / temperature)
    return e / e.sum(axis=-1, keepdims=True)


def _torch_probabilities(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """The torch twin's generate before torch.multinomial (its lines, on these logits)."""
    x = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    if top_k is not None:
        x = torch.where(x < torch.topk(x, top_k).values[:, -1:], -torch.inf, x)
    shifted = x - x.amax(dim=-1, keepdim=True)
    return torch.softmax(torch.where(shifted == 0, shifted, shifted / temperature), dim=-1).numpy()


def _flax_probabilities(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """The Flax twin's generate before jax.random.categorical (its top-k, its lines after)."""
    x = generate_module("flax")._filter_top_k(jnp.asarray(np.asarray(logits, np.float32)), top_k=top_k)
    shifted = x - x.max(axis=-1, keepdims=True)
    return np.asarray(jax.nn.softmax(jnp.where(shifted == 0, shifted, shifted / temperature), axis=-1))


_PROBABILITIES = {"torch": _torch_probabilities, "flax": _flax_probabilities}


def generate_module(twin: str) -> Any:
    """The twin's generate module (`gpt_torch.generate` the attribute is the function)."""
    return importlib.import_module(f"gpt_{twin}.generate")


def sampler(twin: str) -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    """(the pick_token the twin's generate calls now, the distribution it draws from): a sampler
    planted in its place carries its own `probabilities`."""
    pick = generate_module(twin).pick_token
    return pick, getattr(pick, "probabilities", _PROBABILITIES[twin])


def tie_rows(natural: np.ndarray, top_k: int = TOP_K, ties: int = TIES) -> np.ndarray:
    """Rows with `ties` logits equal to the k-th largest (the book keeps all of them; exactly k
    would drop some): from natural rows, and one row where every logit is equal."""
    rows = np.array(natural, dtype=np.float32, copy=True)
    for row in rows:
        order = np.argsort(-row, kind="stable")
        row[order[top_k - 1 : top_k - 1 + ties]] = row[order[top_k - 1]]
    return np.concatenate([rows, np.zeros((1, rows.shape[1]), np.float32)])


def _sampling_rows(part: str, rows: str, position: int, logits: np.ndarray, seed: int) -> list[Finding]:
    out = []
    ref = reference_probabilities(logits, TEMPERATURE, TOP_K)
    ref_pick = pick_token(logits, TEMPERATURE, TOP_K, seed, position)
    probs, picks = {}, {}
    for twin in TWINS:
        pick, probabilities = sampler(twin)
        probs[twin] = probabilities(logits, TEMPERATURE, TOP_K)
        c = compare("probabilities", ref, probs[twin], FP32_FORWARD)
        out.append(Finding(part, rows, position, "probabilities", twin, c.passed, c.margin, c.describe()))
        picks[twin] = np.asarray(pick(logits, TEMPERATURE, TOP_K, seed, position))
        ok = bool(np.array_equal(picks[twin], ref_pick))
        detail = f"drew {picks[twin].tolist()}, the reference {ref_pick.tolist()}"
        out.append(Finding(part, rows, position, "draws", twin, ok, 0.0 if ok else np.inf, detail))
    c = compare("probabilities", probs["torch"], probs["flax"], FP32_FORWARD)
    out.append(Finding(part, rows, position, "probabilities", "torch vs flax", c.passed, c.margin, c.describe()))
    ok = bool(np.array_equal(picks["torch"], picks["flax"]))
    detail = f"torch drew {picks['torch'].tolist()}, flax {picks['flax'].tolist()}"
    out.append(Finding(part, rows, position, "draws", "torch vs flax", ok, 0.0 if ok else np.inf, detail))
    return out


def _sampling_part(models: dict[str, Any], prompts: np.ndarray, seed: int) -> list[Finding]:
    part = "sampling"
    tm, fm = models["torch"], models["flax"]
    findings: list[Finding] = []
    first_rows = None
    for p, prompt in enumerate(prompts):
        # The torch twin's logits along its greedy continuation of the prompt: the same logits for both.
        with torch.no_grad():
            ids = gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), NEW_TOKENS - 1, tm.cfg.context_length)
            logits = tm(ids).numpy()
        first_rows = logits[:, 0] if first_rows is None else first_rows
        for j in range(logits.shape[1]):
            findings += _sampling_rows(part, f"prompt {p}", j, logits[:, j], seed)
        try:
            t = gpt_torch.generate(
                tm, torch.from_numpy(prompt), NEW_TOKENS, tm.cfg.context_length, TEMPERATURE, TOP_K, parity_seed=seed
            ).numpy()
            f = np.asarray(
                gpt_flax.generate(fm, prompt, NEW_TOKENS, fm.cfg.context_length, TEMPERATURE, TOP_K, parity_seed=seed)
            )
        except Exception as e:  # a sampler that crashes inside generate
            msg = f"generate raised {type(e).__name__}: {e}".splitlines()[0]
            findings.append(
                Finding(part, f"prompt {p}", PROMPT_LEN, "generate", "torch vs flax", False, np.inf, msg, True)
            )
            continue
        at = _first_difference(t, f)
        ok = at is None
        detail = "the same tokens" if ok else f"torch {t[:, at].tolist()}, flax {f[:, at].tolist()}"
        pos = t.shape[1] - 1 if at is None else at
        findings.append(
            Finding(part, f"prompt {p}", pos, "generate", "torch vs flax", ok, 0.0 if ok else np.inf, detail)
        )
    assert first_rows is not None
    built = tie_rows(first_rows)
    for r in range(built.shape[0]):
        findings += _sampling_rows(part, "ties", r, built[r : r + 1], seed)
    return findings


# --- the check -----------------------------------------------------------------------------------------


def check_fits(cfg: GPTConfig) -> None:
    if cfg.context_length < POSITIONS:
        raise ValueError(
            f"the generation check feeds {POSITIONS} positions: context_length {cfg.context_length} is too short"
        )
    if cfg.vocab_size < TOP_K + TIES:
        raise ValueError(f"the generation check's top-k rows need vocab_size >= {TOP_K + TIES}")


def build_models(
    cfg: GPTConfig, seed: int = 0, weights: Mapping[str, np.ndarray] | None = None
) -> dict[str, dict[str, Any]]:
    """Both twins from the same weights (the torch twin's init, copied, or `weights`, a
    checkpoint's state dict), eval mode: for the full cache, and with kv_window_size WINDOW for the
    sliding one."""
    check_fits(cfg)
    models = {}
    for part, window in (("cached", None), ("sliding", WINDOW)):
        tm, fm = build_pair("gpt", cfg.replace(kv_window_size=window), source="torch", seed=seed)
        if weights is not None:
            gpt_torch.load_state_dict(tm, weights)
            gpt_flax.load_state_dict(fm, weights)
        models[part] = {"torch": tm, "flax": fm}
    return models


def run_generation_check(
    cfg: GPTConfig,
    *,
    seed: int = 0,
    models: dict[str, dict[str, Any]] | None = None,
    plant: Plant | None = None,
) -> DecodingReport:
    """The generation check on `cfg` (weights from torch.manual_seed(seed), or `models` from
    build_models), with `plant` entered around each part (it takes the part's dict of both twins)."""
    models = build_models(cfg, seed) if models is None else models
    plant = plant or _NO_PLANT
    prompts = np.random.default_rng(seed).integers(0, cfg.vocab_size, (PROMPTS, BATCH, PROMPT_LEN))
    findings: list[Finding] = []
    for pair in models.values():  # each part starts with no cache allocated, before anything is planted
        for model in pair.values():
            model.reset_kv_cache()
    with float32_matmuls():
        with plant(models["cached"]):
            findings += _cache_part("cached", models["cached"], prompts, None, production=True)
        with plant(models["sliding"]):  # the compiled decoding loop is the cached part's, once is enough
            findings += _cache_part("sliding", models["sliding"], prompts, WINDOW, production=False)
        with plant(models["cached"]):
            findings += _sampling_part(models["cached"], prompts, seed)
    return DecodingReport(cfg, findings)
