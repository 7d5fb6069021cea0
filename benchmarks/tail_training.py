"""Tail training from a cached prefix (``--train-tail``) on a CPU: an epoch against the same
epoch computing the prefix every step and against an epoch on frozen features; a BGFormer epoch
against a plain one at the same cut; the prefix cache's size and build time.

Every model is EfficientNet-Lite0 with its ImageNet weights (the ``pretrained`` extra) at
``--size`` px, a 128-d embedding, 16 × 4 class-balanced batches, built and trained through the
package's own experiment code (``build_run_method``, ``train_loader``, ``train_one_epoch``):

- ``frozen``: ``--freeze-backbone``, plain (the head on the cached pooled features);
- ``tail_cached``: ``--train-tail CUT``, plain (tail + head from the cached prefix outputs);
- ``tail_every_step``: ``--trainable-stages CUT+1``, plain: the same parameters train, the
  whole network runs every step, on the same two views (the images are decoded and transformed
  once beforehand, so only the network is timed);
- ``tail_cached_bgformer``: ``--train-tail CUT``, BGFormer (graph width 128, k = 5, α = 0.9,
  λ = 1: the emoji benchmark's settings).

The variants are timed in interleaved rounds (one epoch of each per round, after one warm-up
round); the JSON holds every time and the medians. Images: the emoji set of ``bgf-data emoji``
(``--data-root``), else ``--classes`` generated emoji-like drawings in ``--styles`` styles each.

    OMP_NUM_THREADS=1 python benchmarks/tail_training.py --threads 1 \\
        --out benchmarks/results/tail_training_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

from bgf_pyg.config import Config, configure
from bgf_pyg.data import build_transform
from bgf_pyg.data.emoji import IMAGES_DIR, MANIFEST
from bgf_pyg.data.features import FeatureDataset, HorizontalFlip, image_list_of
from bgf_pyg.experiment import use_threads
from bgf_pyg.experiment.build import build_optimization, build_run_method, train_loader
from bgf_pyg.experiment.splits import config_splits, transform_options
from bgf_pyg.train import seed_all
from bgf_pyg.train.loop import train_one_epoch
from bgf_pyg.train.precision import Precision

#: The goals: tail training within 1.5× of a frozen-feature epoch, BGFormer within 1.5× of plain.
GOAL = 1.5
BGFORMER = {"method": "bgformer", "graph_dim": 128, "k": 5, "alpha": 0.9, "lam": 1.0}


def generate_emoji(root: Path, classes: int, styles: int, size: int) -> None:
    """``classes`` emoji-like drawings (a face: disc, eyes, mouth; its shapes fixed by the
    class) in ``styles`` styles (colours, outline, offset; fixed by the style), written in the
    layout of ``bgf-data emoji`` (``images/<class>/<style>.png`` and ``manifest.jsonl``)."""
    records = []
    for c in range(classes):
        shape = torch.Generator().manual_seed(c)
        eyes, mouth = torch.rand(4, generator=shape), torch.rand(4, generator=shape)
        for s in range(styles):
            style = torch.Generator().manual_seed(10_000 + s)
            fill = tuple(int(v) for v in torch.randint(60, 255, (3,), generator=style))
            ink = tuple(int(v) for v in torch.randint(0, 100, (3,), generator=style))
            shift = int(torch.randint(-size // 16, size // 16 + 1, (), generator=style))
            image = Image.new("RGB", (size, size), "white")
            draw = ImageDraw.Draw(image)
            m = size // 8 + shift
            draw.ellipse([m, m, size - m, size - m], fill=fill, outline=ink,
                         width=1 + s % 3)
            for x in (0.35, 0.65):  # eyes: their height and width drawn from the class
                w, h = size * (0.03 + 0.05 * eyes[0]), size * (0.03 + 0.08 * eyes[1])
                cx, cy = size * x, size * (0.35 + 0.1 * eyes[2])
                draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=ink)
            top = size * (0.55 + 0.1 * mouth[0])
            draw.arc([size * 0.3, top, size * 0.7, top + size * (0.05 + 0.2 * mouth[1])],
                     start=0 if mouth[2] > 0.5 else 180, end=180 if mouth[2] > 0.5 else 360,
                     fill=ink, width=2 + int(3 * mouth[3]))
            path = f"{IMAGES_DIR}/class{c}/style{s}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / path)
            records.append({"path": path, "class": f"class{c}", "style": f"style{s}",
                            "icon": f"class{c}", "package": "generated", "version": "0",
                            "license": "none", "size": size})
    (root / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))


def image_views(config: Config, dataset) -> FeatureDataset:
    """The training split's images under the two views the caches hold (the test-time
    transform and its mirror image), as (2, N, 3, H, W) items drawn as the cached ones are."""
    base, indices = image_list_of(dataset)
    center = build_transform(config.dataset, train=False, options=transform_options(config))
    views = [center, T.Compose([HorizontalFlip(), center])]
    images = torch.stack([torch.stack([view(base.load(i)) for i in indices]) for view in views])
    return FeatureDataset(images, dataset.labels, dataset.class_ids, sample_views=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cache_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="the emoji set of `bgf-data emoji` (default: generated images)")
    parser.add_argument("--classes", type=int, default=128, help="generated classes")
    parser.add_argument("--styles", type=int, default=7, help="generated images per class")
    parser.add_argument("--size", type=int, default=96, help="image side (pixels)")
    parser.add_argument("--cut", type=int, default=1,
                        help="--train-tail: trailing MBConv stages that train (with the head "
                             "convolution)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/tail_training_cpu.json"))
    args = parser.parse_args()
    use_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:
            root = Path(tmp, "emoji")
            generate_emoji(root, args.classes, args.styles, args.size)
        cache = Path(tmp, "cache")  # a cold cache, also for the real emoji set
        base = {"dataset": "emoji", "data_root": str(root), "backbone": "efficientnet_lite0",
                "image_size": args.size, "embedding_dim": 128, "classes_per_batch": 16,
                "samples_per_class": 4, "lr": 3e-4, "val_classes": 0, "select_on": "last",
                "feature_cache": str(cache), "no_progress": True, "device": "cpu",
                "threads": args.threads, "seed": 0}
        without_cache = {k: v for k, v in base.items() if k != "feature_cache"}
        configs = {
            "frozen": configure(**base, method="plain", freeze_backbone=True),
            "tail_cached": configure(**base, method="plain", train_tail=args.cut),
            "tail_every_step": configure(**without_cache, method="plain",
                                         trainable_stages=args.cut + 1),
            "tail_cached_bgformer": configure(**base, **BGFORMER, train_tail=args.cut),
        }
        cpu = torch.device("cpu")
        runs, built = {}, {}
        for name, config in configs.items():
            splits = config_splits(config, check_images="off")
            start = time.perf_counter()
            method, splits = build_run_method(config, splits, cpu)
            built[name] = time.perf_counter() - start  # model, and the caches when cold
            train = image_views(config, splits.train) if name == "tail_every_step" \
                else splits.train
            generator = seed_all(config.seed)
            loader = train_loader(config, train, generator)
            optimizer, _ = build_optimization(config, method)
            runs[name] = (method, loader, optimizer)
        precision = Precision(cpu)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for name, (method, loader, optimizer) in runs.items():
                seconds = timed(lambda m=method, d=loader, o=optimizer: train_one_epoch(
                    m, d, o, precision))
                if round_:
                    times[name].append(round(seconds, 4))
        steps = len(runs["frozen"][1])
        median = {name: statistics.median(t) for name, t in times.items()}
        prefix = runs["tail_cached"][1].dataset.features
        pooled = runs["frozen"][1].dataset.features
        images = prefix.size(1)
        result = {
            "threads": torch.get_num_threads(), "device": "cpu",
            "torch": torch.__version__,
            "images": "emoji" if args.data_root else (
                f"generated: {args.classes} classes × {args.styles} styles"),
            "size": args.size, "cut": args.cut, "train_images": images,
            "batch": "16 × 4", "steps_per_epoch": steps, "repeats": args.repeats,
            "epoch_s": {name: {"median": round(m, 4), "all": times[name]}
                        for name, m in median.items()},
            "step_ms": {name: round(1000 * m / steps, 1) for name, m in median.items()},
            "cache": {
                "prefix_shape": list(prefix.shape[2:]),
                "prefix_bytes_per_image_view": prefix[0, 0].numel() * prefix.element_size(),
                "prefix_files_bytes": cache_bytes(cache, f"*-tail{args.cut}-*.pt"),
                "frozen_files_bytes": cache_bytes(cache, "efficientnet_lite0-[0-9a-f]*.pt"),
                "pooled_bytes_per_image_view": pooled[0, 0].numel() * pooled.element_size(),
                # building the model and computing every split's prefix outputs (training: 2
                # views, test: 1) into a cold cache; building it and reading them; the model alone
                "prefix_cold_build_s": round(built["tail_cached"], 2),
                "prefix_warm_build_s": round(built["tail_cached_bgformer"], 2),
                "model_only_build_s": round(built["tail_every_step"], 2),
                "frozen_cold_build_s": round(built["frozen"], 2),
            },
            "ratios": {
                "tail_cached / frozen": round(median["tail_cached"] / median["frozen"], 2),
                "tail_every_step / tail_cached": round(
                    median["tail_every_step"] / median["tail_cached"], 2),
                "bgformer / plain (tail_cached)": round(
                    median["tail_cached_bgformer"] / median["tail_cached"], 2),
            },
        }
        result["goals"] = {
            f"tail_cached within {GOAL}× of frozen":
                result["ratios"]["tail_cached / frozen"] <= GOAL,
            f"bgformer within {GOAL}× of plain":
                result["ratios"]["bgformer / plain (tail_cached)"] <= GOAL,
        }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
