"""Nothing loads silently wrong, nothing is saved unsafely: each finding of the adversarial run of
the checkpoint code, as a test that failed before its fix."""

import json
import os
import re
import stat
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

import gpt_flax
import gpt_torch
from gpt_spec import GPTConfig, load_checkpoint, save_checkpoint
from gpt_spec.formats.canonical import FORMAT
from parity_tests import twins
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.hf_reference import gpt2_config_json, random_hf_gpt2

HF_TINY = dict(vocab_size=97, n_positions=11, n_embd=24, n_layer=2)
LOADERS = {"torch": gpt_torch.load, "flax": gpt_flax.load}


def _canonical(cfg, seed=0):
    torch.manual_seed(seed)
    return gpt_torch.state_dict(gpt_torch.GPTModel(cfg))


def _hf_snapshot(tmp_path, hf=None, **changes):
    save_file(hf if hf is not None else random_hf_gpt2(**HF_TINY), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json(**HF_TINY, n_head=3) | changes))
    return tmp_path / "model.safetensors"


# --- the HF config is honoured or refused ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "llama"}, "model_type = 'llama'"),
        ({"add_cross_attention": True}, "add_cross_attention = True"),
        ({"n_positions": 12}, "config.json says n_positions = 12, the tensors 11"),
        ({"n_layer": 3}, "config.json says n_layer = 3, the tensors 2"),
        ({"vocab_size": 98}, "config.json says vocab_size = 98, the tensors 97"),
        ({"n_ctx": 10}, "n_ctx = 10"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings = false but the file has no lm_head.weight"),
        ({"attn_pdrop": 0.0}, "the twins have one drop_rate"),
        ({"rope_theta": 10000.0}, "config.json has key\\(s\\) 'rope_theta' whose meaning the twins do not know"),
        ({"layer_norm_epsilon": True}, "layer_norm_epsilon = True"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
@pytest.mark.parametrize("twin", list(LOADERS))
def test_config_fields_are_checked_against_the_tensors_and_the_twins(tmp_path, twin, changes, message):
    path = _hf_snapshot(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        LOADERS[twin](path)


def test_a_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    hf = random_hf_gpt2(**HF_TINY, lm_head=True)
    hf["lm_head.weight"] = hf["lm_head.weight"] + 1
    path = _hf_snapshot(tmp_path, hf)
    with pytest.raises(ValueError, match="tie_word_embeddings = true .* lm_head.weight differs"):
        load_checkpoint(path)
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json(**HF_TINY, n_head=3, tie_word_embeddings=False)))
    np.testing.assert_array_equal(load_checkpoint(path).state_dict["out_head.weight"], hf["lm_head.weight"])


def test_a_config_that_is_not_an_object_is_refused(tmp_path):
    path = _hf_snapshot(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        load_checkpoint(path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_checkpoint(path)


def test_n_heads_can_be_given_for_a_file_without_config(tmp_path):
    save_file(random_hf_gpt2(**HF_TINY), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="cannot tell n_heads"):
        load_checkpoint(tmp_path / "model.safetensors")
    assert gpt_flax.load(tmp_path / "model.safetensors", n_heads=3).cfg.n_heads == 3
    assert gpt_torch.load(tmp_path / "model.safetensors", n_heads=3).cfg.n_heads == 3


def _n_heads_files(tmp_path):
    """`{layout: the file to load}` of a TINY (emb_dim 24, 3 heads) model in every layout load reads."""
    sd = _canonical(TINY)
    save_checkpoint(tmp_path / "meta.safetensors", sd, TINY)
    save_file(sd, tmp_path / "bare.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "book.pth")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf-bare").mkdir()
    save_file(random_hf_gpt2(**HF_TINY), tmp_path / "hf-bare" / "model.safetensors")
    return {
        "canonical": tmp_path / "meta.safetensors",
        "no-metadata": tmp_path / "bare.safetensors",
        "pth": tmp_path / "book.pth",
        "hf": _hf_snapshot(tmp_path / "hf"),
        "hf-no-config": tmp_path / "hf-bare" / "model.safetensors",
    }


@pytest.mark.parametrize("layout", ["canonical", "no-metadata", "pth", "hf", "hf-no-config"])
@pytest.mark.parametrize("twin", ["spec", *LOADERS])
def test_an_n_heads_given_is_checked_naming_the_file(tmp_path, twin, layout):
    """n_heads=0 was taken as not given ("pass it"), and an n_heads that does not divide emb_dim
    was refused without naming the file (or blamed on config.json)."""
    load = load_checkpoint if twin == "spec" else LOADERS[twin]
    path = _n_heads_files(tmp_path)[layout]
    named = f"^checkpoint '{re.escape(str(path))}': "
    for bad in (0, -3, True, 3.0, "3"):
        with pytest.raises(ValueError, match=named + f"n_heads must be an int >= 1, got {re.escape(repr(bad))}$"):
            load(path, n_heads=bad)
    with pytest.raises(ValueError, match=named + "emb_dim \\(24\\) must be divisible by n_heads \\(5\\)$"):
        load(path, n_heads=5)
    model = load(path, n_heads=np.int64(6))
    assert (model.config if twin == "spec" else model.cfg).n_heads == 6


# --- no key silently ignored or preferred ---------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda hf: hf.update({"wte.weight": hf["transformer.wte.weight"]}),
            "holds both 'wte.weight' and 'transformer.wte.weight'|holds both 'transformer.wte.weight' and 'wte.weight'",
        ),
        (
            lambda hf: hf.update({"transformer.h.0.foo.attn.bias": hf["transformer.h.0.attn.bias"]}),
            "unexpected tensor 'transformer.h.0.foo.attn.bias'",
        ),
        (
            lambda hf: hf.update({"transformer.h.7.attn.bias": hf["transformer.h.0.attn.bias"]}),
            "transformer layers \\[0, 1, 7\\] are not numbered",
        ),
        (
            lambda hf: hf.update({"transformer.h.0.attn.bias": np.ones((1, 1, 11, 11), np.float32)}),
            "buffer 'h.0.attn.bias' is not GPT-2's causal mask of 11 positions",
        ),
        (
            lambda hf: hf.update({"transformer.h.1.attn.masked_bias": np.array(0.0, np.float32)}),
            "buffer 'h.1.attn.masked_bias' is not a masked-score fill value",
        ),
    ],
    ids=["both-prefixes", "nested-buffer-name", "stray-block", "not-causal", "masked-bias"],
)
def test_no_hf_key_is_silently_ignored_or_preferred(tmp_path, edit, message):
    hf = random_hf_gpt2(**HF_TINY)
    edit(hf)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(_hf_snapshot(tmp_path, hf))


