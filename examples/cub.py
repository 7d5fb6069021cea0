"""Train and evaluate on CUB-200-2011, or on the embedded demo set when no --data-root is given.

    python examples/cub.py --data-root /data/CUB_200_2011 --method bgformer --pretrained r50.pth
    python examples/cub.py                              # demo, BGFormer, about 2 minutes (114 s)
    python examples/cub.py --method all --seeds 0 1 2   # the demo table of docs/results.rst

Every other option is one of ``bgf-train``'s (see ``bgf-train --help``); the demo runs
``--dataset demo``'s defaults (``bgf_pyg.config.DEMO_DEFAULTS``). Each run is a
:class:`bgf_pyg.config.Config` run by :func:`bgf_pyg.experiment.run`; every run's configuration
is checked before the first one starts; a run that fails does not stop the others: the table
shows those that finished, the failures are named and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Sequence

from bgf_pyg.arguments import (
    EXIT_USAGE,
    USER_ERRORS,
    OneLineParser,
    argument_type,
    error_message,
    given_options,
    resolve_options,
)
from bgf_pyg.config import Config
from bgf_pyg.console import setup_logging
from bgf_pyg.data import build_dataset
from bgf_pyg.domains import seed_int
from bgf_pyg.experiment import run, use_threads
from bgf_pyg.experiment.splits import raw_pixel_metrics
from bgf_pyg.models import METHODS
from bgf_pyg.tables import format_table, results_caption, row_name

PROG = "cub.py"
#: Exit code when a run failed with a bug (a traceback was printed).
EXIT_FAILURE = 1


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="CUB_200_2011 folder; none: the demo set")
    p.add_argument("--method", choices=(*METHODS, "all"), default=METHODS.default,
                   help="one method, or all of them one after the other")
    p.add_argument("--seeds", type=argument_type(seed_int), nargs="+", default=[0],
                   help="one run per seed")
    p.add_argument("--out", default=None,
                   help="the run folder of a single run; with several methods or seeds, the "
                        "parent of one METHOD-sSEED folder per run (default: bgf-train's "
                        "runs/DATASET-METHOD-sSEED)")
    return p.parse_known_args(argv)


def run_config(args: argparse.Namespace, rest: list[str], method: str, seed: int,
               single: bool, methods: Sequence[str] | None = None) -> Config:
    """The configuration of one run: the bgf-train options in ``rest``, the dataset, the
    method, the seed and the run folder (``methods``: every method of this invocation, for the
    options' scope check). A bad option exits with one line and code 2."""
    options, _ = given_options(rest, PROG)
    options.update(method=method, seed=seed)
    options.update({"dataset": "demo"} if args.data_root is None else {
        "dataset": "cub", "data_root": args.data_root})
    if args.out is not None:
        options["out"] = args.out if single else f"{args.out}/{method}-s{seed}"
    return resolve_options(options, PROG, methods=methods)


def paired_line(bgformer: dict[int, dict[str, float]], plain: dict[int, dict[str, float]],
                plan: dict, seed: int) -> str:
    """BGFormer − plain test R@1 of the seeds both finished, per seed and mean ± std, in
    points; says whether the two used the same metric loss."""
    seeds = [s for s in bgformer if s in plain]
    diffs = [100 * (bgformer[s]["recall@1"] - plain[s]["recall@1"]) for s in seeds]
    per_seed = ", ".join(f"seed {s}: {d:+.1f}" for s, d in zip(seeds, diffs, strict=True))
    losses = {plan["bgformer", seed].loss, plan["plain", seed].loss}
    loss = (f"same loss ({losses.pop()})" if len(losses) == 1
            else f"different losses: bgformer {plan['bgformer', seed].loss}, plain "
                 f"{plan['plain', seed].loss}")
    summary = ""
    if len(diffs) > 1:
        wins = sum(d > 0 for d in diffs)
        summary = (f"; mean {statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}, "
                   f"BGFormer ahead on {wins} of {len(diffs)} seeds")
    return f"\nBGFormer − plain, test R@1 in points, paired by seed ({loss}): {per_seed}{summary}"


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse(argv)
    methods = tuple(METHODS) if args.method == "all" else (args.method,)
    single = len(methods) == 1 and len(args.seeds) == 1
    # Every run's options are checked before the first run starts.
    plan = {(m, s): run_config(args, rest, m, s, single, methods)
            for m in methods for s in args.seeds}
    if args.data_root is None:
        print("No --data-root given: training on the embedded demo set (two-digit numbers, "
              "28×56, smallcnn) instead of CUB-200-2011.")
    setup_logging()
    use_threads(plan[methods[0], args.seeds[0]].threads)  # every run's, the baseline row's too
    rows, failures, exit_code = [], [], 0
    finished: dict[str, dict[int, dict[str, float]]] = {}
    start = time.perf_counter()
    if args.data_root is None:
        rows.append(("raw pixels", [raw_pixel_metrics(build_dataset("demo", None, "test"))]))
    for method in methods:
        finished[method] = {}
        for seed in args.seeds:
            try:
                finished[method][seed] = run(plan[method, seed]).test_metrics
            except USER_ERRORS as err:
                failures.append(f"{method} (seed {seed}): {error_message(err, plan[method, seed])}")
                exit_code = exit_code or EXIT_USAGE
            except Exception as err:  # a bug: keep its traceback, still run the other methods
                traceback.print_exc()
                failures.append(f"{method} (seed {seed}): {type(err).__name__}: {err}")
                exit_code = EXIT_FAILURE
        if finished[method]:
            rows.append((row_name(plan[method, args.seeds[0]]), list(finished[method].values())))
    if len(rows) > (args.data_root is None):  # a trained method finished
        seeds = ", ".join(map(str, args.seeds))
        spread = " (mean ± std)" if len(args.seeds) > 1 else ""
        print(f"\n{results_caption(plan[methods[0], args.seeds[0]])}; seeds {seeds}{spread}; "
              f"{time.perf_counter() - start:.0f} s in all:")
        print(format_table(rows))
        if finished.get("bgformer") and finished.get("plain"):
            print(paired_line(finished["bgformer"], finished["plain"], plan, args.seeds[0]))
    for failure in failures:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
