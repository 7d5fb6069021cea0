"""``bgf-sweep``: a small, resumable hyperparameter search on the validation split.

    bgf-sweep --name demo-lr --grid lr=1e-3,3e-4 --grid k=5,10 --seeds 0 1 -- --method bgformer

Each trial sets the named ``bgf-train`` options to one combination of the given values (every
combination with ``--sampler grid``, ``--trials`` distinct ones in a seeded random order with
``--sampler random``) and trains one run per seed; its score is the validation R@1 of the selected
checkpoint, averaged over the seeds. An on/off option takes ``true`` and ``false`` as its values
(``--grid detach-graph-input=true,false``). The search is Optuna's (its SQLite storage makes it
resumable); a run folder that already holds a finished run is read instead of trained again, and a
killed one is resumed (``bgf-train --resume``). One JSON line per run goes to
``<dir>/runs.jsonl``; a summary table, best validation score first, is printed at the end. The test
numbers are shown beside the validation score but never used to choose.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from .arguments import (
    EXIT_USAGE,
    USER_ERRORS,
    OneLineParser,
    argument_type,
    error_message,
    field_name,
    given_options,
    resolve_options,
)
from .checks import InputError
from .config import OPTIONS, Config, resolve
from .console import setup_logging
from .domains import positive_int, seed_int
from .experiment import check_against_training_split, run
from .experiment.splits import config_splits
from .run_folder import LAST_CHECKPOINT, read_metrics
from .tables import format_cell

PROG = "bgf-sweep"
#: The score of a run: this metric of the validation split at the selected epoch.
SCORE = "recall@1"
RUNS_FILE = "runs.jsonl"
#: Grid values of an on/off option (``--grid detach-graph-input=true,false``).
SWITCH_VALUES = {"true": True, "false": False}
STUDY_FILE = "study.db"


def grid_option(text: str) -> tuple[str, list[str]]:
    """An argparse ``type=``: ``NAME=V1,V2,...`` (``NAME`` a ``bgf-train`` option, with or
    without its leading ``--``)."""
    name, sep, values = text.partition("=")
    name = name.strip().removeprefix("--")
    choices = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name or not choices:
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,..., got {text!r}")
    return name, choices


USAGE = f"{PROG} --name NAME --grid NAME=V1,V2 [options] -- [bgf-train options]"
EPILOG = """\
The bgf-train options of every run go after "--" (an option before it that bgf-sweep does not
know is an error), e.g.
  bgf-sweep --name demo-lr --grid lr=1e-3,3e-4 --grid k=5,10 --seeds 0 1 -- --method bgformer
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, usage=USAGE, epilog=EPILOG, allow_abbrev=False,
                      description="A small, resumable search over bgf-train options, scored on "
                                  "the validation split.",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the study's name (and its folder's)")
    p.add_argument("--dir", default=None, help="study folder (default: runs/sweeps/NAME)")
    p.add_argument("--grid", type=grid_option, action="append", required=True,
                   metavar="NAME=V1,V2", help="a bgf-train option and its values (repeatable)")
    p.add_argument("--seeds", type=argument_type(seed_int), nargs="+", default=[0], metavar="SEED",
                   help="one run per seed (default: 0)")
    p.add_argument("--sampler", choices=("grid", "random"), default="grid",
                   help="every combination, or --trials distinct ones drawn at random "
                        "(default: grid)")
    p.add_argument("--trials", type=argument_type(positive_int), default=None,
                   help="trials to run in all (default: every combination)")
    p.add_argument("--sampler-seed", type=argument_type(seed_int), default=0,
                   help="seeds the random sampler (default: 0)")
    return p


def split_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[
        argparse.Namespace, list[str]]:
    """bgf-sweep's options (before ``--``) and the bgf-train options of every run (after it); an
    unknown option before ``--`` is an error, not silently handed to the runs."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:cut])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (bgf-train's options go "
                     f"after --: {USAGE})")
    return args, argv[cut + 1:]


def run_folder_name(params: dict[str, str], seed: int) -> str:
    """A run's folder name from its options and seed, so a re-run of the same setting (a resumed
    sweep, a repeated random draw) finds it."""
    return "_".join(f"{k}={v}" for k, v in params.items()).replace("/", "%") + f"-s{seed}"


def is_switch(name: str) -> bool:
    """Whether ``bgf-train`` option ``name`` (``detach-graph-input``) is an on/off switch."""
    field = field_name(name)
    return field in OPTIONS and OPTIONS[field].switch is not None


def trial_options(params: dict[str, str]) -> dict:
    """The options of a trial's setting, typed: ``NAME=VALUE`` read as ``bgf-train`` reads
    ``--NAME VALUE``, an on/off option's ``true`` / ``false`` as the switch on or off."""
    options, argv = {}, []
    for name, value in params.items():
        if is_switch(name):
            options[name.replace("-", "_")] = SWITCH_VALUES[value.lower()]
        else:
            argv += [f"--{name}", value]
    given, _ = given_options(argv, PROG)
    return {**given, **options}


