"""The ``diffcredit`` command: plan coalitions and aggregate their utilities without Snakemake or a GPU.

Each subcommand is one small function that imports what it needs when it runs, so ``plan``, ``aggregate`` and
``verify`` start without torch or diffusers. User errors (bad files, bad values) print ``diffcredit: error: ...``
and exit with status 2, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from diffcredit.estimators import NAMES as ESTIMATORS


def _plan(args: argparse.Namespace) -> int:
    from diffcredit.coalitions import plan, read_contributors, write_coalitions

    table = plan(
        read_contributors(args.contributors), args.estimator, args.budget, args.seed, bound_repeats=args.bound_repeats
    )
    write_coalitions(table, args.out)
    print(f"planned {len(table)} {args.estimator} coalitions -> {args.out}")
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    from diffcredit.coalitions import read_coalitions, read_contributors
    from diffcredit.shapley import aggregate, read_utilities, write_result

    result = aggregate(
        read_coalitions(args.coalitions),
        read_utilities(args.utilities),
        contributors=None if args.contributors is None else read_contributors(args.contributors),
        confidence=args.confidence,
        missing=args.missing,
    )
    write_result(result, args.out, convergence=args.convergence)
    print(f"{len(result.table)} values -> {args.out} ({result.method})")
    if result.excluded:
        print(f"excluded {len(result.excluded)} coalition(s) without a finite utility", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from diffcredit.demo import main as demo

    demo(args.arguments)
    return 0


def _verify(args: argparse.Namespace) -> int:
    import tarfile

    from diffcredit.bundle import ARCHIVE, CHECKSUMS, verify_bundle

    try:
        problems = verify_bundle(args.bundle)
    except (tarfile.TarError, KeyError) as error:  # a truncated archive or one without MANIFEST.json
        problems = [f"{ARCHIVE}: unreadable ({error})"]
    for problem in problems:
        print(problem)
    if problems:
        return 1
    lines = (args.bundle / CHECKSUMS).read_text().splitlines()
    print(f"ok: {sum(1 for line in lines if line and not line.endswith(f'  {ARCHIVE}'))} files verified")
    return 0


def _payout(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from diffcredit.io import write_json, write_table, write_text
    from diffcredit.payout import metadata, payout, statement_text, statements, unallocated, values_level

    if (args.coalitions is None) != (args.utilities is None):
        raise ValueError("evidence needs both --coalitions and --utilities (or neither)")
    if args.out.suffix == ".json":
        raise ValueError(f"--out {args.out}: name the shares CSV *.csv; its metadata goes beside it as .json")
    yardstick = None
    if args.reference is not None:
        from diffcredit.properties import reference_provenance  # imports torch: only when a reference is named

        yardstick = reference_provenance(args.reference)
    level = values_level(args.values, args.confidence)
    shares = payout(
        pd.read_csv(args.values), args.budget, confidence=level, level=level, draws=args.draws, seed=args.seed
    )
    write_table(shares, args.out, sep=",")
    about = metadata(shares, args.budget, confidence=level, yardstick=yardstick)
    write_json(args.out.with_suffix(".json"), about)
    print(f"{len(shares)} shares of {args.budget:g} -> {args.out}; unallocated {unallocated(shares, args.budget):.4g}")
    print(f"yardstick: {about['yardstick_statement']}")
    if args.statements is not None:
        from diffcredit.coalitions import read_coalitions
        from diffcredit.shapley import read_utilities

        evidence = (
            {}
            if args.coalitions is None
            else {"coalitions": read_coalitions(args.coalitions), "utilities": read_utilities(args.utilities)}
        )
        stated = statements(shares, budget=args.budget, yardstick=yardstick, **evidence)
        for contributor, statement in stated.items():
            write_text(args.statements / f"{contributor}.md", statement_text(statement))
        write_text(args.statements / "statements.json", json.dumps(stated, indent=1, default=float) + "\n")
        print(f"{len(stated)} statements -> {args.statements}/")
    return 0


def _parser() -> argparse.ArgumentParser:
    from diffcredit import __version__

    parser = argparse.ArgumentParser(
        prog="diffcredit", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = commands.add_parser("plan", help="plan the coalitions to evaluate (prefix-stable in the budget)")
    plan.add_argument("--contributors", type=Path, required=True, help="TSV with a 'contributor' column")
    plan.add_argument("--estimator", choices=ESTIMATORS, required=True)
    plan.add_argument("--budget", type=int, help="number of coalitions (sampled estimators; exact and loo ignore it)")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument(
        "--bound-repeats",
        type=int,
        default=2,
        help="utility measurements of the empty and the grand coalition (the plan's 'repeats')",
    )
    plan.add_argument("--out", type=Path, required=True, help="coalitions TSV to write")
    plan.set_defaults(run=_plan)

    aggregate = commands.add_parser("aggregate", help="values with intervals from coalition utilities")
    aggregate.add_argument("--coalitions", type=Path, required=True, help="the plan written by 'diffcredit plan'")
    aggregate.add_argument(
        "--utilities",
        type=Path,
        required=True,
        help="TSV with 'coalition' and 'utility' (several rows per coalition allowed)",
    )
    aggregate.add_argument("--out", type=Path, required=True, help="values CSV to write")
    aggregate.add_argument("--confidence", type=float, default=0.95, help="interval level")
    aggregate.add_argument(
        "--missing",
        choices=("error", "exclude"),
        default="error",
        help="coalitions without a finite utility: refuse or leave out",
    )
    aggregate.add_argument("--convergence", type=Path, help="CSV of value and stderr vs coalitions used")
    aggregate.add_argument(
        "--contributors", type=Path, help="TSV with a 'contributor' column: refuse others, order the output by it"
    )
    aggregate.set_defaults(run=_aggregate)

    # Every argument after "demo" (--help too) goes to diffcredit.demo, which parses its own.
    demo = commands.add_parser(
        "demo", help="train, prune and sample the tiny digits model (needs torch)", add_help=False
    )
    demo.set_defaults(run=_demo)

    verify = commands.add_parser("verify", help="check a result bundle against its checksums")
    verify.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    verify.set_defaults(run=_verify)

    payout = commands.add_parser("payout", help="shares of a budget from values with intervals, and statements")
    payout.add_argument(
        "--values", type=Path, required=True, help="CSV with contributor, value, stderr, ci_low, ci_high (values.csv)"
    )
    payout.add_argument("--budget", type=float, required=True, help="the amount to share out")
    payout.add_argument("--out", type=Path, required=True, help="shares CSV to write")
    payout.add_argument("--statements", type=Path, help="folder for one Markdown statement per contributor (+ JSON)")
    payout.add_argument("--coalitions", type=Path, help="the plan, for the evidence in the statements")
    payout.add_argument("--utilities", type=Path, help="the plan's utilities TSV, for the evidence")
    payout.add_argument(
        "--reference",
        type=Path,
        help="the run's prepared reference folder (results/<name>/reference): the statements and the shares' JSON "
        "name the yardstick",
    )
    payout.add_argument(
        "--confidence",
        type=float,
        help="level of the values' and the share intervals; None: the level in the JSON beside the values, else 0.95",
    )
    payout.add_argument("--draws", type=int, default=10_000, help="draws of the values for the share intervals")
    payout.add_argument("--seed", type=int, default=0, help="seed of those draws")
    payout.set_defaults(run=_payout)
    for command in commands.choices.values():  # every subcommand's --help shows each option's default
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        args.arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
