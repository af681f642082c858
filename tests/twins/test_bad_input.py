"""Bad input and odd input, each twin against the other: the same refusal (ValueError, same words,
same culprit named first) or the same result, never a silently wrong one.

| input | message |
|---|---|
| int16 prompt, vocab_size 50257 (either generator) | token ids of dtype int16 cannot hold every id of the vocabulary (up to 50256, vocab_size 50257): generation would wrap them; pass int32 or int64 ids |
| uint64 id 2**63 | token id 9223372036854775808 is out of range [0, 97) (vocab_size) |
| adamw(lr=nan) | lr must be a finite number >= 0, got nan |
| adamw(lr=None) | lr must be a real number, got None (NoneType) |
| adamw(betas=(1.0, 0.999)) | betas[0] must be in [0, 1), got 1.0 |
| adamw(eps=0.0) | eps must be a finite number >= 1.17549e-38 (float32's smallest normal), got 0.0 |
| adamw(lr=1e39, betas=(0.0, 0.999)) | lr / (1 - betas[0]), Adam's first step size, must be at most 3.4028234663852886e+38 (float32's largest), got 1e+39 |
| adamw(lr=1e30, weight_decay=1e10) | lr * weight_decay must be at most 3.4028234663852886e+38 (float32's largest), got 1e+40 |
| GPTConfig(vocab_size=10**30, ...) | vocab_size must be at most 2147483647 (2**31 - 1: token ids and positions are int32 in JAX), got 10**30 |
| GPTModel(emb_dim=3_000_000, ...) | GPTModel with 1.08e14 parameters needs 432 TB (float32 parameters, causal masks and 64 kB per block) to build; 22 GB of memory is available |
| DummyGPTModel(n_layers=2**31 - 1, ...) | DummyGPTModel with 4,920 parameters needs 8.59 TB (float32 parameters and 4 kB per block) to build; 22 GB of memory is available |
| generate_text_simple(16 prompts, 10**9 new tokens) | generating 1000000000 new tokens at batch 16 needs 128 GB for the output ids alone (16 x 1000000003 int64); 22 GB of memory is available |
| a state dict with W_key and W_query both of a wrong shape | state dict key 'trf_blocks.0.att.W_query.weight' has shape ... (the first in model order, in both twins) |
| train_step with a bad input and a bad target | the input's refusal (inputs are checked first, in both twins) |
| calc_loss_batch(..., device="bogus"), device=3 | device 'bogus' names no device this framework has here; device must be a device or a device name such as 'cpu', got 3 (int) |
| torch ids as a sparse, meta or nested tensor | token ids must be a dense tensor holding its values, got a sparse_coo tensor |
| create_dataloader_v1(b"...") | txt must be a str, got bytes |
"""

import importlib
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig
from gpt_spec.layout import model_shapes
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.twins import build_pair, float32_matmuls
from tests import helpers

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
NOISELESS = TINY.replace(drop_rate=0.0)
# Wide enough that an int16 (or int8, uint8) prompt cannot hold every id; narrow to stay cheap.
BIG_VOCAB = GPTConfig(
    vocab_size=50257, context_length=11, emb_dim=4, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False
)


def _refusals(call_torch, call_flax) -> tuple[str, str]:
    """Both calls raise ValueError (and nothing else); their messages."""
    with pytest.raises(ValueError) as t_err:
        call_torch()
    with pytest.raises(ValueError) as f_err:
        call_flax()
    return str(t_err.value), str(f_err.value)


def _same_refusal(call_torch, call_flax) -> str:
    t, f = _refusals(call_torch, call_flax)
    assert t == f
    return t


# 1. Ids of every integer dtype; generation never wraps an id.


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_ids_of_any_integer_dtype_give_what_int64_ids_give(dtype):
    """forward, calc_loss_batch, loss_and_grads and train_step of both twins."""
    tm, fm = build_pair("gpt", NOISELESS, source="torch", mode="train")
    ids = np.random.default_rng(1).integers(0, NOISELESS.vocab_size, (2, 7))
    ids[0, 0] = NOISELESS.vocab_size - 1  # the edge of the range, which int8 still holds
    x, y = ids[:, :-1], ids[:, 1:]
    xd, yd = x.astype(dtype), y.astype(dtype)
    tx, ty, txd, tyd = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, y, xd, yd))
    with float32_matmuls():
        np.testing.assert_array_equal(tm(txd).detach().numpy(), tm(tx).detach().numpy())
        np.testing.assert_array_equal(np.asarray(fm(xd)), np.asarray(fm(x)))
        t_loss = gpt_torch.calc_loss_batch(txd, tyd, tm).item()
        f_loss = float(gpt_flax.calc_loss_batch(xd, yd, fm))
        assert t_loss == gpt_torch.calc_loss_batch(tx, ty, tm).item()
        assert f_loss == float(gpt_flax.calc_loss_batch(x, y, fm))
        assert abs(t_loss - f_loss) < 1e-5
        t_grad_loss, t_grads = gpt_torch.loss_and_grads(tm, txd, tyd)
        f_grad_loss, f_grads = gpt_flax.loss_and_grads(fm, xd, yd)
        assert abs(t_grad_loss - f_grad_loss) < 1e-5
        np.testing.assert_allclose(f_grads["out_head.weight"], t_grads["out_head.weight"], atol=1e-6)
        t_step = gpt_torch.train_step(tm, gpt_torch.adamw(tm), txd, tyd)
        f_step = gpt_flax.train_step(fm, gpt_flax.adamw(fm), xd, yd)
    assert abs(t_step - f_step) < 1e-5 and abs(t_step - t_loss) < 1e-5


