"""`gpt-parity bench`: the forward and decoding against this machine's own references."""

from __future__ import annotations

import argparse

from parity_bench import bench, profile

from .. import bench_reports
from ..common import (
    Setup,
    add_model_args,
    dtype_list,
    emit,
    non_negative,
    positive,
    positive_list,
)
from ..render import (
    progress,
)


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench",
        help="time the jitted Flax forward against torch eager and torch.compile, "
        "as fractions of this machine's GEMM throughput",
    )
    add_model_args(b, grid=True)
    b.add_argument(
        "--dtype",
        type=dtype_list,
        default=["float32"],
        metavar="D[,D...]",
        help="float32 and/or bfloat16 (default: float32)",
    )
    b.add_argument(
        "--repeats",
        type=positive,
        default=3,
        help="timed calls per backend (default: 3)",
    )
    b.add_argument("--warmup", type=non_negative, default=1, help="untimed calls after the first")
    b.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    b.add_argument(
        "--decode",
        type=non_negative,
        default=0,
        metavar="N",
        help="also time greedy decoding of N tokens at batch 1, with and without the KV "
        "cache, against the memory-bandwidth limit (default: 0, off)",
    )
    b.add_argument(
        "--decode-uncached",
        type=positive,
        default=32,
        metavar="N",
        help="tokens timed without the cache, at most --decode (default: 32)",
    )
    b.add_argument(
        "--decode-batch",
        type=positive_list,
        default=list(bench.DECODE_BATCHES),
        metavar="B[,B...]",
        help="batch sizes of the cached-decoding grid (default: %(default)s)",
    )
    b.add_argument(
        "--decode-prompt",
        type=positive_list,
        default=list(bench.DECODE_PROMPTS),
        metavar="P[,P...]",
        help="prompt lengths of the cached-decoding grid, each at most context_length - N + 1; "
        "longer ones are left out with a note (default: %(default)s)",
    )
    b.add_argument(
        "--gemm-size",
        type=positive,
        default=bench.GEMM_N,
        metavar="N",
        help=f"the N^3 matmul that measures GEMM throughput (default: {bench.GEMM_N})",
    )
    b.add_argument("--plot", metavar="PNG", help="save tokens/s against sequence length as a plot")
    b.add_argument(
        "--profile",
        metavar="DIR",
        help="also trace both twins on the grid's first cell, per dtype (and decoding, with --decode): "
        "DIR/flax-DTYPE/ (jax.profiler: TensorBoard's profile plugin, perfetto_trace.json.gz for Perfetto) "
        "and DIR/torch-DTYPE.json (torch.profiler's Chrome trace, for Perfetto)",
    )
    return b


def run(args: argparse.Namespace, setup: Setup, parser: argparse.ArgumentParser) -> int:
    backends = tuple(b for b in bench.BACKENDS if not (args.no_compile and b == "torch-compile"))
    opts = bench.BenchOptions(
        model=setup.model,
        batches=args.batch,
        seqs=args.seq or [min(256, setup.cfg.context_length)],
        dtypes=tuple(args.dtype),
        repeats=args.repeats,
        warmup=args.warmup,
        backends=backends,
        seed=args.seed,
        model_options=setup.options,
        decode=args.decode,
        decode_uncached=args.decode_uncached,
        decode_batches=args.decode_batch,
        decode_prompts=args.decode_prompt,
        gemm_n=args.gemm_size,
        profile=args.profile,
    )
    if args.profile:
        try:
            profile.check_profile_dir(args.profile)
        except ValueError as e:
            parser.error(str(e))
    report = bench.run_bench(setup.cfg, opts, weights=setup.weights, meshes=setup.meshes, progress=progress(args.quiet))
    emit(args, report, bench_reports.bench_table, bench_reports.plot_bench)
    for dtype, written in report.traces.items():
        print(
            f"{dtype} traces: {written['flax']}/ (Flax), {written['torch']} (torch); docs/benchmarks.md says how to open them"
        )
    return 0
