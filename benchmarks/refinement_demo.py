"""Test-time refinement on the demo: BGFormer trained per seed, evaluated without refinement,
with query expansion and with the learned refinement, settings chosen on the validation classes.

Each seed trains the demo's BGFormer (``bgf-train`` with its demo defaults, as
``examples/cub.py``) with ``--refine none,qe,bgformer``; a run folder that already holds the
refinement records is read instead of retrained. The JSON holds every seed's test records and
the paired per-seed differences to ``none``; the Markdown table goes to stdout and next to it.

Usage::

    python benchmarks/refinement_demo.py --seeds 0 1 2 3 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bgf_pyg.config import configure
from bgf_pyg.experiment import run
from bgf_pyg.run_folder import read_metrics

METRICS = (("recall@1", "R@1"), ("map@r", "MAP@R"))
REFINEMENTS = ("none", "qe", "bgformer")


def run_seed(seed: int, runs: Path, grid: dict, threads: int) -> list[dict]:
    """The refinement records of the demo's BGFormer run of ``seed`` (trained when missing)."""
    out = runs / f"demo-bgformer-refine-s{seed}"
    records = [r for r in read_metrics(out) if r.get("final") and "refine" in r]
    if not records:
        config = configure(seed=seed, out=str(out), overwrite=True, no_progress=True,
                           device="cpu", refine=list(REFINEMENTS), threads=threads, **grid)
        records = run(config).refinements
    return records


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--refine-k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--refine-alpha", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/refinement_demo.json"))
    args = parser.parse_args()
    grid = {"refine_k": args.refine_k, "refine_alpha": args.refine_alpha}
    per_seed = {seed: run_seed(seed, args.runs, grid, args.threads) for seed in args.seeds}
    test = {seed: {r["refine"]: r for r in recs if r["split"] == "test"}
            for seed, recs in per_seed.items()}
    val = {seed: {r["refine"]: r for r in recs if r["split"] == "val"
                  and all(r.get(f"refine_{p}") == test[seed][r["refine"]].get(f"refine_{p}")
                          for p in ("k", "alpha"))}
           for seed, recs in per_seed.items()}
    lines = ["| refinement | settings chosen (per seed) | val R@1 | test R@1 | test MAP@R | "
             "Δ R@1 vs none (paired) | Δ MAP@R vs none (paired) |", "|---|---|---|---|---|---|---|"]
    for name in REFINEMENTS:
        chosen = ", ".join(
            " ".join(f"{p} {test[s][name][f'refine_{p}']:g}" for p in ("k", "alpha")
                     if f"refine_{p}" in test[s][name]) or "–" for s in args.seeds)
        cells = [mean_std([val[s][name]["recall@1"] for s in args.seeds])]
        cells += [mean_std([test[s][name][m] for s in args.seeds]) for m, _ in METRICS]
        for metric, _ in METRICS:
            diffs = [test[s][name][metric] - test[s]["none"][metric] for s in args.seeds]
            cells.append("–" if name == "none" else
                         mean_std(diffs) + f" ({sum(d > 0 for d in diffs)}/{len(diffs)} up)")
        lines.append(f"| {name} | {chosen} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "threads": args.threads,
                                    "grid": grid, "records": per_seed}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main_()
