"""`gpt-parity diagnose`: when the twins' check fails, which bug of the zoo explains it."""

from __future__ import annotations

import argparse

from gpt_spec import ModelKind
from gpt_spec.checks import FORWARD_DTYPES
from parity_tests import decoding, diagnose, diagnose_runs, hf_candidate, zoo
from parity_tests.diagnose import Diagnosis
from parity_tests.forward import DIRECTIONS, ParityOptions
from parity_tests.training import TrainingReport

from ..common import Setup, add_model_args, add_precision_arg, plant_arg, write_outputs
from ..render import format_table, progress


def perturb_arg(text: str) -> tuple[str, float, str]:
    spec, _, twin = text.partition("@")
    param, _, eps = spec.rpartition(":")
    twin = twin or "flax"
    try:
        size = float(eps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PARAM:EPS[@TWIN], got {text!r}") from None
    if not param or not size > 0:
        raise argparse.ArgumentTypeError(f"expected PARAM:EPS[@TWIN] with EPS > 0, got {text!r}")
    if twin not in zoo.TWINS:
        raise argparse.ArgumentTypeError(f"unknown twin {twin!r} in {text!r}; expected torch or flax")
    return param, size, twin


def evidence_arg(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(","))
    unknown = [k for k in kinds if k not in diagnose_runs.EVIDENCE]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown evidence {', '.join(map(repr, unknown))}; expected {', '.join(diagnose_runs.EVIDENCE)}"
        )
    return kinds


def add_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser(
        "diagnose",
        help="check the twins against each other and, where they differ, plant each bug of the zoo that could "
        "have made the first failure in each twin in turn: the one that brings every finding back under its "
        "bound names the bug and the twin that carries it",
    )
    add_model_args(d)
    d.add_argument("--dtype", default="float32", choices=list(FORWARD_DTYPES), help="as check's (default: float32)")
    add_precision_arg(d)
    d.add_argument(
        "--plant",
        type=plant_arg,
        metavar="MUTANT[@TWIN]",
        help="first plant this bug of the zoo in one twin (default: flax), to see the diagnosis find it",
    )
    d.add_argument(
        "--perturb",
        type=perturb_arg,
        metavar="PARAM:EPS[@TWIN]",
        help="first multiply one weight tensor of one twin (default: flax) by 1 ± EPS, element by element: "
        "a difference no bug of the zoo makes",
    )
    d.add_argument(
        "--reference",
        default="both",
        choices=["torch", "flax", "both"],
        help="the twin to plant the zoo's bugs in; the other is the candidate (default: both, in turn, so the "
        "verdict names the twin that carries the bug)",
    )
    d.add_argument(
        "--direction",
        default=None,
        choices=list(DIRECTIONS),
        help="check this direction only (default: both, as check does)",
    )
    d.add_argument(
        "--evidence",
        type=evidence_arg,
        default=None,
        metavar="KIND[,KIND...]",
        help="the checks to run, in this order until one fails, which is diagnosed: forward (every stage and "
        "layer: the forward mutants), training (10 AdamW steps: the optimizer and loss mutants), bfloat16-training "
        "(one bfloat16 step: the bfloat16 training mutant), generation (the KV cache, its window and parity "
        "sampling: the decoding mutants) (default: all four)",
    )
    d.add_argument(
        "--hf",
        metavar="SNAPSHOT",
        help="the candidate is transformers' GPT2LMHeadModel of this HF snapshot folder (config.json and "
        "model.safetensors; needs the dev extra), the reference the torch twin holding its weights as the "
        "book's GPT-2: the bug named is in the HF model or in what its config.json asks of it",
    )
    d.add_argument(
        "--zoo",
        action="store_true",
        help="the zoo in reverse: plant each mutant of the --evidence kinds in the candidate (the twin --reference "
        "does not name; flax when it names both) and diagnose it by its kind's check; exits 1 unless each is named "
        "top-1",
    )
    return d


def zoo_table(rows: list[diagnose_runs.ZooDiagnosis]) -> str:
    body = []
    for r in rows:
        top = f"{r.explained[0][0]} in {r.explained[0][1]}" if r.explained else "no known bug"
        others = ", ".join(f"{m} in {t}" for m, t in r.explained[1:]) or "-"
        body.append([r.mutant, r.candidate, top, others, r.trials, "ok" if r.top1 else "MISSED"])
    return format_table(["mutant planted", "in", "diagnosed as", "also explained by", "trials", "result"], body)


def trial_table(d: Diagnosis, limit: int = 8) -> str:
    rows = []
    for t in [*d.trials[:limit], d.none]:
        rows.append(
            [
                t.mutant or "(nothing planted)",
                t.planted_in if t.mutant else "-",
                t.carrier,
                t.findings - len(t.unexplained) - t.own_rounding,
                t.own_rounding,
                len(t.unexplained),
                round(t.excess, 1),
                "yes" if t.explains else "no",
            ]
        )
    head = ["mutant", "planted in", "bug in", "under bound", "own rounding", "past", "Σlog2 past", "explains"]
    table = format_table(head, rows)
    more = len(d.trials) - limit
    return table + (f"\n... and {more} more (--json has them all)" if more > 0 else "")


def _options(args: argparse.Namespace, directions: tuple[str, ...]) -> ParityOptions:
    return ParityOptions(
        batch=args.batch,
        seq=args.seq,
        seed=args.seed,
        directions=directions,
        dtype=args.dtype,
        matmul_precision=args.matmul_precision,
    )


