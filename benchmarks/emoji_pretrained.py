"""Does BGFormer help with a pretrained backbone on real images? The emoji benchmark.

Every method trains on the frozen features of ImageNet-pretrained EfficientNet-Lite0
(``--backbone efficientnet_lite0 --freeze-backbone``, 96 px) of the emoji set's training classes
(``bgf-data emoji``; one class is one emoji, its images the drawings of up to seven designers) and
is tested once on the unseen half of the emoji. Each model's settings were chosen by ``bgf-sweep``
on the validation classes (seed 0; the commands are in docs/results.rst and the
sweeps' runs in ``benchmarks/results/sweeps/``); this script then trains each model for every seed
and reports test R@1 and MAP@R, mean ± std over the seeds, each BGFormer model minus plain (the
same loss) and minus the control (the same BGFormer model with its graph term weighted 0, so
plain's loss through BGFormer's 128-d projection), paired by seed, and the wall time of every
run. The first row is the pretrained features themselves, untrained. Every run also evaluates its
selected checkpoint with the test-time refinements (``--refine``: query expansion for every
model, the learned BGFormer refinement for the kNN BGFormer models; k and α chosen on the
validation classes), reported per model as the change against no refinement, paired by seed.
Every run is kept in the JSON as it finishes; running the command again skips the finished runs
and resumes a killed one.

    python benchmarks/emoji_pretrained.py --data-root data/emoji --seeds 0 1 2 3 4 \\
        --out benchmarks/results/emoji_pretrained.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bgf_pyg.arguments import OneLineParser, argument_type
from bgf_pyg.checks import InputError
from bgf_pyg.config import Config, configure
from bgf_pyg.console import setup_logging
from bgf_pyg.domains import positive_int, seed_int
from bgf_pyg.experiment import run, use_threads
from bgf_pyg.experiment.splits import config_splits, frozen_splits, raw_pixel_metrics
from bgf_pyg.models.efficientnet import efficientnet_trunk
from bgf_pyg.run_folder import LAST_CHECKPOINT, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper beside this script
from seeded_runs import load, mean_std, paired, run_name, save  # noqa: E402

#: Options every run shares: frozen pretrained features, 128-d embeddings, 16 × 4 batches.
COMMON = {"dataset": "emoji", "backbone": "efficientnet_lite0", "freeze_backbone": True,
          "embedding_dim": 128, "epochs": 30, "eval_every": 5, "no_progress": True}
BALANCED = {"classes_per_batch": 16, "samples_per_class": 4}
#: BGFormer's shared settings: a learned 128-d projection feeds the graph and the head.
BGFORMER = {"method": "bgformer", **BALANCED, "graph_dim": 128, "lr": 3e-4}
PLAIN = "plain (multi-similarity)"
#: BGFormer's model with its graph term weighted 0: what each BGFormer model is also paired with.
CONTROL = "bgformer with α = 1 (no graph term)"
#: name → (the plain model it is paired with or None, its options chosen on validation)
MODELS: dict[str, tuple[str | None, dict]] = {
    PLAIN: (None, {"method": "plain", **BALANCED, "lr": 3e-4}),
    "plain (PCE)": (None, {"method": "plain", **BALANCED, "lr": 1e-3, "loss": "pce"}),
    # the control: the graph term weighs 0, so this is plain's loss through BGFormer's projection
    CONTROL: (PLAIN, {**BGFORMER, "lam": 1.0, "alpha": 1.0, "k": 5}),
    "bgformer, kNN, visual only": (PLAIN, {**BGFORMER, "lam": 1.0, "alpha": 0.9, "k": 5}),
    "bgformer, top-K, visual only": (
        PLAIN, {**BGFORMER, "lam": 1.0, "alpha": 0.9, "k": 10, "visual_graph": "attention_topk"}),
    "bgformer, kNN + semantic": (PLAIN, {**BGFORMER, "lam": 0.5, "alpha": 0.5, "k": 10}),
    "bgformer, kNN + semantic, detached": (
        PLAIN, {**BGFORMER, "lam": 0.5, "alpha": 0.5, "k": 10, "detach_graph_input": True}),
    "bgformer, authors' form": (
        PLAIN, {**BGFORMER, "lam": 0.3, "alpha": 0.5, "k": 30, "visual_graph": "attention_topk",
                "semantic_branch": "label_propagation"}),
    "bgformer, authors' form, detached": (
        PLAIN, {**BGFORMER, "lam": 0.3, "alpha": 0.5, "k": 30, "visual_graph": "attention_topk",
                "semantic_branch": "label_propagation", "detach_graph_input": True}),
    "intra-batch": (None, {"method": "intra-batch", **BALANCED, "lr": 1e-3, "graph_layers": 2}),
    "proxygml": (None, {"method": "proxygml", "batch_size": 64, "lr": 3e-4,
                        "proxies_per_class": 1}),
}
UNTRAINED = "pretrained features, untrained"
#: Test-time refinements, their settings chosen on the validation classes.
REFINE_GRID = {"refine_k": [5, 10, 20], "refine_alpha": [0.0, 1.0, 3.0]}
METRICS = ("recall@1", "map@r")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="emoji_pretrained.py", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="the emoji cache (bgf-data emoji --root)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--seeds", type=argument_type(seed_int), nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=argument_type(positive_int), default=None,
                   help="threads of every run (default: the configuration's automatic count)")
    p.add_argument("--runs", default="runs/emoji", help="parent of the run folders")
    p.add_argument("--out", default="benchmarks/results/emoji_pretrained.json")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    return p.parse_args(argv)


def refinements(options: dict) -> list[str]:
    """The refinements of a model: the learned one needs BGFormer's kNN branch."""
    learned = options["method"] == "bgformer" and options.get("visual_graph") != "attention_topk"
    return ["none", "qe", "bgformer"] if learned else ["none", "qe"]


