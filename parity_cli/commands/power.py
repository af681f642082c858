"""`gpt-parity power`: the smallest bug of each kind `check` catches, per kind of evidence."""

from __future__ import annotations

import argparse

import numpy as np

from parity_tests import power
from parity_tests.forward import ParityOptions

from ..common import JSON_HELP, config_and_seq, names_from, positive, seed_arg, write_outputs
from ..render import format_table, progress, pyplot, save_figure

knob_list = names_from(power.BY_NAME, "knob")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "power",
        help="bisect each bug with a natural size (LayerNorm eps, the GELU constant, the attention scale, "
        "operand mantissa bits, one weight tensor, the learning rate) to the smallest setting check catches, "
        "per kind of evidence",
    )
    p.add_argument("--config", default=None, help="a preset or a JSON file with the book's keys (default: gpt2-small)")
    p.add_argument(
        "--knob",
        type=knob_list,
        default=None,
        metavar="NAME[,NAME...]",
        help=f"only these knobs: {', '.join(power.BY_NAME)} (default: all)",
    )
    p.add_argument(
        "--candidate",
        choices=["flax", "torch"],
        default="flax",
        help="the twin each knob is planted in (default: flax; torch recompiles nothing per setting)",
    )
    p.add_argument("--batch", type=positive, default=2, help="batch size of each check (default: 2)")
    p.add_argument("--seq", type=positive, default=None, help="sequence length (default: 128, at most context_length)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed for weights and token ids")
    p.add_argument("--json", metavar="PATH", help=JSON_HELP)
    p.add_argument("--plot", metavar="PNG", help="save every setting run, caught or not, per knob and evidence")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _setting(x: float | None, knob: power.Knob) -> str:
    if x is None:
        return "-"
    return f"{x:g} bits" if knob.bits else f"{x:.3g}"


def _cell(t: power.Threshold, knob: power.Knob) -> str:
    if t.caught is None and t.passes is None:
        return "not run"
    if t.caught is None:
        return f"passes all ({_setting(t.passes, knob)})"
    if t.passes is None:
        return f"catches all ({_setting(t.caught, knob)})"
    return _setting(t.caught, knob)


def power_table(report: power.PowerReport) -> str:
    kinds = [*power.FORWARD_KINDS, "training"]
    rows = []
    for kp in report.knobs:
        by = {t.kind: t for t in kp.thresholds}
        k = kp.knob
        rows.append(
            [
                k.name,
                k.what,
                *[_cell(by[kind], k) if kind in by else "" for kind in kinds],
                _cell(kp.check, k),
                _setting(kp.check.passes, k),
                len(kp.points),
            ]
        )
    return format_table(["knob", "setting x", *kinds, "check catches", "passes", "runs"], rows)


def plot_power(report: power.PowerReport, path: str) -> None:
    """Every setting run, per knob (a panel) and kind of evidence (a row): caught red, passing green."""
    plt = pyplot()
    fig, axes = plt.subplots(len(report.knobs), 1, figsize=(8.0, 1.3 * len(report.knobs) + 0.8), squeeze=False)
    for ax, kp in zip(axes[:, 0], report.knobs, strict=True):
        kinds = [t.kind for t in kp.thresholds if t.kind != "check"]
        for i, kind in enumerate(kinds):
            xs = np.array([p.x for p in kp.points])
            hit = np.array([kind in p.failing for p in kp.points])
            # The bias test runs only on layers whose envelope passed: where one fails, it is not judged.
            unjudged = np.array([kind == "bias" and "envelope" in p.failing for p in kp.points]) & ~hit
            ax.scatter(xs[hit], np.full(hit.sum(), i), color="tab:red", marker="x", s=18)
            ok = ~hit & ~unjudged
            ax.scatter(xs[ok], np.full(ok.sum(), i), color="tab:green", marker="o", s=12)
            ax.scatter(xs[unjudged], np.full(unjudged.sum(), i), color="lightgray", marker="o", s=12)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_ylim(-0.7, len(kinds) - 0.3)
        if not kp.knob.bits:
            ax.set_xscale("log")
        ax.set_title(f"{kp.knob.name}: {kp.knob.what}", fontsize=8)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("setting x (red x: caught; green o: passes; grey: bias not judged, the envelope fails)")
    fig.tight_layout()
    save_figure(fig, path)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg = config_and_seq(args, parser)
    knobs = [power.BY_NAME[n] for n in args.knob] if args.knob else list(power.KNOBS)
    seq = args.seq or min(128, cfg.context_length)
    opts = ParityOptions(batch=args.batch, seq=seq, seed=args.seed, directions=("torch->flax",))
    report = power.measure(cfg, opts, knobs=knobs, candidate=args.candidate, progress=progress(args.quiet))
    print(
        f"{args.config or 'gpt2-small'}: each knob planted in {args.candidate}, checked torch->flax, batch {args.batch} x {seq} "
        f"tokens (training: {power.TRAINING_STEPS} AdamW steps, batch {args.batch} x {min(seq, 32)}); the smallest "
        f"setting caught, bisected to x{power.RESOLUTION:.3g} (bits: to 1)"
    )
    print(power_table(report))
    for kp in report.knobs:
        print(kp.describe())
    write_outputs(args, report.to_json(), lambda path: plot_power(report, path))
    return 0
