"""gpt_spec.checkpoint and gpt_spec.formats: canonical files, the HF GPT-2 layout, config inference, and bad files."""

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import gpt_flax
import gpt_torch
import parity_cli.main as cli
from gpt_spec import GPTConfig, from_hf, load_checkpoint, save_checkpoint, to_hf
from gpt_spec.layout import gpt_shapes, infer_config
from parity_tests.configs import TINY, TINY_BIAS
from parity_tests.hf_reference import gpt2_config_json, random_hf_gpt2

HF_TINY = dict(vocab_size=97, n_positions=11, n_embd=24, n_layer=2)  # n_head 3 is not inferable
HF_TINY_CONFIG = gpt2_config_json(**HF_TINY, n_head=3)


def _hf_config(cfg, **changes):
    return gpt2_config_json(cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers, cfg.n_heads, **changes)


def _canonical(cfg, seed=0):
    torch.manual_seed(seed)
    return gpt_torch.state_dict(gpt_torch.GPTModel(cfg))


def test_canonical_hf_canonical_round_trip_is_exact():
    cfg = TINY_BIAS.replace(n_layers=2)
    sd = _canonical(cfg)
    back, back_cfg = from_hf(to_hf(sd, cfg), _hf_config(cfg, tie_word_embeddings=False))
    assert back_cfg == cfg.replace(drop_rate=0.1)
    assert list(back) == list(gpt_shapes(cfg)) == list(sd)
    for name in sd:
        np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


def test_hf_canonical_hf_round_trip_is_exact():
    hf = random_hf_gpt2(**HF_TINY, buffers=False, lm_head=True)
    sd, cfg = from_hf(hf, HF_TINY_CONFIG | {"tie_word_embeddings": False})
    again = to_hf(sd, cfg, tied=False)
    assert again.keys() == hf.keys()
    for name in hf:
        np.testing.assert_array_equal(again[name], hf[name], err_msg=name)


def test_hf_layout_maps_fused_and_transposed_tensors():
    hf = random_hf_gpt2(**HF_TINY, prefix="")  # GPT2Model files have no "transformer." prefix
    sd, cfg = from_hf(hf, HF_TINY_CONFIG | {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers) == (97, 11, 24, 2)
    assert cfg.qkv_bias and cfg.n_heads == 3 and cfg.drop_rate == 0.0
    w = hf["h.1.attn.c_attn.weight"]  # (in, 3*out): q | k | v along the output axis
    np.testing.assert_array_equal(sd["trf_blocks.1.att.W_key.weight"], w[:, 24:48].T)
    np.testing.assert_array_equal(sd["trf_blocks.1.att.W_value.bias"], hf["h.1.attn.c_attn.bias"][48:])
    np.testing.assert_array_equal(sd["trf_blocks.0.ff.layers.2.weight"], hf["h.0.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(sd["out_head.weight"], hf["wte.weight"])  # tied head
    assert not any("mask" in k or k.endswith("attn.bias") for k in sd)


def test_n_heads_is_never_guessed_beyond_the_published_shapes():
    """Without a config only the four published GPT-2 shapes imply n_heads (gpt2-xl: 25 heads of 64)."""
    hf = random_hf_gpt2(vocab_size=50, n_positions=8, n_embd=128, n_layer=1)
    with pytest.raises(
        ValueError,
        match=r"cannot tell n_heads.*emb_dim 128 x n_layers 1 is none of the "
        r"published GPT-2 shapes.*--n-heads N",
    ):
        from_hf(hf)
    assert from_hf(hf, config=GPTConfig(50, 8, 128, 4, 1, 0.1, True))[1].n_heads == 4
    from gpt_spec.layout import published_n_heads

    assert [published_n_heads(e, n, "x") for e, n in [(768, 12), (1024, 24), (1280, 36), (1600, 48)]] == [
        12,
        16,
        20,
        25,
    ]
    with pytest.raises(ValueError, match="cannot tell n_heads"):
        infer_config(_canonical(TINY))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensor 'h.1.mlp.c_fc.bias'"),
        (
            lambda sd: sd.update({"transformer.h.0.attn.c_attn.weight": np.zeros((24, 71), np.float32)}),
            r"tensor 'h.0.attn.c_attn.weight' has shape \(24, 71\), expected \(24, 72\)",
        ),
        (
            lambda sd: sd.update({"transformer.h.0.ln_1.weight": np.ones(24, np.int32)}),
            "tensor 'h.0.ln_1.weight' has dtype int32, expected one of float16, bfloat16, float32, float64",
        ),
        (
            lambda sd: sd.update({"transformer.h.0.attn.extra": np.ones(2, np.float32)}),
            "unexpected tensor 'transformer.h.0.attn.extra' for a GPT-2",
        ),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("transformer.h.0.")],
            r"transformer layers \[1\] are not numbered 0..n-1",
        ),
        (lambda sd: sd.pop("transformer.wpe.weight"), "missing tensor 'wpe.weight'"),
    ],
)
def test_an_inconsistent_gpt2_is_refused_naming_the_tensor(edit, message):
    hf = random_hf_gpt2(**HF_TINY)
    edit(hf)
    with pytest.raises(ValueError, match=message):
        from_hf(hf, HF_TINY_CONFIG)


