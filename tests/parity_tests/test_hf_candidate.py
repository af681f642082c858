"""An HF transformers GPT2LMHeadModel as the candidate of `check` and `diagnose`: a snapshot that
computes the book's GPT-2 passes every piece of evidence against the torch twin; one whose
config.json asks for what a zoo mutant computes is diagnosed as that mutant, in transformers; one
that asks for what no mutant computes is "no known bug"."""

import json
import sys

import pytest

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from parity_cli.main import main  # noqa: E402
from parity_tests import diagnose, hf_candidate  # noqa: E402
from parity_tests.forward import ParityOptions  # noqa: E402
from parity_tests.twins import submodule  # noqa: E402
from tests import helpers  # noqa: E402

# (vocab, positions, width, heads, layers): 3 heads of width 8, two blocks (a per-layer bug shows
# from the second), odd sizes where a swapped axis cannot hide.
SHAPE = (97, 12, 24, 3, 2)
OPTS = ParityOptions(batch=2, seq=12)


def _snapshot(tmp_path, **config) -> str:
    folder = tmp_path / "snapshot"
    helpers.hf_gpt2(*SHAPE, **config).save_pretrained(folder)
    return str(folder)


def test_an_hf_model_of_the_books_gpt2_passes_every_piece_of_evidence(tmp_path):
    candidate = hf_candidate.load_candidate(_snapshot(tmp_path))
    assert candidate.meaning == {}
    report = hf_candidate.check(candidate, OPTS)
    assert report.passed, report.failures()
    row = report.rows[0]
    assert row.direction == "torch->transformers"
    assert [c.name for c in row.stages][:3] == ["drop_emb", "trf_blocks.0.norm1", "trf_blocks.0.att"]
    assert len(row.stages) == 2 + 6 * SHAPE[4] + 1 and len(row.layers) > 20
    d = diagnose.diagnose_hf(candidate, OPTS)
    assert d.verdict == "nothing to diagnose: the check passes" and not d.trials


def test_each_probe_calls_transformers_own_module(tmp_path):
    """What a layer probe calls on the candidate is transformers' module, not a copy of it."""
    candidate = hf_candidate.load_candidate(_snapshot(tmp_path))
    hf = candidate.model.hf.transformer
    assert submodule(candidate.model, "trf_blocks.1.norm2") is hf.h[1].ln_2
    assert submodule(candidate.model, "trf_blocks.0.ff.layers.1") is hf.h[0].mlp.act
    assert submodule(candidate.model, "trf_blocks.0.att.out_proj") is hf.h[0].attn.c_proj
    assert submodule(candidate.model, "out_head") is candidate.model.hf.lm_head


@pytest.mark.parametrize(
    "config, mutant, stage",
    [
        ({"layer_norm_epsilon": 1e-6}, "layernorm-eps-1e-6", "trf_blocks.0.norm1"),
        ({"layer_norm_epsilon": 1e-12}, "layernorm-eps-1e-12", "trf_blocks.0.norm1"),
        ({"activation_function": "gelu"}, "gelu-erf", "trf_blocks.0.ff"),
        ({"scale_attn_weights": False}, "attention-unscaled", "trf_blocks.0.att"),
    ],
)
def test_a_config_that_asks_for_a_mutant_is_diagnosed_as_it_in_transformers(tmp_path, config, mutant, stage):
    candidate = hf_candidate.load_candidate(_snapshot(tmp_path, **config))
    assert candidate.meaning == config
    d = diagnose.diagnose_hf(candidate, OPTS)
    assert [(t.mutant, t.carrier) for t in d.explained] == [(mutant, "transformers")], d.verdict
    assert {t.planted_in for t in d.trials} == {"torch"}
    assert d.verdict.startswith(f"consistent with {mutant} in transformers at {stage}: planted in torch")


def test_what_no_mutant_computes_is_no_known_bug(tmp_path):
    """Scores divided by the layer's index + 1: the same as the book's in block 0, off from block 1."""
    candidate = hf_candidate.load_candidate(_snapshot(tmp_path, scale_attn_by_inverse_layer_idx=True))
    d = diagnose.diagnose_hf(candidate, OPTS)
    assert not d.baseline.passed and not d.explained
    assert d.verdict.startswith("no known bug explains it (first failure at trf_blocks.1.att)")


def test_diagnose_hf_on_the_command_line(tmp_path, capsys):
    folder = _snapshot(tmp_path, layer_norm_epsilon=1e-6)
    out = tmp_path / "d.json"
    assert main(["diagnose", "--hf", folder, "--seq", "12", "--quiet", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "its config.json departs from the book's GPT-2: layer_norm_epsilon = 1e-06" in text
    assert "consistent with layernorm-eps-1e-6 in transformers at trf_blocks.0.norm1" in text
    got = json.loads(out.read_text())
    assert got["diagnosis"] == {"mutant": "layernorm-eps-1e-6", "bug_in": "transformers"}
    assert got["candidate"] == {"hf_snapshot": folder, "config_meaning": {"layer_norm_epsilon": 1e-6}}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "gpt2-small"], "drop --config"),
        (["--plant", "gelu-erf"], "drop --plant"),
        (["--reference", "flax"], "against the torch twin"),
    ],
)
def test_diagnose_hf_refuses_what_it_cannot_honour(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--hf", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_snapshots_are_refused_naming_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is not a folder"):
        hf_candidate.load_candidate(tmp_path / "absent")
    with pytest.raises(ValueError, match="config.json' does not exist"):
        hf_candidate.load_candidate(tmp_path)
    folder = _snapshot(tmp_path, add_cross_attention=True)
    with pytest.raises(ValueError, match="add_cross_attention"):  # a model of another shape: no reference
        hf_candidate.load_candidate(folder)
    folder = _snapshot(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` finds absent
    with pytest.raises(ValueError, match="transformers, which is not installed"):
        hf_candidate.load_candidate(folder)
