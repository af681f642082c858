"""The planted-bug zoo against the suite: each classic porting bug, planted in either twin, fails
the default check (`gpt-parity check`: whole forward and layer evidence, both directions) at the
stage where it was planted; with nothing planted the same check passes; and the zoo's layers,
with every knob at its default, are the book's layers (so what is caught is the bug, not the
rewrite)."""

import contextlib
import json

import numpy as np
import pytest

import gpt_torch
from gpt_spec import GPTConfig
from gpt_spec.stages import in_stage, stage_names, stage_of
from parity_cli import reports
from parity_cli.main import main
from parity_tests import zoo
from parity_tests.configs import TINY
from parity_tests.forward import DIRECTIONS, ParityOptions, run_parity
from parity_tests.twins import build_torch, submodule

# Odd sizes everywhere, a qkv bias to drop, dropout to leave on, a context long enough for the
# sequence to be cut short of it.
CFG = TINY

pytestmark = pytest.mark.zoo

# The optimizer and loss mutants have their own module (test_zoo_training.py).
ZOO = [m for m in zoo.MUTANTS if m not in zoo.OPTIMIZER_MUTANTS]


@pytest.fixture(scope="class")
def tiny_zoo(request) -> zoo.ZooReport:
    """The zoo planted in the twin of the test's class."""
    return zoo.run_zoo(CFG, mutants=ZOO, twins=[request.cls.twin], batch=2, seq=CFG.context_length - 2)


class _ZooHalf:
    """The zoo planted in one twin: a class per twin, so that the halves run on two workers
    (pytest -n 2 --dist loadscope gives each class to one)."""

    twin: str

    @pytest.mark.parametrize("name", [m.name for m in ZOO])
    def test_each_mutant_is_caught_where_it_was_planted(self, tiny_zoo, name):
        row = next(r for r in tiny_zoo.rows if r.mutant == name and r.twin == self.twin)
        assert row.caught, f"{name} planted in {self.twin} escaped the check"
        assert row.located, f"{name} planted in {self.twin} at {row.where}, first failure named: {row.describe}"
        assert row.margin > 1 and row.evidence in ("bound", "envelope", "bias")

    def test_nothing_planted_passes_and_the_report_says_so(self, tiny_zoo, tmp_path):
        control = tiny_zoo.rows[0]
        assert control.mutant == "" and control.passed and control.ok and not control.first
        assert 0 < control.margin < 1 and control.describe.startswith("closest to failing: ")
        assert tiny_zoo.passed and len(tiny_zoo.rows) == 1 + len(ZOO)
        assert {r.twin for r in tiny_zoo.rows[1:]} == {self.twin}
        assert (
            f"{len(ZOO)} of {len(ZOO)} planted bugs caught at the stage they were planted; "
            "control passes (its closest call: " in reports.zoo_table(tiny_zoo)
        )
        data = tiny_zoo.to_json()
        assert data["passed"] and data["rows"][0]["mutant"] is None and data["rows"][0]["check_passed"]
        assert all(r["caught"] and r["located"] and r["first_stage"] for r in data["rows"][1:])
        reports.plot_zoo(tiny_zoo, str(tmp_path / "zoo.png"))
        assert (tmp_path / "zoo.png").read_bytes()[:4] == b"\x89PNG"


class TestPlantedInTorch(_ZooHalf):
    twin = "torch"


class TestPlantedInFlax(_ZooHalf):
    twin = "flax"


NULL = zoo.Mutant(
    "null",
    "every zoo layer with its knobs at their defaults",
    "-",
    tuple(zoo.Swap(layer, ()) for layer in zoo._LAYERS["torch"] if layer != "Dropout"),
)


@pytest.mark.parametrize("twin", zoo.TWINS)
def test_the_zoos_layers_at_their_defaults_pass_the_check(twin):
    report = run_parity(
        CFG.replace(qkv_bias=True), ParityOptions(batch=2, seq=7), plant=lambda models: zoo.planted(NULL, twin, models)
    )
    assert report.passed, report.failures()


def test_planting_puts_every_class_and_function_back():
    models = {"torch": build_torch("gpt", CFG, seed=0)}
    before = [type(m) for m in models["torch"].modules()]
    load, export = gpt_torch.load_state_dict, gpt_torch.state_dict
    with zoo.planted(zoo.get("matmul-tf32"), "torch", models):
        assert type(submodule(models["torch"], "out_head")).__name__ == "Linear[operand_bits=10]"
    with zoo.planted(zoo.get("square-kernel-untransposed"), "torch", models):
        assert gpt_torch.load_state_dict is not load
    assert [type(m) for m in models["torch"].modules()] == before
    assert gpt_torch.load_state_dict is load and gpt_torch.state_dict is export
    with pytest.raises(ValueError, match="unknown mutant 'nope'"), contextlib.ExitStack():
        zoo.get("nope")


class _OneModule:
    """Plant a bug in one module only (the zoo plants in every module of a kind), to see that
    the report names that module's stage, not the first of its kind."""

    def __init__(self, twin: str, path: str):
        self.twin, self.path = twin, path

    @contextlib.contextmanager
    def __call__(self, models):
        module = submodule(models[self.twin], self.path)
        cls = type(module)
        zoo_cls = zoo._LAYERS[self.twin]["LayerNorm"][1]
        object.__setattr__(module, "__class__", zoo._mutant_class(zoo_cls, cls, (("bug_eps", 1e-12),)))
        try:
            yield
        finally:
            object.__setattr__(module, "__class__", cls)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("twin", zoo.TWINS)
