"""Is sparse graph attention robust to noisy samples? BGFormer's claim, measured on the demo set.

Trains on the embedded demo set (``bgf-train --dataset demo`` and its per-method demo settings)
with a fraction of the training labels flipped (``--label-noise``) and, separately, with
uniform-noise outlier images added under random labels (``--outliers``); validation and test
stay clean. Three batch-graph models are compared, several seeds each:

- ``bgformer-knn``: BGFormer with its sparse kNN visual graph (the demo's ``--k``);
- ``bgformer-full``: the same model with full attention (``--k`` = batch size − 1, every other
  sample of the batch is a visual neighbour);
- ``intra-batch``: the intra-batch message passing network on the complete batch graph.

Reported: test R@1 (clean, unseen classes) of the checkpoint selected on the validation classes,
mean ± std over seeds, per model and corruption level. Every run is kept in the JSON as it
finishes; running the command again skips the finished runs and resumes a killed one.

    python benchmarks/robustness.py --epochs 15 --out benchmarks/results/robustness_demo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bgf_pyg.arguments import OneLineParser, argument_type
from bgf_pyg.checks import InputError
from bgf_pyg.config import DEMO_DEFAULTS, Config, configure, demo_defaults
from bgf_pyg.console import setup_logging
from bgf_pyg.domains import positive_int, probability, seed_int
from bgf_pyg.experiment import run
from bgf_pyg.run_folder import LAST_CHECKPOINT, atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper beside this script
from seeded_runs import add_run_options  # noqa: E402

#: Global batch of the demo runs (P × M), so full attention is k = batch − 1.
DEMO_BATCH = DEMO_DEFAULTS["classes_per_batch"] * DEMO_DEFAULTS["samples_per_class"]
#: name → (method, its options beyond the demo's)
MODELS = {
    "bgformer-knn": ("bgformer", {}),
    "bgformer-full": ("bgformer", {"k": DEMO_BATCH - 1}),
    "intra-batch": ("intra-batch", {}),
}
METRIC = "recall@1"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="robustness.py", description=__doc__.splitlines()[0])
    p.add_argument("--label-noise", type=argument_type(probability), nargs="+",
                   default=[0.0, 0.1, 0.2, 0.4],
                   help="fractions of flipped training labels (0 is the clean reference)")
    p.add_argument("--outliers", type=argument_type(probability), nargs="+", default=[0.2, 0.4],
                   help="outlier images added, as fractions of the training split (clean labels)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--seeds", type=argument_type(seed_int), nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=argument_type(positive_int), default=DEMO_DEFAULTS["epochs"])
    p.add_argument("--alpha", type=argument_type(probability), default=None,
                   help="BGFormer's α for both bgformer models (default: the demo's); with a "
                        "smaller α the graph term weighs more in the loss")
    add_run_options(p, "runs/robustness", "benchmarks/results/robustness_demo.json")
    return p.parse_args(argv)


def conditions(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(corruption, level) pairs: the clean run once, then each noise level of each kind."""
    levels = [("label_noise", x) for x in args.label_noise if x > 0]
    levels += [("outliers", x) for x in args.outliers if x > 0]
    return [("clean", 0.0), *levels]


def run_name(model: str, corruption: str, level: float, seed: int,
             alpha: float | None = None) -> str:
    tag = "" if alpha is None or not model.startswith("bgformer") else f"-a{alpha:g}"
    return f"{model}{tag}-{corruption}{level:g}-s{seed}"


def run_config(args: argparse.Namespace, model: str, corruption: str, level: float,
               seed: int) -> Config:
    """The configuration of one run (checked; a killed run continues from its checkpoint, a
    folder without one starts afresh)."""
    method, extra = MODELS[model]
    out = Path(args.runs, run_name(model, corruption, level, seed, args.alpha))
    options = {"method": method, **extra, "seed": seed, "epochs": args.epochs, "out": str(out),
               "no_progress": True, "threads": args.threads}
    if args.alpha is not None and method == "bgformer":
        options["alpha"] = args.alpha
    if corruption != "clean":
        options[corruption] = level
    resume = (out / LAST_CHECKPOINT).is_file()
    return configure(**options, resume=resume, overwrite=not resume)


def summarise(records: list[dict]) -> list[dict]:
    """Mean and std of the metric over seeds, per model and condition."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["model"], r["corruption"], r["level"]), []).append(r[METRIC])
    return [{"model": m, "corruption": c, "level": lvl, "seeds": len(v),
             "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for (m, c, lvl), v in sorted(groups.items())]


def save(path: Path, config: dict, records: list[dict]) -> None:
    payload = {"config": config, "runs": records, "summary": summarise(records)}
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def plot(path: Path, summary: list[dict], models: Sequence[str], alpha: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, corruption, label in ((axes[0], "label_noise", "flipped training labels"),
                                  (axes[1], "outliers", "outlier images added (× training set)")):
        for model in models:
            rows = [s for s in summary if s["model"] == model
                    and s["corruption"] in ("clean", corruption)]
            rows.sort(key=lambda s: s["level"])
            ax.errorbar([s["level"] for s in rows], [100 * s["mean"] for s in rows],
                        yerr=[100 * s["std"] for s in rows], marker="o", capsize=3, label=model)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test R@1 (%), clean unseen classes")
    axes[0].legend()
    setting = "" if alpha is None else f", BGFormer α = {alpha:g}"
    fig.suptitle(f"Demo set: robustness to noisy training samples{setting} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    plan = [(m, c, lvl, s) for c, lvl in conditions(args) for m in args.models
            for s in args.seeds]
    # every run's configuration is checked before the first one starts
    try:
        checked = [run_config(args, *key) for key in plan]
    except InputError as err:
        raise SystemExit(f"robustness.py: error: {err}") from err
    saved = json.loads(out.read_text()) if out.is_file() else {"config": {}, "runs": []}
    for option in ("epochs", "alpha"):  # runs of other settings would be averaged together
        if option in saved["config"] and saved["config"][option] != getattr(args, option):
            raise SystemExit(f"robustness.py: error: {out} holds runs with --{option} "
                             f"{saved['config'][option]}; pass another --out")
    records = saved["runs"]
    done = {(r["model"], r["corruption"], r["level"], r["seed"]) for r in records}
    config = {"epochs": args.epochs, "alpha": args.alpha, "demo_batch": DEMO_BATCH,
              "demo_defaults": {m: demo_defaults(MODELS[m][0]) for m in args.models},
              "models": {m: MODELS[m] for m in args.models}, "threads": checked[0].threads}
    setup_logging()
    start = time.perf_counter()
    for i, (model, corruption, level, seed) in enumerate(plan, 1):
        if (model, corruption, level, seed) in done:
            continue
        print(f"[{i}/{len(plan)}] {run_name(model, corruption, level, seed, args.alpha)}",
              file=sys.stderr)
        metrics = run(run_config(args, model, corruption, level, seed)).test_metrics
        records.append({"model": model, "corruption": corruption, "level": level, "seed": seed,
                        **metrics})
        save(out, config, records)
    summary = summarise(records)
    plot(Path(args.plot) if args.plot else out.with_suffix(".png"), summary, args.models,
         args.alpha)
    print(f"{time.perf_counter() - start:.0f} s; test R@1 in %, mean ± std over seeds "
          f"{' '.join(map(str, args.seeds))}:")
    for s in summary:
        print(f"  {s['model']:14s} {s['corruption']:12s} {s['level']:<4g} "
              f"{100 * s['mean']:5.1f} ± {100 * s['std']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