def _book_state_dict(cfg, seed=0):
    """What the book's own GPTModel.state_dict() holds: the parameters and a persistent
    `att.mask` buffer per block."""
    torch.manual_seed(seed)
    sd = gpt_torch.GPTModel(cfg).state_dict()
    n = cfg.context_length
    return {**sd, **{f"trf_blocks.{i}.att.mask": torch.triu(torch.ones(n, n), diagonal=1) for i in range(cfg.n_layers)}}


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_the_books_in_memory_state_dict_loads_straight(twin):
    book = _book_state_dict(TINY)
    model = gpt_torch.GPTModel(TINY) if twin == "torch" else gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(1))
    twins.package(twin).load_state_dict(model, book)
    got = twins.package(twin).state_dict(model)
    np.testing.assert_array_equal(got["trf_blocks.1.att.W_key.weight"], book["trf_blocks.1.att.W_key.weight"].numpy())


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd, n: sd.update({"trf_blocks.5.att.mask": torch.triu(torch.ones(n, n), 1)}),
            "unexpected key\\(s\\) 'trf_blocks.5.att.mask'",
        ),
        (
            lambda sd, n: sd.update({"trf_blocks.0.att.mask": torch.triu(torch.ones(n + 1, n + 1), 1)}),
            "'trf_blocks.0.att.mask' has shape \\(12, 12\\), expected the causal mask \\(11, 11\\)",
        ),
        (
            lambda sd, n: sd.update({"trf_blocks.1.att.mask": torch.triu(torch.ones(n, n), 0)}),
            "'trf_blocks.1.att.mask' is not the causal mask",
        ),
        (lambda sd, n: sd.update({"att.mask": torch.triu(torch.ones(n, n), 1)}), "unexpected key\\(s\\) 'att.mask'"),
    ],
    ids=["stray-block", "wrong-size", "not-causal", "no-block"],
)
@pytest.mark.parametrize("via", ["pth", "torch", "flax"])
def test_a_wrong_mask_buffer_is_refused_never_dropped(tmp_path, edit, message, via):
    book = _book_state_dict(TINY)
    edit(book, TINY.context_length)
    if via == "pth":
        torch.save(book, tmp_path / "model.pth")
        with pytest.raises(ValueError, match=message):
            gpt_flax.load(tmp_path / "model.pth", config=TINY)
    elif via == "torch":
        with pytest.raises(ValueError, match=message):
            gpt_torch.load_state_dict(gpt_torch.GPTModel(TINY), book)
    else:
        with pytest.raises(ValueError, match=message):
            gpt_flax.load_state_dict(gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0)), book)


