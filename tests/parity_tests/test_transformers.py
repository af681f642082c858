"""HF transformers as the oracle: an implementation nobody here wrote.

GPT-2 snapshots written by transformers' own `save_pretrained` load into both twins (by folder and
by file, float32/float16/bfloat16, sharded or not) and give transformers' logits within
FP32_FORWARD; snapshots the twins write (`save_hf`, `gpt-parity convert --to hf`) load in
`GPT2LMHeadModel.from_pretrained` and give the twins' logits; every config field whose meaning the
twins do not compute, set through transformers' own GPT2Config, is refused naming it.
"""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

import gpt_flax  # noqa: E402
import gpt_torch  # noqa: E402
from gpt_spec import GPTConfig, load_checkpoint, save_hf  # noqa: E402
from gpt_spec.formats.hf_config import HF_DEFAULTS, HF_IGNORED  # noqa: E402
from parity_cli.main import main  # noqa: E402
from parity_tests.compare import assert_close  # noqa: E402
from parity_tests.tolerances import FP32_FORWARD  # noqa: E402
from parity_tests.twins import float32_matmuls, run_flax, run_torch  # noqa: E402
from tests import helpers  # noqa: E402

# (vocab, positions, width, heads, layers, tied): 4 heads of width 16 (where emb_dim / 64 would
# guess 1 head), an untied head, and odd sizes where a swapped axis cannot hide.
CONFIGS = {
    "issue-211v-4x16": (211, 32, 64, 4, 2, True),
    "untied": (101, 24, 48, 2, 2, False),
    "odd-3x16": (97, 13, 48, 3, 3, True),
}


def _hf_logits(model, ids):
    with torch.no_grad(), float32_matmuls():
        return model(torch.from_numpy(ids)).logits.double().numpy()


def _ids(vocab, positions, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (2, positions))


def _twins_against(reference, path, ids, **load):
    tm = gpt_torch.load(path, **load).eval()
    fm = gpt_flax.load(path, **load)
    fm.eval()
    with float32_matmuls():
        assert_close(reference, run_torch(tm, ids), FP32_FORWARD, f"torch twin from {path}")
        assert_close(reference, run_flax(fm, ids), FP32_FORWARD, f"flax twin from {path}")
    return tm, fm


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("given", ["folder", "file"])
def test_save_pretrained_snapshots_give_transformers_logits_in_both_twins(tmp_path, name, given):
    vocab, positions, width, heads, layers, tied = CONFIGS[name]
    model = helpers.hf_gpt2(*CONFIGS[name])
    model.save_pretrained(tmp_path)
    ids = _ids(vocab, positions)
    path = tmp_path if given == "folder" else tmp_path / "model.safetensors"
    tm, _ = _twins_against(_hf_logits(model, ids), path, ids)
    assert tm.cfg == GPTConfig(vocab, positions, width, heads, layers, 0.1, True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_snapshots_load_kept_or_cast(tmp_path, dtype):
    """A float16 or bfloat16 snapshot: cast to float32 (exactly) it gives transformers' float32
    logits of the same weights; a bfloat16 one is kept bfloat16 unless float32 is asked for."""
    spec = CONFIGS["issue-211v-4x16"]
    model = helpers.hf_gpt2(*spec).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path)
    widened = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(spec[0], spec[1])
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.dtypes == (dtype,)
    _twins_against(_hf_logits(widened, ids), tmp_path, ids, dtype="float32")
    kept_t, kept_f = gpt_torch.load(tmp_path), gpt_flax.load(tmp_path)
    want = "bfloat16" if dtype == "bfloat16" else "float32"
    assert str(kept_t.tok_emb.weight.dtype) == f"torch.{want}"
    assert kept_f.tok_emb.embedding[...].dtype.name == want


def test_sharded_snapshots_load_as_one_model(tmp_path):
    spec = CONFIGS["odd-3x16"]
    model = helpers.hf_gpt2(*spec)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    ids = _ids(spec[0], spec[1])
    _twins_against(_hf_logits(model, ids), tmp_path, ids)
    _twins_against(_hf_logits(model, ids), tmp_path / "model.safetensors.index.json", ids)


@pytest.mark.parametrize(
    "tied, qkv_bias", [(True, True), (False, True), (True, False)], ids=["tied", "untied", "book-no-qkv-bias"]
)
def test_twins_snapshots_load_in_transformers(tmp_path, tied, qkv_bias):
    """The other way: `save_hf` (what `convert --to hf` writes) read by GPT2LMHeadModel.from_pretrained
    gives the twins' logits. The book's GPT_CONFIG_124M has no q/k/v biases: zeros are written."""
    cfg = GPTConfig(
        vocab_size=89, context_length=12, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=qkv_bias
    )
    torch.manual_seed(3)
    tm = gpt_torch.GPTModel(cfg).eval()
    if tied:
        with torch.no_grad():
            tm.out_head.weight.copy_(tm.tok_emb.weight)
    save_hf(tmp_path, gpt_torch.state_dict(tm), cfg)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is tied
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = _ids(89, 12)
    with float32_matmuls():
        assert_close(_hf_logits(hf, ids), run_torch(tm, ids), FP32_FORWARD, "transformers from save_hf")


def test_convert_to_hf_and_back(tmp_path, capsys):
    spec = CONFIGS["untied"]
    model = helpers.hf_gpt2(*spec)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "c.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "hf-gpt2" in out and "config.json" in out and "float32" in out
    assert main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "back"), "--to", "hf"]) == 0
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    ids = _ids(spec[0], spec[1])
    np.testing.assert_array_equal(_hf_logits(again, ids), _hf_logits(model, ids))


# Each field set through transformers' own GPT2Config, saved by save_pretrained: what it means the
# twins do not compute, so the load is refused naming it.
REFUSED = {
    "activation_function": ({"activation_function": "relu"}, "activation_function = 'relu'"),
    "layer_norm_epsilon": ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon = 1e-06"),
    "n_inner": ({"n_inner": 1024}, "n_inner = 1024"),
    "scale_attn_by_inverse_layer_idx": (
        {"scale_attn_by_inverse_layer_idx": True},
        "scale_attn_by_inverse_layer_idx = True",
    ),
    "scale_attn_weights": ({"scale_attn_weights": False}, "scale_attn_weights = False"),
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_config_fields_the_twins_do_not_compute_are_refused(tmp_path, field, capsys):
    changes, message = REFUSED[field]
    vocab, positions, width, heads, layers, _ = CONFIGS["issue-211v-4x16"]
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_head=heads, n_layer=layers, **changes
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    for load in (gpt_torch.load, gpt_flax.load, load_checkpoint):
        with pytest.raises(ValueError, match=message):
            load(tmp_path / "model.safetensors")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path), str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_gelu_pytorch_tanh_is_the_books_gelu(tmp_path):
    spec = CONFIGS["issue-211v-4x16"]
    model = helpers.hf_gpt2(*spec, activation_function="gelu_pytorch_tanh")
    model.save_pretrained(tmp_path)
    ids = _ids(spec[0], spec[1])
    _twins_against(_hf_logits(model, ids), tmp_path, ids)


def test_every_key_transformers_writes_is_classified():
    """A key transformers adds to GPT2Config must be judged (computed, checked or harmless) before a
    file carrying it loads; today's keys all are."""
    written = set(transformers.GPT2Config().to_dict())
    assert written - set(HF_DEFAULTS) - HF_IGNORED - {"n_ctx"} == set()
