"""Each report of the engine as the terminal shows it (tables) and as a picture (plots): the
reports themselves are plain data. The benchmarks' are in bench_reports.py."""

from __future__ import annotations

import numpy as np

from gpt_spec.stages import stage_key, stage_of
from parity_tests.chapter5 import TWINS, Chapter5Report, TwinRun
from parity_tests.forward import ParityReport, ParityRow
from parity_tests.layers import Finding
from parity_tests.mesh import ShardingReport
from parity_tests.parallel import ParallelReport
from parity_tests.tolerances import train_loss_bound
from parity_tests.training import TrainingReport, noise_only
from parity_tests.zoo import ZooReport

from .render import format_table, pyplot, save_figure


def parity_table(report: ParityReport) -> str:
    rows = [
        (
            r.direction,
            r.reference,
            r.candidate,
            r.logits.max_abs,
            r.logits.max_rel,
            max(c.max_abs for c in r.stages),
            max(c.margin for c in r.stages),
            max((f.margin for f in r.layers), default=float("nan")),
            r.distribution.kl_mean if r.distribution else float("nan"),
            r.distribution.top1 if r.distribution else float("nan"),
            r.distribution.topk_mean if r.distribution else float("nan"),
            "pass" if r.passed else "FAIL",
        )
        for r in report.rows
    ]
    table = format_table(
        [
            "direction",
            "reference",
            "candidate",
            "logits max |Δ|",
            "max rel |Δ|",
            "any stage max |Δ|",
            "stages |Δ|/bound",
            "layers |Δ|/allowed",
            "KL mean",
            "top-1",
            "top-10",
            "result",
        ],
        rows,
    )
    lines = [
        table,
        f"stages: every stage of the whole forward, bound {report.rows[0].logits.bound.describe()}"
        if report.rows
        else "",
    ]
    checks = [r.distribution_check for r in report.rows if r.distribution_check is not None]
    if checks:
        lines.append(
            f"distributions: KL(reference || candidate) per token, bounds mean {checks[0].kl_mean_bound:g}, "
            f"max {checks[0].kl_max_bound:g}; worst {max(c.margin for c in checks):.3g}x"
        )
    else:
        lines.append(
            "distributions: KL(reference || candidate) per token, top-1 and top-10 agreement (no bound in this tier)"
        )
    lines += report.notes
    lines += [f"skipped {label}: {reason}" for label, reason in report.skipped]
    return "\n".join(line for line in lines if line)


def parity_layers(report: ParityReport) -> str:
    """Max |Δ| of every stage (rows) for every backend compared (columns), matched by name."""
    headers = ["stage"] + [f"{r.direction} {r.candidate}" for r in report.rows] + ["result"]
    rows = []
    for name in sorted({c.name for r in report.rows for c in r.stages}, key=stage_key):
        cells = [r.stage(name) for r in report.rows]
        rows.append([name, *(c.max_abs for c in cells), "pass" if all(c.passed for c in cells) else "FAIL"])
    return format_table(headers, rows)


def parity_evidence(report: ParityReport) -> str:
    """The layer evidence in one table: per layer, input and kind of evidence, the number of
    checks over every row and the worst margin (|Δ| / allowed; above 1 fails) with where."""
    groups: dict[tuple[str, str, str], list[tuple[ParityRow, Finding]]] = {}
    for r in report.rows:
        for f in r.layers:
            _, what = f.name.split(" ", 1)
            layer, inputs = what.split(", ", 1)
            groups.setdefault((layer, inputs, f.evidence), []).append((r, f))
    if not groups:
        return ""
    rows = []
    for (layer, inputs, evidence), found in groups.items():
        r, worst = max(found, key=lambda rf: rf[1].margin)
        rows.append(
            [
                layer,
                inputs,
                evidence,
                len(found),
                worst.margin,
                f"{worst.name.split(' ', 1)[0]} ({r.direction})",
                "pass" if all(f.passed for _, f in found) else "FAIL",
            ]
        )
    return format_table(["layer", "input", "evidence", "checks", "worst |Δ|/allowed", "at", "result"], rows)


