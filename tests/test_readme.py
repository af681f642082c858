"""Every command and code block the README shows is run: Python blocks here, `gpt-parity` lines
here in a subprocess, the two `make` commands by .ci/run."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _shell_lines() -> list[str]:
    lines = [line.split("#")[0].strip() for block in _blocks("sh") for line in block.splitlines()]
    return [line for line in lines if line]


def test_python_examples_run(capsys):
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


def test_the_make_commands_are_the_ones_ci_runs():
    make_lines = [line for line in _shell_lines() if line.startswith("make")]
    assert make_lines == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make run" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert "gpt-parity check --layers --train-steps 10" in makefile and "-c $(CONSTRAINTS)" in makefile


GPT_PARITY_LINES = [line for line in _shell_lines() if line.startswith("gpt-parity")]


@pytest.mark.slow
@pytest.mark.parametrize("line", GPT_PARITY_LINES)
def test_cli_examples_run(line, tmp_path):
    args = shlex.split(line)[1:]
    proc = subprocess.run([sys.executable, "-m", "parity_tests.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for json_name in [a for a in args if a.endswith(".json")]:
        assert (tmp_path / json_name).stat().st_size > 0