def test_the_report_names_the_planted_stage_in_either_direction(direction, twin):
    """Flax's jitted stages come back sorted by name (trf_blocks.10 before trf_blocks.2); every
    table, JSON and verdict must still read them by name, in the model's order."""
    cfg = GPTConfig(vocab_size=53, context_length=9, emb_dim=12, n_heads=3, n_layers=11, drop_rate=0.0, qkv_bias=False)
    report = run_parity(
        cfg, ParityOptions(batch=2, seq=9, directions=[direction]), plant=_OneModule(twin, "trf_blocks.10.norm2")
    )
    row = report.rows[0]
    assert [c.name for c in row.stages] == stage_names(11)
    assert row.logits.name == "out_head"
    # eps 1e-12 for 1e-5 in one LayerNorm: invisible to the whole forward's bound, found by the
    # layer evidence at that LayerNorm and nowhere before it.
    assert all(c.passed for c in row.stages) and not row.passed
    assert stage_of(row.first_failure.name) == "trf_blocks.10.norm2"
    data = report.to_json()["rows"][0]
    assert data["first_failure"]["stage"] == "trf_blocks.10.norm2"
    assert [s["name"] for s in data["stages"]] == stage_names(11)
    table = reports.parity_layers(report).splitlines()[2:]
    assert [line.split()[0] for line in table] == stage_names(11)
    assert f"{direction} {row.candidate}: first failure at trf_blocks.10.norm2" in report.failures()[0]


@pytest.mark.parametrize(
    "name, twin", [("layernorm-eps-1e-6", "flax"), ("matmul-tf32", "torch"), ("positions-off-by-one", "flax")]
)
def test_check_exits_1_with_a_mutant_planted_and_0_without(name, twin, tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CFG.to_dict()))
    base = ["check", "--config", str(config), "--quiet"]
    assert main(base) == 0
    out = tmp_path / "check.json"
    assert main([*base, "--plant", f"{name}@{twin}", "--json", str(out)]) == 1
    stdout = capsys.readouterr().out
    where = zoo.get(name).where
    assert f"with {name} planted in the {twin} twin" in stdout and f"first failure at {where}" in stdout
    rows = json.loads(out.read_text())["forward"]["rows"]
    assert all(in_stage(r["first_failure"]["stage"], where) for r in rows)


def test_mutants_command_lists_runs_and_exits_1_on_an_escape(tmp_path, capsys, monkeypatch):
    assert main(["mutants", "--list"]) == 0
    assert "square-kernel-untransposed" in capsys.readouterr().out
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CFG.to_dict()))
    out, png = tmp_path / "zoo.json", tmp_path / "zoo.png"
    argv = [
        "mutants",
        "--config",
        str(config),
        "--mutant",
        "gelu-constant,post-norm",
        "--quiet",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["mutant"], r["twin"]) for r in data["rows"]] == [
        (None, "-"),
        ("gelu-constant", "torch"),
        ("gelu-constant", "flax"),
        ("post-norm", "torch"),
        ("post-norm", "flax"),
    ]
    assert png.stat().st_size > 5_000
    # A suite blind to the bug: the mutant escapes, and the command says so with exit status 1.
    monkeypatch.setitem(
        zoo.BY_NAME,
        "gelu-constant",
        zoo.Mutant("gelu-constant", "no bug at all", "trf_blocks.0.ff", (zoo.Swap("GELU", ()),)),
    )
    assert main(["mutants", "--config", str(config), "--mutant", "gelu-constant", "--twin", "flax", "--quiet"]) == 1
    assert "ESCAPED" in capsys.readouterr().out


def test_unknown_mutants_and_twins_are_refused_in_one_line(capsys):
    for argv, message in [
        (["check", "--plant", "nope"], "unknown mutant 'nope'"),
        (["check", "--plant", "gelu-erf@jax"], "unknown twin 'jax'"),
        (["mutants", "--mutant", "gelu-erf,nope"], "unknown mutant 'nope'"),
        (["mutants", "--kind", "forward,optimizer"], "unknown kind 'optimizer'"),
        (["mutants", "--mutant", "gelu-erf", "--kind", "generation"], "no mutant of --mutant is of kind generation"),
        (["check", "--model", "dummy", "--plant", "gelu-erf"], "--plant needs --model gpt"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_mutant_that_needs_a_config_field_says_which():
    cfg = CFG.replace(qkv_bias=False, drop_rate=0.0)
    assert zoo.get("qkv-bias-dropped").adapt(cfg).qkv_bias is True
    assert zoo.get("dropout-in-eval").adapt(cfg).drop_rate == 0.1
    assert zoo.get("dropout-in-eval").adapt(CFG) is CFG and zoo.get("gelu-erf").adapt(cfg) is cfg
    assert np.isfinite([m.adapt(cfg).drop_rate for m in zoo.MUTANTS]).all()


def test_every_mutant_has_a_kind_the_command_picks_it_by(capsys):
    from parity_cli.commands import mutants

    assert mutants.KINDS == ("forward", "bfloat16-training", "float32-training", "generation")
    assert main(["mutants", "--list"]) == 0
    listed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(listed) == len(zoo.MUTANTS) and {kind for _, kind in listed} == set(mutants.KINDS)
    # what make run plants: the model's bugs, as before the optimizer and decoding kinds came
    chosen = [m for m in zoo.MUTANTS if mutants.kind(m) in ("forward", "bfloat16-training")]
    assert len(chosen) == len(zoo.FORWARD_MUTANTS) + len(zoo.TRAINING_MUTANTS)
