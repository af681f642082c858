"""Resident memory of loading a checkpoint, against the size of the file.

A randomly filled checkpoint of a config's shape (gpt2-xl: 1.56 B parameters, 6.2 GB in float32)
is written once, then each twin loads it in a fresh process, which reports its peak resident set
(VmHWM: anonymous memory and the file pages it has mapped). The figure that matters is peak RSS
over file size; the process's resident set before loading (Python, torch, JAX) is reported beside
it and counted in the peak, so the ratio is an upper bound on what loading itself costs.

    gpt-parity load-memory --config gpt2-xl --dir /tmp/ckpt --json out/load-memory.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt_spec import GPTConfig, save_checkpoint
from gpt_spec.layout import gpt_shapes
from parity_tests import TWINS
from parity_tests.progress import Progress, silent

LAYOUTS = ("canonical", "hf")
SCRATCH = {"canonical": "model-canonical.safetensors", "hf": "hf-snapshot"}  # written in the folder, then deleted
# Peak resident memory a load may reach, as a multiple of the file's size.
PEAK_OVER_FILE = 1.5

_CHILD = r"""
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out
twin, path = sys.argv[1], sys.argv[2]
import gpt_spec
if twin == "torch":
    import gpt_torch as mod
else:
    import gpt_flax as mod
import jax, torch  # both imported in either case: the baseline is the same process
before = status()
start = time.perf_counter()
model = mod.load(path)
seconds = time.perf_counter() - start
after = status()
print(json.dumps({"before": before["VmRSS"], "peak": after["VmHWM"], "after": after["VmRSS"], "seconds": seconds}))
"""


def write_random_checkpoint(cfg: GPTConfig, path: Path, layout: str, *, seed: int = 0) -> Path:
    """A checkpoint of `cfg`'s shapes filled with N(0, 0.02) values: a canonical file, or an HF
    snapshot (model.safetensors in HF's layout, made directly so the writer holds one copy)."""
    from safetensors.numpy import save_file

    from gpt_spec.formats.hf import hf_shapes
    from gpt_spec.formats.hf_config import hf_config

    rng = np.random.default_rng(seed)

    def random(shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    if layout == "hf":
        path.mkdir(exist_ok=True)
        save_file(
            {f"transformer.{k}": random(s) for k, s in hf_shapes(cfg, lm_head=False).items()},
            str(path / "model.safetensors"),
        )
        (path / "config.json").write_text(json.dumps(hf_config(cfg, tied=True)), encoding="utf-8")
        return path / "model.safetensors"
    save_checkpoint(path, {name: random(shape) for name, shape in gpt_shapes(cfg).items()}, cfg)
    return path


def measure(path: Path, twin: str) -> dict:
    """Peak RSS of a fresh process loading `path` into `twin`, with the RSS it started from."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, twin, str(path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {path} in {twin} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cfg: GPTConfig, folder: Path, layouts=LAYOUTS, twins=TWINS, *, progress: Progress = silent) -> dict:
    steps = progress(len(layouts) * (1 + len(twins)))
    rows = []
    for layout in layouts:
        target = folder / SCRATCH[layout]
        with steps.step(f"writing a random {layout} checkpoint"):
            file = write_random_checkpoint(cfg, target, layout)
        size = file.stat().st_size
        for twin in twins:
            with steps.step(f"{twin} loading {file.name} ({size / 2**30:.2f} GiB)"):
                m = measure(file, twin)
            rows.append(
                {
                    "layout": layout,
                    "twin": twin,
                    "file_bytes": size,
                    **m,
                    "peak_over_file": m["peak"] / size,
                    "load_over_file": (m["peak"] - m["before"]) / size,
                }
            )
        if target.is_dir():
            for p in target.iterdir():
                p.unlink()
            target.rmdir()
        else:
            target.unlink()
    return {"config": cfg.to_dict(), "limit_peak_over_file": PEAK_OVER_FILE, "rows": rows}
