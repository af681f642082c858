"""A file that is not what it should be is refused as one ValueError naming the file and the field,
never a TypeError, RecursionError, UnicodeDecodeError or SafetensorError, and `gpt-parity` prints
it as one line with exit status 2. A save that cannot finish is refused before any work where it
can be, and otherwise leaves every old file as it was and nothing of its own behind."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors import SafetensorError
from safetensors.numpy import save_file

import parity_cli.main as cli
from gpt_spec import GPTConfig, load_checkpoint, save_checkpoint, save_hf
from gpt_spec.formats.canonical import FORMAT
from gpt_spec.layout import gpt_shapes
from gpt_spec.tensors import LazyStateDict
from parity_tests.configs import TINY
from parity_tests.hf_reference import gpt2_config_json, random_hf_gpt2
from tests.helpers import ROOT

HF_TINY = dict(vocab_size=97, n_positions=11, n_embd=24, n_layer=2)
# Deeper than Python's JSON parser survives: 100,000 levels of objects, and of arrays.
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
NOT_UTF8 = b"\xff\xfe{}"
# Linux's prctl option and the capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) by
# which root ignores permission bits: a root test run drops them for the read-only-folder saves.
PR_CAPBSET_DROP = 24
CAPS_OVERRIDING_PERMISSIONS = (1, 2, 3)
FILE_SIZE_LIMIT = 4096  # bytes: a TINY checkpoint is ~80 KB, its config.json ~1 KB


def _sd(cfg=TINY, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in gpt_shapes(cfg).items()}


def _never_read(cfg=TINY):
    """A lazy state dict of `cfg`'s shapes whose every read fails: a save refused before any work
    never reads it."""

    def read():
        raise AssertionError("a tensor was read before the destination was checked")

    return LazyStateDict({k: (s, "float32", read) for k, s in gpt_shapes(cfg).items()})


def _cli_refuses(argv, capsys) -> str:
    """`gpt-parity ARGV` exits 2 with one line on stderr; that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt-parity"), err
    return err


def _canonical_file(path, sd=None, **metadata):
    save_file(
        sd if sd is not None else _sd(),
        path,
        metadata={
            "format": FORMAT,
            "config": json.dumps(TINY.to_dict()),
            "model": "GPTModel",
            "options": "{}",
            **metadata,
        },
    )
    return path


def _hf_snapshot(folder, config=None, **changes):
    """An HF GPT-2 snapshot folder; `config` replaces its config.json (text or bytes)."""
    folder.mkdir(exist_ok=True)
    save_file(random_hf_gpt2(**HF_TINY), folder / "model.safetensors")
    config = config if config is not None else json.dumps(gpt2_config_json(**HF_TINY, n_head=3) | changes)
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    return folder


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# --- 1. saves: the destination is checked first, and a failed write leaves nothing ---------------


def test_a_missing_or_wrong_destination_is_refused_before_any_tensor_is_read(tmp_path):
    with pytest.raises(
        ValueError, match=r"cannot write checkpoint '.*/no/m\.safetensors': folder '.*/no' does not exist"
    ):
        save_checkpoint(tmp_path / "no" / "m.safetensors", _never_read(), TINY)
    (tmp_path / "file").write_text("")
    with pytest.raises(
        ValueError, match=r"cannot write checkpoint '.*/file/m\.safetensors': '.*/file' is not a folder"
    ):
        save_checkpoint(tmp_path / "file" / "m.safetensors", _never_read(), TINY)
    (tmp_path / "snap" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"cannot write checkpoint '.*/snap/model\.safetensors': it is a directory"):
        save_hf(tmp_path / "snap", _never_read(), TINY)
    assert _listing(tmp_path) == ["file", "snap", "snap/model.safetensors"]