@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_uint64_ids_past_2_63_are_out_of_range_not_negative(value):
    tm, fm = build_pair("dummy", TINY, source="torch")
    ids = np.array([[1, value, 3]], np.uint64)
    message = _same_refusal(lambda: tm(torch.from_numpy(ids)), lambda: fm(ids))
    assert message == f"token id {value} is out of range [0, 97) (vocab_size)"
    low = np.array([[1, 2, 3]], np.uint64)
    np.testing.assert_array_equal(
        tm(torch.from_numpy(low)).detach().numpy(), tm(torch.from_numpy(low.astype(np.int64))).detach().numpy()
    )


def _pointing_at(token: int):
    """A DummyGPTModel pair on GPT-2's vocabulary whose logits peak at `token` everywhere."""
    sd = gpt_torch.state_dict(gpt_torch.DummyGPTModel(BIG_VOCAB))
    sd["tok_emb.weight"][:] = 0.5
    sd["pos_emb.weight"][:] = 0.5
    sd["out_head.weight"][:] = 0.0
    sd["out_head.weight"][token] = 1.0
    tm, fm = gpt_torch.DummyGPTModel(BIG_VOCAB).eval(), gpt_flax.DummyGPTModel(BIG_VOCAB, rngs=nnx.Rngs(0))
    gpt_torch.load_state_dict(tm, sd)
    gpt_flax.load_state_dict(fm, sd)
    fm.eval()
    return tm, fm


GENERATORS = {
    "simple": (
        lambda m, ids, n: gpt_torch.generate_text_simple(m, ids, n, BIG_VOCAB.context_length),
        lambda m, ids, n: gpt_flax.generate_text_simple(m, ids, n, BIG_VOCAB.context_length),
    ),
    "cached": (
        lambda m, ids, n: gpt_torch.generate_text_simple_cached(m, ids, n),
        lambda m, ids, n: gpt_flax.generate_text_simple_cached(m, ids, n),
    ),
}


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8])
def test_a_prompt_dtype_that_cannot_hold_the_vocabulary_is_refused(generator, dtype):
    """The Flax twin wrote id 35000 of an int16 prompt as -30536 and went on."""
    tm, fm = _pointing_at(35000)
    prompt = np.array([[1, 2, 3]], dtype)
    gen_t, gen_f = GENERATORS[generator]
    message = _same_refusal(lambda: gen_t(tm, torch.from_numpy(prompt), 4), lambda: gen_f(fm, prompt, 4))
    name = np.dtype(dtype).name
    assert message == (
        f"token ids of dtype {name} cannot hold every id of the vocabulary (up to 50256, "
        "vocab_size 50257): generation would wrap them; pass int32 or int64 ids"
    )


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_generated_ids_keep_the_prompts_dtype_and_never_wrap(generator, dtype):
    tm, fm = _pointing_at(35000)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], dtype)
    gen_t, gen_f = GENERATORS[generator]
    t = gen_t(tm, torch.from_numpy(prompt), 4)
    f = gen_f(fm, prompt, 4)
    assert t.dtype == torch.from_numpy(prompt).dtype
    assert f.dtype == jax.numpy.asarray(prompt).dtype  # jnp's canonical form: uint64 as uint32
    expected = np.concatenate([prompt.astype(np.int64), np.full((2, 4), 35000)], axis=1)
    np.testing.assert_array_equal(t.to(torch.int64).numpy(), expected)
    np.testing.assert_array_equal(np.asarray(f).astype(np.int64), expected)


# 2. adamw's arguments.

NAN, INF = float("nan"), float("inf")
BAD_ADAMW = [
    (dict(lr=NAN), "lr must be a finite number >= 0, got nan"),
    (dict(lr=INF), "lr must be a finite number >= 0, got inf"),
    (dict(lr=-1e-3), "lr must be a finite number >= 0, got -0.001"),
    (dict(lr=None), "lr must be a real number, got None (NoneType)"),
    (dict(lr="4e-4"), "lr must be a real number, got '4e-4' (str)"),
    (dict(lr=True), "lr must be a real number, got True (bool)"),
    (dict(lr=np.float32(NAN)), "lr must be a finite number >= 0, got np.float32(nan)"),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0, got -0.1"),
    (dict(weight_decay=NAN), "weight_decay must be a finite number >= 0, got nan"),
    (dict(weight_decay=None), "weight_decay must be a real number, got None (NoneType)"),
    (dict(betas=(1.0, 0.999)), "betas[0] must be in [0, 1), got 1.0"),
    (dict(betas=(-0.1, 0.999)), "betas[0] must be in [0, 1), got -0.1"),
    (dict(betas=(0.9, NAN)), "betas[1] must be in [0, 1), got nan"),
    (dict(betas=(0.9, INF)), "betas[1] must be in [0, 1), got inf"),
    (dict(betas=(0.9, None)), "betas[1] must be a real number, got None (NoneType)"),
    (dict(betas=(False, 0.999)), "betas[0] must be a real number, got False (bool)"),
    (dict(betas=0.9), "betas must be a pair (beta1, beta2), got 0.9"),
    (dict(betas=(0.9,)), "betas must be a pair (beta1, beta2), got (0.9,)"),
    (dict(betas="ab"), "betas must be a pair (beta1, beta2), got 'ab'"),
    (dict(eps=-1e-8), "eps must be a finite number >= 1.17549e-38 (float32's smallest normal), got -1e-08"),
    (dict(eps=0.0), "eps must be a finite number >= 1.17549e-38 (float32's smallest normal), got 0.0"),
    (dict(eps=1e-45), "eps must be a finite number >= 1.17549e-38 (float32's smallest normal), got 1e-45"),
    (dict(eps=INF), "eps must be a finite number >= 1.17549e-38 (float32's smallest normal), got inf"),
    (dict(weight_decay=10**400), "weight_decay must be a finite number >= 0, got " + str(10**400)),
    # Found by tests/twins/test_fuzz.py: torch raised RuntimeError in the step, optax made every weight inf.
    (
        dict(lr=1e39, betas=(0.0, 0.999)),
        "lr / (1 - betas[0]), Adam's first step size, must be at most "
        "3.4028234663852886e+38 (float32's largest), got 1e+39",
    ),
    (
        dict(lr=1e30, weight_decay=1e10),
        "lr * weight_decay must be at most 3.4028234663852886e+38 (float32's largest), got 1e+40",
    ),
]


