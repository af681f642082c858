"""GPT-2 files in the HF layout, made here from random tensors the way the hub stores them, load into
both twins, and both twins' logits equal a float64 numpy GPT-2 computed from the HF tensors."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import gpt_flax
import gpt_torch
from gpt_spec import load_checkpoint
from parity_cli.main import main
from parity_tests.compare import assert_close
from parity_tests.configs import TINY_BIAS
from parity_tests.hf_reference import gpt2_config_json, hf_gpt2_logits, random_hf_gpt2
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import float32_matmuls, run_flax, run_torch


def _both_against_reference(path, hf, n_head, ids):
    tm = gpt_torch.load(path).eval()
    fm = gpt_flax.load(path)
    fm.eval()
    reference = hf_gpt2_logits(hf, ids, n_head)
    with float32_matmuls():
        assert_close(reference, run_torch(tm, ids), FP32_FORWARD, "torch logits")
        assert_close(reference, run_flax(fm, ids), FP32_FORWARD, "flax logits")
    return tm, fm


@pytest.mark.parametrize("prefix, lm_head", [("transformer.", False), ("", True)], ids=["LMHead", "bare"])
def test_tiny_hf_file_in_both_twins_equals_the_numpy_reference(tmp_path, prefix, lm_head):
    hf = random_hf_gpt2(vocab_size=97, n_positions=11, n_embd=24, n_layer=2, seed=1, prefix=prefix, lm_head=lm_head)
    save_file(hf, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json(97, 11, 24, 2, 3)))
    ids = np.random.default_rng(0).integers(0, 97, (3, 11))
    _both_against_reference(tmp_path, hf, 3, ids)


def test_convert_then_check_and_generate_from_the_file(tmp_path, capsys):
    hf = random_hf_gpt2(vocab_size=50257, n_positions=32, n_embd=64, n_layer=2, seed=2, dtype=np.float32)
    save_file(hf, tmp_path / "model.safetensors")
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_json(50257, 32, 64, 2, 4, **no_dropout)))
    dst = tmp_path / "canonical.safetensors"
    assert main(["convert", str(tmp_path), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"hf-gpt2, 1 file(s), float32, GPTModel, 6,535,040 parameters; config from {tmp_path / 'config.json'}" in out
    assert f"wrote {dst}: canonical, float32, read back and verified" in out
    ckpt = load_checkpoint(dst)
    assert ckpt.layout == "canonical" and ckpt.config.n_heads == 4 and ckpt.config.qkv_bias
    assert main(["check", "--checkpoint", str(dst), "--seq", "16", "--quiet"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    assert main(["generate", "Hello, I am", "--checkpoint", str(tmp_path), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "[torch] Hello, I am" in out and "the twins generated the same token ids" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--checkpoint", "no/such/file.safetensors"], "does not exist"),
        (["generate", "x", "--checkpoint", "missing.pth"], "does not exist"),
        (["convert", "a.safetensors", "b.bin"], "the destination must be a .safetensors file"),
        (["convert", "missing.safetensors", "b.safetensors"], "does not exist"),
    ],
)
def test_bad_checkpoint_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_gpt2_small_shaped_hf_file(tmp_path, capsys):
    """124M parameters in the HF layout, as `model.safetensors` of the hub's gpt2 holds them."""
    hf = random_hf_gpt2(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, seed=3)
    save_file(hf, tmp_path / "model.safetensors")
    ids = np.random.default_rng(1).integers(0, 50257, (2, 16))
    tm, fm = _both_against_reference(tmp_path / "model.safetensors", hf, 12, ids)
    assert tm.cfg.emb_dim == 768 and tm.cfg.n_heads == 12 and tm.cfg.qkv_bias
    assert sum(p.numel() for p in tm.parameters()) == 163_037_184  # 124M + the untied head
    assert (
        main(
            [
                "generate",
                "Hello, I am",
                "--checkpoint",
                str(tmp_path / "model.safetensors"),
                "--max-new-tokens",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert "the twins generated the same token ids" in capsys.readouterr().out


def test_gpt_parity_reads_the_books_pth(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(gpt_torch.GPTModel(TINY_BIAS.replace(emb_dim=128, n_heads=2)).state_dict(), tmp_path / "model.pth")
    dst = tmp_path / "model.safetensors"
    with pytest.raises(SystemExit):  # 128 wide, 2 layers: no published GPT-2, so n_heads is not guessed
        main(["convert", str(tmp_path / "model.pth"), str(dst)])
    assert "cannot tell n_heads" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "model.pth"), str(dst), "--n-heads", "2"]) == 0
    assert "torch.save, 1 file(s), float32" in capsys.readouterr().out
    assert main(["check", "--checkpoint", str(dst), "--quiet"]) == 0