# Run by a user who cannot write ro/: each save prints one line.
_SAVES_INTO_READ_ONLY = """
from gpt_spec import GPTConfig, save_checkpoint, save_hf
from gpt_spec.layout import gpt_shapes
from gpt_spec.tensors import LazyStateDict

cfg = GPTConfig(**{cfg})
def read():
    raise AssertionError("a tensor was read before the destination was checked")
sd = LazyStateDict({{k: (s, "float32", read) for k, s in gpt_shapes(cfg).items()}})
for save in (lambda: save_checkpoint("ro/old.safetensors", sd, cfg), lambda: save_hf("ro", sd, cfg),
             lambda: save_hf("ro/new/snapshot", sd, cfg)):
    try:
        save()
        print("saved")
    except Exception as e:
        print(type(e).__name__, e)
"""


def _obey_permissions() -> None:
    """preexec_fn: a child of root obeys permission bits as any user does (the capabilities that
    override them leave its bounding set before it execs); refused where they cannot be dropped."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in CAPS_OVERRIDING_PERMISSIONS:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.subprocess
def test_a_read_only_folder_is_refused_before_any_tensor_is_read(tmp_path):
    """The saves run in a fresh Python that may not write `ro/` (mode 0o555); a root test run
    drops, for that Python, the capabilities that let root ignore permissions."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "old.safetensors").write_bytes(b"old")
    os.chmod(tmp_path / "ro", 0o555)
    try:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _SAVES_INTO_READ_ONLY.format(cfg=TINY.to_dict())],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=60,
                preexec_fn=_obey_permissions if os.geteuid() == 0 else None,
            )
        except subprocess.SubprocessError:
            pytest.skip("running as root without the right to drop capabilities: root ignores permissions")
        assert proc.returncode == 0, proc.stderr
        ro = re.escape(str(tmp_path.resolve() / "ro"))
        expected = [
            rf"ValueError cannot write checkpoint 'ro/old\.safetensors': folder '{ro}' is not writable",
            rf"ValueError cannot write HF snapshot 'ro': folder '{ro}' is not writable",
            rf"ValueError cannot write HF snapshot 'ro/new/snapshot': folder '{ro}' is not writable",
        ]
        lines = proc.stdout.splitlines()
        assert len(lines) == len(expected) and all(map(re.fullmatch, expected, lines)), lines
        assert (tmp_path / "ro" / "old.safetensors").read_bytes() == b"old"
        assert _listing(tmp_path / "ro") == ["old.safetensors"]
    finally:
        os.chmod(tmp_path / "ro", 0o755)


# Run with RLIMIT_FSIZE below the files' sizes: each save prints one line.
_SAVES_PAST_A_FILE_SIZE_LIMIT = """
import resource
import numpy as np
from gpt_spec import GPTConfig, save_checkpoint, save_hf
from gpt_spec.layout import gpt_shapes

cfg = GPTConfig(**{cfg})
sd = {{k: np.ones(s, np.float32) for k, s in gpt_shapes(cfg).items()}}
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # Python ignores SIGXFSZ: EFBIG
for save in (lambda: save_checkpoint("m.safetensors", sd, cfg), lambda: save_hf("snap", sd, cfg),
             lambda: save_hf("new", sd, cfg)):
    try:
        save()
        print("saved")
    except Exception as e:
        print(type(e).__name__, e)
"""


@pytest.mark.subprocess
def test_a_write_past_the_file_size_limit_is_refused_naming_the_file_and_leaves_nothing(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"old")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").write_bytes(b"old model")
    (tmp_path / "snap" / "config.json").write_bytes(b"old config")
    code = _SAVES_PAST_A_FILE_SIZE_LIMIT.format(cfg=TINY.to_dict(), limit=FILE_SIZE_LIMIT)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [
        "ValueError cannot write checkpoint 'm.safetensors'",
        "ValueError cannot write checkpoint 'snap/model.safetensors'",
        "ValueError cannot write checkpoint 'new/model.safetensors'",
    ]
    assert all("File too large" in line for line in lines), lines
    assert (tmp_path / "m.safetensors").read_bytes() == b"old"
    assert (tmp_path / "snap" / "model.safetensors").read_bytes() == b"old model"
    assert (tmp_path / "snap" / "config.json").read_bytes() == b"old config"
    assert _listing(tmp_path) == ["m.safetensors", "snap", "snap/config.json", "snap/model.safetensors"]


