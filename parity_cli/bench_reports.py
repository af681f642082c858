"""The benchmarks' reports as the terminal shows them (tables) and as pictures (plots)."""

from __future__ import annotations

import statistics
import textwrap

import jax

from parity_bench.bench import BACKENDS, BenchReport, Timing, describe_config
from parity_bench.decoding import DecodeTiming
from parity_bench.roofline import READ_BYTES

from .render import format_table, pyplot, save_figure


def bench_table(report: BenchReport) -> str:
    lines = [
        f"{report.model} {describe_config(report.config)}, {report.device}, matmuls "
        f"{report.precision.split(' ')[0]}, median of {report.repeats} after {report.warmup} warm-up",
        f"CPU: {report.cpu}; malloc: {report.hugepages}",
    ]
    gemm_rows: list[tuple[str, str, float, float | str, float | str]] = []  # a bandwidth has no min, max
    for dtype, samples in report.gemm.items():
        for lib, values in samples.items():
            gemm_rows.append(
                (
                    dtype,
                    f"{report.gemm_n}^3 matmul, {lib}",
                    statistics.median(values) / 1e9,
                    min(values) / 1e9,
                    max(values) / 1e9,
                )
            )
    if report.read_bw:
        for lib, value in report.read_bw.items():
            gemm_rows.append(("float32", f"sum over {READ_BYTES >> 20} MiB, {lib} (GB/s)", value / 1e9, "", ""))
    lines += [
        "",
        "this machine, measured in this run (GFLOP/s unless marked; the reference is the best sample):",
        format_table(["dtype", "reference", "median", "min", "max"], gemm_rows),
    ]
    rows = []
    for t in report.timings:
        eager, compiled = report.speedup(t), report.speedup(t, "torch-compile")
        rows.append(
            (
                t.dtype,
                f"{t.batch}x{t.seq}",
                t.backend,
                t.first_call_s,
                t.median_s * 1e3,
                f"{min(t.times_s) * 1e3:.0f}-{max(t.times_s) * 1e3:.0f}",
                t.tokens_per_s,
                t.flops_per_s / 1e9,
                f"{report.fraction_of_gemm(t):.3f}",
                "-" if eager is None else f"{eager:.2f}x",
                "-" if compiled is None else f"{compiled:.2f}x",
            )
        )
    lines += [
        "",
        "forward:",
        format_table(
            [
                "dtype",
                "batch x seq",
                "backend",
                "first call s",
                "median ms",
                "min-max ms",
                "tokens/s",
                "GFLOP/s",
                "of GEMM",
                "vs eager",
                "vs compile",
            ],
            rows,
        ),
    ]
    flax = next((t for t in report.timings if t.backend == "flax-jit"), None)
    share = f" = {report.id_check_s / flax.median_s:.2%} of the flax-jit forward" if flax else ""
    lines.append(f"host-side token-id check before dispatch: {report.id_check_s * 1e6:.1f} µs{share}")
    if report.decode:
        lines += [
            "",
            "greedy decoding; cached: the steps after the prefill and first pick; limit = the lower of read "
            "bandwidth x batch / bytes read per step (weights once, each row's cache) and GEMM throughput / "
            "FLOPs per token:",
            format_table(
                [
                    "twin",
                    "dtype",
                    "KV cache",
                    "batch",
                    "prompt",
                    "new tokens",
                    "first call s",
                    "prefill s",
                    "tokens/s",
                    "limit tokens/s",
                    "binds",
                    "of limit",
                ],
                [
                    (
                        d.twin,
                        d.dtype,
                        "yes" if d.cache else "no",
                        d.batch,
                        d.prompt,
                        d.new_tokens,
                        d.first_call_s,
                        "-" if d.prefill_s is None else f"{d.prefill_s:.3f}",
                        "-" if d.tokens_per_s is None else d.tokens_per_s,
                        d.limit_tokens_per_s,
                        d.binds,
                        "-" if d.fraction_of_limit is None else f"{d.fraction_of_limit:.3f}",
                    )
                    for d in report.decode
                ],
            ),
        ]
    if report.memory:
        lines += [
            "",
            format_table(
                [
                    "mesh",
                    "param bytes on one device, unsharded",
                    "sharded: most on a device",
                    "fraction",
                    "split params: unsharded",
                    "split params: most on a device",
                    "fraction",
                ],
                [
                    (
                        m["mesh"],
                        m["unsharded_bytes"],
                        m["sharded_bytes_per_device"],
                        f"{m['sharded_bytes_per_device'] / m['unsharded_bytes']:.3f}",
                        m["split_unsharded_bytes"],
                        m["split_bytes_per_device"],
                        f"{m['split_bytes_per_device'] / m['split_unsharded_bytes']:.3f}",
                    )
                    for m in report.memory
                ],
            ),
        ]
        if jax.devices()[0].platform == "cpu":
            lines.append(
                "(simulated devices share this machine's cores: sharded timings measure the program, not a speed-up)"
            )
    lines += report.notes
    return "\n".join(lines)