@pytest.mark.parametrize("kwargs, message", BAD_ADAMW, ids=[m for _, m in BAD_ADAMW])
def test_both_adamw_refuse_the_same_arguments_alike(kwargs, message):
    tm, fm = build_pair("dummy", TINY, source="torch")
    t, f = _refusals(lambda: gpt_torch.adamw(tm, **kwargs), lambda: gpt_flax.adamw(fm, **kwargs))
    assert t == f == message


def test_adamw_takes_numpy_scalars_zero_and_ints_and_steps_alike():
    tm, fm = build_pair("dummy", TINY.replace(drop_rate=0.0), source="torch", mode="train")
    args = dict(lr=np.float32(1e-2), weight_decay=0, betas=[np.float64(0.8), 0.99], eps=np.float32(1e-6))
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 6))
    with float32_matmuls():
        gpt_torch.train_step(
            tm, gpt_torch.adamw(tm, **args), torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
        )
        gpt_flax.train_step(fm, gpt_flax.adamw(fm, **args), ids[:, :-1], ids[:, 1:])
    t, f = gpt_torch.state_dict(tm), gpt_flax.state_dict(fm)
    for name in t:
        np.testing.assert_allclose(f[name], t[name], atol=1e-5, err_msg=name)


# 3. Sizes: a ceiling on every size, what fits in memory, and interruptible generation.

CEILING = "must be at most 2147483647 (2**31 - 1: token ids and positions are int32 in JAX)"


@pytest.mark.parametrize(
    "field, value",
    [("vocab_size", 10**30), ("context_length", 2**63), ("emb_dim", 2**31), ("n_heads", 2**40), ("n_layers", 2**31)],
)
def test_config_sizes_have_a_ceiling(field, value):
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**TINY.to_dict(), field: value})
    assert str(e.value) == f"{field} {CEILING}, got {value}"


def test_the_ceiling_itself_is_a_valid_size():
    top = 2**31 - 1
    cfg = GPTConfig(
        vocab_size=top, context_length=top, emb_dim=top, n_heads=top, n_layers=top, drop_rate=0.0, qkv_bias=False
    )
    assert cfg.head_dim == 1


@pytest.mark.parametrize("cfg", [TINY, TINY_BIAS, BIG_VOCAB], ids=["tiny", "bias", "big-vocab"])
def test_the_parameter_count_is_the_models(cfg):
    from gpt_spec.limits import n_parameters

    for model, options in [("GPTModel", {}), ("DummyGPTModel", {}), ("DummyGPTModel", {"final_norm": "layernorm"})]:
        expected = sum(int(np.prod(s)) for s in model_shapes(model, cfg, options).values())
        assert n_parameters(model, cfg, **options) == expected
        built = getattr(gpt_torch, model)(cfg, **options)
        assert sum(p.numel() for p in built.parameters()) == expected