def run_options(args: argparse.Namespace, model: str, seed: int) -> dict:
    """The options of one run (a run killed midway continues from its checkpoint; one without
    starts afresh)."""
    out = Path(args.runs, run_name(model, seed))
    options = MODELS[model][1]
    resume = (out / LAST_CHECKPOINT).is_file()
    return {**COMMON, "data_root": args.data_root, **options, "threads": args.threads,
            "seed": seed, "out": str(out), "refine": refinements(options), **REFINE_GRID,
            "resume": resume, "overwrite": not resume}


def run_config(args: argparse.Namespace, model: str, seed: int) -> Config:
    """The checked configuration of one run."""
    return configure(**run_options(args, model, seed))


def untrained_metrics(args: argparse.Namespace) -> dict[str, float]:
    """Test-split retrieval on the frozen backbone's pooled features (read from the cache)."""
    config = configure(**COMMON, data_root=args.data_root, **MODELS[next(iter(MODELS))][1],
                       threads=args.threads, out=str(Path(args.runs, "untrained")))
    splits = config_splits(config, augment=False, check_images="off")
    trunk, _ = efficientnet_trunk(config.backbone, config.pretrained)
    splits = frozen_splits(config, splits, trunk.eval(), torch.device("cpu"))
    return raw_pixel_metrics(splits.test)


def refinement_records(out: Path) -> dict[str, dict]:
    """The test records of each refinement of a finished run, by refinement name."""
    return {r["refine"]: {key: value for key, value in r.items()
                          if key in (*METRICS, "refine_k", "refine_alpha")}
            for r in read_metrics(out) if r.get("final") and r.get("split") == "test"
            and "refine" in r}


def summarise(records: list[dict]) -> list[dict]:
    """Mean and std of each metric over seeds per model; each BGFormer model minus its plain
    model, paired by seed."""
    by_model: dict[str, dict[int, dict]] = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["seed"]] = r
    rows = []
    for model, runs in by_model.items():
        row = {"model": model, "seeds": sorted(runs),
               "wall_s": statistics.mean(r["wall_s"] for r in runs.values())}
        for metric in METRICS:
            row[metric] = mean_std([r[metric] for r in runs.values()])
        plain = MODELS.get(model, (None, []))[0]
        if plain in by_model:
            row["minus_plain_recall@1"] = {
                "against": plain,
                **paired({s: r["recall@1"] for s, r in runs.items()},
                         {s: r["recall@1"] for s, r in by_model[plain].items()})}
        if plain is not None and model != CONTROL and CONTROL in by_model:
            row["minus_control_recall@1"] = paired(
                {s: r["recall@1"] for s, r in runs.items()},
                {s: r["recall@1"] for s, r in by_model[CONTROL].items()})
        row["refine"] = {}
        for name in ("qe", "bgformer"):
            refined = {s: r["refine"][name] for s, r in runs.items() if name in r.get("refine", {})}
            if not refined:
                continue
            row["refine"][name] = {
                "settings": [(r.get("refine_k"), r.get("refine_alpha")) for r in refined.values()],
                **{metric: {"mean": statistics.mean(r[metric] for r in refined.values()),
                            "minus_none": paired(
                                {s: r[metric] for s, r in refined.items()},
                                {s: runs[s]["refine"]["none"][metric] for s in refined})}
                   for metric in METRICS}}
        rows.append(row)
    return rows


