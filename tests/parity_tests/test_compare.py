"""The comparator of parity_tests.compare: it must fail where the twins differ, and say where."""

import numpy as np
import pytest
import torch

from parity_tests.compare import assert_close, compare, compare_tree
from parity_tests.tolerances import EXACT, Bound

B = Bound(atol=1e-5, rtol=1e-5, measured="test bound")


def test_within_bound_passes_and_reports_the_worst_element():
    ref = np.linspace(-3, 3, 60, dtype=np.float32).reshape(3, 4, 5)
    cand = ref.copy()
    cand[2, 3, 4] += 2e-5  # |ref| is 3 there: inside atol + rtol*|ref| = 4e-5
    c = compare("logits", ref, cand, B)
    assert c.passed and c.worst_index == (2, 3, 4)
    assert c.max_abs == pytest.approx(2e-5, rel=1e-2)
    assert c.max_rel == pytest.approx(2e-5 / 3, rel=1e-2)
    cand[0, 0, 1] += 2e-5  # |ref| is ~2.9 there too, but the same change near 0 would fail:
    cand[1, 2, 2] += 2e-5  # ref[1, 2, 2] ~ 0.25, limit ~1.25e-5
    c = compare("logits", ref, cand, B)
    assert not c.passed and c.worst_index == (1, 2, 2)


def test_a_difference_past_the_bound_fails_and_is_named():
    ref = np.zeros((2, 3), np.float32)
    cand = ref.copy()
    cand[0, 2] = 1e-4
    c = compare("block.0", ref, cand, B)
    assert not c.passed and c.worst_index == (0, 2)
    assert "block.0: FAILED: max |Δ| 0.0001 at (0, 2)" in c.describe()


def test_shapes_are_checked_before_values():
    c = compare("logits", np.zeros((2, 3)), np.zeros((3, 2)), B)
    assert not c.passed and c.problem == "shape (3, 2) differs from reference shape (2, 3)"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_fail_even_when_both_sides_agree(bad):
    ref = np.ones(4)
    ref[2] = bad
    c = compare("x", ref, ref.copy(), EXACT)
    assert not c.passed and "both sides have 1 non-finite value(s), the same ones, first at (2,)" in c.problem
    assert c.same_non_finite == 1


def test_nested_outputs_name_the_failing_leaf():
    ref = {"logits": np.ones((2, 2)), "hidden": [np.zeros(3), np.ones(3)]}
    cand = {"logits": np.ones((2, 2)), "hidden": [np.zeros(3), np.ones(3) * 1.5]}
    results = compare_tree(ref, cand, B)
    assert [c.name for c in results] == ["output.logits", "output.hidden.0", "output.hidden.1"]
    with pytest.raises(AssertionError, match=r"output.hidden.1: FAILED: max \|Δ\| 0.5"):
        assert_close(ref, cand, B)
    with pytest.raises(AssertionError, match="keys .* differ from reference keys"):
        assert_close(ref, {"logits": np.ones((2, 2))}, B)
    with pytest.raises(AssertionError, match="1 entries differ from reference's 2"):
        assert_close(ref, {**cand, "hidden": [np.zeros(3)]}, B)


def test_torch_tensors_are_compared_as_numpy():
    t = torch.ones(2, 3, requires_grad=True) * 2
    assert compare("t", t, np.full((2, 3), 2.0), EXACT).passed
