"""Every command and code block the README and the docs pages show is run: Python blocks here, in
one namespace per page; `gpt-parity` lines here, in this process or a subprocess; `make` lines are
checked against the Makefile, and .ci/run runs `make test` and `make run`. Links must resolve."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _text(page), flags=re.S)


# What each page's Python blocks must print or leave behind, beyond running with their own asserts.
def _readme(namespace: dict, out: str, cwd: Path) -> None:
    assert "Hello, I am Featureiman Byeswickattribute argue" in out


def _usage(namespace: dict, out: str, cwd: Path) -> None:
    assert "Hello, I am Featureiman Byeswickattribute argue" in out
    assert "state dict does not match GPTModel: missing key(s) 'final_norm.scale'" in out
    assert abs(namespace["t_loss"] - namespace["f_loss"]) < 1e-5
    assert (cwd / "small.safetensors").is_file() and type(namespace["fm2"]).__name__ == "GPTModel"


def _checkpoints(namespace: dict, out: str, cwd: Path) -> None:
    assert (cwd / "model_and_optimizer.pth").is_file() and type(namespace["model"]).__name__ == "GPTModel"


def _sharding(namespace: dict, out: str, cwd: Path) -> None:
    assert namespace["plan"].mesh.shape == {"data": 1, "model": 1} and namespace["loss"] > 0
    assert namespace["tloss"].item() > 0 and namespace["floss"] > 0  # both twins' distributed steps ran
    assert set(namespace["fsdp_plan"].fsdp_dims) == set(namespace["fsdp_plan"].specs)


def _refusals(namespace: dict, out: str, cwd: Path) -> None:
    assert out.count("the KV cache holds batch size 2, got 1: reset it") == 2


def _training(namespace: dict, out: str, cwd: Path) -> None:
    assert len(namespace["train_loader"].sampler.orders) == 2  # two passes, both replayed
    from parity_tests.tolerances import LOSS  # three steps resumed across frameworks: the loss bound holds

    assert np.allclose(namespace["resumed"], namespace["uninterrupted"], rtol=LOSS.rtol, atol=LOSS.atol)
    assert (cwd / "step3.safetensors").is_file()


EXPECTED = {
    "README.md": _readme,
    "docs/usage.md": _usage,
    "docs/checkpoints.md": _checkpoints,
    "docs/sharding.md": _sharding,
    "docs/refusals.md": _refusals,
    "docs/training.md": _training,
}


def _python_page(page: Path):
    """A page whose blocks build a 124M-sized model is marked slow."""
    slow = any('preset("gpt2-' in block for block in _blocks(page, "python"))
    return pytest.param(page, id=_name(page), marks=[pytest.mark.slow] if slow else [])


PYTHON_PAGES = [page for page in PAGES if _blocks(page, "python")]


def test_every_expectation_has_python_blocks_to_hold_and_the_readme_one():
    assert set(EXPECTED) <= {_name(page) for page in PYTHON_PAGES}
    assert len(_blocks(README, "python")) == 1  # the tour of both twins


@pytest.mark.parametrize("page", [_python_page(page) for page in PYTHON_PAGES])
def test_every_python_block_runs(page, capsys, tmp_path, monkeypatch) -> None:
    """A page's Python blocks run, in order, in one namespace, in a fresh folder (they write files)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks(page, "python"):
        exec(compile(block, _name(page), "exec"), namespace)
    out = capsys.readouterr().out
    if _name(page) in EXPECTED:
        EXPECTED[_name(page)](namespace, out, tmp_path)


def _recipe(makefile: str, target: str) -> str:
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert match, f"no recipe for {target}"
    return match.group(1)


def test_the_make_commands_are_the_makefiles_and_ci_runs_the_two():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for page in PAGES:
        for line in helpers.shell_lines(page):
            assert line.startswith(("make ", "gpt-parity ", "SNAPSHOT=")), f"{_name(page)}: {line}"
        for target in re.findall(r"`make ([\w-]+)`", _text(page)) + [
            line.split()[1] for line in helpers.shell_lines(page) if line.startswith("make ")
        ]:
            assert target in targets, f"{_name(page)}: make {target}"
    assert [line for line in helpers.shell_lines(README) if line.startswith("make")] == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make run" in ci and "make tour" in ci and "-c $(CONSTRAINTS)" in makefile
    run, tour = _recipe(makefile, "run"), _recipe(makefile, "tour")
    assert "gpt-parity check --layers --plot" in run
    assert "gpt-parity mutants --config examples/tiny-odd.json" in run
    assert "gpt-parity bench --dtype float32 --seq 256 " in run
    # gpt2-small's training parity, float32 and bfloat16: in the tour, which CI runs
    assert "gpt-parity check --train-steps 10 " in tour and "gpt-parity check --dtype bfloat16 --train-steps 10" in tour