def test_to_hf_gives_a_model_without_qkv_bias_zero_biases():
    sd = _canonical(TINY)
    hf = to_hf(sd, TINY)
    assert not hf["transformer.h.0.attn.c_attn.bias"].any()
    back, cfg = from_hf(hf, _hf_config(TINY, tie_word_embeddings="lm_head.weight" not in hf))
    assert cfg.qkv_bias
    np.testing.assert_array_equal(back["trf_blocks.1.att.W_key.weight"], sd["trf_blocks.1.att.W_key.weight"])


def test_to_hf_arrays_are_contiguous_and_survive_safetensors(tmp_path):
    """A transposed view handed to safetensors is written in memory order: scrambled (found once)."""
    cfg = TINY_BIAS.replace(n_layers=2)
    sd = _canonical(cfg)
    hf = to_hf(sd, cfg)
    assert all(v.flags.c_contiguous for v in hf.values())
    save_file(hf, tmp_path / "model.safetensors")
    ckpt = load_checkpoint(tmp_path / "model.safetensors", config=cfg)
    for name in sd:
        np.testing.assert_array_equal(ckpt.state_dict[name], sd[name], err_msg=name)


@pytest.mark.parametrize("twin", ["torch", "flax"])
def test_twins_save_and_load_self_describing_files(tmp_path, twin):
    save, load = (gpt_torch.save, gpt_torch.load) if twin == "torch" else (gpt_flax.save, gpt_flax.load)
    state_dict = gpt_torch.state_dict if twin == "torch" else gpt_flax.state_dict
    model = gpt_torch.GPTModel(TINY) if twin == "torch" else gpt_flax.GPTModel(TINY, rngs=gpt_flax_rngs())
    path = tmp_path / "m.safetensors"
    save(model, path)
    ckpt = load_checkpoint(path)
    assert ckpt.config == TINY and ckpt.model == "GPTModel" and ckpt.layout == "canonical"
    loaded = load(path)
    assert type(loaded).__name__ == "GPTModel" and loaded.cfg == TINY
    for name, value in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(loaded)[name], value, err_msg=name)
    dummy = (
        gpt_torch.DummyGPTModel(TINY, final_norm="layernorm")
        if twin == "torch"
        else gpt_flax.DummyGPTModel(TINY, final_norm="layernorm", rngs=gpt_flax_rngs())
    )
    save(dummy, path)
    again = load(path)
    assert type(again).__name__ == "DummyGPTModel" and "final_norm.scale" in state_dict(again)


def gpt_flax_rngs():
    from flax import nnx

    return nnx.Rngs(0)