def plot_parity(report: ParityReport, path: str) -> None:
    """Max |Δ| per stage on a log scale, one line per backend, with each stage's bound; below
    it, the layer evidence's worst |Δ| / allowed per stage."""
    plt = pyplot()

    names = sorted({c.name for r in report.rows for c in r.stages}, key=stage_key)
    x = np.arange(len(names))
    nonzero = [c.max_abs for r in report.rows for c in r.stages if c.max_abs > 0]
    floor = min(nonzero, default=1e-7) / 10  # where exact agreement (|Δ| = 0) is drawn
    layered = any(r.layers for r in report.rows)
    fig, axes = plt.subplots(
        2 if layered else 1,
        1,
        sharex=True,
        squeeze=False,
        figsize=(max(6.0, 0.3 * len(names) + 2), 7.0 if layered else 4.2),
    )
    ax = axes[0][0]
    for r in report.rows:
        values = np.array([r.stage(n).max_abs for n in names])
        ax.plot(x, np.where(values > 0, values, np.nan), marker="o", markersize=3, label=f"{r.direction} {r.candidate}")
        zero = values == 0
        if zero.any():
            ax.scatter(x[zero], np.full(zero.sum(), floor), marker="v", color="black", zorder=3)
    if any(c.max_abs == 0 for r in report.rows for c in r.stages):
        ax.scatter([], [], marker="v", color="black", label="|Δ| = 0 (bit-identical)")
    ax.plot(
        x,
        [report.rows[0].stage(n).largest_allowed for n in names],
        color="grey",
        linestyle="--",
        label="bound at the largest |reference|",
    )
    ax.set_yscale("log")
    ax.set_ylabel("max |Δ| between twins")
    ax.set_title(f"{report.model} {report.mode} {report.dtype}, batch {report.batch} x {report.seq}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if layered:
        ax2 = axes[1][0]
        index = {n: i for i, n in enumerate(names)}
        for evidence, marker in (("envelope", "o"), ("bias", "s")):
            pts = [
                (index[stage_of(f.name)], f.margin)
                for r in report.rows
                for f in r.layers
                if f.evidence == evidence and stage_of(f.name) in index
            ]
            if pts:
                px, py = zip(*pts, strict=True)
                ax2.scatter(
                    px, np.maximum(py, 1e-9), marker=marker, s=12, alpha=0.6, label=f"layer evidence: {evidence}"
                )
        ax2.axhline(1.0, color="red", linestyle="--", label="fails above 1")
        ax2.set_yscale("log")
        ax2.set_ylabel("|Δ| / allowed (0 drawn at 1e-9)")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    bottom = axes[-1][0]
    bottom.set_xticks(x, names, rotation=90, fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def zoo_table(report: ZooReport) -> str:
    body = []
    for r in report.rows:
        if not r.mutant:
            verdict = "control: pass" if r.passed else "CONTROL FAILS"
            body.append(
                [
                    "(nothing planted)",
                    "-",
                    "-",
                    verdict,
                    r.first_stage or "-",
                    r.evidence or "-",
                    r.margin,
                    "ok" if r.ok else "FAIL",
                ]
            )
            continue
        body.append(
            [
                r.mutant,
                r.twin,
                r.where,
                "caught" if r.caught else "ESCAPED",
                r.first_stage or "-",
                r.evidence or "-",
                r.margin,
                "ok" if r.ok else ("MISPLACED" if r.caught else "FAIL"),
            ]
        )
    table = format_table(
        ["mutant", "twin", "planted at", "check", "first stage named", "evidence", "|Δ|/allowed", "result"], body
    )
    bad = [r for r in report.rows if not r.ok]
    lines = [table]
    lines += [f"  {r.mutant or 'control'} in {r.twin}: {r.describe or 'no failure'}" for r in bad]
    caught = sum(r.caught and r.located for r in report.rows if r.mutant)
    control = report.rows[0]
    lines.append(
        f"{caught} of {sum(1 for r in report.rows if r.mutant)} planted bugs caught at the stage "
        f"they were planted; control {'passes' if control.passed else 'FAILS'}"
        + (
            f" (its closest call: {control.margin:.3g} of what its {control.evidence} allows)"
            if control.passed and control.evidence
            else ""
        )
    )
    return "\n".join(lines)


def plot_zoo(report: ZooReport, path: str) -> None:
    """|Δ| / allowed at the first failure, per mutant and twin, on a log scale."""
    plt = pyplot()

    mutants = [r for r in report.rows if r.mutant]
    names = list(dict.fromkeys(r.mutant for r in mutants))
    fig, ax = plt.subplots(figsize=(8.0, 0.28 * len(names) + 1.6))
    y = np.arange(len(names))
    for k, twin in enumerate(TWINS):
        margins = {r.mutant: r.margin for r in mutants if r.twin == twin}
        values = [margins.get(n, np.nan) for n in names]
        finite = [v if np.isfinite(v) and v > 0 else 1e12 for v in values]  # non-finite: off the scale
        ax.barh(y + (k - 0.5) * 0.4, finite, height=0.4, label=f"planted in {twin}")
    ax.axvline(1.0, color="red", linestyle="--", label="caught above 1")
    ax.set_xscale("log")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("|Δ| / allowed at the first failing stage (NaN, inf: drawn at 1e12)")
    ax.set_title(
        f"planted bugs, {report.config.emb_dim}-wide {report.config.n_layers}-layer GPT, "
        f"batch {report.batch} x {report.seq}"
    )
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def chapter5_table(report: Chapter5Report) -> str:
    train, val = report.eval_deltas()
    rows = [
        [
            a["epoch"],
            a["step"],
            a["tokens_seen"],
            a["train_loss"],
            b["train_loss"],
            a["val_loss"],
            b["val_loss"],
            max(dt, dv),
            train_loss_bound(a["step"]),
        ]
        for a, b, dt, dv in zip(report.torch.evals, report.flax.evals, train, val, strict=True)
    ]
    headers = [
        "epoch",
        "step",
        "tokens",
        "train torch",
        "train flax",
        "val torch",
        "val flax",
        "max |Δ|",
        "bound",
    ]
    return format_table(headers, rows)


def evaluations_table(run: TwinRun) -> str:
    """One twin's evaluations, where nothing is compared."""
    rows = [[e["epoch"], e["step"], e["tokens_seen"], e["train_loss"], e["val_loss"]] for e in run.evals]
    return format_table(["epoch", "step", "tokens", "train loss", "val loss"], rows)


def chapter5_samples(report: Chapter5Report) -> str:
    rows = []
    for epoch, (a, b) in enumerate(zip(report.torch.samples, report.flax.samples, strict=True), 1):
        rows.append([epoch, "same" if a == b else "DIFFER", a if a == b else f"torch: {a} | flax: {b}"])
    return format_table(["epoch", "twins", "greedy sample of start_context"], rows)


def plot_chapter5(report: Chapter5Report, path: str) -> None:
    """Both twins' loss curves overlaid, and |Δ loss| per step on a log scale with its bound."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [p["step"] for p in report.torch.evals]
    for name, style in (("torch", "-"), ("flax", "--")):
        run = report.runs[name]
        ax1.plot(steps, [p["train_loss"] for p in run.evals], style, label=f"{name} train")
        ax1.plot(steps, [p["val_loss"] for p in run.evals], style, label=f"{name} validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title(f"chapter 5, dropout {report.dropout}: both twins' losses")
    ax1.legend()
    deltas = report.step_deltas()
    x = np.arange(len(deltas))
    ax2.semilogy(x, np.maximum(deltas, 1e-9), ".", label="|Δ training loss| per step")
    ax2.semilogy(x, [train_loss_bound(s) for s in range(len(deltas))], "k-", label="bound")
    train, val = report.eval_deltas()
    ax2.semilogy(steps, np.maximum(np.maximum(train, val), 1e-9), "x", label="|Δ| at evaluations")
    ax2.set_xlabel("step")
    ax2.set_title("torch vs flax (1e-9 stands for 0)")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path)


def training_table(report: TrainingReport) -> str:
    signal = [c for c in report.grads if not noise_only(c.name)]
    noise = [c for c in report.grads if noise_only(c.name)]
    worst = max(signal, key=lambda c: c.max_rel)
    bounds = report.bounds
    rows = [
        ("loss", report.loss.max_abs, bounds.loss.describe(), "pass" if report.loss.passed else "FAIL"),
        (
            f"gradients, {len(signal)} tensors (largest max|Δ|/max|g|: {worst.max_rel:.2g}, "
            f"{worst.name.removeprefix('grad ')})",
            max(c.max_abs for c in signal),
            bounds.grads.describe(),
            "pass" if all(c.passed for c in signal) else "FAIL",
        ),
    ]
    if noise:
        rows.append(
            (
                f"gradients zero in exact arithmetic, {len(noise)} tensors (max |g| "
                f"{max(c.ref_max for c in noise):.2g})",
                max(c.max_abs for c in noise),
                f"|g| and |Δ| <= {bounds.grads.atol:g}",
                "pass" if report.noise_grads_ok else "FAIL",
            )
        )
    for w in report.weights:
        rows.append(
            (
                f"weights after {w.step} AdamW step(s): {w.n_outliers} of {w.n_elements} "
                f"elements past the bound (<= {w.allowed_outliers}), {w.past_envelope} past the envelope",
                w.max_abs,
                f"{w.bound.describe()}; all <= {w.envelope.describe()}",
                "pass" if w.passed else "FAIL",
            )
        )
    lines = [format_table(["what", "max |Δ|", "bound", "result"], rows)]
    lines += [f"  {g.describe()}" for g in report.grads if not g.passed]
    return "\n".join(lines)


def sharding_table(report: ShardingReport) -> str:
    rows = [
        (
            r.mesh,
            r.logits.max_abs,
            "same" if r.tokens_equal else "DIFFER",
            max(g.max_abs for g in r.grads),
            r.weights.max_abs,
            f"{r.bytes_per_device / r.bytes_total:.3f}",
            f"{r.bytes_split_per_device / r.bytes_split_total:.3f}",
            "pass" if r.passed else "FAIL",
        )
        for r in report.rows
    ]
    lines = [
        format_table(
            [
                "mesh (data x model)",
                "logits max |Δ|",
                "greedy tokens",
                "grads max |Δ|",
                "weights after AdamW max |Δ|",
                "param bytes/device",
                "split params bytes/device",
                "result",
            ],
            rows,
        )
    ]
    lines.append("bytes/device: the largest share of one device, as a fraction of the unsharded parameters")
    for r in report.rows:
        lines += [f"  {r.mesh}: {n}" for n in r.notes]
        lines += [f"  {r.mesh}: {c.describe()}" for c in [r.logits, *r.grads] if not c.passed]
    return "\n".join(lines)


def parallel_table(report: ParallelReport) -> str:
    rows = [
        (
            r.strategy,
            r.twin,
            r.against,
            r.loss.max_abs,
            r.worst_grad.name.removeprefix("grad "),
            r.worst_grad.max_abs,
            r.worst_grad.margin,
            r.weights.max_abs,
            f"{r.state_bytes / r.single_bytes:.3f}" if r.against == "one device" else "",
            "pass" if r.passed else "FAIL",
        )
        for r in report.rows
    ]
    table = format_table(
        [
            "strategy",
            "run",
            "against",
            "loss max |Δ|",
            "worst gradient",
            "its max |Δ|",
            "|Δ|/allowed",
            f"weights after {report.spec.steps} steps max |Δ|",
            "state/rank",
            "result",
        ],
        rows,
    )
    note = "state/rank: parameters + AdamW moments on the rank holding the most, as a fraction of one device's"
    return f"{table}\n{note}"


def plot_parallel(report: ParallelReport, path: str) -> None:
    """Each comparison's worst margin (loss, gradients, weights) on a log scale, and the state per
    rank each strategy leaves, as a fraction of one device's."""
    plt = pyplot()

    labels = [f"{r.strategy}: {r.label}" for r in report.rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.0, 0.3 * len(labels) + 1.8), width_ratios=(2, 1))
    y = np.arange(len(labels))
    parts = {
        "loss": [r.loss.margin for r in report.rows],
        "worst gradient": [r.worst_grad.margin for r in report.rows],
        # the noise-only tensors are held to the envelope alone (training.WeightCheck)
        "worst weight": [max(c.margin for c in r.weights.tensors if not noise_only(c.name)) for r in report.rows],
    }
    for k, (what, values) in enumerate(parts.items()):
        drawn = [v if np.isfinite(v) and v > 0 else 1e-6 for v in values]
        ax.barh(y + (k - 1) * 0.27, drawn, height=0.27, label=what)
    ax.axvline(1.0, color="red", linestyle="--", label="bound")
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("max |Δ| / allowed")
    ax.legend(fontsize=7, loc="lower right")
    own = [r for r in report.rows if r.against == "one device"]
    bx.barh(np.arange(len(own)), [r.state_bytes / r.single_bytes for r in own], color="tab:gray", height=0.6)
    bx.set_yticks(np.arange(len(own)), [f"{r.strategy} {r.twin}" for r in own], fontsize=7)
    bx.invert_yaxis()
    bx.set_xlim(0, 1.05)
    bx.set_xlabel("state per rank / one device")
    s = report.spec
    planted = f", {s.plant} planted in {report.plant_twin}" if s.plant else ""
    fig.suptitle(
        f"world size {s.world}, {s.steps} AdamW steps, batch {s.batch} x {s.seq}, dropout {s.dropout}{planted}"
    )
    fig.tight_layout()
    save_figure(fig, path)
