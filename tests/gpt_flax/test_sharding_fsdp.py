"""shard_model(fsdp=True): every parameter, and its Adam moments, also split over `data`.

The split rule is checked on abstract meshes here; placing a model needs several devices, which JAX
fixes when it starts, so that case runs in a subprocess with 4 simulated CPU devices.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from gpt_flax.sharding import fsdp_spec

MESH = AbstractMesh((4, 2), ("data", "model"))
DDP_MESH = AbstractMesh((4, 1), ("data", "model"))


@pytest.mark.parametrize(
    "spec, shape, mesh, expected, dim",
    [
        (P(), (32,), MESH, P("data"), 0),  # a LayerNorm scale
        (P("model", None), (128, 32), MESH, P("model", "data"), 1),  # column-parallel: the other dim
        (P(None, "model"), (97, 32), MESH, P(None, "model"), None),  # 97 indivisible, 32 split by model
        (P(None, "model"), (97, 32), DDP_MESH, P(None, ("model", "data")), 1),  # model of size 1 splits nothing
        (P(), (11, 32), MESH, P(None, "data"), 1),  # the first dim data divides
        (P(), (11, 6), MESH, P(), None),  # none: replicated
    ],
)
def test_fsdp_adds_data_on_a_dimension_it_divides(spec, shape, mesh, expected, dim):
    assert fsdp_spec(spec, shape, mesh) == (expected, dim)


def four_devices() -> None:
    """Run with 4 CPU devices: a tiny GPT on a 4x1 mesh, with and without fsdp."""
    import jax
    from flax import nnx

    import gpt_flax
    from gpt_flax import sharding
    from gpt_spec import GPTConfig

    assert len(jax.devices()) == 4
    cfg = GPTConfig(vocab_size=97, context_length=11, emb_dim=32, n_heads=8, n_layers=2, drop_rate=0.0, qkv_bias=True)
    mesh = sharding.make_mesh((4, 1))

    def placed(fsdp: bool):
        model = gpt_flax.GPTModel(cfg, rngs=nnx.Rngs(0))
        plan = sharding.shard_model(model, mesh, fsdp=fsdp)
        optimizer = gpt_flax.adamw(model)
        moments = [x for x in jax.tree.leaves(nnx.state(optimizer)) if x.ndim]
        most = max(sharding.param_bytes_per_device(model).values())
        return plan, most, moments

    plain, plain_bytes, plain_moments = placed(False)
    fsdp, fsdp_bytes, moments = placed(True)
    assert all("data" not in str(s) for s in plain.specs.values()) and not plain.fsdp_dims
    assert all(fsdp.fsdp_dims[n] is not None for n in fsdp.specs)  # emb 32 and hidden 128 divide by 4
    assert "data" in str(fsdp.specs["trf_blocks.0.norm1.scale"]) and "data" in str(fsdp.specs["out_head.weight"])
    assert plain_bytes == 4 * fsdp_bytes, (plain_bytes, fsdp_bytes)  # every parameter in 4 slices
    for x in moments:  # Adam's moments inherit the split
        assert x.addressable_shards[0].data.size * 4 == x.size, x.sharding
    assert all(s.data.size == x.size for x in plain_moments for s in x.addressable_shards)
    print("four devices: ok")


@pytest.mark.subprocess
def test_fsdp_splits_parameters_and_moments_on_four_devices():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    code = "from tests.gpt_flax.test_sharding_fsdp import four_devices; four_devices()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "four devices: ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