@pytest.mark.slow
def test_the_books_chapter5_pth_reaches_the_flax_twin_in_one_call(tmp_path):
    cfg = GPTConfig.preset("gpt2-small").replace(context_length=8, vocab_size=50, n_layers=12)
    book = _book_state_dict(cfg)
    torch.save({"model_state_dict": book, "optimizer_state_dict": {}}, tmp_path / "model_and_optimizer.pth")
    model = gpt_flax.load(tmp_path / "model_and_optimizer.pth")  # 768 wide, 12 layers: gpt2-small's 12 heads
    assert model.cfg == cfg.replace(drop_rate=0.1)
    np.testing.assert_array_equal(gpt_flax.state_dict(model)["out_head.weight"], book["out_head.weight"].numpy())


# --- every dtype ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_half_and_double_files_load_in_both_twins(tmp_path, dtype, twin):
    sd = _canonical(TINY_BIAS)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    stored = {k: v.astype(np_dtype) for k, v in sd.items()}
    save_file(
        stored,
        tmp_path / "m.safetensors",
        metadata={"format": FORMAT, "config": json.dumps(TINY_BIAS.to_dict()), "model": "GPTModel", "options": "{}"},
    )
    model = LOADERS[twin](tmp_path / "m.safetensors")
    got = twins.package(twin).state_dict(model)
    for name, value in stored.items():
        np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)
    kept = "bfloat16" if dtype == "bfloat16" else "float32"
    first = next(model.parameters()).dtype if twin == "torch" else model.tok_emb.embedding[...].dtype
    assert str(first).removeprefix("torch.") == kept


def test_float64_beyond_float32_is_refused_not_made_inf(tmp_path):
    sd = {k: v.astype(np.float64) for k, v in _canonical(TINY_BIAS).items()}
    sd["trf_blocks.0.norm1.scale"][3] = 1e39
    save_checkpoint_bare = tmp_path / "m.safetensors"
    save_file(sd, save_checkpoint_bare)
    for load in LOADERS.values():
        with pytest.raises(
            ValueError, match="'trf_blocks.0.norm1.scale' holds float64 value\\(s\\) up to 1e\\+39 in magnitude"
        ):
            load(save_checkpoint_bare, config=TINY_BIAS)
    with pytest.raises(ValueError, match="beyond float32's range"):
        gpt_flax.load_state_dict(gpt_flax.GPTModel(TINY_BIAS, rngs=nnx.Rngs(0)), sd)


FLOAT32_MAX = float(np.finfo(np.float32).max)
# float64 values at or past the midpoint between float32's largest and 2**128 round to inf.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@pytest.mark.parametrize("twin", ["spec", *LOADERS])
def test_float64_that_rounds_to_float32s_largest_loads_and_only_overflow_is_refused(tmp_path, twin, kind):
    """A value that rounds to float32's largest was refused as "3.4e+38 beyond 3.4e+38"; the
    refusal of a value that would be inf did not name its file."""
    sd = {k: v.astype(np.float64) for k, v in _canonical(TINY_BIAS).items()}
    rounds_down = np.nextafter(FLOAT32_OVERFLOW, 0.0)
    sd["trf_blocks.0.norm1.scale"][:2] = [rounds_down, -rounds_down]
    path = tmp_path / f"m.{'safetensors' if kind == 'safetensors' else 'pth'}"

    def write(sd):
        if kind == "safetensors":
            save_file(sd, path)
        else:
            torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)

    write(sd)
    load = load_checkpoint if twin == "spec" else LOADERS[twin]
    loaded = load(path, config=TINY_BIAS)
    if twin == "spec":
        got = loaded.state_dict["trf_blocks.0.norm1.scale"].astype(
            np.float32
        )  # the file's float64, as the twins take it
    else:
        got = twins.package(twin).state_dict(loaded)["trf_blocks.0.norm1.scale"]
    np.testing.assert_array_equal(got[:2], [FLOAT32_MAX, -FLOAT32_MAX])
    sd["trf_blocks.0.norm1.scale"][3] = -FLOAT32_OVERFLOW
    write(sd)
    message = (
        f"^checkpoint '{re.escape(str(path))}': state dict key 'trf_blocks.0.norm1.scale' holds float64 value\\(s\\) "
        "up to 3.40282357e\\+38 in magnitude, beyond float32's range \\(largest 3.40282347e\\+38\\)$"
    )
    with pytest.raises(ValueError, match=message):
        if twin == "spec":
            dict(load(path, config=TINY_BIAS).state_dict)
        else:
            load(path, config=TINY_BIAS)


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_saving_bfloat16_on_request(tmp_path, twin):
    mod = twins.package(twin)
    model = gpt_torch.GPTModel(TINY) if twin == "torch" else gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    mod.save(model, tmp_path / "bf16.safetensors", dtype="bfloat16")
    assert load_checkpoint(tmp_path / "bf16.safetensors").dtypes == ("bfloat16",)
    back = mod.load(tmp_path / "bf16.safetensors")
    want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in mod.state_dict(model).items()}
    for name, value in mod.state_dict(back).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    mod.cast(model, "bfloat16")
    mod.save(model, tmp_path / "own.safetensors")  # the model's own dtype by default
    assert load_checkpoint(tmp_path / "own.safetensors").dtypes == ("bfloat16",)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'float16'"):
        mod.save(model, tmp_path / "x.safetensors", dtype="float16")