def trial_config(base: Config, params: dict[str, str], seed: int, out: Path) -> Config:
    """The configuration of one run of a trial: the base runs' options, the trial's setting,
    the seed and the run folder."""
    return base.replace(**trial_options(params), seed=seed, out=str(out), no_progress=True)


def check_distinct_values(parser: argparse.ArgumentParser, name: str,
                          values: Sequence[str]) -> None:
    """Two values of ``--grid name`` that ``bgf-train`` reads as one (``1e-3,0.001``,
    ``true,True``) would train the same setting twice: a parser error naming both."""
    seen: dict = {}
    for value in values:
        typed = json.dumps(trial_options({name: value}), sort_keys=True)
        if typed in seen:
            parser.error(f"--grid {name}: {seen[typed]} and {value} are the same value")
        seen[typed] = value


def check_plan(parser: argparse.ArgumentParser, args: argparse.Namespace,
               base: Sequence[str]) -> Config:
    """Every combination and seed is a valid ``bgf-train`` run selected on the validation split,
    its options checked against the training split as :func:`~bgf_pyg.experiment.run` checks
    them (the split loaded once per dataset and validation split, before the first run starts;
    a bad one exits with code 2). Returns the configuration of the runs' common options."""
    names = [name for name, _ in args.grid]
    if len(set(names)) != len(names):
        parser.error(f"--grid names an option twice: {names}")
    given, _ = given_options(base, PROG)
    for name in ("seed", "out", "resume", "overwrite"):
        if name in names or name in given:
            parser.error(f"--{name} is set by {PROG} itself; remove it from the options")
    for name, values in args.grid:
        bad = [v for v in values if v.lower() not in SWITCH_VALUES]
        if is_switch(name) and bad:
            parser.error(f"--grid {name}: an on/off option takes true or false, got {bad}")
        if name.replace("-", "_") in given:
            parser.error(f"--{name} is set both by --grid and after --; keep one")
        check_distinct_values(parser, name, values)
    training_splits: dict[tuple, Dataset] = {}  # loaded once per dataset and validation split
    for values in itertools.product(*(v for _, v in args.grid)):
        params = dict(zip(names, values, strict=True))
        config = resolve_options({**given, **trial_options(params)}, PROG,
                                 note=lambda message: None)  # a run notes it when it starts
        if config.select_on != "val" or not config.val_classes:
            parser.error("a sweep chooses on the validation split: keep --select-on val and "
                         "--val-classes above 0")
        key = (config.dataset, config.data_root, config.val_classes, config.val_seed)
        try:
            if key not in training_splits:
                training_splits[key] = config_splits(config, augment=False,
                                                     check_images="off").train
            check_against_training_split(config, training_splits[key])
        except USER_ERRORS as err:
            setting = " ".join(f"{k}={v}" for k, v in params.items())
            parser.error(f"--grid {setting}: {error_message(err, config)}")
    # what the runs share; on its own it may lack what every setting adds (lr_milestones for a
    # given lr_gamma), so only the trials' configurations are checked
    return resolve(given, check=False)


def run_once(base: Config, params: dict[str, str], seed: int, out: Path) -> dict:
    """Train (or read, if ``out`` holds a finished run; or resume a killed one) one run; return
    its validation score and test metrics."""
    records = read_metrics(out)
    if not any(r.get("final") for r in records):
        resume = (out / LAST_CHECKPOINT).is_file()
        run(trial_config(base, params, seed, out).replace(resume=resume, overwrite=not resume))
        records = read_metrics(out)
    final = [r for r in records if r.get("final") and "refine" not in r][-1]
    val = next(r for r in records if r.get("split") == "val"
               and r["epoch"] == final["selected_epoch"] and not r.get("final"))
    test = {k: v for k, v in final.items() if k.startswith(("recall@", "map@r", "nmi"))}
    return {"val_" + SCORE: val[SCORE], "selected_epoch": final["selected_epoch"], "test": test}