def _is_slow(line: str, args: list[str]) -> bool:
    """124M-sized (neither a config of examples/ nor the stand-in snapshot), or, whatever the size,
    a training or timing run or a fresh process with simulated devices: each takes a minute."""
    small = any(a.startswith("examples/") for a in args) or '"$SNAPSHOT"' in line or "--list" in args
    return not small or args[0] in ("train", "bench") or "--cpu-devices" in args


def _cli_params():
    for page in PAGES:
        for line in helpers.shell_lines(page):
            if line.startswith("gpt-parity ") and "--cpu-devices" not in line:  # see below
                args = shlex.split(line)[1:]
                marks = [pytest.mark.slow] if _is_slow(line, args) else []
                if args[0] == "parallel" and "--list" not in args:  # starts both twins' ranks
                    marks = [pytest.mark.distributed]
                yield pytest.param(line, id=f"{_name(page)}: {line}", marks=marks)


def test_the_simulated_device_lines_run_in_the_eight_device_process():
    """Lines with --cpu-devices are not run here: tests/parity_tests/sharded_cases.py runs them in
    its 8-device process (one process for all, not one each)."""
    lines = [line for page in PAGES for line in helpers.shell_lines(page) if "--cpu-devices" in line]
    assert lines and all(line.startswith("gpt-parity ") for line in lines)
    assert len(helpers.simulated_device_commands()) == len(lines)
    assert "helpers.simulated_device_commands()" in (ROOT / "tests/parity_tests/sharded_cases.py").read_text()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """What an HF gpt2 snapshot folder holds, with random tensors of a small GPT-2's shapes."""
    from safetensors.numpy import save_file

    from parity_tests.hf_reference import gpt2_config_json, random_hf_gpt2

    folder = tmp_path_factory.mktemp("snapshot")
    save_file(random_hf_gpt2(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(gpt2_config_json(50257, 128, 64, 2, 4)))
    return str(folder)


@pytest.mark.parametrize("line", list(_cli_params()))
def test_cli_examples_run(line, tmp_path, snapshot, monkeypatch, capsys):
    """Each `gpt-parity` line, in this process (as the console script calls main), or in its own
    process where it sets the device count, which JAX fixes when it starts."""
    line = line.replace('"$SNAPSHOT"', snapshot).replace("examples/", str(ROOT / "examples") + "/")
    args = shlex.split(line)[1:]
    monkeypatch.chdir(tmp_path)
    # a planted bug must fail the check; a planted defect, the run (the tiny one's bound catches it) and diverge
    planted = any(flag in args for flag in ("--plant", "--plant-defect", "--perturb"))
    expected = 1 if planted or args[0] == "diverge" else 0
    if "--cpu-devices" in args:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(
            [sys.executable, "-m", "parity_cli.main", *args], capture_output=True, text=True, timeout=600, env=env
        )
        assert proc.returncode == expected, proc.stderr + proc.stdout
    else:
        from parity_cli.main import main

        if "--resume" in args:  # the page's line before, which saved the state, runs first
            assert main(_line_before(line, "--save-state")) == 0, capsys.readouterr().out
        if args[0] == "diverge":  # the page's line before, which saved the run's snapshots, runs first
            assert main(_line_before(line, "--snapshot-every")) == 1, capsys.readouterr().out
        assert main(args) == expected, capsys.readouterr().out
    for flag in ("--json", "--plot"):
        if flag in args:
            assert (tmp_path / args[args.index(flag) + 1]).stat().st_size > 0


def _line_before(resuming: str, flag: str) -> list[str]:
    """The line with `flag` (`--save-state`, `--snapshot-every`) before `resuming` on its page, whose
    output it reads."""
    for page in PAGES:
        lines = helpers.shell_lines(page)
        for i, line in enumerate(lines):
            if line.replace(str(ROOT / "examples") + "/", "examples/") == resuming.replace(
                str(ROOT / "examples") + "/", "examples/"
            ):
                saving = [previous for previous in lines[:i] if flag in previous]
                assert saving, f"{_name(page)}: {resuming} reads what no line before it writes ({flag})"
                return shlex.split(saving[-1].replace("examples/", str(ROOT / "examples") + "/"))[1:]
    raise AssertionError(f"no page has {resuming}")


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    headings = re.findall(r"^#+ (.*)$", _text(page), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_docs_page_is_linked_from_the_readme():
    for page in DOCS:
        assert f"](docs/{page.name})" in _text(README), page.name


def test_every_relative_link_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _text(page)):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{_name(page)}: {target}"
            if anchor:
                assert anchor in _anchors(linked), f"{_name(page)}: {target}"


def test_the_readme_is_a_front_door():
    lines = _text(README).splitlines()
    assert len(lines) <= 200 and max(len(line) for line in lines) <= 120