def test_a_save_never_leaves_a_half_file(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "m.safetensors"

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(ValueError, match=r"cannot write checkpoint .*m.safetensors.*No space left"):
        save_checkpoint(path, _canonical(TINY), TINY)
    assert list(tmp_path.iterdir()) == []


def test_canonical_files_without_metadata_infer_their_config(tmp_path):
    sd = _canonical(TINY_BIAS.replace(emb_dim=128, n_heads=2))
    save_file(sd, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="cannot tell n_heads"):
        load_checkpoint(tmp_path / "bare.safetensors")
    ckpt = load_checkpoint(tmp_path / "bare.safetensors", n_heads=2)
    assert ckpt.config == TINY_BIAS.replace(emb_dim=128, n_heads=2, drop_rate=0.1)
    assert ckpt.config_source == "inferred from the tensors"
    assert infer_config(sd, n_heads=4).n_heads == 4


@pytest.mark.parametrize("given", ["folder", "file"])
def test_hf_config_json_is_read_beside_the_file_or_in_the_folder(tmp_path, given):
    """Given the file, not the folder, config.json used to be left unread and n_heads guessed as
    emb_dim / 64."""
    save_file(random_hf_gpt2(**HF_TINY), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(HF_TINY_CONFIG))
    ckpt = load_checkpoint(tmp_path if given == "folder" else tmp_path / "model.safetensors")
    assert ckpt.layout == "hf-gpt2" and ckpt.config.n_heads == 3 and ckpt.config.n_layers == 2
    assert ckpt.config_source == str(tmp_path / "config.json")


def _write_truncated(path: Path) -> None:
    """A safetensors file with its last 9 bytes cut off."""
    save_file({"tok_emb.weight": np.ones((4, 4), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-9])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"not a safetensors file at all"), "is not a readable safetensors file"),
        (_write_truncated, "is not a readable safetensors file"),
        (
            lambda p: save_file({"weight": np.ones((4, 4), np.float32)}, p),
            r"neither the canonical layout \(tok_emb.weight, ...\) nor HF GPT-2's",
        ),
        (
            lambda p: save_file(
                {"tok_emb.weight": np.ones((4, 4), np.float32), "pos_emb.weight": np.ones((4, 4), np.float32)}, p
            ),
            r"no transformer blocks \(trf_blocks.N.\*\) found",
        ),
    ],
    ids=["missing", "garbage", "truncated", "unknown-layout", "no-blocks"],
)
def test_bad_files_raise_value_error_naming_the_problem(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


def test_a_mismatched_file_leaves_no_model_half_loaded(tmp_path):
    """A file for another config: load refuses it whole; load_state_dict into an existing model too."""
    path = tmp_path / "other.safetensors"
    sd = _canonical(TINY)
    sd["trf_blocks.1.ff.layers.0.weight"] = np.zeros((96, 23), np.float32)
    save_file(sd, path)
    with pytest.raises(
        ValueError, match=r"'trf_blocks.1.ff.layers.0.weight' has shape \(96, 23\), expected \(96, 24\)"
    ):
        load_checkpoint(path, config=TINY)
    model = gpt_torch.GPTModel(TINY)
    before = gpt_torch.state_dict(model)
    with pytest.raises(
        ValueError, match=r"'trf_blocks.1.ff.layers.0.weight' has shape \(96, 23\), expected \(96, 24\)"
    ):
        gpt_torch.load_state_dict(model, sd)
    for name, value in gpt_torch.state_dict(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    with pytest.raises(ValueError, match=r"has shape \(96, 23\), expected \(96, 24\)"):
        gpt_flax.load(path, config=TINY)


def test_the_books_model_pth_loads_without_running_pickled_code(tmp_path):
    torch.manual_seed(0)
    model = gpt_torch.GPTModel(TINY_BIAS)
    sd = model.state_dict()
    n = TINY_BIAS.context_length  # the book's MultiHeadAttention saves its mask buffer
    book_sd = {
        **sd,
        **{f"trf_blocks.{i}.att.mask": torch.triu(torch.ones(n, n), diagonal=1) for i in range(TINY_BIAS.n_layers)},
    }
    torch.save(book_sd, tmp_path / "model.pth")
    torch.save({"model_state_dict": book_sd, "optimizer_state_dict": {}}, tmp_path / "model_and_optimizer.pth")
    for name in ("model.pth", "model_and_optimizer.pth"):
        read = gpt_torch.read_torch_file(tmp_path / name)
        assert read.keys() == book_sd.keys()
        loaded = gpt_torch.load(tmp_path / name, config=TINY_BIAS)
        fm = gpt_flax.GPTModel(TINY_BIAS, rngs=gpt_flax_rngs())
        gpt_flax.load_state_dict(fm, read)
        np.testing.assert_array_equal(gpt_flax.state_dict(fm)["out_head.weight"], sd["out_head.weight"].numpy())
        np.testing.assert_array_equal(gpt_torch.state_dict(loaded)["tok_emb.weight"], sd["tok_emb.weight"].numpy())


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


class Shell:
    def __reduce__(self):
        return (os.system, ("echo pickled code ran",))


def _scripted(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own, while making the file
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


def _runs_code(name):
    return (
        f": its pickle would run code \\(a global '{re.escape(name)}' outside the tensors and containers a state "
        "dict holds\\); refused, nothing was run"
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: torch.save({"tok_emb.weight": torch.ones(2), "x": Shell()}, p),
            _runs_code(f"{os.system.__module__}.system"),
        ),
        (lambda p: torch.save({"tok_emb.weight": torch.ones(2), "x": Payload()}, p), _runs_code("print")),
        (
            lambda p: torch.save({"x": Shell()}, p, _use_new_zipfile_serialization=False),
            _runs_code(f"{os.system.__module__}.system"),
        ),
        (_scripted, " is a TorchScript archive \\(a program, not a state dict\\); refused, nothing was run"),
    ],
    ids=["os.system", "print", "legacy-format", "torchscript"],
)
@pytest.mark.parametrize("how", ["spec", "torch", "flax", "cli"])
def test_a_pickle_that_would_run_code_is_refused_in_one_line_without_torchs_advice(tmp_path, capfd, make, message, how):
    """Nothing runs, and the refusal says why in one line: torch's own error (8 lines, after a
    2-line warning for a TorchScript archive) advised re-running with weights_only=False."""
    path = tmp_path / "evil.pth"
    make(path)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if how == "cli":
            with pytest.raises(SystemExit) as e:
                cli.main(["convert", str(path), str(tmp_path / "out.safetensors")])
            assert e.value.code == 2
            err = capfd.readouterr().err
            assert err.count("\n") == 1 and re.search(f"checkpoint '{re.escape(str(path))}'{message}$", err), err
        else:
            load = {"spec": load_checkpoint, "torch": gpt_torch.load, "flax": gpt_flax.load}[how]
            with pytest.raises(ValueError, match=f"^checkpoint '{re.escape(str(path))}'{message}$") as e:
                load(path)
            err = str(e.value)
            assert "\n" not in err
    assert "weights_only" not in err and "pickled code ran" not in capfd.readouterr().out


def test_files_torch_cannot_read_are_refused_naming_them(tmp_path):
    """A safetensors file named .pth (what save wrote when given that name) was "Unsupported operand
    152" behind torch's advice to unpickle it unsafely."""
    save_checkpoint(tmp_path / "m.safetensors", _canonical(TINY), TINY)
    (tmp_path / "m.safetensors").rename(tmp_path / "m.pth")
    for load in (load_checkpoint, gpt_torch.load, gpt_flax.load):
        with pytest.raises(
            ValueError,
            match=f"^checkpoint '{re.escape(str(tmp_path / 'm.pth'))}' holds safetensors, but a name ending in "
            "\\.pth or \\.pt is read as a torch\\.save file; rename it to end in \\.safetensors$",
        ):
            load(tmp_path / "m.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a readable torch.save file"):
        gpt_torch.read_torch_file(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="is not a readable torch.save file"):
        gpt_flax.load(tmp_path / "junk.pth")