# --- shapes before any model is built -------------------------------------------------------------


@pytest.mark.parametrize(
    "claim", [{"n_layers": 20_000}, {"vocab_size": 2**31 - 1}, {"emb_dim": 3 * 10**6, "n_heads": 1}]
)
@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_metadata_is_checked_against_the_tensors_before_building(tmp_path, twin, claim):
    """An 80 KB file claiming 20,000 layers took 15 s (torch) and 182 s (Flax) to be refused; one
    claiming vocab 1e11 made torch try to allocate 9.6 TB (the largest vocab a config may now name, 2**31 - 1: 200 GB)."""
    sd = _canonical(TINY)
    cfg = TINY.replace(**claim)
    save_file(
        sd,
        tmp_path / "liar.safetensors",
        metadata={"format": FORMAT, "config": json.dumps(cfg.to_dict()), "model": "GPTModel", "options": "{}"},
    )
    start = time.perf_counter()
    with pytest.raises(ValueError, match="liar.safetensors.*(does not match GPTModel|'tok_emb.weight' has shape)"):
        LOADERS[twin](tmp_path / "liar.safetensors")
    assert time.perf_counter() - start < 5  # refused from the header, not after building


@pytest.mark.parametrize(
    "metadata, message",
    [
        (
            {"model": "DummyGPTModel", "options": '{"final_norm": "rmsnorm"}'},
            "final_norm must be one of dummy, layernorm",
        ),
        ({"model": "DummyGPTModel", "options": '{"bias": true}'}, "DummyGPTModel takes no option\\(s\\) 'bias'"),
        ({"model": "DummyGPTModel", "options": "[1]"}, "options must be a mapping, got list"),
        (
            {"model": "GPTModel", "options": '{"final_norm": "layernorm"}'},
            "GPTModel takes no option\\(s\\) 'final_norm'",
        ),
        ({"model": "GPT3", "options": "{}"}, "model must be one of GPTModel, DummyGPTModel, got 'GPT3'"),
    ],
)
def test_bad_options_metadata_is_refused_on_load(tmp_path, metadata, message):
    sd = _canonical(TINY)
    save_file(
        sd, tmp_path / "m.safetensors", metadata={"format": FORMAT, "config": json.dumps(TINY.to_dict()), **metadata}
    )
    for load in (load_checkpoint, *LOADERS.values()):
        with pytest.raises(ValueError, match=message):
            load(tmp_path / "m.safetensors")


def test_save_checkpoint_validates_every_model_and_its_options(tmp_path):
    with pytest.raises(ValueError, match="state dict does not match DummyGPTModel: missing key"):
        save_checkpoint(tmp_path / "d.safetensors", {"x": np.ones(2, np.float32)}, TINY, model="DummyGPTModel")
    with pytest.raises(ValueError, match="final_norm must be one of dummy, layernorm"):
        save_checkpoint(
            tmp_path / "d.safetensors", _canonical(TINY), TINY, options={"final_norm": "x"}, model="DummyGPTModel"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["m.pth", "m.pt", "m.bin", "m", "m.safetensors.partial"])