def summary(rows: list[dict]) -> str:
    """Markdown table, one line per setting of the options, best mean validation score first
    (mean ± std over the seeds, in %)."""
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(" ".join(f"--{k} {v}" for k, v in row["params"].items()),
                              []).append(row)
    ordered = sorted(by_setting.items(),
                     key=lambda item: -statistics.mean(r["val_" + SCORE] for r in item[1]))
    lines = ["| options | seeds | val R@1 | test R@1 |", "|---|---|---|---|"]
    for options, runs in ordered:
        lines.append(f"| {options} | {len(runs)} | "
                     f"{format_cell([r['val_' + SCORE] for r in runs])} | "
                     f"{format_cell([r['test'][SCORE] for r in runs])} |")
    return "\n".join(lines)


def make_study(args: argparse.Namespace, folder: Path):
    """The Optuna study in ``<folder>/study.db`` (loaded if it exists); a trial a killed sweep
    left running is marked failed and queued again on the same setting, by Optuna's
    ``RetryHeartbeatStaleTrialCallback`` (which keeps the grid sampler's bookkeeping intact).
    A study of another grid (Optuna cannot change a study's values) is an ``InputError``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Both samplers walk the grid in a seeded random order without repeating a setting: "grid"
    # to its end, "random" for --trials settings (Optuna's RandomSampler would draw a finite
    # grid's settings again and spend trials on runs already done).
    sampler = optuna.samplers.GridSampler(dict(args.grid), seed=args.sampler_seed)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / STUDY_FILE}")
    study = optuna.create_study(study_name=args.name, storage=storage, sampler=sampler,
                                direction="maximize", load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    grid = {name: values for name, values in args.grid}
    if study.user_attrs.get("grid", grid) != grid:
        first = " ".join(f"--grid {k}={','.join(v)}" for k, v in study.user_attrs["grid"].items())
        raise InputError(f"{folder} holds study {args.name!r} of another grid ({first}); repeat "
                         "it to resume that study, or give another --name or --dir")
    study.set_user_attr("grid", grid)
    # Failed through the storage, as optuna.storages.fail_stale_trials fails a heartbeat-stale
    # trial: Study.tell would first hand the trial to the grid sampler, which stops the study
    # (an error outside optimize) when the trial holds the grid's last setting.
    study_id = storage.get_study_id_from_name(args.name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        retry(study, storage.get_trial(trial_id))
    return study


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bgf-sweep``; the options after ``--`` go to every run."""
    parser = build_parser()
    try:
        args, base_argv = split_argv(parser, sys.argv[1:] if argv is None else argv)
        base = check_plan(parser, args, base_argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        import optuna
    except ImportError:
        print(f"{PROG}: error: needs optuna: pip install 'bgf_pyg[sweep]'", file=sys.stderr)
        return EXIT_USAGE
    folder = Path(args.dir or f"runs/sweeps/{args.name}")
    folder.mkdir(parents=True, exist_ok=True)
    setup_logging()
    try:
        study = make_study(args, folder)
    except USER_ERRORS as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    combinations = len(list(itertools.product(*(v for _, v in args.grid))))
    total = min(args.trials or (combinations if args.sampler == "grid" else 1), combinations)
    done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    def score(number: int, params: dict[str, str]) -> float:
        """Train (or read, or resume) every seed of one setting; the mean validation score."""
        scores = []
        for seed in args.seeds:
            out = folder / run_folder_name(params, seed)
            row = {"trial": number, "seed": seed, "params": params, "out": str(out),
                   **run_once(base, params, seed, out)}
            with open(folder / RUNS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            scores.append(row["val_" + SCORE])
        return statistics.mean(scores)

    def objective(trial) -> float:
        return score(trial.number, {name: trial.suggest_categorical(name, values)
                                    for name, values in args.grid})

    try:
        study.optimize(objective, n_trials=max(total - done, 0), catch=())
    except USER_ERRORS as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    finished = {t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    rows = [r for r in read_rows(folder) if r["trial"] in finished]
    print(f"Sweep {args.name}: {len(finished)} trial(s), chosen on validation {SCORE} "
          f"(test shown, not used to choose); runs in {folder}")
    print(summary(rows))
    return 0


def read_rows(folder: Path) -> list[dict]:
    """The runs of ``<folder>/runs.jsonl``, the last line of each run folder."""
    path = folder / RUNS_FILE
    if not path.is_file():
        return []
    latest = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            latest[row["out"]] = row
    return list(latest.values())



if __name__ == "__main__":
    sys.exit(main())
