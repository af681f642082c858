import json

import pytest

from gpt_spec import PRESETS, GPTConfig
from gpt_spec.config import read_json, resolve_config
from parity_tests.configs import GPT_CONFIG_124M


def test_book_dict_is_gpt2_small_and_round_trips():
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    assert cfg == GPTConfig.preset("gpt2-small")
    assert cfg.to_dict() == GPT_CONFIG_124M
    assert cfg.head_dim == 64


@pytest.mark.parametrize(
    "name, emb_dim, n_layers, n_heads",
    [
        ("gpt2-small", 768, 12, 12),
        ("gpt2-medium", 1024, 24, 16),
        ("gpt2-large", 1280, 36, 20),
        ("gpt2-xl", 1600, 48, 25),
    ],
)
def test_presets_have_the_books_sizes(name, emb_dim, n_layers, n_heads):
    cfg = GPTConfig.preset(name)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb_dim, n_layers, n_heads)
    assert (cfg.vocab_size, cfg.context_length) == (50257, 1024)


def test_config_is_frozen() -> None:
    cfg = GPTConfig.preset("gpt2-small")
    with pytest.raises(AttributeError):
        cfg.emb_dim = 1  # type: ignore[misc]
    assert cfg.replace(emb_dim=24, n_heads=3).emb_dim == 24
    assert hash(cfg) == hash(GPTConfig.preset("gpt2-small"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vocab_size": 0}, "vocab_size must be positive, got 0"),
        ({"context_length": -4}, "context_length must be positive, got -4"),
        ({"n_layers": 2.0}, "n_layers must be an int, got 2.0 (float)"),
        ({"n_heads": True}, "n_heads must be an int, got True (bool)"),
        ({"emb_dim": 770}, "emb_dim (770) must be divisible by n_heads (12)"),
        ({"drop_rate": 1.0}, "drop_rate must be in [0, 1), got 1.0"),
        ({"drop_rate": -0.1}, "drop_rate must be in [0, 1), got -0.1"),
        ({"drop_rate": "0.1"}, "drop_rate must be a number, got '0.1' (str)"),
        ({"qkv_bias": 1}, "qkv_bias must be a bool, got 1 (int)"),
    ],
)
def test_bad_values_name_the_field_and_rule(change, message):
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**GPT_CONFIG_124M, **change})
    assert str(e.value) == message


def test_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'emb_size'; known keys: vocab_size"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "emb_size": 768})
    partial = {k: v for k, v in GPT_CONFIG_124M.items() if k != "qkv_bias"}
    with pytest.raises(ValueError, match=r"missing config key\(s\): qkv_bias"):
        GPTConfig.from_dict(partial)
    with pytest.raises(ValueError, match="config must be a mapping, got list"):
        GPTConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        GPTConfig.preset("gpt2-tiny")
    assert str(e.value) == f"unknown preset 'gpt2-tiny'; known presets: {', '.join(PRESETS)}"


def test_numpy_scalars_are_accepted_as_plain_python():
    np = pytest.importorskip("numpy")
    cfg = GPTConfig.from_dict(
        {**GPT_CONFIG_124M, "emb_dim": np.int64(768), "qkv_bias": np.bool_(True), "drop_rate": np.float32(0.0)}
    )
    assert type(cfg.emb_dim) is int and cfg.qkv_bias is True and type(cfg.drop_rate) is float


def test_coerce_accepts_both_forms(tiny_cfg):
    assert GPTConfig.coerce(tiny_cfg) is tiny_cfg
    assert GPTConfig.coerce(tiny_cfg.to_dict()) == tiny_cfg


def test_json_files_and_resolve(tmp_path, tiny_cfg):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_cfg.to_dict()))
    assert resolve_config(str(path)) == tiny_cfg
    assert resolve_config("gpt2-medium") == GPTConfig.preset("gpt2-medium")
    with pytest.raises(ValueError, match="config file .*missing.json' does not exist"):
        resolve_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        resolve_config(str(bad))
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        resolve_config("nope")