def test_a_failed_config_write_leaves_the_old_snapshot_whole(tmp_path, monkeypatch):
    """Both files of a snapshot are renamed into place only once both are written: a full disk at
    config.json used to leave the new model.safetensors beside the old config.json."""
    save_hf(tmp_path / "snap", _sd(seed=0), TINY)
    before = {name: (tmp_path / "snap" / name).read_bytes() for name in ("model.safetensors", "config.json")}
    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".config.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(ValueError, match=r"cannot write config '.*/snap/config\.json': No space left on device$"):
        save_hf(tmp_path / "snap", _sd(seed=1), TINY)
    assert {name: (tmp_path / "snap" / name).read_bytes() for name in before} == before
    with pytest.raises(ValueError, match="No space left on device"):
        save_hf(tmp_path / "new" / "snap", _sd(seed=1), TINY)
    assert _listing(tmp_path) == ["snap", "snap/config.json", "snap/model.safetensors"]  # no new/ left


def test_a_safetensors_error_while_writing_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "m.safetensors").write_bytes(b"old")

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(
        ValueError, match=r"cannot write checkpoint '.*/m\.safetensors': Error while serializing: .*StorageFull"
    ):
        save_checkpoint(tmp_path / "m.safetensors", _sd(), TINY)
    assert (tmp_path / "m.safetensors").read_bytes() == b"old" and _listing(tmp_path) == ["m.safetensors"]


def test_cli_save_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    src = _canonical_file(tmp_path / "src.safetensors")
    err = _cli_refuses(["convert", src, tmp_path / "no" / "dst.safetensors"], capsys)
    assert "no/dst.safetensors'" in err and "/no' does not exist" in err
    (tmp_path / "ro").mkdir()
    ro, real_access = (tmp_path / "ro").resolve(), os.access  # the folder as a user who may not write it sees it
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p).resolve() == ro else real_access(p, mode, **kw)
    )
    err = _cli_refuses(["convert", src, tmp_path / "ro" / "dst.safetensors"], capsys)
    assert re.search(r"cannot write checkpoint '.*/ro/dst\.safetensors': folder '.*/ro' is not writable$", err)
    err = _cli_refuses(["convert", "--to", "hf", src, tmp_path / "ro" / "snap"], capsys)
    assert "cannot write HF snapshot" in err and "/ro' is not writable" in err
    monkeypatch.undo()

    def too_large(tensors, filename, metadata=None):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), filename)

    monkeypatch.setattr(safetensors.numpy, "save_file", too_large)
    err = _cli_refuses(["convert", src, tmp_path / "dst.safetensors"], capsys)
    assert re.search(r"cannot write checkpoint '.*/dst\.safetensors': File too large$", err)
    assert _listing(tmp_path) == ["ro", "src.safetensors"]


# --- 2. a canonical checkpoint's metadata ---------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"options": '{"x": 1}'}, "GPTModel takes no option\\(s\\) 'x'"),
        (
            {"model": "DummyGPTModel", "options": '{"final_norm": "layernorm", "bias": [1]}'},
            "DummyGPTModel takes no option\\(s\\) 'bias'; it takes final_norm",
        ),
        ({"options": "[1, 2]"}, "options must be a mapping, got list"),
        ({"options": '"final_norm"'}, "options must be a mapping, got str"),
        ({"options": "null"}, "options must be a mapping, got NoneType"),
        ({"options": "{x"}, "its metadata field 'options' is not valid JSON: Expecting property name"),
        ({"options": ""}, "its metadata field 'options' is not valid JSON: Expecting value"),
        ({"options": DEEP_ARRAY}, "its metadata field 'options' is nested too deeply"),
        ({"config": DEEP_OBJECT}, "its metadata field 'config' is nested too deeply"),
        ({"config": "[1]"}, "its metadata holds a bad config: config must be a mapping, got list"),
        ({"config": "{x"}, "its metadata field 'config' is not valid JSON"),
        (
            {"config": json.dumps(TINY.to_dict() | {"n_heads": "3"})},
            "its metadata holds a bad config: n_heads must be an int, got '3'",
        ),
    ],
    ids=[
        "unknown-key",
        "dummy-unknown-key",
        "list",
        "string",
        "null",
        "not-json",
        "empty",
        "deep-options",
        "deep-config",
        "config-list",
        "config-not-json",
        "config-field-type",
    ],
)
def test_bad_metadata_is_refused_naming_the_file_and_field(tmp_path, capsys, metadata, message):
    path = _canonical_file(tmp_path / "m.safetensors", **metadata)
    with pytest.raises(ValueError, match=f"^checkpoint '.*/m\\.safetensors': {message}"):
        load_checkpoint(path)
    err = _cli_refuses(["convert", path, tmp_path / "out.safetensors"], capsys)
    assert re.search(message, err) and "m.safetensors" in err
    err = _cli_refuses(["check", "--checkpoint", path], capsys)
    assert re.search(message, err)