@pytest.mark.parametrize("twin", list(LOADERS))
def test_save_takes_only_a_name_load_reads_as_safetensors(tmp_path, monkeypatch, twin, name):
    """save(m, "m.pth") wrote safetensors that load("m.pth") then refused as no torch.save file.
    The refusal comes before the parameters are copied out of the model."""
    mod = twins.package(twin)
    model = gpt_torch.GPTModel(TINY) if twin == "torch" else gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    monkeypatch.setattr(mod.weights, "state_dict", lambda model: pytest.fail("the parameters were copied out"))
    message = (
        f"^cannot write checkpoint '{re.escape(str(tmp_path / name))}': a checkpoint is written as safetensors, "
        "so its name must end in .safetensors$"
    )
    with pytest.raises(ValueError, match=message):
        mod.save(model, tmp_path / name)
    with pytest.raises(ValueError, match=message):
        save_checkpoint(tmp_path / name, _canonical(TINY), TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("twin", list(LOADERS))
def test_save_refuses_a_path_that_names_a_folder(tmp_path, twin):
    """save(m, "xx/") wrote a file xx."""
    mod = twins.package(twin)
    model = gpt_torch.GPTModel(TINY) if twin == "torch" else gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(0))
    for given in (f"{tmp_path}/xx.safetensors/", f"{tmp_path}/xx/"):
        with pytest.raises(
            ValueError,
            match=f"^cannot write checkpoint '{re.escape(given)}': it ends in '/', so it names a folder, not a file$",
        ):
            mod.save(model, given)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="^cannot write checkpoint '.*/dir.safetensors': it is a directory$"):
        mod.save(model, tmp_path / "dir.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["dir.safetensors"]


# --- saving respects the umask, links and neighbours, and cleans up after itself -----------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_umasks_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "m.safetensors", _canonical(TINY), TINY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == mode


def test_saving_never_changes_the_umask(tmp_path, monkeypatch):
    """os.umask sets the mask for the whole process, XLA's and torch's threads included: a save
    leaves the mode to the kernel instead of reading the mask that way."""

    def refused(mask):
        raise AssertionError(f"os.umask({mask:o}) called while saving")

    monkeypatch.setattr(os, "umask", refused)
    save_checkpoint(tmp_path / "m.safetensors", _canonical(TINY), TINY)
    assert (tmp_path / "m.safetensors").is_file()


def test_a_symlinked_destination_is_written_where_it_points(tmp_path):
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "real.safetensors"
    link = tmp_path / "link.safetensors"
    save_checkpoint(real, _canonical(TINY, seed=0), TINY)
    link.symlink_to(real)
    save_checkpoint(link, _canonical(TINY, seed=1), TINY)
    assert link.is_symlink()
    np.testing.assert_array_equal(
        load_checkpoint(real).state_dict["tok_emb.weight"], _canonical(TINY, seed=1)["tok_emb.weight"]
    )


@pytest.mark.subprocess
def test_neighbours_survive_and_a_killed_saves_temp_is_cleaned(tmp_path):
    neighbour = tmp_path / "m.safetensors.partial"
    neighbour.write_bytes(b"someone else's")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stale = tmp_path / f".m.safetensors.{dead}.abc123.partial"  # what a SIGKILLed save leaves
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".m.safetensors.{os.getppid()}.xyz789.partial"  # a save running now
    live.write_bytes(b"y")
    save_checkpoint(tmp_path / "m.safetensors", _canonical(TINY), TINY)
    assert neighbour.read_bytes() == b"someone else's" and live.exists() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", "m.safetensors.partial", live.name])


@pytest.mark.subprocess
def test_a_sigkilled_save_leaves_only_a_temp_the_next_save_removes(tmp_path):
    code = (
        "import signal, os, safetensors.numpy as s\n"
        "from gpt_spec import save_checkpoint\n"
        "from parity_tests.configs import TINY\n"
        "import numpy as np, json\n"
        "real = s.save_file\n"
        "def killed(t, f, metadata=None):\n"
        "    real(t, f, metadata=metadata); os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.save_file = killed\n"
        "sd = json.load(open('sd.json'))\n"
        "save_checkpoint('m.safetensors', {k: np.array(v, np.float32) for k, v in sd.items()}, TINY)\n"
    )
    sd = {k: v.tolist() for k, v in _canonical(TINY).items()}
    (tmp_path / "sd.json").write_text(json.dumps(sd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert proc.returncode == -9
    leftovers = [p.name for p in tmp_path.glob(".m.safetensors.*.partial")]
    assert len(leftovers) == 1 and not (tmp_path / "m.safetensors").exists()
    save_checkpoint(tmp_path / "m.safetensors", _canonical(TINY), TINY)
    assert list(tmp_path.glob(".m.safetensors.*.partial")) == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "it is a directory"),
        (lambda p: None, "folder .* does not exist"),
    ],
    ids=["directory", "missing-folder"],
)
def test_save_errors_are_value_errors_naming_the_file(tmp_path, make, message):
    target = tmp_path / "x.safetensors" if message != "folder .* does not exist" else tmp_path / "no" / "x.safetensors"
    make(target)
    with pytest.raises(ValueError, match=message):
        save_checkpoint(target, _canonical(TINY), TINY)