def plot(path: Path, summary: list[dict], untrained: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [UNTRAINED, *(s["model"] for s in summary)]
    means = [100 * untrained["recall@1"], *(100 * s["recall@1"][0] for s in summary)]
    stds = [0.0, *(100 * s["recall@1"][1] for s in summary)]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh(range(len(names)), means, xerr=stds, capsize=3, color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("test R@1 (%), unseen emoji; mean ± std over seeds")
    ax.set_xlim(min(means) - 5, max(means) + 5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Emoji set, frozen EfficientNet-Lite0 features (96 px)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    plan = [(m, s) for m in args.models for s in args.seeds]
    # every run's configuration is checked before the first one starts
    try:
        checked = [run_config(args, *key) for key in plan]
    except InputError as err:
        raise SystemExit(f"emoji_pretrained.py: error: {err}") from err
    saved = load(out)
    records = saved["runs"]
    done = {(r["model"], r["seed"]) for r in records}
    setup_logging()
    use_threads(checked[0].threads)  # the untrained row's too
    payload = {"config": {"common": COMMON, "models": {m: MODELS[m] for m in args.models},
                          "threads": checked[0].threads},
               "untrained": saved.get("untrained") or untrained_metrics(args), "runs": records}
    for i, (model, seed) in enumerate(plan, 1):
        if (model, seed) in done:
            continue
        print(f"[{i}/{len(plan)}] {run_name(model, seed)}", file=sys.stderr)
        start = time.perf_counter()
        metrics = run(run_config(args, model, seed)).test_metrics
        records.append({"model": model, "seed": seed, "wall_s": time.perf_counter() - start,
                        **metrics,
                        "refine": refinement_records(Path(args.runs, run_name(model, seed)))})
        payload["summary"] = summarise(records)
        save(out, payload)
    payload["summary"] = summary = summarise(records)
    save(out, payload)
    plot(Path(args.plot) if args.plot else out.with_suffix(".png"), summary, payload["untrained"])
    print(f"test, in %, mean ± std over seeds {' '.join(map(str, args.seeds))}:")
    print(f"  {UNTRAINED:40s} R@1 {100 * payload['untrained']['recall@1']:5.1f}  "
          f"MAP@R {100 * payload['untrained']['map@r']:5.1f}")
    for s in summary:
        line = (f"  {s['model']:40s} R@1 {100 * s['recall@1'][0]:5.1f} ± "
                f"{100 * s['recall@1'][1]:.1f}  MAP@R {100 * s['map@r'][0]:5.1f} ± "
                f"{100 * s['map@r'][1]:.1f}  {s['wall_s']:.0f} s/run")
        if "minus_plain_recall@1" in s:
            d = s["minus_plain_recall@1"]
            line += (f"  − plain: {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} "
                     f"(ahead on {d['ahead']}/{len(d['per_seed'])})")
        if "minus_control_recall@1" in s:
            d = s["minus_control_recall@1"]
            line += (f"  − control: {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} "
                     f"(ahead on {d['ahead']}/{len(d['per_seed'])})")
        print(line)
        for name, refined in s["refine"].items():
            print(f"    refine {name:8s} " + "  ".join(
                f"{metric} {100 * refined[metric]['mean']:5.1f} "
                f"({100 * refined[metric]['minus_none']['mean']:+.1f} ± "
                f"{100 * refined[metric]['minus_none']['std']:.1f}, up on "
                f"{refined[metric]['minus_none']['ahead']}/"
                f"{len(refined[metric]['minus_none']['per_seed'])})" for metric in METRICS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
