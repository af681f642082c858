"""A stateful fuzzer of both twins: one hypothesis state machine drives a torch twin and a Flax twin
of the same weights through random sequences of public calls, and after every call holds them to
one outcome.

The calls: reset the KV cache (good and bad sizes), cached and uncached forwards (good ids and bad),
`cast` to each forward dtype (a float16 model does not train: both refuse its adamw), eval() and
train() (parity dropout is on in both, so train mode drops the same elements), adamw and
train_step (with the model's own optimizer, another model's, one made before a cast), greedy,
cached and parity-sampled generation (good arguments and bad), and a checkpoint saved by one twin
and loaded by both.

What must hold after every step: both twins succeed with results within the tier's bound (logits,
losses, weights after a step, generated tokens: a token may differ only where the two best logits
are within the bound of each other), or both refuse with a ValueError of the same words; a refused
call changes nothing (weights, cache, positions, dropout counter, optimizer); and the twins' state
stays alike (positions, cache sizes and contents, mode, dtype, weights).

Steps: the `machine-quick` profile below by default (a few seconds); `GPT_FUZZ_PROFILE=hunt` runs
400 sequences of up to 30 steps.
"""

import copy
import os
import tempfile

import numpy as np
import torch
from flax import nnx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from gpt_spec.randomness import gumbel_noise
from parity_tests.tolerances import BF16_FORWARD, BF16_LOSS, FP16_FORWARD, FP32_FORWARD, LOSS, Bound
from parity_tests.training import TRAINING_BOUNDS, weights_check
from parity_tests.twins import float32_matmuls

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "machine-quick", max_examples=5, stateful_step_count=10, deadline=None, suppress_health_check=_HEALTH
)
settings.register_profile(
    "machine-hunt", max_examples=400, stateful_step_count=30, deadline=None, suppress_health_check=_HEALTH
)
PROFILE = "hunt" if os.environ.get("GPT_FUZZ_PROFILE") == "hunt" else "quick"
STEPS = [0]  # calls checked, over every sequence (a hunt reports it: `pytest -s`)

# One config without a window and one whose KV cache slides: every call below is cheap, and the
# shapes come from small sets (each new one is a compilation in the Flax twin).
CONFIGS = [
    GPTConfig(vocab_size=97, context_length=8, emb_dim=12, n_heads=2, n_layers=2, drop_rate=0.25, qkv_bias=True),
    GPTConfig(
        vocab_size=97,
        context_length=8,
        emb_dim=12,
        n_heads=3,
        n_layers=1,
        drop_rate=0.25,
        qkv_bias=False,
        kv_window_size=4,
    ),
]
DROPOUT_SEED = 5
PARITY_SEED, TOP_K = 3, 5  # parity sampling's
STEP_OUTLIERS = 1e-3  # of the weights may pass the training bound after one step (see train_step)
FORWARD = {"float32": FP32_FORWARD, "bfloat16": BF16_FORWARD, "float16": FP16_FORWARD}
LOOSENESS = ["float32", "float16", "bfloat16"]  # FORWARD's tiers, tightest first
LOSSES = {"float32": LOSS, "bfloat16": BF16_LOSS}
BAD_IDS = [None, "past-vocab", "negative", "float", "empty"]


def _limit(bound: Bound, reference: np.ndarray) -> float:
    return bound.atol + bound.stol * float(np.abs(reference).max(initial=0.0))


class Refused(Exception):
    """Both twins refused with this ValueError message."""


def _outcome(call):
    try:
        return "ok", call()
    except ValueError as e:
        return "refused", str(e)


class TwinMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self):
        self.tmp.cleanup()

    # --- setup ---------------------------------------------------------------------------------

    @initialize(config=st.sampled_from(range(len(CONFIGS))), seed=st.integers(0, 3))
    def build(self, config, seed):
        self.cfg = CONFIGS[config]
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.t = gpt_torch.use_parity_dropout(gpt_torch.GPTModel(self.cfg), DROPOUT_SEED)
        self.f = gpt_flax.use_parity_dropout(gpt_flax.GPTModel(self.cfg, rngs=nnx.Rngs(seed)), DROPOUT_SEED)
        gpt_flax.load_state_dict(self.f, gpt_torch.state_dict(self.t))
        self.t.eval()
        self.f.eval()
        self.dtype = "float32"
        self.cache_filled = set()  # the dtypes the cache's keys and values were computed in
        self.opt: tuple | None = None  # (torch optimizer, flax optimizer), made for these models
        self.other: tuple | None = None  # a second pair of models, for optimizers that are not theirs

    # --- the machine's own view of the twins ---------------------------------------------------

    def _snapshot(self) -> dict:
        """Everything a refused call must leave as it was, per twin."""
        t, f = self.t, self.f
        snap = {
            "t_weights": gpt_torch.state_dict(t),
            "f_weights": gpt_flax.state_dict(f),
            "t_pos": t.current_pos,
            "f_pos": int(f.current_pos[...]),
            "t_max": t.cache_max_len,
            "f_max": f.cache_max_len,
            "t_count": t.dropout_counter.value,
            "f_count": int(f.dropout_counter[...]),
            "t_mode": t.training,
            "t_cache": [self._torch_cache(b.att) for b in t.trf_blocks],
            "f_cache": [self._flax_cache(b.att) for b in f.trf_blocks],
        }
        if self.opt is not None:
            snap["t_opt"] = sum(int(s.get("step", 0)) for s in self.opt[0].state.values())
            snap["f_opt"] = int(self.opt[1].step[...])
        return snap

    @staticmethod
    def _torch_cache(att):
        if att.cache_k is None:
            return None
        return att.ptr_current_pos, att.cache_k.float().numpy().copy(), att.cache_v.float().numpy().copy()

    @staticmethod
    def _flax_cache(att):
        if att.cache_k is None:
            return None
        k, v = (np.asarray(c[...].astype(np.float32)) for c in (att.cache_k, att.cache_v))
        return int(att.ptr_current_pos[...]), k, v

    def _assert_unchanged(self, before: dict, what: str) -> None:
        after = self._snapshot()
        for key, value in before.items():
            same = _equal(value, after[key])
            assert same, f"the refused {what} changed {key}"

    def _both(self, call_t, call_f, what: str):
        """Run both twins; both succeed (return both results) or both refuse alike (raise Refused),
        and a refusal changed nothing."""
        before = self._snapshot()
        t, f = _outcome(call_t), _outcome(call_f)
        assert t[0] == f[0], (
            f"{what}: torch {t[0]} ({t[1] if t[0] == 'refused' else ''}), flax {f[0]} ({f[1] if f[0] == 'refused' else ''})"
        )
        if t[0] == "refused":
            assert t[1] == f[1], f"{what}: the twins refused in other words:\n  torch: {t[1]}\n  flax:  {f[1]}"
            self._assert_unchanged(before, what)
            raise Refused(t[1])
        return t[1], f[1]

    def _ids(self, batch: int, n: int, bad: str | None = None) -> np.ndarray:
        ids = self.rng.integers(0, self.cfg.vocab_size, (batch, n))
        if bad == "past-vocab":
            ids[-1, -1] = self.cfg.vocab_size
        elif bad == "negative":
            ids[0, 0] = -1
        elif bad == "float":
            ids = ids.astype(np.float32)
        elif bad == "empty":
            ids = ids[:, :0]
        return ids

    def _forward_both(self, ids: np.ndarray, what: str, **kwargs):
        def run_t():
            with torch.no_grad(), float32_matmuls():
                return self.t(torch.from_numpy(ids), **kwargs).float().numpy()

        def run_f():
            with float32_matmuls():
                return np.asarray(self.f(ids, **kwargs))

        t, f = self._both(run_t, run_f, what)
        bound = self._bound(cached=kwargs.get("use_cache", False))
        assert np.abs(t - f).max(initial=0.0) <= _limit(bound, t), f"{what}: logits past {bound.describe()}"
        return t, f

    def _bound(self, cached: bool) -> Bound:
        """The forward's bound for this dtype, or the loosest of those that filled the cache it reads."""
        tiers = {self.dtype} | (self.cache_filled if cached else set())
        return FORWARD[max(tiers, key=LOOSENESS.index)]

    # --- rules ---------------------------------------------------------------------------------

    @rule(batch_size=st.sampled_from([None, 1, 2, 3, 0]), max_len=st.sampled_from([None, 1, 3, 8, 9]))
    def reset_cache(self, batch_size, max_len):
        try:
            self._both(
                lambda: self.t.reset_kv_cache(batch_size, max_len),
                lambda: self.f.reset_kv_cache(batch_size, max_len),
                "reset_kv_cache",
            )
        except Refused:
            return
        self.cache_filled = set()

    @rule(batch=st.sampled_from([1, 2, 3]), n=st.integers(1, 5), bad=st.sampled_from(BAD_IDS))
    def cached_forward(self, batch, n, bad):
        try:
            self._forward_both(self._ids(batch, n, bad), "cached forward", use_cache=True)
        except Refused:
            return
        self.cache_filled.add(self.dtype)

    @rule(batch=st.sampled_from([1, 2]), n=st.integers(1, 9), bad=st.sampled_from(BAD_IDS))
    def forward(self, batch, n, bad):
        try:
            self._forward_both(self._ids(batch, n, bad), "forward")
        except Refused:
            pass

    @rule(dtype=st.sampled_from(["float32", "bfloat16", "float16"]))
    def cast(self, dtype):
        try:
            self._both(lambda: gpt_torch.cast(self.t, dtype), lambda: gpt_flax.cast(self.f, dtype), "cast")
        except Refused:
            return
        self.dtype = dtype

    @rule(train=st.booleans())
    def mode(self, train):
        self.t.train(train)
        if train:
            self.f.train()
        else:
            self.f.eval()

    @rule(lr=st.sampled_from([4e-4, 1e-3, -1.0]))
    def make_optimizer(self, lr):
        try:
            self.opt = self._both(
                lambda: gpt_torch.adamw(self.t, lr=lr), lambda: gpt_flax.adamw(self.f, lr=lr), "adamw"
            )
        except Refused:
            pass

    @precondition(lambda self: self.opt is not None)
    @rule(
        seq=st.integers(1, 8),
        whose=st.sampled_from(["own", "own", "other's"]),
        bad=st.sampled_from([None, "past-vocab"]),
    )
    def train_step(self, seq, whose, bad):
        if whose == "other's":
            if self.other is None:
                self.other = (gpt_torch.GPTModel(self.cfg), gpt_flax.GPTModel(self.cfg, rngs=nnx.Rngs(9)))
            opt_t, opt_f = gpt_torch.adamw(self.other[0]), gpt_flax.adamw(self.other[1])
        else:
            assert self.opt is not None
            opt_t, opt_f = self.opt
        ids = self._ids(2, seq + 1, bad)
        x, y = ids[:, :-1], ids[:, 1:]
        lr = opt_t.param_groups[0]["lr"]

        def step_t():
            with float32_matmuls():
                return gpt_torch.train_step(self.t, opt_t, torch.from_numpy(x), torch.from_numpy(y))

        def step_f():
            with float32_matmuls():
                return gpt_flax.train_step(self.f, opt_f, x, y)

        try:
            t_loss, f_loss = self._both(step_t, step_f, "train_step")
        except Refused:
            return
        loss = LOSSES[self.dtype]
        assert abs(t_loss - f_loss) <= loss.atol + loss.rtol * abs(t_loss), f"losses {t_loss} and {f_loss}"
        # The suite's rule for one step from equal weights (the tier's bound and envelope), with at
        # least STEP_OUTLIERS of the elements let past the bound: on these few thousand weights and
        # batches of 2 to 16 tokens a gradient element at the rounding floor flips an update now and
        # then (one seen in float32). A step that trains another model, or nothing, moves them all.
        t_w, f_w = gpt_torch.state_dict(self.t), gpt_flax.state_dict(self.f)
        fraction = max(STEP_OUTLIERS, TRAINING_BOUNDS[self.dtype].outlier_fraction)
        check = weights_check(1, t_w, f_w, lr, fraction, dtype=self.dtype)
        assert check.passed, (
            f"weights after a step: {check.n_outliers} outliers, {check.past_envelope} past the envelope"
        )
        gpt_flax.load_state_dict(self.f, t_w)  # the same weights again: later calls compare tightly

    @rule(
        kind=st.sampled_from(["simple", "greedy", "cached", "sampled"]),
        batch=st.sampled_from([1, 2]),
        n_prompt=st.integers(1, 4),
        max_new=st.sampled_from([0, 1, 3, 5, -1]),
        temperature=st.sampled_from([0.7, 1e-30, -1.0]),
    )
    def generate(self, kind, batch, n_prompt, max_new, temperature):
        prompt = self._ids(batch, n_prompt)
        ctx = self.cfg.context_length
        calls = {
            "simple": (
                lambda m, p: gpt_torch.generate_text_simple(m, p, max_new, ctx),
                lambda m, p: gpt_flax.generate_text_simple(m, p, max_new, ctx),
            ),
            "greedy": (
                lambda m, p: gpt_torch.generate(m, p, max_new, ctx),
                lambda m, p: gpt_flax.generate(m, p, max_new, ctx),
            ),
            "cached": (
                lambda m, p: gpt_torch.generate_text_simple_cached(m, p, max_new),
                lambda m, p: gpt_flax.generate_text_simple_cached(m, p, max_new),
            ),
            "sampled": (
                lambda m, p: gpt_torch.generate(m, p, max_new, ctx, temperature, TOP_K, parity_seed=PARITY_SEED),
                lambda m, p: gpt_flax.generate(m, p, max_new, ctx, temperature, TOP_K, parity_seed=PARITY_SEED),
            ),
        }
        gen_t, gen_f = calls[kind]
        replay = copy.deepcopy(self.t)  # the torch twin as it was: to see a divergence's logits

        def run_t():
            with float32_matmuls():
                return gen_t(self.t, torch.from_numpy(prompt)).numpy()

        def run_f():
            with float32_matmuls():
                return np.asarray(gen_f(self.f, prompt))

        try:
            t, f = self._both(run_t, run_f, f"{kind} generation")
        except Refused:
            return
        assert t.shape == f.shape and (t[:, :n_prompt] == prompt).all(), f"{kind}: {t} vs {f}"
        if kind == "cached" and max_new > 0:  # the generation reset and filled the cache
            self.cache_filled = {self.dtype}
        if not np.array_equal(t, f):
            self._near_tie(replay, prompt, t, f, kind, temperature)

    def _near_tie(self, replay, prompt, t, f, kind, temperature) -> None:
        """The twins' tokens differ first at (row, step): accepted only where the pick hangs on a
        near-tie, two candidates within twice the bound of each other in torch's logits (each twin's
        logits are within the bound of the other's). Generation then went different ways: the
        caches are emptied, alike."""
        row, col = (int(i) for i in np.argwhere(t != f)[0])
        step = col - prompt.shape[1]
        seen: list[torch.Tensor] = []
        hook = replay.out_head.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
        with float32_matmuls():
            _regenerate(replay, prompt, step + 1, self.cfg, kind, temperature)
        hook.remove()
        logits = seen[-1][row, -1].float().numpy().astype(np.float64)
        slack = 2 * _limit(FORWARD[self.dtype], logits)
        a, b = int(t[row, col]), int(f[row, col])
        if kind == "sampled":  # Gumbel-max over the top 5: a near-tie of the noisy scores, or at the 5th
            noise = gumbel_noise(PARITY_SEED, step, (t.shape[0], logits.size))[row].astype(np.float64)
            kth = np.sort(logits)[-TOP_K]
            tie = abs((logits[a] - logits[b]) + temperature * (noise[a] - noise[b])) <= slack
            tie = tie or min(abs(logits[a] - kth), abs(logits[b] - kth)) <= slack
        else:
            tie = abs(logits[a] - logits[b]) <= slack
        assert tie, f"{kind}: tokens {a} (torch) and {b} (flax) at step {step} of row {row}, not a near-tie"
        self.t.reset_kv_cache()
        self.f.reset_kv_cache()
        self.cache_filled = set()

    @rule(saver=st.sampled_from(["torch", "flax"]), suffix=st.sampled_from([".safetensors", ".safetensors", ".pth"]))
    def save_and_load(self, saver, suffix):
        """Each twin saves; both load the file one of them wrote (fresh models: parity dropout put
        back, the mode kept, no optimizer)."""
        path = os.path.join(self.tmp.name, "m" + suffix)  # one name: a refusal names it in both
        paths = {twin: os.path.join(self.tmp.name, twin + suffix) for twin in ("torch", "flax")}

        def save(twin, package, model):
            package.save(model, path)
            os.replace(path, paths[twin])

        try:
            self._both(lambda: save("torch", gpt_torch, self.t), lambda: save("flax", gpt_flax, self.f), "save")
        except Refused:
            return
        training = self.t.training
        self.t = gpt_torch.use_parity_dropout(gpt_torch.load(paths[saver]), DROPOUT_SEED)
        self.f = gpt_flax.use_parity_dropout(gpt_flax.load(paths[saver]), DROPOUT_SEED)
        self.mode(training)
        self.opt = None  # made for the models replaced
        self.cache_filled = set()

    # --- what holds after every step -------------------------------------------------------------

    @invariant()
    def alike(self):
        if not hasattr(self, "t"):
            return
        STEPS[0] += 1
        t, f = self.t, self.f
        assert t.current_pos == int(f.current_pos[...]) and t.cache_max_len == f.cache_max_len
        assert t.dropout_counter.value == int(f.dropout_counter[...])
        assert t.training == (not f.trf_blocks[0].drop_shortcut.deterministic)
        assert str(t.tok_emb.weight.dtype).removeprefix("torch.") == self.dtype == f.tok_emb.embedding.dtype.name
        t_w, f_w = gpt_torch.state_dict(t), gpt_flax.state_dict(f)
        assert all(np.array_equal(t_w[k], f_w[k]) for k in t_w), "the weights differ"
        for tb, fb in zip(t.trf_blocks, f.trf_blocks, strict=True):
            tc, fc = self._torch_cache(tb.att), self._flax_cache(fb.att)
            assert (tc is None) == (fc is None)
            if tc is None:
                continue
            assert tc[0] == fc[0]
            for tt, ff in zip(tc[1:], fc[1:], strict=True):
                ff = ff.reshape(tt.shape)  # the Flax cache folds the heads into the batch axis
                assert np.abs(tt - ff).max() <= _limit(self._bound(cached=True), tt), "the caches differ"


