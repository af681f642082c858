"""Cases that need 8 devices; test_sharding.py runs this file with 8 simulated CPU devices.

Not named test_*.py, so the main session does not collect it with its single CPU device.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gpt_flax
from gpt_flax import sharding
from gpt_spec import GPTConfig, ModelKind
from parity_cli.main import main
from parity_tests.compare import compare
from parity_tests.tolerances import FP32_FORWARD
from parity_tests.twins import build_flax, float32_matmuls
from tests import helpers

if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)", allow_module_level=True)

# Sizes the mesh axes divide (emb 32, 8 heads, hidden 128), except the vocabulary, as with GPT-2.
CFG = GPTConfig(vocab_size=97, context_length=11, emb_dim=32, n_heads=8, n_layers=2, drop_rate=0.0, qkv_bias=True)


@pytest.mark.parametrize("args", helpers.simulated_device_commands(), ids=" ".join)
def test_the_docs_lines_with_simulated_devices(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0


def test_four_meshes_equal_one_device_and_split_the_parameters(tmp_path, capsys):
    """`gpt-parity check --mesh 1x8,8x1,2x4,4x2`: the twins agree, and the sharded Flax twin's logits,
    greedy tokens, gradients and weights after an AdamW step equal its single-device run."""
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(CFG.to_dict()))
    out = tmp_path / "check.json"
    assert (
        main(
            [
                "check",
                "--config",
                str(config),
                "--mesh",
                "1x8,8x1,2x4,4x2",
                "--batch",
                "8",
                "--seq",
                "10",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "Flax twin sharded vs one device" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["forward"]["passed"] and data["sharding"]["passed"]
    meshes = data["sharding"]["meshes"]
    assert [m["mesh"] for m in meshes] == ["1x8", "8x1", "2x4", "4x2"]
    for m in meshes:
        _, model = sharding.parse_mesh(m["mesh"])
        assert m["passed"] and m["generated_tokens_equal"] and not m["notes"]
        assert m["split_param_bytes_per_device"] * model == m["split_param_bytes_total"]  # 1/model each
        replicated = m["param_bytes_total"] - m["split_param_bytes_total"]
        assert m["param_bytes_per_device"] == m["split_param_bytes_per_device"] + replicated
        assert m["weights"]["n_outliers"] == 0 and m["logits"]["margin"] < 1


def test_every_parameter_gets_the_rule_it_should():
    mesh = sharding.make_mesh("2x4")
    model = build_flax(ModelKind.GPT, CFG, seed=0)
    plan = sharding.shard_model(model, mesh)
    optimizer = gpt_flax.adamw(model)  # after: its moments take the parameters' sharding metadata
    # Canonical names, specs over the canonical layout (Linear weights (out, in)).
    specs = {name: tuple(spec) for name, spec in plan.specs.items()}
    assert set(specs) == set(gpt_flax.state_dict(model))
    assert specs["tok_emb.weight"] == (None, "model")
    assert specs["trf_blocks.0.att.W_key.weight"] == ("model", None)
    assert specs["trf_blocks.1.att.W_value.bias"] == ("model",)
    assert specs["trf_blocks.0.att.out_proj.weight"] == (None, "model")
    assert specs["trf_blocks.0.att.out_proj.bias"] == ()
    assert specs["trf_blocks.1.ff.layers.0.weight"] == ("model", None)
    assert specs["trf_blocks.1.ff.layers.0.bias"] == ("model",)
    assert specs["trf_blocks.1.ff.layers.2.weight"] == (None, "model")
    assert specs["trf_blocks.0.norm1.scale"] == ()
    assert specs["out_head.weight"] == (None, "model")
    # The Flax kernels, (in, out), hold them transposed: column-parallel splits the output.
    kernel = model.trf_blocks[0].att.W_query.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 8)}
    hidden = model.trf_blocks[1].ff.layers.layers[2].kernel[...]
    assert hidden.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert {s.data.shape for s in hidden.addressable_shards} == {(32, 32)}
    head = model.out_head.kernel[...]
    assert head.sharding.spec == jax.sharding.PartitionSpec("model", None)
    # Adam's moments are placed as their parameters are.
    moments = {
        keys: var[...].sharding.spec
        for keys, var in nnx.to_flat_state(nnx.state(optimizer))
        if keys[-3:] == ("att", "W_query", "kernel")
    }
    assert len(moments) == 4 and set(moments.values()) == {jax.sharding.PartitionSpec(None, "model")}, moments
    # A replicated parameter's moments are on the whole mesh too, not left on one device.
    scale_moments = [
        var[...] for keys, var in nnx.to_flat_state(nnx.state(optimizer)) if keys[-2:] == ("norm1", "scale")
    ]
    assert len(scale_moments) == 4
    assert all(m.sharding.is_equivalent_to(NamedSharding(mesh, P()), 1) for m in scale_moments)


def test_dimensions_the_mesh_does_not_divide_are_replicated_and_reported():
    cfg = CFG.replace(emb_dim=12, n_heads=3)  # 12 does not divide by 8; the MLP's 48 does
    model = build_flax(ModelKind.GPT, cfg, seed=1)
    model.eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 7))  # 3 does not divide by 8
    with float32_matmuls():
        reference = np.asarray(gpt_flax.jit_forward(model)(ids))
        mesh = sharding.make_mesh("1x8")
        plan = sharding.shard_model(model, mesh)
        sharded = np.asarray(gpt_flax.jit_forward(model)(sharding.shard_batch(ids, mesh)))
    notes = plan.describe()
    assert any(n.startswith("tok_emb.weight: dim(s) [1]") for n in notes)
    assert any(n.startswith("trf_blocks.0.att.W_query.weight: dim(s) [0]") for n in notes)
    assert not any("ff.layers.0.weight" in n for n in notes)  # 48 % 8 == 0: still split
    assert tuple(plan.specs["trf_blocks.0.ff.layers.0.weight"]) == ("model", None)
    assert compare("logits", reference, sharded, FP32_FORWARD).passed
    batch = sharding.shard_batch(ids, sharding.make_mesh("8x1"))
    assert tuple(batch.sharding.spec) == (None, None)  # batch 3 over data 8: replicated


def test_bench_reports_memory_per_device(tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(CFG.to_dict()))
    bench_out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--config",
                str(config),
                "--mesh",
                "1x8",
                "--batch",
                "8",
                "--seq",
                "10",
                "--no-compile",
                "--repeats",
                "2",
                "--gemm-size",
                "256",
                "--quiet",
                "--json",
                str(bench_out),
            ]
        )
        == 0
    )
    bench = json.loads(bench_out.read_text())
    memory = bench["memory"][0]
    assert memory["split_bytes_per_device"] * 8 == memory["split_unsharded_bytes"]
    assert "flax-jit@1x8" in {r["backend"] for r in bench["results"]}
    assert np.isclose(memory["sharded_bytes_per_device"] / memory["unsharded_bytes"], 0.137, atol=0.01)


def test_an_orbax_checkpoint_restores_onto_another_mesh_and_one_device(tmp_path):
    """gpt_flax.save_checkpoint from a (data=2, model=4) model and optimizer, restored onto one
    device, onto (4, 2) and onto (4, 2) with fsdp: the same values, each in its target's sharding."""
    model = build_flax(ModelKind.GPT, CFG, seed=0)
    sharding.shard_model(model, sharding.make_mesh("2x4"))
    optimizer = gpt_flax.adamw(model, lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(2):
        batch = rng.integers(0, CFG.vocab_size, (8, 11))
        gpt_flax.train_step(model, optimizer, batch[:, :-1], batch[:, 1:])
    gpt_flax.save_checkpoint(tmp_path, model, optimizer, step=2)
    saved = gpt_flax.train_state(model, optimizer)

    def same(state) -> None:
        assert state.step == saved.step == 2
        for part in ("weights", "exp_avg", "exp_avg_sq"):
            for name, value in getattr(saved, part).items():
                assert np.array_equal(getattr(state, part)[name], value), (part, name)

    targets = {"one device": None, "4x2": False, "4x2 fsdp": True}
    for label, fsdp in targets.items():
        target = build_flax(ModelKind.GPT, CFG, seed=7)
        if fsdp is not None:
            sharding.shard_model(target, sharding.make_mesh("4x2"), fsdp=fsdp)
        target_opt = gpt_flax.adamw(target, lr=1e-3)
        before = [x.sharding for x in jax.tree.leaves(nnx.state((target, target_opt)))]
        gpt_flax.restore_checkpoint(tmp_path, target, target_opt)
        after = [x.sharding for x in jax.tree.leaves(nnx.state((target, target_opt)))]
        assert after == before, label  # read straight into the target's placement
        same(gpt_flax.train_state(target, target_opt))
    same(gpt_flax.checkpoint_to_train_state(tmp_path))