def test_a_model_memory_cannot_hold_is_refused_alike(monkeypatch):
    monkeypatch.setattr("gpt_spec.limits.available_memory", lambda: 50_000)
    message = _same_refusal(lambda: gpt_torch.GPTModel(TINY), lambda: gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0)))
    # 19,272 float32 parameters, 2 causal masks of 11 x 11 floats and 2 blocks: 206,056 bytes.
    assert message == (
        "GPTModel with 19,272 parameters needs 206 kB (float32 parameters, causal masks and "
        "64 kB per block) to build; 50 kB of memory is available"
    )
    monkeypatch.setattr("gpt_spec.limits.available_memory", lambda: 19_000)
    message = _same_refusal(
        lambda: gpt_torch.DummyGPTModel(TINY), lambda: gpt_flax.DummyGPTModel(TINY, rngs=nnx.Rngs(0))
    )
    assert message == (
        "DummyGPTModel with 4,920 parameters needs 27.7 kB (float32 parameters and 4 kB per "
        "block) to build; 19 kB of memory is available"
    )
    monkeypatch.setattr("gpt_spec.limits.available_memory", lambda: None)  # unknown: not checked
    gpt_torch.GPTModel(TINY)
    gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "change, models",
    [
        ({"emb_dim": 3_000_000, "n_heads": 1}, ["GPTModel"]),  # DummyGPTModel: 2.5 GB, it would be built
        ({"vocab_size": 2**31 - 1, "emb_dim": 768, "n_heads": 1}, ["GPTModel", "DummyGPTModel"]),
        ({"context_length": 2**31 - 1}, ["GPTModel", "DummyGPTModel"]),
        # Found by tests/twins/test_fuzz.py: a DummyGPTModel's parameters do not grow with its blocks.
        ({"n_layers": 2**31 - 1}, ["GPTModel", "DummyGPTModel"]),
    ],
    ids=["emb_dim-3e6", "vocab-2**31-1", "context-2**31-1", "layers-2**31-1"],
)
def test_a_model_no_machine_holds_is_refused_before_anything_is_allocated(change, models):
    """Before: torch raised RuntimeError or TypeError; the Flax twin aborted the interpreter."""
    cfg = TINY.replace(**change)
    for model in models:
        message = _same_refusal(
            lambda: getattr(gpt_torch, model)(cfg), lambda: getattr(gpt_flax, model)(cfg, rngs=nnx.Rngs(0))
        )
        assert re.fullmatch(
            rf"{model} with \S+ parameters needs \S+ [kMGTPEZ]?B \(float32 parameters"
            rf"(, causal masks)? and \d+ kB per block\) to build; \S+ [kMGTPEZ]?B of memory is "
            "available",
            message,
        ), message


def test_the_available_memory_is_read():
    from gpt_spec.limits import available_memory

    assert available_memory() > 0


def test_an_output_memory_cannot_hold_is_refused_before_generation(monkeypatch):
    tm, fm = build_pair("dummy", TINY, source="torch")
    monkeypatch.setattr("gpt_spec.limits.available_memory", lambda: 1_000)
    prompt = np.ones((16, 3), np.int64)
    for gen_t, gen_f in [
        (gpt_torch.generate_text_simple, gpt_flax.generate_text_simple),
        (gpt_torch.generate_text_simple_cached, gpt_flax.generate_text_simple_cached),
    ]:
        message = _same_refusal(lambda: gen_t(tm, torch.from_numpy(prompt), 5, 11), lambda: gen_f(fm, prompt, 5, 11))
        assert message == (
            "generating 5 new tokens at batch 16 needs 1.02 kB for the output ids alone "
            "(16 x 8 int64); 1 kB of memory is available"
        )


def test_a_billion_new_tokens_at_batch_16_is_refused_on_this_machine(monkeypatch):
    """Before: the Flax twin allocated a 64 GB buffer and aborted; torch ran for days."""
    from gpt_spec import limits

    real = limits.available_memory()
    # This machine's memory, capped below the 128 GB asked for: on a bigger one the call would run.
    monkeypatch.setattr(limits, "available_memory", lambda: min(real or 10**11, 10**11))
    tm, fm = build_pair("dummy", TINY, source="torch")
    prompt = np.ones((16, 3), np.int64)
    message = _same_refusal(
        lambda: gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), 10**9, 11),
        lambda: gpt_flax.generate_text_simple(fm, prompt, 10**9, 11),
    )
    assert message.startswith("generating 1000000000 new tokens at batch 16 needs 128 GB for the output ids alone")


def test_a_sequence_past_the_position_ceiling_is_refused():
    tm, fm = build_pair("dummy", TINY, source="torch")
    prompt = np.ones((1, 3), np.int8)
    message = _same_refusal(
        lambda: gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), 2**31, 11),
        lambda: gpt_flax.generate_text_simple(fm, prompt, 2**31, 11),
    )
    assert message == (
        "a prompt of 3 and 2147483648 new tokens make 2147483651 tokens, more than 2147483647 "
        "(2**31 - 1: token ids and positions are int32 in JAX)"
    )


LONG = GPTConfig(vocab_size=97, context_length=100, emb_dim=4, n_heads=1, n_layers=1, drop_rate=0.0, qkv_bias=False)


def _count_waits(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """Count jax.block_until_ready calls (the generators wait for each chunk with it); raise
    KeyboardInterrupt, as Ctrl-C would, once the `interrupt_at`-th has returned."""
    waits = []
    wait = jax.block_until_ready

    def counting(x):
        out = wait(x)
        waits.append(1)
        if len(waits) == interrupt_at:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(jax, "block_until_ready", counting)
    return waits


def test_long_generation_runs_in_chunks_of_one_compiled_program(monkeypatch):
    """Ctrl-C lands between chunks, and the chunks share one compilation per shape."""
    # The module, not the package's `generate` (the book's chapter-5 function, which shadows it).
    flax_generate = importlib.import_module("gpt_flax.generate")

    chunk = getattr(flax_generate, "GENERATE_CHUNK", None)
    assert chunk == 32
    tm, fm = build_pair("gpt", LONG, source="torch", seed=4)
    prompt = np.random.default_rng(0).integers(0, LONG.vocab_size, (3, 2))  # a shape no other test uses
    with float32_matmuls():
        expected = gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), 3 * chunk, 20).numpy()
        waits = _count_waits(monkeypatch)
        with helpers.compilations() as compiled:
            out = np.asarray(gpt_flax.generate_text_simple(fm, prompt, 3 * chunk, 20))
        assert compiled["_generate"] == 1, compiled
        assert len(waits) == 3
        np.testing.assert_array_equal(out, expected)
        # Cached: one prefill, then 2 * chunk + 4 decode steps in 3 chunks of one program.
        n_new = 2 * chunk + 5
        expected = gpt_torch.generate_text_simple_cached(tm, torch.from_numpy(prompt), n_new).numpy()
        waits.clear()
        with helpers.compilations() as compiled:
            out = np.asarray(gpt_flax.generate_text_simple_cached(fm, prompt, n_new))
        assert compiled["_generate_cached"] == 1, compiled
        assert len(waits) == 3
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("cached", [False, True], ids=["simple", "cached"])
def test_ctrl_c_stops_a_long_generation_between_chunks(monkeypatch, cached):
    tm, fm = build_pair("gpt", LONG, source="torch", seed=4)
    prompt = np.array([[5, 6]])
    generate = (
        (lambda: gpt_flax.generate_text_simple_cached(fm, prompt, 90))
        if cached
        else (lambda: gpt_flax.generate_text_simple(fm, prompt, 90, LONG.context_length))
    )
    expected = np.asarray(generate())
    waits = _count_waits(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        generate()
    assert len(waits) == 2  # the third chunk never ran
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(generate()), expected)  # the model is whole