def _regenerate(model, prompt, max_new, cfg, kind, temperature) -> None:
    """The torch twin's generation of `kind` again, `max_new` tokens, on a copy of the model as it was."""
    ctx, p = cfg.context_length, torch.from_numpy(prompt)
    if kind == "simple":
        gpt_torch.generate_text_simple(model, p, max_new, ctx)
    elif kind == "greedy":
        gpt_torch.generate(model, p, max_new, ctx)
    elif kind == "cached":
        gpt_torch.generate_text_simple_cached(model, p, max_new)
    else:
        gpt_torch.generate(model, p, max_new, ctx, temperature, TOP_K, parity_seed=PARITY_SEED)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


TwinMachine.TestCase.settings = settings.get_profile(f"machine-{PROFILE}")

# GPT_MACHINE_RULES=cast,cached_forward hunts with those rules alone (a rule left out is replaced by
# a plain method, which the machine does not see as a rule).
if os.environ.get("GPT_MACHINE_RULES"):
    _kept = set(os.environ["GPT_MACHINE_RULES"].split(","))
    for _name, _value in list(vars(TwinMachine).items()):
        if _name not in _kept and hasattr(_value, "hypothesis_stateful_rule"):
            setattr(TwinMachine, _name, lambda self, **kwargs: None)


def test_the_twins_stay_twins():
    STEPS[0] = 0
    TwinMachine.TestCase().runTest()
    if PROFILE == "hunt":
        print(f"\nthe twin machine checked {STEPS[0]} calls")