def plot_bench(report: BenchReport, path: str) -> None:
    """The forward as a fraction of GEMM throughput (and tokens/s): bars per backend and dtype
    for a single cell, lines against sequence length for a grid; with decoding, the cached
    decoder's tokens/s and fraction of its limit against batch size, a line per twin, dtype
    and prompt length."""
    plt = pyplot()

    rows = 2 if report.decode else 1  # the forward above, decoding below
    fig, grid = plt.subplots(rows, 2, figsize=(12, 4.6 * rows), squeeze=False)
    axes = grid.flatten()
    ax, frac = axes[0], axes[1]
    cells = {(t.batch, t.seq) for t in report.timings}
    if len(cells) == 1:
        ((batch, seq),) = cells
        names = [f"{t.backend}\n{t.dtype}" for t in report.timings]
        colors = [f"C{BACKENDS.index(t.backend.split('@')[0]) if t.backend in BACKENDS else 3}" for t in report.timings]
        ax.bar(names, [t.tokens_per_s for t in report.timings], color=colors)
        frac.bar(names, [report.fraction_of_gemm(t) for t in report.timings], color=colors)
        for a in (ax, frac):
            a.tick_params(axis="x", labelsize=7)
            a.set_title(f"forward, batch {batch} x {seq} tokens", fontsize=9)
            a.grid(True, axis="y", alpha=0.3)
    else:
        lines: dict[tuple[str, str, int], list[Timing]] = {}
        for t in report.timings:
            lines.setdefault((t.backend, t.dtype, t.batch), []).append(t)
        for (backend, dtype, batch), ts in lines.items():
            ts = sorted(ts, key=lambda t: t.seq)
            label = f"{backend} {dtype} batch {batch}"
            ax.plot([t.seq for t in ts], [t.tokens_per_s for t in ts], marker="o", label=label)
            frac.plot([t.seq for t in ts], [report.fraction_of_gemm(t) for t in ts], marker="o", label=label)
        for a in (ax, frac):
            a.set_xscale("log", base=2)
            a.set_xlabel("sequence length (tokens)")
            a.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_ylabel("tokens/s (forward)")
    frac.set_ylabel("achieved FLOP/s / best GEMM FLOP/s")
    frac.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    if report.decode:
        tps, lim = axes[2], axes[3]
        series: dict[tuple[str, str, int], list[DecodeTiming]] = {}
        for d in report.decode:
            if d.cache and d.tokens_per_s is not None:
                series.setdefault((d.twin, d.dtype, d.prompt), []).append(d)
        # colour: the prompt length; line: the dtype; marker: the twin
        prompts = sorted({prompt for _, _, prompt in series})
        for (twin, dtype, prompt), ds in series.items():
            ds = sorted(ds, key=lambda d: d.batch)
            style = {
                "color": f"C{prompts.index(prompt) % 10}",
                "linestyle": "-" if dtype == "float32" else "--",
                "marker": "o" if twin == "flax" else "x",
                "label": f"{twin} {dtype}, prompt {prompt}",
            }
            tps.plot([d.batch for d in ds], [d.tokens_per_s for d in ds], **style)
            lim.plot([d.batch for d in ds], [d.fraction_of_limit for d in ds], **style)
        for a in (tps, lim):
            a.set_xscale("log", base=2)
            a.set_xlabel("batch size (decoding with the KV cache)")
            a.grid(True, which="both", alpha=0.3)
        tps.set_yscale("log")
        tps.set_ylabel("tokens/s (all rows)")
        lim.set_ylabel("of the bandwidth or compute limit")
        lim.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        tps.legend(fontsize=6)
    fig.suptitle(textwrap.fill(f"{report.model} {describe_config(report.config)}, {report.cpu}", 150), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def load_memory_table(report: dict) -> str:
    rows = [
        [
            r["layout"],
            r["twin"],
            r["file_bytes"] / 2**30,
            r["before"] / 2**30,
            r["peak"] / 2**30,
            r["peak_over_file"],
            r["load_over_file"],
            r["seconds"],
        ]
        for r in report["rows"]
    ]
    return format_table(
        [
            "layout",
            "twin",
            "file GiB",
            "RSS before GiB",
            "peak RSS GiB",
            "peak / file",
            "(peak - before) / file",
            "load s",
        ],
        rows,
    )
