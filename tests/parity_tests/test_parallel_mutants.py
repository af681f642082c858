"""Every distributed mutant, planted in either twin, fails `gpt-parity parallel` under each strategy
it exists in, and only there, naming the first tensor past its bound (`make test-distributed`)."""

from __future__ import annotations

import json

import pytest

from parity_tests import parallel
from parity_tests.parallel_spec import DIST_MUTANTS, STRATEGIES, ParallelSpec
from tests.helpers import ROOT

pytestmark = pytest.mark.distributed

TINY_MESH = json.loads((ROOT / "examples" / "tiny-mesh.json").read_text())


@pytest.mark.parametrize("twin", parallel.TWINS)
@pytest.mark.parametrize("mutant", DIST_MUTANTS, ids=lambda m: m.name)
def test_each_distributed_mutant_is_caught_where_it_exists(mutant, twin):
    spec = ParallelSpec(TINY_MESH, 2, STRATEGIES, steps=2, dropout="parity", plant=mutant.name)
    report = parallel.run_parallel_parity(spec, plant_twin=twin)
    assert report.failure is None, report.failure
    failed = {(r.strategy, r.twin) for r in report.rows if not r.passed}
    for strategy in STRATEGIES:
        planted = strategy in mutant.strategies
        # the planted twin against one device, and the twins against each other: failed exactly there
        assert ((strategy, twin) in failed) == planted, (strategy, sorted(failed))
        assert ((strategy, "torch vs flax") in failed) == planted, (strategy, sorted(failed))
    other = "flax" if twin == "torch" else "torch"
    assert not any(t == other for _, t in failed), sorted(failed)  # the clean twin stays clean
    for row in report.rows:
        if not row.passed:
            assert row.first_failure and (row.first_failure == "loss" or "." in row.first_failure), row.first_failure