# 4. The same culprit named first; the same inputs taken.


def _cropped(sd, *names):
    return {k: (v[:-1].copy() if k in names else v) for k, v in sd.items()}


@pytest.mark.parametrize(
    "cfg, bad, first",
    [
        (TINY, ("out_head.weight", "pos_emb.weight"), "pos_emb.weight"),
        (TINY, ("pos_emb.weight", "tok_emb.weight"), "tok_emb.weight"),
        (TINY, ("trf_blocks.1.att.W_key.weight", "trf_blocks.1.att.W_query.weight"), "trf_blocks.1.att.W_query.weight"),
        (
            TINY,
            ("trf_blocks.0.ff.layers.2.weight", "trf_blocks.0.att.W_value.weight"),
            "trf_blocks.0.att.W_value.weight",
        ),
        (
            TINY.replace(n_layers=11),
            ("trf_blocks.2.ff.layers.0.weight", "trf_blocks.10.ff.layers.0.weight"),
            "trf_blocks.2.ff.layers.0.weight",
        ),
    ],
    ids=["out_head-pos_emb", "pos_emb-tok_emb", "W_key-W_query", "ff-W_value", "block-10-block-2"],
)
def test_two_bad_keys_the_first_in_model_order_is_named_by_both(cfg, bad, first):
    tm, fm = build_pair("gpt", cfg, source="torch")
    sd = _cropped(gpt_torch.state_dict(tm), *bad)
    message = _same_refusal(lambda: gpt_torch.load_state_dict(tm, sd), lambda: gpt_flax.load_state_dict(fm, sd))
    assert message.startswith(f"state dict key {first!r} has shape")


BAD_PAIRS = [
    (np.array([[1, 97, 3]]), np.array([[1, -1, 3]]), "token id 97 is out of range [0, 97) (vocab_size)"),
    (np.zeros((1, 3), np.float32), np.array([[1, 2, 97]]), "token ids must be integers, got dtype float32"),
    (np.zeros((1, 12), np.int64), np.zeros((1, 3), np.float32), "sequence length 12 exceeds context_length 11"),
    (
        np.zeros((3,), np.int64),
        np.zeros((2, 2, 2), np.int64),
        "token ids must have shape (batch, seq_len), got shape (3,)",
    ),
    (
        np.zeros((1, 3), np.int64),
        np.zeros((1, 4), np.int64),
        "targets have shape (1, 4), expected the inputs' shape (1, 3)",
    ),
    (np.zeros((1, 3), np.int64), np.array([[0, 0, 97, 0]]), "token id 97 is out of range [0, 97) (vocab_size)"),
]


@pytest.mark.parametrize("entry", ["calc_loss_batch", "loss_and_grads", "train_step"])
@pytest.mark.parametrize("x, y, message", BAD_PAIRS, ids=[m for _, _, m in BAD_PAIRS])
def test_the_input_is_checked_before_the_target_by_both(entry, x, y, message):
    tm, fm = build_pair("dummy", TINY, source="torch", mode="train")
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    calls = {
        "calc_loss_batch": (lambda: gpt_torch.calc_loss_batch(tx, ty, tm), lambda: gpt_flax.calc_loss_batch(x, y, fm)),
        "loss_and_grads": (lambda: gpt_torch.loss_and_grads(tm, tx, ty), lambda: gpt_flax.loss_and_grads(fm, x, y)),
        "train_step": (
            lambda: gpt_torch.train_step(tm, gpt_torch.adamw(tm), tx, ty),
            lambda: gpt_flax.train_step(fm, gpt_flax.adamw(fm), x, y),
        ),
    }
    assert _same_refusal(*calls[entry]) == message


def test_calc_loss_batch_takes_what_each_twins_forward_takes(tiny_cfg):
    tm, fm = build_pair("dummy", tiny_cfg, source="torch")
    x, y = [[1, 2, 3], [4, 5, 6]], [[2, 3, 4], [5, 6, 7]]
    # The Flax forward and train_step take nested lists: so does its calc_loss_batch.
    assert float(gpt_flax.calc_loss_batch(x, y, fm)) == float(gpt_flax.calc_loss_batch(np.array(x), np.array(y), fm))
    # The torch forward takes tensors only: so does its calc_loss_batch, with the forward's words.
    with pytest.raises(ValueError, match="^token ids must be a torch.Tensor, got list$"):
        gpt_torch.calc_loss_batch(x, torch.tensor(y), tm)


