"""``bgf-train``: train one method on one dataset, evaluate it and print a results table.

Errors a user can cause (a wrong data root, a truncated annotation file, a corrupt image, an
impossible sampling setting) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .checks import InputError
from .data import ClassBalancedBatchSampler, build_dataset, build_transform
from .metrics import evaluate_retrieval
from .models import BACKBONES, LOSSES, METHODS, build_backbone, build_method
from .monitor import TensorBoardLogger
from .train import build_optimizer, fit, seed_all, seed_worker

log = logging.getLogger("bgf_pyg")

DATASETS = ("cub", "cars", "sop", "inshop", "demo")
#: Columns of the results table: (metric key, header).
TABLE_COLUMNS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"),
                 ("recall@8", "R@8"), ("nmi", "NMI"), ("map@r", "MAP@R"))
#: The intra-batch original pools ResNet-50 features with global max pooling.
METHOD_POOLING = {"intra-batch": "max"}
EVAL_BATCH_SIZE = 128
#: P of the intra-batch original's CUB batches (6 classes × 9 samples).
DEFAULT_CLASSES_PER_BATCH = 6
#: --proxy-lr default relative to --lr (proxies move faster than the network, as in the originals).
PROXY_LR_FACTOR = 100.0
EXIT_USAGE = 2
#: Folder of the TensorBoard event files inside the run folder.
TENSORBOARD_DIR = "tensorboard"
#: What a user can cause (bad paths, broken files, impossible settings): one line, exit code 2.
#: Other errors (torch's RuntimeErrors included) are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError, InputError)


def build_parser() -> argparse.ArgumentParser:
    """The ``bgf-train`` argument parser."""
    p = argparse.ArgumentParser(
        prog="bgf-train", description="Train and evaluate a batch-graph metric-learning method."
    )
    p.add_argument("--dataset", choices=DATASETS, default="demo")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for demo)")
    p.add_argument("--method", choices=METHODS, default="bgformer")
    p.add_argument("--loss", choices=LOSSES, default="multi_similarity",
                   help="metric loss of plain and bgformer")
    p.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="default: smallcnn for demo, resnet50 otherwise")
    p.add_argument("--pretrained", default=None, help="local ImageNet state dict of the ResNet")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="random batches (proxygml)")
    p.add_argument("--classes-per-batch", type=int, default=None,
                   help=f"P of a P×M batch (default: {DEFAULT_CLASSES_PER_BATCH}, or every "
                        "class when there are fewer)")
    p.add_argument("--samples-per-class", type=int, default=9, help="M of a P×M batch")
    p.add_argument("--k", type=int, default=30, help="BGFormer's kNN neighbours")
    p.add_argument("--proxies-per-class", type=int, default=12, help="ProxyGML's N")
    p.add_argument("--proxygml-r", type=float, default=0.05,
                   help="ProxyGML's r: it keeps the top ceil(r·C·N) proxies of each sample")
    p.add_argument("--graph-layers", type=int, default=None,
                   help="layers of BGFormer (default 2) or of the intra-batch MPN (default 1)")
    p.add_argument("--graph-heads", type=int, default=None,
                   help="attention heads of BGFormer (default 8) or of the MPN (default 2)")
    p.add_argument("--alpha", type=float, default=None,
                   help="BGFormer: weight of the loss on the backbone features (default 0.5)")
    p.add_argument("--lam", type=float, default=None,
                   help="BGFormer: weight of the visual branch in dual SSA (default 0.5)")
    p.add_argument("--temperature", type=float, default=None,
                   help="intra-batch: logit temperature T (default 0.2, the CUB original)")
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--proxy-lr", type=float, default=None, help="default: 100 × --lr")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-milestones", type=int, nargs="+", default=None, metavar="EPOCH",
                   help="multiply every learning rate by --lr-gamma after these epochs "
                        "(ProxyGML's original: 20 40)")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--out", default=None, help="run folder (default: runs/DATASET-METHOD-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-augment", action="store_true",
                   help="train on test-time transforms (no random augmentation)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="log losses, learning rates, metrics and BGFormer's attention entropy "
                        "to <out>/tensorboard (needs the tensorboard package)")
    return p


@dataclass
class Splits:
    """The datasets of one run: training split, evaluation split(s)."""

    train: Dataset
    test: Dataset
    gallery: Dataset | None = None


def load_splits(dataset: str, root: str | None, augment: bool = True) -> Splits:
    """Training and evaluation splits (In-Shop: query against gallery)."""
    if dataset != "demo" and root is None:
        raise ValueError(f"--data-root is required for --dataset {dataset}")
    train_tf = build_transform(dataset, train=augment)
    test_tf = build_transform(dataset, train=False)
    train = build_dataset(dataset, root, "train", train_tf)
    if dataset == "inshop":
        return Splits(train, build_dataset(dataset, root, "query", test_tf),
                      build_dataset(dataset, root, "gallery", test_tf))
    return Splits(train, build_dataset(dataset, root, "test", test_tf))


def train_loader(
    args: argparse.Namespace, dataset: Dataset, generator: torch.Generator
) -> DataLoader:
    """Random batches for ProxyGML (as the original), class-balanced P×M batches otherwise
    (seeded by ``args.seed``); ``generator`` drives the shuffling and the workers' seeds."""
    common = {"num_workers": args.num_workers, "worker_init_fn": seed_worker,
              "generator": generator}
    if args.method == "proxygml":
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                          **common)
    classes_per_batch = args.classes_per_batch
    if classes_per_batch is None:
        classes_per_batch = min(DEFAULT_CLASSES_PER_BATCH, dataset.num_classes)
    sampler = ClassBalancedBatchSampler(dataset.labels, classes_per_batch,
                                        args.samples_per_class, seed=args.seed)
    return DataLoader(dataset, batch_sampler=sampler, **common)