def run(args: argparse.Namespace, setup: Setup, parser: argparse.ArgumentParser) -> int:
    cfg = setup.cfg
    if setup.model != ModelKind.GPT:
        parser.error("diagnose plants the zoo's bugs in the full GPT: needs --model gpt")
    if setup.meshes:
        parser.error("diagnose checks one device per twin: drop --mesh")
    if args.hf is not None:
        return _run_hf(args, parser)
    evidence: tuple[str, ...] = args.evidence or diagnose_runs.EVIDENCE
    if args.dtype != "float32":
        if args.evidence not in (None, ("forward",)):
            parser.error(f"--dtype {args.dtype}: diagnose runs only the forward check in it: drop --evidence")
        evidence = ("forward",)
    directions = DIRECTIONS if args.direction is None else (args.direction,)
    reference = zoo.TWINS if args.reference == "both" else (args.reference,)
    if args.zoo:
        if args.plant or args.perturb or setup.weights is not None:
            parser.error("--zoo plants each mutant itself on an init's weights: drop --plant, --perturb, --checkpoint")
        candidate = "flax" if args.reference != "flax" else "torch"
        rows = diagnose_runs.diagnose_zoo(
            cfg,
            _options(args, directions),
            candidate=candidate,
            evidence=evidence,
            twins=reference,
            progress=progress(args.quiet),
        )
        print(
            f"{setup.label}, {args.dtype}, batch {args.batch} x {args.seq or min(128, cfg.context_length)} tokens, "
            f"{', '.join(directions)}: each {', '.join(evidence)} mutant planted in {candidate}, the zoo's mutants "
            f"planted in {' and '.join(reference)} to explain it"
        )
        print(zoo_table(rows))
        named = sum(r.top1 for r in rows)
        print(f"{named} of {len(rows)} named top-1; {sum(r.alone for r in rows)} by no other mutant")
        write_outputs(
            args, {"config": cfg.to_dict(), "directions": list(directions), "rows": [r.to_json() for r in rows]}
        )
        return 0 if named == len(rows) else 1
    if args.plant and args.perturb:
        parser.error("--plant and --perturb: one difference at a time")
    plant, what = None, ""
    if args.plant:
        name, twin = args.plant
        mutant = zoo.get(name)
        plant, what = diagnose_runs.plant_of(mutant, twin), f", {name} planted in {twin}"  # refuses what it cannot read
        if mutant.adapt(cfg) != cfg:
            parser.error(f"mutant {name} needs a config with {dict(mutant.needs)} to show")
    if args.perturb:
        param, eps, twin = args.perturb
        plant, what = zoo.perturb(param, eps, twin, seed=args.seed), f", {param} x (1 ± {eps:g}) in {twin}"
    d = diagnose_runs.diagnose_all(
        cfg,
        _options(args, directions),
        weights=setup.weights,
        plant=plant,
        evidence=evidence,
        twins=reference,
        progress=progress(args.quiet),
    )
    print(f"{setup.label}{what}")
    ran = f"the {d.kind.name} check ({_setup_line(d, args, directions)})"
    if d.passed:
        print(f"the {' and '.join(d.passed)} check{'s' if len(d.passed) > 1 else ''} passed; then {ran}:")
    else:
        print(f"{ran[0].upper()}{ran[1:]}:")
    if d.trials:
        print(
            f"check failed first at {d.stage}; each suspect planted in "
            f"{' and '.join(reference)} in turn, the check run again:"
        )
        print(trial_table(d))
    if d.untried and d.trials:
        print(f"{len(d.untried)} mutants not tried: they first fail elsewhere or need another config (--json)")
    print(d.verdict)
    write_outputs(args, d.to_json())
    return 0 if d.baseline.passed else 1


def _setup_line(d: Diagnosis, args: argparse.Namespace, directions: tuple[str, ...]) -> str:
    """What the diagnosed check ran: each kind has its own batch, length and steps."""
    r = d.baseline
    if isinstance(r, TrainingReport):
        steps = max((w.step for w in r.weights), default=0)
        return f"batch {r.batch} x {r.seq} tokens, {steps} AdamW step{'s' if steps != 1 else ''}"  # the kind names the dtype
    if isinstance(r, decoding.DecodingReport):
        return decoding.setup_text()
    return f"{args.dtype}, batch {args.batch} x {r.seq} tokens, {', '.join(directions)}"


def _run_hf(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = [
        flag
        for flag, value in (
            ("--config", args.config),
            ("--checkpoint", args.checkpoint),
            ("--plant", args.plant),
            ("--perturb", args.perturb),
            ("--zoo", args.zoo),
            ("--direction", args.direction),
            ("--evidence", args.evidence not in (None, ("forward",))),
        )
        if value
    ]
    if given:
        parser.error(
            f"--hf takes its config and weights from the snapshot and plants in the torch twin: drop {', '.join(given)}"
        )
    if args.reference == "flax" or args.dtype != "float32":
        parser.error("--hf checks the HF model in float32 against the torch twin: drop --reference flax and --dtype")
    candidate = hf_candidate.load_candidate(args.hf)
    d = diagnose.diagnose_hf(candidate, _options(args, (hf_candidate.DIRECTION,)), progress=progress(args.quiet))
    print(
        f"{args.hf} ({hf_candidate.NAME}), float32, batch {args.batch} x {d.baseline.seq} tokens, against the torch twin"
    )
    if candidate.meaning:
        print(
            f"its config.json departs from the book's GPT-2: {', '.join(f'{k} = {v!r}' for k, v in candidate.meaning.items())}"
        )
    if d.trials:
        print(f"check failed first at {d.stage}; each suspect planted in torch in turn, the check run again:")
        print(trial_table(d))
    print(d.verdict)
    write_outputs(
        args, {**d.to_json(), "candidate": {"hf_snapshot": candidate.folder, "config_meaning": candidate.meaning}}
    )
    return 0 if d.baseline.passed else 1