class BookGPTModel(torch.nn.Module):
    """The book's chapter-4 GPTModel as the book writes it: configured by the plain dict, no `cfg`
    attribute, no id checks, forward(in_idx) only (the twin's blocks, which compute the book's)."""

    def __init__(self, cfg: dict):
        super().__init__()
        spec = GPTConfig.from_dict(cfg)
        self.tok_emb = torch.nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = torch.nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = torch.nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = torch.nn.Sequential(*[gpt_torch.TransformerBlock(spec) for _ in range(cfg["n_layers"])])
        self.final_norm = gpt_torch.LayerNorm(cfg["emb_dim"])
        self.out_head = torch.nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.drop_emb(tok_embeds + pos_embeds)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


def book_generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's greedy loop: crop, forward, argmax of the last position, append."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


@pytest.mark.parametrize(
    "n_prompt, max_new_tokens, context_size", [(3, 6, 11), (15, 4, 5), (2, 12, 11)], ids=["short", "cropped", "sliding"]
)
def test_the_torch_generators_drive_the_books_own_model(n_prompt, max_new_tokens, context_size):
    twin, _ = build_pair("gpt", TINY, source="torch", seed=7)
    book = BookGPTModel(TINY.to_dict()).eval()
    book.load_state_dict(twin.state_dict())
    prompt = torch.from_numpy(np.random.default_rng(n_prompt).integers(0, TINY.vocab_size, (2, n_prompt)))
    with torch.no_grad():
        expected = book_generate_text_simple(book, prompt, max_new_tokens, context_size)
        assert torch.equal(book_generate_text_simple(twin, prompt, max_new_tokens, context_size), expected)
        assert torch.equal(gpt_torch.generate_text_simple(book, prompt, max_new_tokens, context_size), expected)
        assert torch.equal(gpt_torch.generate_text_simple(twin, prompt, max_new_tokens, context_size), expected)
        if n_prompt + max_new_tokens - 1 <= TINY.context_length:  # the cache does not slide
            assert torch.equal(gpt_torch.generate_text_simple_cached(book, prompt, max_new_tokens), expected)
    # What the book's embeddings tell is checked: its vocabulary and its context.
    with pytest.raises(ValueError, match=r"^token id 97 is out of range \[0, 97\) \(vocab_size\)$"):
        gpt_torch.generate_text_simple(book, torch.tensor([[97]]), 1, 11)
    with pytest.raises(ValueError, match="^sequence length 12 exceeds context_length 11$"):
        gpt_torch.generate_text_simple(book, prompt, 20, 12)