# --- 3. HF config.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resid_pdrop": None}, "resid_pdrop = None \\(JSON null\\); expected a number"),
        (
            {"resid_pdrop": [], "embd_pdrop": [], "attn_pdrop": []},
            "resid_pdrop = \\[\\] \\(JSON array\\); expected a number",
        ),
        ({"n_embd": "768"}, "n_embd = '768' \\(JSON string\\); expected an integer"),
        ({"n_layer": 12.5}, "n_layer = 12.5 \\(JSON number\\); expected an integer"),
        ({"n_layer": 2.0}, "n_layer = 2.0 \\(JSON number\\); expected an integer"),
        ({"layer_norm_epsilon": None}, "layer_norm_epsilon = None \\(JSON null\\); expected a number"),
        ({"n_head": None}, "n_head = None \\(JSON null\\); expected an integer"),
        ({"n_head": "3"}, "n_head = '3' \\(JSON string\\); expected an integer"),
        ({"n_inner": 96.0}, "n_inner = 96.0 \\(JSON number\\); expected an integer or null"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings = 1 \\(JSON integer\\); expected true or false"),
        (
            {"activation_function": ["gelu_new"]},
            "activation_function = \\['gelu_new'\\] \\(JSON array\\); expected a string",
        ),
        ({"n_head": 5}, "describes no model the twins build: emb_dim \\(24\\) must be divisible by n_heads \\(5\\)"),
        ({"n_embd": list(range(1000))}, "n_embd = \\[0, 1, 2, .*\\.\\.\\. \\(JSON array\\)"),  # a long value cut short
    ],
    ids=[
        "resid_pdrop-null",
        "pdrops-arrays",
        "n_embd-string",
        "n_layer-fraction",
        "n_layer-float",
        "eps-null",
        "n_head-null",
        "n_head-string",
        "n_inner-float",
        "tie-integer",
        "activation-array",
        "n_head-indivisible",
        "n_embd-long-array",
    ],
)
def test_an_hf_config_field_of_the_wrong_type_is_refused_naming_it(tmp_path, capsys, changes, message):
    folder = _hf_snapshot(tmp_path / "snap", **changes)
    source = "^checkpoint '.*/snap/model\\.safetensors': config\\.json (sets )?"
    with pytest.raises(ValueError, match=source + message):
        load_checkpoint(folder)
    err = _cli_refuses(["convert", folder, tmp_path / "out.safetensors"], capsys)
    assert re.search(message, err) and "snap/model.safetensors" in err and len(err) < 400


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "checkpoint '.*/model\\.safetensors': config\\.json must hold a JSON object, got list"),
        ('"gpt2"', "checkpoint '.*/model\\.safetensors': config\\.json must hold a JSON object, got str"),
        ("12", "checkpoint '.*/model\\.safetensors': config\\.json must hold a JSON object, got int"),
        ("", "HF config '.*/config\\.json' is not valid JSON: Expecting value"),
        (DEEP_OBJECT, "HF config '.*/config\\.json' is nested too deeply \\(more than 64 levels"),
        (DEEP_ARRAY, "HF config '.*/config\\.json' is nested too deeply \\(more than 64 levels"),
        (NOT_UTF8, "HF config '.*/config\\.json' is not UTF-8 text: 'utf-8' codec can't decode byte 0xff"),
        ('{"n_head": 1' + "0" * 5000 + "}", "HF config '.*/config\\.json' is not valid JSON: Exceeds the limit"),
    ],
    ids=["list", "string", "number", "empty", "deep-object", "deep-array", "not-utf8", "huge-int"],
)
def test_an_hf_config_that_is_no_json_object_is_refused_naming_the_file(tmp_path, capsys, text, message):
    folder = _hf_snapshot(tmp_path / "snap", config=text)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(folder)
    err = _cli_refuses(["convert", folder, tmp_path / "out.safetensors"], capsys)
    assert re.search(message, err)


