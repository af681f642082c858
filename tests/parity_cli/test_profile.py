"""`bench --profile DIR`: a jax.profiler trace of the Flax forward and decoding and a torch.profiler
trace of the torch twin's, each with the calls marked, in files Perfetto and TensorBoard open."""

from __future__ import annotations

import collections
import gzip
import json

import pytest

from parity_cli.main import main
from tests.helpers import ROOT

ARGS = ["bench", "--config", str(ROOT / "examples" / "tiny-odd.json"), "--seq", "8", "--batch", "2", "--repeats", "1"]
DECODE = ["--no-compile", "--decode", "3", "--decode-batch", "1", "--decode-prompt", "8", "--quiet"]


def _names(events: list[dict]) -> collections.Counter:
    return collections.Counter(e.get("name") for e in events)


def test_bench_profile_writes_both_twins_traces_with_their_calls_marked(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main([*ARGS, *DECODE, "--profile", str(out), "--json", str(tmp_path / "bench.json")]) == 0
    assert f"float32 traces: {out}/flax-float32/ (Flax), {out}/torch-float32.json (torch)" in capsys.readouterr().out
    traces = json.loads((tmp_path / "bench.json").read_text())["traces"]["float32"]
    torch_names = _names(json.loads((out / "torch-float32.json").read_text())["traceEvents"])
    assert torch_names["forward"] == 1 and torch_names["decode"] == 1 and torch_names["aten::linear"] > 0
    (run,) = (out / "flax-float32" / "plugins" / "profile").iterdir()  # TensorBoard's profile plugin layout
    assert traces["flax"] == str(out / "flax-float32") and any(run.glob("*.xplane.pb"))
    with gzip.open(run / "perfetto_trace.json.gz") as f:
        flax_names = _names(json.load(f)["traceEvents"])
    assert flax_names["forward"] == 1 and flax_names["decode"] == 1
    assert flax_names["PjitFunction(_forward)"] >= 3 and flax_names["PjitFunction(_generate_cached)"] >= 1


def test_bench_profile_refuses_a_folder_that_holds_traces(tmp_path, capsys):
    (tmp_path / "torch-float32.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main([*ARGS, "--profile", str(tmp_path)])
    assert e.value.code == 2 and "already holds traces: choose another folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        main([*ARGS, "--profile", str(tmp_path / "file")])
    assert "is a file, not a folder" in capsys.readouterr().err