@pytest.mark.parametrize(
    "text, key",
    [
        ('{"emb_dim": 24, "emb_dim": 48}', "emb_dim"),
        ('{"a": {"n_head": 3, "n_head": 4}}', "n_head"),  # HF's config.json nests objects
    ],
)
def test_a_json_key_given_twice_is_refused_naming_the_key_and_file(tmp_path, tiny_cfg, text, key):
    """json.loads keeps the last of two equal keys: which value was meant is the file's ambiguity."""
    path = tmp_path / "dup.json"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        resolve_config(str(path))
    assert str(e.value) == f"config file {str(path)!r} has the key {key!r} more than once"
    fields = json.dumps(tiny_cfg.to_dict())[1:-1]
    path.write_text("{" + fields + ', "n_layers": 7}')
    with pytest.raises(ValueError, match="has the key 'n_layers' more than once"):
        resolve_config(str(path))
    with pytest.raises(ValueError, match=r"^HF config '.*dup\.json' has the key 'n_layers' more than once$"):
        read_json(path, "HF config")  # the reader of HF's config.json and the shard index


# kv_window_size: optional (the book's optimized KV cache reads cfg["kv_window_size"]).


def test_kv_window_size_is_optional_and_written_only_when_set():
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)  # the book's dict has no such key
    assert cfg.kv_window_size is None
    assert "kv_window_size" not in cfg.to_dict()  # files without it read as before
    windowed = GPTConfig.from_dict({**GPT_CONFIG_124M, "kv_window_size": 1024})
    assert windowed.kv_window_size == 1024 and windowed != cfg
    assert windowed.to_dict() == {**GPT_CONFIG_124M, "kv_window_size": 1024}
    assert GPTConfig.from_dict(windowed.to_dict()) == windowed
    assert GPTConfig.from_dict({**GPT_CONFIG_124M, "kv_window_size": None}) == cfg
    assert cfg.replace(kv_window_size=5).kv_window_size == 5
    np = pytest.importorskip("numpy")
    assert type(GPTConfig.from_dict({**GPT_CONFIG_124M, "kv_window_size": np.int64(7)}).kv_window_size) is int


@pytest.mark.parametrize(
    "window, message",
    [
        (0, "kv_window_size must be positive, got 0"),
        (-1, "kv_window_size must be positive, got -1"),
        (True, "kv_window_size must be an int or None, got True (bool)"),
        (1.5, "kv_window_size must be an int or None, got 1.5 (float)"),
        ("5", "kv_window_size must be an int or None, got '5' (str)"),
        (1025, "kv_window_size (1025) must be at most context_length (1024)"),
    ],
)
def test_bad_kv_window_sizes_are_refused(window, message):
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**GPT_CONFIG_124M, "kv_window_size": window})
    assert str(e.value) == message


def test_kv_window_size_is_in_the_known_keys_but_never_missing():
    partial = {k: v for k, v in GPT_CONFIG_124M.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match=r"^missing config key\(s\): vocab_size$"):
        GPTConfig.from_dict(partial)
    with pytest.raises(ValueError, match=r"known keys: vocab_size, .*, qkv_bias, kv_window_size$"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "window": 3})


def test_a_checkpoint_keeps_kv_window_size_and_one_without_reads_as_before(tmp_path, tiny_cfg):
    import gpt_torch
    from gpt_spec import load_checkpoint, save_checkpoint

    sd = gpt_torch.state_dict(gpt_torch.GPTModel(tiny_cfg))
    for cfg in (tiny_cfg, tiny_cfg.replace(kv_window_size=4)):
        path = tmp_path / f"w{cfg.kv_window_size}.safetensors"
        save_checkpoint(path, sd, cfg)
        assert load_checkpoint(path).config == cfg
        metadata = json.loads(_metadata(path)["config"])
        assert metadata == cfg.to_dict()
        assert ("kv_window_size" in metadata) == (cfg.kv_window_size is not None)


def test_hf_export_drops_kv_window_size(tmp_path, tiny_cfg):
    """It changes only cached decoding, not what the weights compute: GPT2Config has no key for it."""
    import gpt_torch
    from gpt_spec import load_checkpoint, save_hf

    cfg = tiny_cfg.replace(qkv_bias=True, kv_window_size=4)
    save_hf(tmp_path / "hf", gpt_torch.state_dict(gpt_torch.GPTModel(cfg)), cfg)
    assert "window" not in (tmp_path / "hf" / "config.json").read_text()
    assert load_checkpoint(tmp_path / "hf").config == cfg.replace(kv_window_size=None)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()
