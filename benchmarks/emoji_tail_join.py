"""Join ``emoji_tail.py`` result files into one: its runs, configuration, summary and plot.

Long verdicts run as many calls at once, one row and seed each, every call with its own
``--runs`` and ``--out`` (two processes on two cores, or several machines). This joins their
JSON files into ``--out`` (its own runs kept when it exists) and writes the summary and plot
that ``emoji_tail.py`` writes. It trains nothing, and refuses, before writing anything:

- files whose runs trained other epochs, or whose shared options or thread counts differ;
- a row whose runs trained with other options in one file than in another;
- a run (regime, cut, row, seed) that two files hold with different results (the same record
  twice is one run: joining a file again changes nothing);
- runs of different machines, unless ``--mixed-machines``: a row is paired with plain by seed,
  and another CPU may train the same seed to other weights (docs/results.rst).

    python benchmarks/emoji_tail_join.py parts/*.json --out benchmarks/results/emoji_tail_x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bgf_pyg.arguments import OneLineParser
from bgf_pyg.checks import InputError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this script
from emoji_tail import FIRST_VERDICT, joined_cuts, label, with_options, write_verdict  # noqa: E402

#: Configuration entries every joined file must share: runs that differ in them do not compare.
SHARED = ("common", "epochs", "threads")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="emoji_tail_join.py", description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="+", help="emoji_tail.py --out files to join")
    p.add_argument("--out", required=True,
                   help="the joined JSON (an existing one keeps its runs and takes the parts')")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--mixed-machines", action="store_true",
                   help="join runs of different machines (their rows are then paired across "
                        "machines)")
    p.add_argument("--first-verdict", default=FIRST_VERDICT,
                   help="the frozen-feature verdict's JSON, its rows shown beside (if present)")
    return p.parse_args(argv)


def read_part(path: Path) -> dict:
    """One ``emoji_tail.py`` result file, its runs given the options they trained with."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"parts: cannot read {path} as JSON ({err})") from err
    if not (isinstance(payload, dict) and isinstance(payload.get("runs"), list)
            and isinstance(payload.get("config"), dict)):
        raise InputError(f"parts: {path} is not an emoji_tail.py result (expected a JSON object "
                         "with 'config' and 'runs')")
    return {"config": payload["config"], "runs": with_options(payload)}


def run_key(run: dict) -> tuple:
    return run["regime"], run["cut"], run["model"], run["seed"]


def machine_name(run: dict) -> str:
    machine = run.get("machine")
    return (f"{machine['cpu_model']} ({machine['cpu_capability']}, torch {machine['torch']})"
            if machine else "unrecorded")


def joined_config(parts: dict[Path, dict]) -> dict:
    """The parts' configurations as one: ``SHARED`` equal in all, their regimes, cuts and rows
    together (a row's options the same wherever it appears)."""
    first, *_ = parts.items()
    config: dict = {key: first[1]["config"].get(key) for key in SHARED}
    config.update(regimes={}, cuts={}, models={})
    where: dict[tuple[str, str], Path] = {}
    for path, part in parts.items():
        own = part["config"]
        for key in SHARED:
            if own.get(key) != config[key]:
                raise InputError(f"parts: {path} has {key} {own.get(key)!r}, {first[0]} has "
                                 f"{config[key]!r}: runs that differ in it do not compare")
        config["regimes"].update(own.get("regimes", {}))
        for regime, cuts in own.get("cuts", {}).items():
            config["cuts"][regime] = joined_cuts(config["cuts"].get(regime, []), cuts)
        rows = [(r["regime"], r["model"], r["options"]) for r in part["runs"]] + [
            (regime, model, options) for regime, models in own.get("models", {}).items()
            for model, options in models.items()]
        for regime, model, options in rows:
            known = config["models"].setdefault(regime, {}).setdefault(model, options)
            if known != options:
                raise InputError(f"parts: {regime} '{model}' trained with {options} in {path} "
                                 f"but {known} in {where[regime, model]}; join each setting "
                                 "into its own --out")
            where.setdefault((regime, model), path)
    return config


def joined_runs(parts: dict[Path, dict], mixed_machines: bool) -> list[dict]:
    """Every part's runs, each once; refused where two files disagree on a run or, unless
    ``mixed_machines``, where the runs come from more than one machine."""
    runs: dict[tuple, tuple[dict, Path]] = {}
    for path, part in parts.items():
        for run in part["runs"]:
            known, source = runs.setdefault(run_key(run), (run, path))
            if known != run:
                regime, cut, model, seed = run_key(run)
                raise InputError(f"parts: {label(regime, cut, model)}, seed {seed} is in {source}"
                                 f" and in {path} with different results; keep one of them")
    joined = [run for run, _ in runs.values()]
    if not joined:
        raise InputError(f"parts: {', '.join(map(str, parts))} hold no runs")
    machines = Counter(machine_name(run) for run in joined)
    if len(machines) > 1 and not mixed_machines:
        raise InputError("--mixed-machines: the runs come from "
                         + "; ".join(f"{name}: {n} run(s)" for name, n in machines.items())
                         + ". Rows are paired by seed, so join each machine's runs into its own "
                           "--out, or give --mixed-machines to pair them across machines")
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    try:
        paths = ([out] if out.is_file() else []) + [Path(p) for p in args.parts]
        parts = {path: read_part(path) for path in dict.fromkeys(paths)}
        payload = {"config": joined_config(parts),
                   "runs": joined_runs(parts, args.mixed_machines)}
    except InputError as err:
        raise SystemExit(f"emoji_tail_join.py: error: {err}") from err
    write_verdict(out, payload, args.plot, args.first_verdict)
    print(f"{out}: {len(payload['runs'])} runs from {len(parts)} file(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