class TorchBare(torch.nn.Module):
    """A model that tells nothing of itself: ids in, logits out."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


class FlaxBare(nnx.Module):
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, ids):
        return self.inner(ids)


def test_both_twins_generate_with_a_model_that_tells_nothing_of_itself():
    tm, fm = build_pair("gpt", TINY, source="torch", seed=2)
    prompt = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 3))
    with float32_matmuls():
        expected = gpt_torch.generate_text_simple(tm, torch.from_numpy(prompt), 5, 11).numpy()
        t = gpt_torch.generate_text_simple(TorchBare(tm), torch.from_numpy(prompt), 5, 11).numpy()
        f = np.asarray(gpt_flax.generate_text_simple(FlaxBare(fm), prompt, 5, 11))
        tc = gpt_torch.generate_text_simple_cached(TorchBare(tm), torch.from_numpy(prompt), 5).numpy()
        fc = np.asarray(gpt_flax.generate_text_simple_cached(FlaxBare(fm), prompt, 5))
    for out in (t, f, tc, fc):
        np.testing.assert_array_equal(out, expected)
    # Its vocabulary shows in its logits only: an int8 prompt is refused there, alike.
    bt, bf = _pointing_at(35000)
    prompt8 = np.array([[1, 2]], np.int8)
    message = _same_refusal(
        lambda: gpt_torch.generate_text_simple(TorchBare(bt), torch.from_numpy(prompt8), 2, 11),
        lambda: gpt_flax.generate_text_simple(FlaxBare(bf), prompt8, 2, 11),
    )
    assert message.startswith("token ids of dtype int8 cannot hold every id of the vocabulary (up to 50256")


# 8. reset_kv_cache's batch_size and max_len: checked alike, and honoured alike.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an int, got 2.0 (float)"),
        ({"batch_size": True}, "batch_size must be an int, got True (bool)"),
        ({"max_len": 0}, "max_len must be >= 1, got 0"),
        ({"max_len": "5"}, "max_len must be an int, got '5' (str)"),
        ({"max_len": 12}, "max_len 12 exceeds context_length 11"),
        ({"batch_size": 2, "max_len": 12}, "max_len 12 exceeds context_length 11"),
    ],
    ids=[
        "batch-0",
        "batch-float",
        "batch-bool",
        "max-len-0",
        "max-len-str",
        "max-len-past-context",
        "allocated-past-context",
    ],
)
@pytest.mark.parametrize("kind", ["gpt", "dummy"])
def test_reset_kv_cache_refuses_the_same_arguments_alike(kind, kwargs, message):
    tm, fm = build_pair(kind, TINY, source="torch")
    assert _same_refusal(lambda: tm.reset_kv_cache(**kwargs), lambda: fm.reset_kv_cache(**kwargs)) == message


@pytest.mark.parametrize("batch_size", [None, 2], ids=["allocated-at-first-call", "allocated-now"])
@pytest.mark.parametrize("kind", ["gpt", "dummy"])
def test_a_cached_call_past_max_len_is_refused_alike(kind, batch_size):
    tm, fm = build_pair(kind, NOISELESS, source="torch")
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 6))
    tm.reset_kv_cache(batch_size=batch_size, max_len=5)
    fm.reset_kv_cache(batch_size=batch_size, max_len=5)
    with torch.no_grad():
        t = tm(torch.from_numpy(ids[:, :3]), use_cache=True).numpy()
        f = np.asarray(fm(ids[:, :3], use_cache=True))
        message = _same_refusal(
            lambda: tm(torch.from_numpy(ids[:, 3:]), use_cache=True), lambda: fm(ids[:, 3:], use_cache=True)
        )
        assert message == (
            "sequence length 6 exceeds the KV cache's max_len 5 (3 cached + 3 new tokens; "
            "reset it with a larger max_len)"
        )
        # The refused call changed nothing: the cache goes on from position 3, up to max_len.
        t = np.concatenate([t, tm(torch.from_numpy(ids[:, 3:5]), use_cache=True).numpy()], axis=1)
        f = np.concatenate([f, np.asarray(fm(ids[:, 3:5], use_cache=True))], axis=1)
        full = tm(torch.from_numpy(ids[:, :5])).numpy()
    np.testing.assert_allclose(t, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f, full, rtol=1e-5, atol=1e-5)
    if kind == "gpt":  # both caches hold max_len positions, not context_length
        assert tuple(tm.trf_blocks[0].att.cache_k.shape) == (2, 3, 5, 8)  # (batch, num_heads, slots, head_dim)
        assert fm.trf_blocks[0].att.cache_k.shape == (2 * 3, 5, 8)  # the heads folded into the batch axis


def test_the_batch_size_given_to_reset_kv_cache_is_held_to_alike():
    tm, fm = build_pair("gpt", TINY, source="torch")
    tm.reset_kv_cache(batch_size=2)
    fm.reset_kv_cache(batch_size=2)
    with torch.no_grad():
        message = _same_refusal(
            lambda: tm(torch.ones((3, 1), dtype=torch.int64), use_cache=True),
            lambda: fm(np.ones((3, 1), np.int64), use_cache=True),
        )
    assert message == "the KV cache holds batch size 2, got 3: reset it"
    # Without arguments, the defaults: any batch, context_length positions.
    tm.reset_kv_cache()
    fm.reset_kv_cache()
    with torch.no_grad():
        tm(torch.ones((3, 11), dtype=torch.int64), use_cache=True)
        fm(np.ones((3, 11), np.int64), use_cache=True)


# 9. calc_loss_batch(input_batch, target_batch, model, device): the book's signature in both twins.


def test_calc_loss_batch_takes_a_device_in_both_twins():
    tm, fm = build_pair("gpt", NOISELESS, source="torch")
    batch = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 6))
    x, y = batch[:, :-1], batch[:, 1:]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    device = jax.devices()[0]
    with float32_matmuls(), torch.no_grad():
        t = gpt_torch.calc_loss_batch(tx, ty, tm, "cpu").item()
        f = float(gpt_flax.calc_loss_batch(x, y, fm, device))
        assert t == gpt_torch.calc_loss_batch(tx, ty, tm).item()
        assert f == float(gpt_flax.calc_loss_batch(x, y, fm))
    from parity_tests.tolerances import LOSS

    assert abs(t - f) <= LOSS.atol + LOSS.rtol * abs(t)
    # Ids are checked before they move, and the inputs before the targets, as without a device.
    bad = np.full_like(x, TINY.vocab_size)
    message = _same_refusal(
        lambda: gpt_torch.calc_loss_batch(torch.from_numpy(bad), tx, tm, "cpu"),
        lambda: gpt_flax.calc_loss_batch(bad, y, fm, device),
    )
    assert message == "token id 97 is out of range [0, 97) (vocab_size)"


# 10. A device that is none, ids torch holds without values, text that is not text.


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "device 'bogus' names no device this framework has here"),
        pytest.param(
            "cuda:0",
            "device 'cuda:0' names no device this framework has here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (3, "device must be a device or a device name such as 'cpu', got 3 (int)"),
    ],
)
def test_a_device_that_is_none_is_refused_alike(device, message):
    """torch raised its RuntimeError for a bad name, the Flax twin a ValueError of jax.device_put's;
    both take a device name ("cpu") now, and refuse the same ones with the same words."""
    tm, fm = build_pair("gpt", NOISELESS, source="torch")
    batch = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 6))
    x, y = batch[:, :-1], batch[:, 1:]
    got = _same_refusal(
        lambda: gpt_torch.calc_loss_batch(torch.from_numpy(x), torch.from_numpy(y), tm, device),
        lambda: gpt_flax.calc_loss_batch(x, y, fm, device),
    )
    assert got == message
    with float32_matmuls():
        t = gpt_torch.calc_loss_batch(torch.from_numpy(x), torch.from_numpy(y), tm, "cpu").item()
        assert abs(float(gpt_flax.calc_loss_batch(x, y, fm, "cpu")) - t) < 1e-5


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta", "nested"])
def test_torch_ids_without_dense_values_are_refused_in_one_line(kind):
    """Sparse, meta and nested id tensors reached nn.Embedding and failed 100 lines deep
    (NotImplementedError, RuntimeError)."""
    import warnings

    tm = gpt_torch.GPTModel(NOISELESS)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR and nested tensors are beta/prototype
        made = {
            "sparse_coo": lambda: ids.to_sparse(),
            "sparse_csr": lambda: ids.to_sparse_csr(),
            "meta": lambda: torch.empty((2, 3), dtype=torch.int64, device="meta"),
            "nested": lambda: torch.nested.nested_tensor([ids[0], ids[1, :2]]),
        }[kind]()
    message = f"token ids must be a dense tensor holding its values, got a {kind} tensor"
    with pytest.raises(ValueError, match=message):
        tm(made)
    with pytest.raises(ValueError, match=message):
        gpt_torch.generate_text_simple(tm, made, 2, 11)


@pytest.mark.parametrize("txt", [b"Every effort moves you", None, 42])
def test_a_text_that_is_not_a_str_is_refused_alike(txt):
    """create_dataloader_v1(b"...") and (None) raised tiktoken's TypeError in both twins."""
    message = _same_refusal(
        lambda: gpt_torch.create_dataloader_v1(txt, batch_size=1, max_length=4, stride=4),
        lambda: gpt_flax.create_dataloader_v1(txt, batch_size=1, max_length=4, stride=4),
    )
    assert message == f"txt must be a str, got {type(txt).__name__}"