def eval_loader(args: argparse.Namespace, dataset: Dataset | None) -> DataLoader | None:
    if dataset is None:
        return None
    return DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, num_workers=args.num_workers)


def method_hparams(args: argparse.Namespace) -> dict:
    """The method-specific keyword arguments of :func:`~bgf_pyg.models.build_method` (options
    left unset keep the method's own defaults)."""
    if args.method == "proxygml":
        return {"proxies_per_class": args.proxies_per_class, "r": args.proxygml_r}
    graph = {"num_layers": args.graph_layers, "heads": args.graph_heads}
    if args.method == "bgformer":
        hparams = {"k": args.k, "alpha": args.alpha, "lam": args.lam, **graph}
    elif args.method == "intra-batch":
        hparams = {"temperature": args.temperature, **graph}
    else:
        hparams = {}
    return {name: value for name, value in hparams.items() if value is not None}


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train and evaluate one method as ``args`` says; return the last evaluation's metrics."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone_name = args.backbone or ("smallcnn" if args.dataset == "demo" else "resnet50")
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-s{args.seed}")
    generator = seed_all(args.seed)
    splits = load_splits(args.dataset, args.data_root, augment=not args.no_augment)
    num_classes = splits.train.num_classes
    samples_per_class = None if args.method == "proxygml" else args.samples_per_class
    backbone = build_backbone(backbone_name, args.embedding_dim, args.pretrained,
                              pooling=METHOD_POOLING.get(args.method, "avg"))
    hparams = method_hparams(args)
    method = build_method(args.method, backbone, num_classes, loss=args.loss,
                          samples_per_class=samples_per_class, **hparams)
    proxy_lr = args.proxy_lr if args.proxy_lr is not None else PROXY_LR_FACTOR * args.lr
    optimizer = build_optimizer(method, args.lr, proxy_lr, args.weight_decay)
    scheduler = None
    if args.lr_milestones:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=args.lr_milestones, gamma=args.lr_gamma
        )
    logger = TensorBoardLogger(out / TENSORBOARD_DIR, method) if args.tensorboard else None
    start = time.perf_counter()
    result = fit(
        method, train_loader(args, splits.train, generator), optimizer, out,
        epochs=args.epochs, eval_loader=eval_loader(args, splits.test),
        gallery_loader=eval_loader(args, splits.gallery), scheduler=scheduler, device=device,
        eval_every=args.eval_every, resume=args.resume, amp=args.amp,
        progress=False if args.no_progress else None, callback=logger,
    )
    if logger is not None:  # each epoch flushes, so a run that stops early keeps its curves
        logger.close()
    log.info("%s on %s: %d epochs in %.0f s, best R@1 %.4f at epoch %s; checkpoints in %s",
             args.method, args.dataset, result.epochs, time.perf_counter() - start,
             result.best_metric, result.best_epoch, out)
    return result.last_metrics


def raw_pixel_metrics(dataset: Dataset) -> dict[str, float]:
    """Retrieval metrics of the flattened images themselves (the demo table's baseline row)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).flatten(1)
    return evaluate_retrieval(images, torch.as_tensor(dataset.labels))


def format_table(rows: Sequence[tuple[str, Sequence[dict[str, float]]]]) -> str:
    """A Markdown table, one row per ``(name, [metrics of each seed])``: mean (± std with
    several seeds), in percent."""
    header = "| method | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name, runs in rows:
        cells = []
        for key, _ in TABLE_COLUMNS:
            values = [100 * r[key] for r in runs if key in r]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (callers and tests may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """Show the package's INFO lines (e.g. "backbone is randomly initialised") on stderr."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bgf-train``; returns the exit code (2 for a user error)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        metrics = run(args)
    except USER_ERRORS as err:
        print(f"bgf-train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table([(args.method, [metrics])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
