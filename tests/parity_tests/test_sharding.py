"""The Flax twin sharded on a (data, model) mesh equals itself on one device.

JAX fixes its device count when it starts, so the cases needing 8 devices (sharded_cases.py) run in
a pytest subprocess with 8 simulated CPU devices; where this session already has 8 or more devices
(a GPU/TPU host), they are collected directly there instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from gpt_flax.sharding import make_mesh, parse_mesh

CASES = Path(__file__).with_name("sharded_cases.py")


@pytest.mark.subprocess
def test_sharded_cases_on_eight_simulated_cpu_devices():
    if len(jax.devices()) >= 8:
        pytest.skip("this session has 8 devices; run parity_tests/sharded_cases.py directly")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=CASES.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.parametrize("text, shape", [("2x4", (2, 4)), ("1X8", (1, 8)), (" 8 x 1 ", (8, 1))])
def test_parse_mesh(text, shape):
    assert parse_mesh(text) == shape


@pytest.mark.parametrize("text", ["2y4", "0x8", "2x", "x4", "2x4x1", ""])
def test_bad_mesh_text(text):
    with pytest.raises(ValueError, match="mesh must look like DATAxMODEL"):
        parse_mesh(text)


def test_a_mesh_needs_its_devices():
    with pytest.raises(ValueError, match=r"mesh 3x3 needs 9 devices, this job has \d+"):
        make_mesh("3x3")


def test_the_mesh_comes_from_jax_make_mesh_with_auto_axes():
    from jax.sharding import AxisType

    mesh = make_mesh("1x1", jax.devices()[:1])
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)  # jax.make_mesh's default is Explicit


def test_every_partition_rule_names_canonical_parameters():
    """Rules are keyed on canonical names: each names some parameter of a GPTModel, and the names
    sharding derives (through gpt_flax.weights) are the state dict's."""
    import re

    from gpt_flax import sharding
    from gpt_spec import GPTConfig
    from gpt_spec.layout import gpt_shapes

    cfg = GPTConfig(vocab_size=97, context_length=11, emb_dim=24, n_heads=3, n_layers=2, drop_rate=0.0, qkv_bias=True)
    names = list(gpt_shapes(cfg))
    for pattern, _ in sharding.PARTITION_RULES:
        assert any(re.fullmatch(pattern, name) for name in names), pattern
    from parity_tests.twins import build_flax

    model = build_flax("gpt", cfg, seed=0)
    plan = sharding.shard_model(model, make_mesh("1x1", jax.devices()[:1]))
    assert set(plan.specs) == set(names)
    assert tuple(plan.specs["trf_blocks.1.ff.layers.2.weight"]) == (None, "model")
