"""The decoding mutants (the KV cache and parity sampling) against the generation check
(parity_tests/decoding.py): each, planted in either twin, is caught where it was planted (part,
prompt, token position, and the stage for the cache); the zoo's decoding layers with their knobs
at the book's defaults pass; and the clean check after the planted ones, on the same models,
passes (nothing planted is left behind, in torch or in Flax's compiled programs)."""

import numpy as np
import pytest

from gpt_spec.randomness import pick_token
from parity_cli.main import main
from parity_tests import decoding, zoo, zoo_decoding
from parity_tests.configs import TINY

pytestmark = pytest.mark.zoo

NAMES = [m.name for m in zoo.DECODING_MUTANTS]


@pytest.fixture(scope="module")
def planted_runs():
    """Every decoding mutant in each twin, one after another on the same models, then the clean
    check on them: {(name, twin): row}, the clean report."""
    runner = zoo_decoding.Runner(seed=0)
    rows = {(m.name, twin): runner.run(TINY, m, twin) for m in zoo.DECODING_MUTANTS for twin in zoo.TWINS}
    clean = runner.close(list(rows.values()), TINY)
    return rows, clean


@pytest.mark.parametrize("twin", zoo.TWINS)
@pytest.mark.parametrize("name", NAMES)
def test_each_decoding_mutant_is_caught_where_it_was_planted(planted_runs, name, twin):
    row = planted_runs[0][(name, twin)]
    assert row.caught, f"{name} planted in {twin} escaped the generation check"
    assert row.located, f"{name} planted in {twin}: expected {row.where}, first failure: {row.describe}"
    assert row.evidence == "bound" and row.margin > 1 and row.ok


def test_the_clean_check_after_the_planted_ones_passes(planted_runs):
    rows, clean = planted_runs
    assert clean.passed and clean.first_failure is None, clean.first_failure and clean.first_failure.describe()
    closest = clean.closest
    assert closest is not None and 0 < closest.margin < 1
    data = clean.to_json()
    assert data["passed"] and data["failures"] == [] and data["first_failure"] is None
    assert all(data["parts"][part]["checked"] > 0 for part in decoding.PARTS)
    assert all(r.control_passed for r in rows.values())


# The zoo's decoding layers with every knob at its default: no bug, so the check must pass.
NULL = zoo.Mutant(
    "null-decoding",
    "the zoo's KV-cache layers and sampler with their knobs at the book's defaults",
    "-",
    (zoo.Swap("KVCacheGPT", ()), zoo.Swap("KVCacheAttention", ()), zoo.Swap(zoo.SAMPLER, ())),
    shows_in=zoo.GENERATION,
)


@pytest.mark.parametrize("twin", zoo.TWINS)
def test_the_decoding_layers_at_their_defaults_pass_the_check(twin):
    row = zoo_decoding.Runner(seed=0).run(TINY, NULL, twin)
    assert row.passed and not row.caught and not row.ok, row.describe


def test_planting_puts_every_class_and_function_back():
    models = decoding.build_models(TINY)
    before = {
        part: {t: [type(m) for m in (pair[t], *(b.att for b in pair[t].trf_blocks))] for t in pair}
        for part, pair in models.items()
    }
    picks = {t: decoding.generate_module(t).pick_token for t in zoo.TWINS}
    for mutant in zoo.DECODING_MUTANTS:
        for twin in zoo.TWINS:
            with zoo_decoding.planted(mutant, twin, models["cached"]):
                pass
    after = {
        part: {t: [type(m) for m in (pair[t], *(b.att for b in pair[t].trf_blocks))] for t in pair}
        for part, pair in models.items()
    }
    assert after == before
    assert all(decoding.generate_module(t).pick_token is picks[t] is pick_token for t in zoo.TWINS)


def test_temperature_before_or_after_top_k_is_the_same_distribution():
    """Why the zoo plants the temperature on the probabilities: dividing by T > 0 keeps the order,
    so top-k before or after it keeps the same logits, and the book's order is no bug to catch."""
    logits = np.random.default_rng(0).normal(size=(4, TINY.vocab_size)) * 3  # float64: no rounding of x / T
    for temperature in (0.3, 0.7, 2.5):
        after = decoding.reference_probabilities(logits, temperature, decoding.TOP_K)
        before = decoding.reference_probabilities(logits / temperature, 1.0, decoding.TOP_K)
        np.testing.assert_array_equal(before > 0, after > 0)  # the same k kept
        np.testing.assert_allclose(before, after, rtol=1e-12, atol=0)


def test_ties_are_built_where_natural_logits_have_none():
    """top-k-exactly-k differs only where logits tie at the k-th largest: float logits never do,
    so the check builds rows that do."""
    natural = np.random.default_rng(1).normal(size=(2, TINY.vocab_size)).astype(np.float32)
    built = decoding.tie_rows(natural)
    for row in built:
        kth = np.sort(row)[-decoding.TOP_K]
        assert (row >= kth).sum() >= decoding.TOP_K + decoding.TIES - 1
    for row in natural:
        assert (row >= np.sort(row)[-decoding.TOP_K]).sum() == decoding.TOP_K


def test_check_refuses_a_decoding_mutant_in_one_line_and_mutants_lists_its_kind(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--config", "examples/tiny-odd.json", "--plant", "kv-cache-stale@torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1  # one line
    assert "`gpt-parity mutants --mutant kv-cache-stale` runs it through the generation check" in err[-1]
    assert main(["mutants", "--list"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert all(listed[name] == zoo.GENERATION for name in NAMES)