def test_an_hf_config_given_from_elsewhere_is_named(tmp_path):
    folder = _hf_snapshot(tmp_path / "snap")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(gpt2_config_json(**HF_TINY, n_head="3")))
    with pytest.raises(
        ValueError, match=r"model\.safetensors' with HF config '.*/other\.json': config\.json sets n_head = '3'"
    ):
        load_checkpoint(folder, hf_config=other)


def test_a_shard_index_naming_no_file_or_nested_too_deeply_is_refused(tmp_path, capsys):
    folder = tmp_path / "snap"
    folder.mkdir()
    save_file(random_hf_gpt2(**HF_TINY), folder / "model-00001-of-00001.safetensors")
    (folder / "config.json").write_text(json.dumps(gpt2_config_json(**HF_TINY, n_head=3)))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": ["model-00001-of-00001.safetensors"]}}))
    with pytest.raises(
        ValueError, match=r"shard index '.*index\.json' names \['model-00001-of-00001\.safetensors'\], not a file"
    ):
        load_checkpoint(folder)
    index.write_text('{"weight_map": ' + DEEP_ARRAY + "}")
    with pytest.raises(ValueError, match=r"shard index '.*index\.json' is nested too deeply"):
        load_checkpoint(folder)
    assert "is nested too deeply" in _cli_refuses(["convert", folder, tmp_path / "out.safetensors"], capsys)


# --- 4. torch.save files of every dtype -------------------------------------------------------------


def _book_bf16(cfg=TINY):
    """The book's state dict (parameters and the att.mask buffers) cast to bfloat16, as torch tensors."""
    n = cfg.context_length
    book = {k: torch.from_numpy(v) for k, v in _sd(cfg).items()}
    book |= {f"trf_blocks.{i}.att.mask": torch.triu(torch.ones(n, n), diagonal=1) for i in range(cfg.n_layers)}
    return {k: v.to(torch.bfloat16) for k, v in book.items()}


@pytest.mark.parametrize("wrap", ["state-dict", "chapter5"])
def test_a_bfloat16_pth_loads_exactly_as_a_bfloat16_safetensors_file(tmp_path, wrap):
    book = _book_bf16()
    torch.save(
        book if wrap == "state-dict" else {"model_state_dict": book, "optimizer_state_dict": {}}, tmp_path / "model.pth"
    )
    ckpt = load_checkpoint(tmp_path / "model.pth", n_heads=TINY.n_heads)
    assert ckpt.config == TINY and ckpt.dtypes == ("bfloat16",) and ckpt.compute_dtype == "bfloat16"
    assert sorted(ckpt.state_dict) == sorted(gpt_shapes(TINY))
    for name in ckpt.state_dict:
        got = ckpt.state_dict[name]
        assert got.dtype == ml_dtypes.bfloat16, name
        assert got.tobytes() == book[name].view(torch.int16).numpy().tobytes(), name  # bit for bit
    save_file(
        {k: book[k].float().numpy().astype(ml_dtypes.bfloat16) for k in ckpt.state_dict}, tmp_path / "m.safetensors"
    )
    twin = load_checkpoint(tmp_path / "m.safetensors", n_heads=TINY.n_heads)
    assert twin.dtypes == ckpt.dtypes and all(
        twin.state_dict[k].tobytes() == ckpt.state_dict[k].tobytes() for k in ckpt.state_dict
    )