def test_a_write_that_does_not_read_back_never_replaces_the_file(tmp_path, monkeypatch):
    """Every saved tensor is read back and compared before the rename."""
    import safetensors.numpy

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _canonical(TINY, seed=0), TINY)
    before = path.read_bytes()
    real = safetensors.numpy.save_file

    def scrambled(tensors, filename, metadata=None):
        tensors = dict(tensors)
        w = tensors["trf_blocks.0.att.W_key.weight"]
        tensors["trf_blocks.0.att.W_key.weight"] = np.ascontiguousarray(w.T)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", scrambled)
    with pytest.raises(ValueError, match="'trf_blocks.0.att.W_key.weight' read back differs"):
        save_checkpoint(path, _canonical(TINY, seed=1), TINY)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --- sharded snapshots ----------------------------------------------------------------------------


def _shard(tmp_path, hf, n=3):
    keys = sorted(hf)
    weight_map = {}
    for s in range(n):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        part = {k: hf[k] for k in keys[s::n]}
        save_file(part, tmp_path / name)
        weight_map |= {k: name for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json(**HF_TINY, n_head=3)))
    return weight_map


def test_a_sharded_snapshot_loads_as_one_model(tmp_path):
    hf = random_hf_gpt2(**HF_TINY, buffers=False)
    _shard(tmp_path, hf)
    ckpt = load_checkpoint(tmp_path)
    assert len(ckpt.files) == 3 and ckpt.layout == "hf-gpt2"
    np.testing.assert_array_equal(
        ckpt.state_dict["trf_blocks.1.ff.layers.2.weight"], hf["transformer.h.1.mlp.c_proj.weight"].T
    )


def test_a_shard_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    hf = random_hf_gpt2(**HF_TINY, buffers=False)
    weight_map = _shard(tmp_path, hf)
    wrong = dict(weight_map)
    key = next(iter(wrong))
    wrong[key] = next(v for v in wrong.values() if v != wrong[key])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(ValueError, match=f"holds '{key}', which the index places in"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {**weight_map, "x": "model-00001-of-00003.safetensors"}})
    )
    with pytest.raises(ValueError, match="lists tensor\\(s\\) no shard holds: x"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(ValueError, match="names '../evil.safetensors', not a file beside it"):
        load_checkpoint(tmp_path)


def test_a_flax_load_never_computes_the_random_init_yet_keeps_the_rng_state(tmp_path):
    """gpt_flax.load builds its model abstractly (no random init held beside the weights); the
    dropout keys and counters are what a plain construction with the same rngs gives."""
    import jax

    save_checkpoint(tmp_path / "m.safetensors", _canonical(TINY), TINY)
    loaded = gpt_flax.load(tmp_path / "m.safetensors", rngs=nnx.Rngs(5))
    plain = gpt_flax.GPTModel(TINY, rngs=nnx.Rngs(5))
    a = nnx.to_flat_state(nnx.state(loaded, nnx.Not(nnx.Param)))
    b = nnx.to_flat_state(nnx.state(plain, nnx.Not(nnx.Param)))
    assert [p for p, _ in a] == [p for p, _ in b] and len(a) > 0
    for (path, x), (_, y) in zip(a, b, strict=True):
        x, y = x.get_value(), y.get_value()
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    loaded.train()
    plain.train()
    gpt_flax.load_state_dict(plain, gpt_flax.state_dict(loaded))
    ids = np.arange(8).reshape(1, 8) % TINY.vocab_size
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(plain(ids)))  # same dropout masks