def test_attention_scores_past_float32s_largest_give_the_same_logits_in_both_twins():
    """Q and K weights scaled so that the largest unmasked score q.k is 6e38, past float32's largest
    (3.4e38) but not once divided by sqrt(head_dim): torch formed Q.K^T before scaling it and
    overflowed (1,552 NaN logits), the Flax twin scaled the queries first and stayed finite. Both
    scale the queries first now."""
    tm, fm = build_pair("gpt", NOISELESS, source="torch", seed=2)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 8))
    att, heads, head_dim = tm.trf_blocks[0].att, TINY.n_heads, TINY.emb_dim // TINY.n_heads
    with torch.no_grad():
        x = tm(torch.from_numpy(ids), return_activations=True)["trf_blocks.0.norm1"]
        q, k = (w(x).view(2, 8, heads, head_dim).transpose(1, 2) for w in (att.W_query, att.W_key))
        largest = (q @ k.transpose(2, 3)).masked_fill(att.mask.bool()[:8, :8], -torch.inf).max().item()
    scale = np.float32(np.sqrt(6e38 / largest))
    sd = gpt_torch.state_dict(tm)
    for name in ("trf_blocks.0.att.W_query.weight", "trf_blocks.0.att.W_key.weight"):
        sd[name] = sd[name] * scale
    gpt_torch.load_state_dict(tm, sd)
    gpt_flax.load_state_dict(fm, sd)
    with float32_matmuls(), torch.no_grad():
        t = tm(torch.from_numpy(ids)).numpy()
        f = np.asarray(gpt_flax.jit_forward(fm)(ids))
    assert np.isfinite(t).all() and np.isfinite(f).all()
    from parity_tests.tolerances import FP32_FORWARD

    np.testing.assert_allclose(f, t, rtol=0, atol=FP32_FORWARD.stol * np.abs(t).max())


def test_a_cast_or_a_bfloat16_save_that_would_make_a_weight_inf_is_refused_alike(tmp_path):
    """A float32 weight past halfway from bfloat16's largest to 2**128 rounds to inf: cast and
    save(dtype="bfloat16") wrote the infinity without a word, in both twins. Refused before anything
    changes; a weight that rounds to bfloat16's largest casts."""
    tm, fm = build_pair("gpt", NOISELESS, source="torch")
    sd = gpt_torch.state_dict(tm)
    sd["trf_blocks.1.ff.layers.0.weight"][0, 0] = np.float32(3.397e38)
    gpt_torch.load_state_dict(tm, sd)
    gpt_flax.load_state_dict(fm, sd)
    largest = "up to 3.39699998e+38 in magnitude, which round to inf in bfloat16 (largest 3.38953139e+38)"
    message = _same_refusal(lambda: gpt_torch.cast(tm, "bfloat16"), lambda: gpt_flax.cast(fm, "bfloat16"))
    assert message == f"parameter 'trf_blocks.1.ff.layers.0.weight' holds value(s) {largest}"
    assert {p.dtype for p in tm.parameters()} == {torch.float32}
    assert all(np.array_equal(v, sd[k]) for k, v in gpt_flax.state_dict(fm).items())
    path = str(tmp_path / "m.safetensors")
    message = _same_refusal(
        lambda: gpt_torch.save(tm, path, dtype="bfloat16"), lambda: gpt_flax.save(fm, path, dtype="bfloat16")
    )
    assert (
        message
        == f"cannot write checkpoint {path!r}: state dict key 'trf_blocks.1.ff.layers.0.weight' holds value(s) {largest}"
    )
    assert not (tmp_path / "m.safetensors").exists()
    sd["trf_blocks.1.ff.layers.0.weight"][0, 0] = np.float32(3.3895e38)
    gpt_torch.load_state_dict(tm, sd)
    assert torch.isfinite(gpt_torch.cast(tm, "bfloat16").trf_blocks[1].ff.layers[0].weight).all()