def test_a_bfloat16_pth_converts_through_the_cli(tmp_path, capsys):
    book = _book_bf16()
    torch.save(book, tmp_path / "model.pth")
    assert cli.main(["convert", str(tmp_path / "model.pth"), str(tmp_path / "out.safetensors"), "--n-heads", "3"]) == 0
    out = load_checkpoint(tmp_path / "out.safetensors")
    assert out.dtypes == ("bfloat16",)
    np.testing.assert_array_equal(
        out.state_dict["tok_emb.weight"].astype(np.float32), book["tok_emb.weight"].float().numpy()
    )


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor.*:UserWarning", "ignore:TypedStorage is deprecated")
@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda t: t.to(torch.float8_e4m3fn),
            "has dtype float8_e4m3fn, which numpy cannot hold; expected one of float16, bfloat16, float32, float64",
        ),
        (lambda t: t.to(torch.float8_e5m2), "has dtype float8_e5m2, which numpy cannot hold"),
        (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "has dtype qint8, which numpy cannot hold"),
        (lambda t: t.to_sparse(), "is a sparse_coo tensor; expected a dense one"),
        (lambda t: torch.empty(t.shape, device="meta"), "is a meta tensor"),
    ],
    ids=["float8_e4m3fn", "float8_e5m2", "qint8", "sparse", "meta"],
)
def test_a_pth_tensor_numpy_cannot_hold_is_refused_naming_the_key_and_dtype(tmp_path, capsys, make, message):
    sd = {k: torch.from_numpy(v) for k, v in _sd().items()}
    sd["trf_blocks.1.att.W_key.weight"] = make(sd["trf_blocks.1.att.W_key.weight"])
    torch.save(sd, tmp_path / "model.pth")
    key = "^checkpoint '.*/model\\.pth': state dict key 'trf_blocks\\.1\\.att\\.W_key\\.weight' "
    with pytest.raises(ValueError, match=key + message):
        load_checkpoint(tmp_path / "model.pth", config=TINY)
    err = _cli_refuses(["convert", tmp_path / "model.pth", tmp_path / "out.safetensors", "--n-heads", "3"], capsys)
    assert re.search(message, err) and "'trf_blocks.1.att.W_key.weight'" in err


# --- 5 and 6. config files nested too deeply, or not UTF-8 ----------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (DEEP_OBJECT, "config file '.*/c\\.json' is nested too deeply \\(more than 64 levels of arrays and objects\\)"),
        (DEEP_ARRAY, "config file '.*/c\\.json' is nested too deeply"),
        (NOT_UTF8, "config file '.*/c\\.json' is not UTF-8 text: 'utf-8' codec can't decode byte 0xff in position 0"),
        ("", "config file '.*/c\\.json' is not valid JSON: Expecting value"),
        ("[1]", "config file '.*/c\\.json' must hold a JSON object, got list"),
        ('"gpt2-small"', "config file '.*/c\\.json' must hold a JSON object, got str"),
        (json.dumps(TINY.to_dict() | {"n_heads": "3"}), "config file '.*/c\\.json': n_heads must be an int, got '3'"),
        (
            json.dumps(TINY.to_dict() | {"dropout": 0.1}),
            "config file '.*/c\\.json': unknown config key\\(s\\) 'dropout'",
        ),
        ('{"n_heads": 1' + "0" * 5000 + "}", "config file '.*/c\\.json' is not valid JSON: Exceeds the limit"),
    ],
    ids=["deep-object", "deep-array", "not-utf8", "empty", "list", "string", "field-type", "unknown-key", "huge-int"],
)
def test_a_bad_config_file_is_refused_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"^{message}"):
        GPTConfig.from_json(path)
    err = _cli_refuses(["check", "--config", path, "--seq", "4"], capsys)
    assert re.search(message, err)
    err = _cli_refuses(
        ["convert", _canonical_file(tmp_path / "m.safetensors"), tmp_path / "out.safetensors", "--config", path], capsys
    )
    assert re.search(message, err)


