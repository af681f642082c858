"""Every command and code block the README shows is run: Python blocks here, `gpt-parity` lines
here in a subprocess, the two `make` commands by .ci/run."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _shell_lines() -> list[str]:
    lines = [line.split("#")[0].strip() for block in _blocks("sh") for line in block.splitlines()]
    return [line for line in lines if line]


@pytest.mark.slow  # the examples build gpt2-small in both twins
def test_python_examples_run(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write small.safetensors
    blocks = _blocks("python")
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Hello, I am Featureiman Byeswickattribute argue" in out
    assert "state dict does not match GPTModel: missing key(s) 'final_norm.scale'" in out
    t_loss, f_loss = namespace["t_loss"], namespace["f_loss"]
    assert abs(t_loss - f_loss) < 1e-5
    assert namespace["plan"].mesh.shape == {"data": 1, "model": 1} and namespace["loss"] > 0
    assert (tmp_path / "small.safetensors").is_file() and type(namespace["fm2"]).__name__ == "GPTModel"


def test_the_make_commands_are_the_ones_ci_runs():
    make_lines = [line for line in _shell_lines() if line.startswith("make")]
    assert all(line.startswith(("make", "gpt-parity", "SNAPSHOT=")) for line in _shell_lines())
    assert make_lines == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make run" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert "gpt-parity check --layers --plot" in makefile and "-c $(CONSTRAINTS)" in makefile
    assert "gpt-parity check --train-steps 10" in makefile and "make tour" in ci
    assert "gpt-parity mutants --config examples/tiny-odd.json" in makefile


GPT_PARITY_LINES = [line for line in _shell_lines() if line.startswith("gpt-parity")]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """What an HF gpt2 snapshot folder holds, with random tensors of a small GPT-2's shapes."""
    from safetensors.numpy import save_file

    from parity_tests.hf_reference import gpt2_config_json, random_hf_gpt2

    folder = tmp_path_factory.mktemp("snapshot")
    save_file(random_hf_gpt2(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(gpt2_config_json(50257, 128, 64, 2, 4)))
    return str(folder)


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("line", GPT_PARITY_LINES)
def test_cli_examples_run(line, tmp_path, snapshot, monkeypatch, capsys):
    """Each `gpt-parity` line, in this process (as the console script calls main), or in its own
    process where it sets the device count, which JAX fixes when it starts."""
    line = line.replace('"$SNAPSHOT"', snapshot).replace("examples/", str(ROOT / "examples") + "/")
    args = shlex.split(line)[1:]
    monkeypatch.chdir(tmp_path)
    if "--cpu-devices" in args:
        proc = subprocess.run(
            [sys.executable, "-m", "parity_cli.main", *args], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr + proc.stdout
    else:
        from parity_cli.main import main

        expected = 1 if "--plant" in args else 0  # a planted bug must fail the check
        assert main(args) == expected, capsys.readouterr().out
    for json_name in [a for a in args if a.endswith(".json") and "/" not in a]:
        assert (tmp_path / json_name).stat().st_size > 0


DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_python_block_of_the_docs_runs(page, capsys):
    """The docs pages' Python blocks run, in order, in one namespace per page (their asserts hold)."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page.relative_to(ROOT)), "exec"), namespace)
    if page.name == "refusals.md":
        assert blocks and capsys.readouterr().out.count("the KV cache holds batch size 2, got 1: reset it") == 2


def test_the_readme_links_every_docs_page():
    for page in DOCS:
        assert f"docs/{page.name}" in README, page.name