def test_a_config_nested_just_within_the_limit_still_reads_to_its_own_refusal(tmp_path):
    """The depth limit refuses only what no config needs: 64 levels parse, and the refusal is the
    config's own (an unknown key), not the nesting."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(TINY.to_dict() | {"x": json.loads("[" * 63 + "]" * 63)}))
    with pytest.raises(ValueError, match="unknown config key\\(s\\) 'x'"):
        GPTConfig.from_json(path)


# --- around these: empty and damaged files --------------------------------------------------------


def test_empty_and_damaged_checkpoints_are_refused_naming_them(tmp_path, capsys):
    """An empty torch.save file used to end its message in a bare colon (torch's EOFError says
    nothing); a canonical file without its config said only "'config'"."""
    cases = {
        "empty.pth": "'.*/empty\\.pth' is not a readable torch\\.save file: it ends before its first record",
        "empty.safetensors": "'.*/empty\\.safetensors' is not a readable safetensors file: .*header too small",
        "no-config.safetensors": "checkpoint '.*/no-config\\.safetensors': its metadata is damaged: it has no 'config'$",
    }
    for name in ("empty.pth", "empty.safetensors"):
        (tmp_path / name).write_bytes(b"")
    save_file(_sd(), tmp_path / "no-config.safetensors", metadata={"format": FORMAT})
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / name, n_heads=TINY.n_heads)
        err = _cli_refuses(["convert", tmp_path / name, tmp_path / "out.safetensors", "--n-heads", "3"], capsys)
        assert re.search(message.rstrip("$"), err)


# --- 7. inputs that are not regular files this process may read ----------------------------------

# Run in a fresh Python (a FIFO opened by a reader blocks it, with the GIL held, until a writer
# comes): each [how, path] loads and prints one line, `how` the refusal's words as JSON.
_LOAD_EACH = """
import contextlib, io, json, sys
import gpt_flax, gpt_torch
from gpt_spec import load_checkpoint
import parity_cli.main as cli

for how, path in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if how == "cli":
                cli.main(["convert", path, "out.safetensors"])
            elif how == "hf_config":
                load_checkpoint(path[0], hf_config=path[1])
            else:
                {"spec": load_checkpoint, "torch": gpt_torch.load, "flax": gpt_flax.load}[how](path)
        print(how, "loaded")
    except SystemExit as e:
        print(how, "exit", e.code, json.dumps(err.getvalue()))
    except Exception as e:
        print(how, type(e).__name__, json.dumps(str(e)))
"""
HOWS = ("spec", "torch", "flax", "cli")
LOADS_TIMEOUT_S = 180  # three interpreters' imports on a shared machine; a hang is forever


def _load_each(tmp_path, cases, *, obey_permissions=False) -> list[str]:
    """Each `(how, path)` loaded in one fresh Python; its lines. A run that hangs fails the test."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_EACH, json.dumps([[how, path] for how, path in cases])],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=LOADS_TIMEOUT_S,
            preexec_fn=_obey_permissions if obey_permissions and os.geteuid() == 0 else None,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the loads hung (no answer in {LOADS_TIMEOUT_S} s)")
    except subprocess.SubprocessError:
        pytest.skip("running as root without the right to drop capabilities: root ignores permissions")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _refused_alike(lines, cases, message) -> None:
    """Every API load raised ValueError(message); every CLI run printed it as one line, exit 2."""
    assert len(lines) == len(cases), lines
    for line, (how, _) in zip(lines, cases, strict=True):
        if how == "cli":
            assert line.startswith("cli exit 2 "), line
            err = json.loads(line.removeprefix("cli exit 2 "))
            assert err.count("\n") == 1 and err.rstrip("\n").endswith(message), err
        else:
            assert line == f"{how} ValueError {json.dumps(message)}", line


@pytest.mark.subprocess
def test_a_fifo_is_refused_before_it_is_opened_wherever_a_loader_would_read_it(tmp_path):
    """A FIFO as the checkpoint, or as any file of a snapshot, used to block the load forever, deaf
    to Ctrl-C (safetensors waits in `open` for a writer with the GIL held)."""
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.mkfifo(tmp_path / "fifo.pth")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "model-fifo").mkdir()
    os.mkfifo(tmp_path / "model-fifo" / "model.safetensors")
    _hf_snapshot(tmp_path / "config-fifo", config=b"{}")
    (tmp_path / "config-fifo" / "config.json").unlink()
    os.mkfifo(tmp_path / "config-fifo" / "config.json")
    (tmp_path / "index-fifo").mkdir()
    os.mkfifo(tmp_path / "index-fifo" / "model.safetensors.index.json")
    (tmp_path / "shard-fifo").mkdir()
    save_file({"transformer.wte.weight": np.ones((97, 24), np.float32)}, tmp_path / "shard-fifo" / "a.safetensors")
    os.mkfifo(tmp_path / "shard-fifo" / "b.safetensors")
    weight_map = {"transformer.wte.weight": "a.safetensors", "transformer.wpe.weight": "b.safetensors"}
    (tmp_path / "shard-fifo" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf_file = str(_hf_snapshot(tmp_path / "hf") / "model.safetensors")
    t = str(tmp_path)
    groups = [
        ([(how, f"{t}/fifo.safetensors") for how in HOWS], f"checkpoint '{t}/fifo.safetensors' is a FIFO"),
        ([(how, f"{t}/fifo.pth") for how in HOWS], f"checkpoint '{t}/fifo.pth' is a FIFO"),
        ([(how, f"{t}/model-fifo") for how in HOWS], f"checkpoint '{t}/model-fifo/model.safetensors' is a FIFO"),
        ([("spec", f"{t}/config-fifo")], f"HF config '{t}/config-fifo/config.json' is a FIFO"),
        ([("spec", f"{t}/index-fifo")], f"shard index '{t}/index-fifo/model.safetensors.index.json' is a FIFO"),
        ([("spec", f"{t}/shard-fifo")], f"shard '{t}/shard-fifo/b.safetensors' is a FIFO"),
        ([("hf_config", [hf_file, f"{t}/fifo.json"])], f"HF config '{t}/fifo.json' is a FIFO"),
    ]
    lines = _load_each(tmp_path, [case for cases, _ in groups for case in cases])
    for cases, message in groups:
        _refused_alike(lines[: len(cases)], cases, message + ", not a regular file")
        lines = lines[len(cases) :]


def test_a_character_device_is_refused_as_no_regular_file(tmp_path):
    with pytest.raises(ValueError, match="^checkpoint '/dev/null' is a character device, not a regular file$"):
        load_checkpoint("/dev/null")


@pytest.mark.subprocess
def test_a_folder_that_may_not_be_searched_and_an_unreadable_file_are_refused_saying_so(tmp_path):
    """Run by a user without the permissions (a root test run drops, for that Python, the
    capabilities that let root ignore them): a snapshot folder without search permission used to
    raise PermissionError from `Path.is_file`, and an unreadable file was said not to exist."""
    _hf_snapshot(tmp_path / "locked")
    _hf_snapshot(tmp_path / "config-unreadable")
    _canonical_file(tmp_path / "unreadable.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in _sd().items()}, tmp_path / "unreadable.pth")
    for path in ("unreadable.safetensors", "unreadable.pth", "config-unreadable/config.json"):
        os.chmod(tmp_path / path, 0o000)
    os.chmod(tmp_path / "locked", 0o600)
    t = str(tmp_path)
    groups = [
        ([(how, f"{t}/locked") for how in HOWS], f"checkpoint folder '{t}/locked' is not searchable"),
        (
            [(how, f"{t}/locked/model.safetensors") for how in HOWS],
            f"checkpoint '{t}/locked/model.safetensors' cannot be reached: folder '{t}/locked' is not searchable",
        ),
        (
            [(how, f"{t}/unreadable.safetensors") for how in HOWS],
            f"checkpoint '{t}/unreadable.safetensors' is not readable",
        ),
        ([(how, f"{t}/unreadable.pth") for how in HOWS], f"checkpoint '{t}/unreadable.pth' is not readable"),
        ([("spec", f"{t}/config-unreadable")], f"HF config '{t}/config-unreadable/config.json' is not readable"),
    ]
    try:
        lines = _load_each(tmp_path, [case for cases, _ in groups for case in cases], obey_permissions=True)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    for cases, message in groups:
        _refused_alike(lines[: len(cases)], cases, message + " (permission denied)")
        lines = lines[len(cases) :]
