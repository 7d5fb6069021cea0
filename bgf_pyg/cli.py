"""``bgf-train``: train one method on one dataset, evaluate it and print a results table.

Every option is checked before any work starts (:mod:`bgf_pyg.options`: value domains, the
methods and datasets each option applies to, cross-option rules). Errors a user can cause (a bad
option, a wrong data root, a truncated annotation file, a corrupt image, an impossible sampling
setting, a run folder in use, a diverging loss) end with one line on stderr and exit code 2,
never a traceback.

Under ``torchrun --nproc_per_node W`` every rank runs :func:`main`; they join one process group
(:mod:`bgf_pyg.distributed`), check that they got the same options, draw their own P×M batches
and train one model on the global batch. Rank 0 alone prints the table and writes the run folder;
a user error is reported by every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import statistics
import sys
import textwrap
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from . import distributed
from .checks import InputError, named_parameters, show_value
from .data import (
    DATASETS as IMAGE_DATASETS,
)
from .data import (
    IMAGE_CHECKS,
    ClassBalancedBatchSampler,
    DigitsDemo,
    DistributedClassBalancedBatchSampler,
    ImageListDataset,
    TransformOptions,
    build_dataset,
    build_transform,
    check_image_headers,
)
from .data.emoji import EMOJI_SIZE
from .data.features import HorizontalFlip, cached_features, feature_dataset
from .data.noise import CorruptedTraining
from .data.splits import split_validation
from .data.transforms import INTERPOLATIONS
from .losses.pce import SPACES
from .metrics import evaluate_retrieval
from .models import (
    BACKBONES,
    LOSSES,
    METHODS,
    OPTIMIZERS,
    backbone_normalization,
    build_backbone,
    build_method,
    build_optimizer,
)
from .models.efficientnet import EFFICIENTNET_BACKBONES, NUM_STAGES
from .monitor import TensorBoardLogger
from .nn.bgformer import SEMANTIC_BRANCHES, VISUAL_GRAPHS
from .options import (
    DIVERGENCE_OPTIONS,
    HelpFormatter,
    OneLineParser,
    applies,
    auto_threads,
    device,
    explicit_dests,
    fraction,
    non_negative_float,
    non_negative_int,
    option_name,
    positive_float,
    positive_int,
    probability,
    refinement_list,
    seed_int,
    stage_count,
    val_classes,
    validate,
)
from .presets import available_presets, check_preset, load_preset, preset_title
from .refine.protocol import check_refinements, embed_split, evaluate_refinements, settings
from .run_folder import append_metrics, check_run_folder, read_metrics
from .train import (
    SELECT_ON,
    DivergenceError,
    fit,
    seed_all,
    seed_worker,
    show_progress,
)

log = logging.getLogger("bgf_pyg")

PROG = "bgf-train"
DATASETS = (*IMAGE_DATASETS, "demo")
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
HELP_WIDTH = 90
#: Folder of the frozen backbone's feature cache inside --data-root (unless --feature-cache).
FEATURE_CACHE_DIR = ".features"
#: What a user can cause (bad paths, broken files, impossible settings): one line, exit code 2.
#: Other errors (torch's RuntimeErrors included) are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError, InputError)

#: The demo configuration: the defaults of ``--dataset demo`` (so ``bgf-train`` with no options and
#: ``examples/cub.py`` without ``--data-root`` run the same thing): 30 epochs of 20 class-balanced
#: 8×6 batches (960 images of the 40 training numbers left by the validation split) with the
#: augmentation of ``demo_train_transform``, AdamW at 1e-3, a 64-d embedding.
DEMO_DEFAULTS = {
    "backbone": "smallcnn", "embedding_dim": 64, "epochs": 30, "eval_every": 10, "lr": 1e-3,
    "classes_per_batch": 8, "samples_per_class": 6, "batch_size": 48, "k": 10,
    "proxies_per_class": 12, "proxygml_r": 0.5,
}
#: Each method's own demo settings, chosen on the validation classes with ``bgf-sweep`` (seed 0,
#: validation R@1 of the selected checkpoint; every search and its table is in the README's demo
#: section); they override :data:`DEMO_DEFAULTS`. Plain keeps them (multi-similarity at 1e-3 beat
#: PCE and 3e-4). BGFormer: λ = 1 turns the semantic (label) branch off (with λ = 0.5 or 0.75
#: validation R@1 fell to 0.51–0.78 against 0.94–0.96 without it), α = 0.9 (0.958 against 0.942
#: at 0.5 and 0.80 at 0.1), k = 10 (tied with 20), multi-similarity (PCE 0.71–0.85).
#: Intra-batch: one MPN layer (0.946 against 0.938 for two). ProxyGML: 4 proxies per class
#: (0.979 against 0.962 for the original's 12).
DEMO_METHOD_DEFAULTS: dict[str, dict] = {
    "bgformer": {"lam": 1.0, "alpha": 0.9, "k": 10, "loss": "multi_similarity"},
    "intra-batch": {"graph_layers": 1},
    "proxygml": {"proxies_per_class": 4},
}


def dataset_defaults(dataset: str, given: Collection[str], args: argparse.Namespace) -> dict:
    """The defaults ``dataset`` changes, for the options not in ``given``: the emoji are
    rendered at ``EMOJI_SIZE`` px, so ``--image-size`` is that side and ``--test-resize`` the
    crop's (the test images are the whole emoji, uncropped)."""
    if dataset != "emoji":
        return {}
    size = args.image_size if "image_size" in given else EMOJI_SIZE
    defaults = {"image_size": size, "test_resize": size}
    return {dest: value for dest, value in defaults.items() if dest not in given}


def demo_defaults(method: str) -> dict:
    """The ``--dataset demo`` defaults of ``method``."""
    return {**DEMO_DEFAULTS, **DEMO_METHOD_DEFAULTS.get(method, {})}


#: ``--val-classes`` when not given, with ``--select-on val``: a fifth of the training classes
#: (CUB: 20 of 100, the demo: 10 of 50).
DEFAULT_VAL_FRACTION = 0.2
#: What each ``--select-on`` means, for the caption of the results table.
PROTOCOLS = {
    "val": "checkpoint selected on the validation classes (held-out training classes)",
    "test": "TEST-SELECTED: checkpoint selected on the test split itself, as the originals do",
    "last": "checkpoint of the last epoch",
}
#: Options that may change on ``--resume``; every other one must match the checkpoint's.
RESUMABLE_OPTIONS = frozenset({"epochs", "eval_every", "resume", "overwrite", "out", "data_root",
                               "device", "num_workers", "no_progress", "check_images",
                               "checkpoint_every", "dist_timeout", "list_presets",
                               "feature_cache", "refine", "refine_k", "refine_alpha",
                               "threads"})


def dataset_help() -> str:
    """Each dataset's folder layout and class-id split, for ``--help``."""
    classes = {**IMAGE_DATASETS, "demo": DigitsDemo}
    lines = ["datasets (--data-root is the folder named first; the test classes are unseen):"]
    for name in DATASETS:
        text = f"{classes[name].LAYOUT}; split: {classes[name].SPLIT}"
        lines.append(textwrap.fill(text, HELP_WIDTH, initial_indent=f"  {name:8s}",
                                   subsequent_indent=" " * 10, break_on_hyphens=False))
    demo = " ".join(f"{option_name(k)} {v}" for k, v in DEMO_DEFAULTS.items())
    per_method = "; ".join(
        f"{method}: " + " ".join(f"{option_name(k)} {v}" for k, v in options.items())
        for method, options in DEMO_METHOD_DEFAULTS.items())
    lines += ["", textwrap.fill("with --dataset demo (the default) these defaults change, so that "
                                "bgf-train with no options runs the demo of examples/cub.py: "
                                + demo + (f"; and per method (chosen on the validation "
                                          f"classes), {per_method}" if per_method else ""),
                                HELP_WIDTH),
              "", "a bad option ends with one line naming it and exit code 2, before any work "
              "starts"]
    return "\n".join(lines)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The ``bgf-train`` argument parser (numeric options declare their domain, see
    :mod:`bgf_pyg.options`)."""
    p = OneLineParser(
        prog=prog, description="Train and evaluate a batch-graph metric-learning method.",
        epilog=dataset_help(), formatter_class=HelpFormatter,
    )
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="start from an original's configuration (see --list-presets); explicit "
                        "options override it")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--dataset", choices=DATASETS, default="demo", help="benchmark (see below)")
    p.add_argument("--data-root", default=None, help="dataset folder (not for demo; see below)")
    p.add_argument("--check-images", choices=IMAGE_CHECKS, default="header",
                   help="before training, open every image: read its header (about 0.02 ms an "
                        "image with a warm file cache), decode it (about 2 ms), or skip; missing "
                        "files are always found")
    p.add_argument("--method", choices=METHODS, default="bgformer", help="training method")
    p.add_argument("--loss", choices=LOSSES, default="multi_similarity",
                   help="metric loss of plain and bgformer (pce: Hyp-ViT's pairwise "
                        "cross-entropy, BGFormer's authors' loss)")
    p.add_argument("--pce-space", choices=SPACES, default="sphere",
                   help="pce: similarity on the unit sphere or the Poincaré ball")
    p.add_argument("--hyp-c", type=positive_float, default=0.1, help="pce: curvature of the ball")
    p.add_argument("--clip-r", type=positive_float, default=2.3,
                   help="pce: feature clipping radius before the ball's exponential map")
    p.add_argument("--backbone", choices=BACKBONES, default="resnet50",
                   help="image network (vit_* need the timm extra)")
    p.add_argument("--pretrained", default=None,
                   help="local weights: a torchvision ResNet state dict, a timm / DINO "
                        "checkpoint for a ViT, an EfficientNet-Lite0 state dict (default: random "
                        "weights, efficientnet_lite0: the installed package's ImageNet weights; "
                        "never downloaded)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="keep the pretrained backbone fixed: its features of every image (the "
                        "test-time transform and, unless --no-augment, its mirror image for "
                        "training) are computed once, cached, and the head, graph module and "
                        "loss train on them (fast on a CPU)")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help=f"folder of the cached features (default: <data-root>/{FEATURE_CACHE_DIR})")
    p.add_argument("--trainable-stages", type=stage_count, default=None, metavar="N",
                   help=f"efficientnet_lite0: train only its last N of {NUM_STAGES} stages (1: "
                        f"the head convolution; {NUM_STAGES}: all), the others frozen (default: "
                        "all train)")
    p.add_argument("--backbone-lr", type=positive_float, default=None,
                   help="learning rate of the backbone's trainable layers (default: --lr)")
    p.add_argument("--pooling", choices=("avg", "max"), default=None,
                   help="ResNet global pooling (default: max for intra-batch, avg otherwise)")
    p.add_argument("--graph-dim", type=positive_int, default=None,
                   help="BGFormer: project backbone features to this width before the graph and "
                        "the head, test time included (default: the backbone's own width)")
    p.add_argument("--epochs", type=positive_int, default=30, help="epochs to train in all")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="size of proxygml's random batches")
    p.add_argument("--classes-per-batch", type=positive_int, default=None,
                   help=f"P of a P×M batch (default: {DEFAULT_CLASSES_PER_BATCH}, or every "
                        "class when there are fewer)")
    p.add_argument("--samples-per-class", type=positive_int, default=9, help="M of a P×M batch")
    p.add_argument("--k", type=positive_int, default=30,
                   help="BGFormer's visual neighbours of each sample: the kNN graph's k (below "
                        "the batch size), or attention_topk's K (the sample itself a candidate; "
                        "K >= the batch size: full attention)")
    p.add_argument("--proxies-per-class", type=positive_int, default=12, help="ProxyGML's N")
    p.add_argument("--proxygml-r", type=fraction, default=0.05,
                   help="ProxyGML's r: it keeps the top ceil(r·C·N) proxies of each sample")
    p.add_argument("--graph-layers", type=positive_int, default=None,
                   help="layers of BGFormer (default 2) or of the intra-batch MPN (default 1)")
    p.add_argument("--graph-heads", type=positive_int, default=None,
                   help="attention heads of BGFormer (default 8) or of the MPN (default 2)")
    p.add_argument("--alpha", type=probability, default=None,
                   help="BGFormer: weight of the loss on the backbone features (default 0.5)")
    p.add_argument("--lam", type=probability, default=None,
                   help="BGFormer: weight of the visual branch in dual SSA (default 0.5)")
    p.add_argument("--semantic-branch", choices=SEMANTIC_BRANCHES, default=None,
                   help="BGFormer's semantic branch (default attention; label_propagation is "
                        "the authors' D^-1(A_same + I) W x)")
    p.add_argument("--visual-graph", choices=VISUAL_GRAPHS, default=None,
                   help="BGFormer's visual branch (default knn: attention over the cosine kNN "
                        "graph of the features, fixed for the batch; attention_topk: the authors' "
                        "form, each layer and head keeps every sample's --k largest attention "
                        "scores in the batch)")
    p.add_argument("--detach-graph-input", action=argparse.BooleanOptionalAction, default=False,
                   help="BGFormer: feed the graph blocks detached features, so the backbone "
                        "learns from the loss on its own features alone (off: end to end, as "
                        "the paper)")
    p.add_argument("--mpn-cat", action=argparse.BooleanOptionalAction, default=False,
                   help="intra-batch: concatenate every MPN layer's output (the Cars original)")
    p.add_argument("--proxygml-lambda", type=non_negative_float, default=None,
                   help="ProxyGML's weight of the proxy regulariser (default 0.3)")
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="intra-batch: logit temperature T; pce: τ (default 0.2 for both)")
    p.add_argument("--embedding-dim", type=positive_int, default=512,
                   help="width of the embedding head")
    p.add_argument("--lr", type=positive_float, default=1e-4,
                   help="AdamW learning rate of the networks")
    p.add_argument("--proxy-lr", type=positive_float, default=None,
                   help=f"learning rate of the loss's proxies (default: {PROXY_LR_FACTOR:g} × "
                        "--lr)")
    p.add_argument("--graph-lr", type=positive_float, default=None,
                   help="learning rate of the graph module (BGFormer, the MPN; default: --lr)")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                   help="weight decay of the optimiser")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adam: coupled L2 decay (ProxyGML); radam: decoupled (intra-batch)")
    p.add_argument("--adam-eps", type=positive_float, default=1e-8, help="the optimiser's epsilon")
    p.add_argument("--clip-grad", type=positive_float, default=None,
                   help="clip the gradients' global norm to this value (default: no clipping)")
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the backbone's BatchNorm statistics frozen while training")
    p.add_argument("--lr-milestones", type=positive_int, nargs="+", default=None, metavar="EPOCH",
                   help="multiply every learning rate by --lr-gamma after these epochs "
                        "(strictly increasing, below --epochs; ProxyGML's original: 19 39, "
                        "i.e. from its 20th and 40th epoch)")
    p.add_argument("--lr-gamma", type=fraction, default=0.1,
                   help="factor of each --lr-milestones step")
    p.add_argument("--out", default=None, help="run folder (default: runs/DATASET-METHOD-sSEED)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (same options; --epochs may "
                        "grow)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="also write last.pt every STEPS steps inside an epoch (P×M batches "
                        "only), so --resume continues mid-epoch")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, such a folder is refused)")
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds every random choice")
    p.add_argument("--eval-every", type=positive_int, default=5,
                   help="evaluate the selection split every N epochs (and after the last)")
    p.add_argument("--val-classes", type=val_classes, default=None, metavar="FRACTION_OR_COUNT",
                   help="hold out this fraction (in (0, 1)) or number of the training classes as "
                        "the validation split; 0: none (default: "
                        f"{DEFAULT_VAL_FRACTION:g} of them with --select-on val; 0 "
                        "otherwise)")
    p.add_argument("--label-noise", type=probability, default=0.0, metavar="FRACTION",
                   help="robustness studies: flip this fraction of the training labels to "
                        "another class (seeded by --seed; validation and test stay clean)")
    p.add_argument("--outliers", type=probability, default=0.0, metavar="FRACTION",
                   help="robustness studies: add uniform-noise images with random labels to "
                        "the training split, this fraction of its size (seeded by --seed)")
    p.add_argument("--val-seed", type=seed_int, default=0,
                   help="seeds which training classes are held out (independent of --seed, so "
                        "every seed of a sweep sees the same split)")
    p.add_argument("--select-on", choices=SELECT_ON, default="val",
                   help="the checkpoint whose test metrics are reported: best on the validation "
                        "classes, best on the test split (the originals' protocol; labelled "
                        "test-selected), or the last epoch's")
    add_refine_options(p, "after training, evaluate the selected checkpoint")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="DataLoader worker processes")
    p.add_argument("--no-augment", action="store_true",
                   help="train on test-time transforms (no random augmentation)")
    p.add_argument("--image-size", type=positive_int, default=224,
                   help=f"crop side (and a ViT's input); --dataset emoji: {EMOJI_SIZE}")
    p.add_argument("--crop-scale", type=fraction, nargs=2, default=[0.08, 1.0],
                   metavar=("MIN", "MAX"), help="area range of the random resized crop")
    p.add_argument("--interpolation", choices=tuple(INTERPOLATIONS), default="bilinear",
                   help="resampling of crops and resizes")
    p.add_argument("--test-resize", type=positive_int, default=None,
                   help="test-time resize before the centre crop (default: size·256/224; "
                        "--dataset emoji: the crop side)")
    p.add_argument("--random-erasing", type=probability, default=0.0,
                   help="probability of random erasing in training (intra-batch: 0.5)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision (CUDA only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="log losses, learning rates, metrics and BGFormer's attention entropy "
                        "to <out>/tensorboard (needs the tensorboard package)")
    p.add_argument("--dist-timeout", type=positive_float, default=distributed.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="under torchrun: how long a rank waits for the others "
                   "before failing")
    add_threads_option(p)
    return p


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads`` (shared with ``bgf-eval``)."""
    p.add_argument("--threads", type=positive_int, default=auto_threads(), metavar="N",
                   help="CPU threads of torch's operations in this process; more than the free "
                        "cores slows a run several times over on a shared machine, and results "
                        "may differ in the last bits with the count (on CUDA it matters little). "
                        "Auto: OMP_NUM_THREADS when set, else half the CPUs this process may "
                        "use, divided among torchrun's processes on the node, at least 1 "
                        "(default: %(default)s, the auto count here)")


def use_threads(count: int) -> None:
    """Run torch's CPU operations on ``count`` threads (``--threads``): intra-op always,
    inter-op too while torch still allows it (only before its first parallel work)."""
    torch.set_num_threads(count)
    if torch.get_num_interop_threads() != count:
        # once started, the inter-op pool keeps its count (it runs few of the operations)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(count)


def parse_args(
    argv: Sequence[str] | None = None,
    methods: Collection[str] | None = None,
    prog: str = PROG,
) -> argparse.Namespace:
    """Parse, resolve the defaults (the demo's for ``--dataset demo``, the device, ``--out``) and
    validate ``argv``; a bad option exits with one line and code 2. ``methods``: the methods these
    options are used for (``examples/cub.py --method all``), for the option-scope check."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list_presets:
        print(format_presets())
        parser.exit(0)
    explicit = explicit_dests(lambda: build_parser(prog), argv)
    preset: dict = {}
    if args.preset is not None:  # defaults < preset < explicit options
        try:
            values = load_preset(args.preset)
        except InputError as err:
            parser.error(f"argument --preset: {err}")
        try:
            preset = check_preset(values, parser, args.preset)
        except InputError as err:
            parser.error(str(err))
        for dest, value in preset.items():
            if dest not in explicit:
                setattr(args, dest, value)
        if "lr_milestones" in preset and "lr_milestones" not in explicit:
            # a preset's schedule cut short by --epochs keeps the steps that fall inside the run
            kept = [m for m in args.lr_milestones if m < args.epochs]
            if len(kept) < len(args.lr_milestones):
                print_note(prog, f"--epochs {args.epochs} ends before the preset's "
                                 f"--lr-milestones {' '.join(map(str, args.lr_milestones))}; "
                                 f"keeping {' '.join(map(str, kept)) or 'none'}")
            args.lr_milestones = kept or None
    if args.dataset == "demo":
        for dest, value in demo_defaults(args.method).items():
            if dest not in explicit and dest not in preset:
                setattr(args, dest, value)
    for dest, value in dataset_defaults(args.dataset, {*explicit, *preset}, args).items():
        setattr(args, dest, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if preset.get("amp") and "amp" not in explicit and torch.device(args.device).type != "cuda":
        # a recipe's mixed precision is a GPU setting: on CPU it trains in float32 (an explicit
        # --amp on CPU is still refused)
        print_note(prog, f"preset {args.preset} uses mixed precision, which needs CUDA; "
                         f"training in float32 on {args.device}")
        args.amp = False
    if args.out is None:
        args.out = f"runs/{args.dataset}-{args.method}-s{args.seed}"
    if args.proxy_lr is None:
        args.proxy_lr = PROXY_LR_FACTOR * args.lr
    if args.val_classes is None:
        args.val_classes = DEFAULT_VAL_FRACTION if args.select_on == "val" else 0
    validate(parser, args, explicit, methods)
    return args


def print_note(prog: str, message: str) -> None:
    """One line on stderr about a value the run resolved differently from what was asked."""
    print(f"{prog}: note: {message}", file=sys.stderr)


def format_presets() -> str:
    """One line per shipped preset: its name and description."""
    names = available_presets()
    width = max(map(len, names))
    return "\n".join(f"{name:<{width}}  {preset_title(name)}" for name in names)


def resolved_options(args: argparse.Namespace) -> dict:
    """Every resolved option of a run (defaults < preset < explicit), as the log and the first
    line of ``metrics.jsonl`` record them."""
    return {k: v for k, v in sorted(vars(args).items()) if k != "list_presets"}


def run_config(args: argparse.Namespace) -> dict:
    """The options a resumed run must share with its checkpoint, by option name."""
    return {option_name(k): v for k, v in sorted(vars(args).items())
            if k not in RESUMABLE_OPTIONS}


@dataclass
class Splits:
    """The datasets of one run: training split, evaluation split(s), and the validation split
    of held-out training classes (``val_class_ids``: their original ids) when there is one."""

    train: Dataset
    test: Dataset
    gallery: Dataset | None = None
    val: Dataset | None = None
    val_class_ids: list | None = None


def load_splits(
    dataset: str,
    root: str | None,
    augment: bool = True,
    check_images: str = "off",
    options: TransformOptions | None = None,
    val_classes: float = 0,
    val_seed: int = 0,
    label_noise: float = 0.0,
    outliers: float = 0.0,
    corruption_seed: int = 0,
) -> Splits:
    """Training and evaluation splits (In-Shop: query against gallery), transformed as
    ``options`` says, and with ``val_classes`` the validation split taken from the training
    classes (:func:`~bgf_pyg.data.splits.split_validation`); with ``check_images`` every image
    is opened now (:func:`~bgf_pyg.data.check_image_headers`). ``label_noise`` and
    ``outliers`` corrupt what remains for training
    (:class:`~bgf_pyg.data.noise.CorruptedTraining`, seeded by ``corruption_seed``)."""
    train_tf = build_transform(dataset, train=augment, options=options)
    test_tf = build_transform(dataset, train=False, options=options)
    train = build_dataset(dataset, root, "train", train_tf)
    if dataset == "inshop":
        splits = Splits(train, build_dataset(dataset, root, "query", test_tf),
                        build_dataset(dataset, root, "gallery", test_tf))
    else:
        splits = Splits(train, build_dataset(dataset, root, "test", test_tf))
    if val_classes:  # before the image checks: a bad --val-classes is found at once
        splits.train, splits.val, splits.val_class_ids = split_validation(
            train, val_classes, val_seed, train_transform=train_tf, val_transform=test_tf)
    for split in (train, splits.test, splits.gallery):
        if isinstance(split, ImageListDataset):
            check_image_headers(split, check_images)
    if label_noise or outliers:
        splits.train = CorruptedTraining(splits.train, label_noise, outliers, corruption_seed)
    return splits


def frozen_splits(
    args: argparse.Namespace, splits: Splits, trunk: nn.Module, device: torch.device
) -> Splits:
    """``splits`` as datasets of the frozen ``trunk``'s features
    (:class:`~bgf_pyg.data.features.FeatureDataset`), read from or written to the feature cache
    (:func:`~bgf_pyg.data.features.cached_features`). Every split gets the features of the
    dataset's test-time transform; the training split also those of its mirror image (unless
    ``--no-augment``), one of the two drawn at random for each item. Under torch.distributed
    rank 0 fills the cache and every rank reads it."""
    test_view = build_transform(args.dataset, train=False, options=transform_options(args))
    train_views = [test_view] if args.no_augment else [test_view,
                                                       T.Compose([HorizontalFlip(), test_view])]
    cache_dir = Path(args.feature_cache or Path(args.data_root) / FEATURE_CACHE_DIR)
    progress = show_progress(False if args.no_progress else None) and distributed.is_main_process()
    trunk.to(device)

    # The training and validation splits share one image list: read its features once.
    read: dict[tuple[int, int], torch.Tensor] = {}

    def features_of(images: ImageListDataset, transform) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return cached_features(images, trunk, transform, cache_dir, name=args.backbone,
                                   device=device, progress=progress)

        key = (id(images), id(transform))
        if key not in read:
            if distributed.is_distributed():
                distributed.run_on_main(lambda: compute() is None)  # rank 0 writes the cache
            read[key] = compute()
        return read[key]

    def convert(dataset: Dataset | None, views: list, sample_views: bool = False):
        if dataset is None:
            return None
        return feature_dataset(dataset, features_of, views, sample_views=sample_views)

    return Splits(convert(splits.train, train_views, sample_views=len(train_views) > 1),
                  convert(splits.test, [test_view]), convert(splits.gallery, [test_view]),
                  convert(splits.val, [test_view]), splits.val_class_ids)


def evaluation_plan(args: argparse.Namespace, splits: Splits) -> dict:
    """The keyword arguments of :func:`~bgf_pyg.train.fit` that say what is evaluated when:
    the selection split every ``--eval-every`` epochs, the test split once at the end (unless it
    is the selection split, ``--select-on test``)."""
    test = {"test_loader": eval_loader(args, splits.test),
            "test_gallery_loader": eval_loader(args, splits.gallery)}
    if args.select_on == "test":
        return {"eval_loader": test["test_loader"], "gallery_loader": test["test_gallery_loader"],
                "eval_split": "test"}
    return {"eval_loader": eval_loader(args, splits.val), "eval_split": "val", **test}


def results_caption(args: argparse.Namespace) -> str:
    """The line above a results table: which split and which protocol produced it."""
    val = (f"; validation classes: --val-classes {args.val_classes} --val-seed {args.val_seed}"
           if args.val_classes else "")
    return f"Test-split retrieval, in %; {PROTOCOLS[args.select_on]}{val}"


def row_name(args: argparse.Namespace) -> str:
    """A results-table row's name: the method, marked when its checkpoint was chosen on the
    test split."""
    return f"{args.method} (test-selected)" if args.select_on == "test" else args.method


def check_against_data(args: argparse.Namespace, train: Dataset) -> None:
    """The sampling options against the training split's size and classes, before the model is
    built (``bgf-sweep`` runs it on every combination before its first run)."""
    if args.method == "proxygml" and args.batch_size > len(train):
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train)} training "
                         "images, so an epoch would have no batch")
    if (args.method != "proxygml" and args.classes_per_batch is not None
            and args.classes_per_batch > train.num_classes):
        raise ValueError(f"--classes-per-batch {args.classes_per_batch} exceeds the "
                         f"{train.num_classes} training classes")


def train_loader(
    args: argparse.Namespace, dataset: Dataset, generator: torch.Generator
) -> DataLoader:
    """Random batches for ProxyGML (as the original), class-balanced P×M batches otherwise
    (seeded by ``args.seed``); ``generator`` drives the shuffling and the workers' seeds."""
    common = {"num_workers": args.num_workers, "worker_init_fn": seed_worker,
              "generator": generator}
    world = distributed.get_world_size()
    if args.method == "proxygml":
        if world == 1:
            return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              **common)
        # Each rank a disjoint 1/W of a seeded permutation: --batch-size rows per rank and step.
        shards = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
        return DataLoader(dataset, batch_size=args.batch_size, sampler=shards, drop_last=True,
                          **common)
    p = classes_per_batch(args, dataset.num_classes)
    if world == 1:
        sampler = ClassBalancedBatchSampler(dataset.labels, p, args.samples_per_class,
                                            seed=args.seed)
    else:
        sampler = DistributedClassBalancedBatchSampler(dataset.labels, p, args.samples_per_class,
                                                       seed=args.seed)
    return DataLoader(dataset, batch_sampler=sampler, **common)


def classes_per_batch(args: argparse.Namespace, num_classes: int) -> int:
    """P of each rank's P×M batch: ``--classes-per-batch``, else the default P or as many as
    the ranks can draw disjointly."""
    if args.classes_per_batch is not None:
        return args.classes_per_batch
    return max(1, min(DEFAULT_CLASSES_PER_BATCH, num_classes // distributed.get_world_size()))


def check_batch_graph_k(args: argparse.Namespace, num_classes: int) -> None:
    """BGFormer's ``--k`` neighbours come from the other samples of the *global* batch (every
    rank's P×M batch together): refuse a kNN graph's k it cannot supply."""
    if args.method != "bgformer" or args.visual_graph == "attention_topk":
        return  # a top-K of K >= the batch is full attention
    world, p = distributed.get_world_size(), classes_per_batch(args, num_classes)
    batch = world * p * args.samples_per_class
    if args.k >= batch:
        raise ValueError(
            f"--k {args.k} must be smaller than the global batch of {batch} samples "
            f"({world} process(es) × {p} classes × "
            f"{args.samples_per_class} samples): each sample's neighbours are other samples"
        )


def eval_loader(args: argparse.Namespace, dataset: Dataset | None) -> DataLoader | None:
    if dataset is None:
        return None
    return DataLoader(distributed.shard(dataset), batch_size=EVAL_BATCH_SIZE,
                      num_workers=args.num_workers)


def method_hparams(args: argparse.Namespace) -> dict:
    """The method-specific keyword arguments of :func:`~bgf_pyg.models.build_method` (options
    left unset keep the method's own defaults)."""
    if args.method == "proxygml":
        hparams = {"proxies_per_class": args.proxies_per_class, "r": args.proxygml_r,
                   "weight_lambda": args.proxygml_lambda}
        return {name: value for name, value in hparams.items() if value is not None}
    graph = {"num_layers": args.graph_layers, "heads": args.graph_heads}
    if args.method == "bgformer":
        hparams = {"k": args.k, "alpha": args.alpha, "lam": args.lam,
                   "semantic_branch": args.semantic_branch, "visual_graph": args.visual_graph,
                   "detach_graph_input": args.detach_graph_input, **graph}
    elif args.method == "intra-batch":
        hparams = {"temperature": args.temperature, "cat": args.mpn_cat, **graph}
    else:
        hparams = {}
    return {name: value for name, value in hparams.items() if value is not None}


def loss_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of the ``pce`` loss (none for the other losses)."""
    if args.loss != "pce":
        return {}
    options = {"space": args.pce_space, "c": args.hyp_c, "clip_r": args.clip_r}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    return options


def transform_options(args: argparse.Namespace) -> TransformOptions:
    """The image pipeline the options describe, normalised for the backbone's weight family."""
    mean, std = backbone_normalization(args.backbone)
    return TransformOptions(
        size=args.image_size, crop_scale=tuple(args.crop_scale),
        interpolation=args.interpolation, test_resize=args.test_resize,
        random_erasing=args.random_erasing, mean=mean, std=std,
    )


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train and evaluate one method as ``args`` (from :func:`parse_args`) says; return the last
    evaluation's metrics."""
    use_threads(args.threads)
    device = distributed.init_distributed(args.device, args.dist_timeout)
    # each rank its own --threads default (its CPUs)
    distributed.check_same_on_all_ranks(
        {k: v for k, v in vars(args).items() if k != "threads"}, "options")
    out = Path(args.out)
    check_run_folder(out, args.resume, args.overwrite)  # before any data is read
    # The same seed on every rank: identical initial weights and identical dropout masks in the
    # batch-level part, which every rank computes on the same global batch.
    generator = seed_all(args.seed)
    generator.manual_seed(args.seed + distributed.get_rank())  # per-rank worker augmentation
    splits = load_splits(args.dataset, args.data_root, augment=not args.no_augment,
                         check_images=args.check_images, options=transform_options(args),
                         val_classes=args.val_classes, val_seed=args.val_seed,
                         label_noise=args.label_noise, outliers=args.outliers,
                         corruption_seed=args.seed)
    check_against_data(args, splits.train)
    if (not args.resume and args.pretrained is None
            and args.backbone not in EFFICIENTNET_BACKBONES):
        log.info("%s backbone is randomly initialised (no --pretrained weights file given)",
                 args.backbone)
    method, splits = build_run_method(args, splits, device)
    check_batch_graph_k(args, splits.train.num_classes)
    check_refine_request(args, method, splits)
    train = train_loader(args, splits.train, generator)  # its checks run before any training
    optimizer = build_optimizer(method, args.lr, args.proxy_lr, args.weight_decay,
                                graph_lr=args.graph_lr, backbone_lr=args.backbone_lr,
                                name=args.optimizer, eps=args.adam_eps)
    scheduler = None
    if args.lr_milestones:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=args.lr_milestones, gamma=args.lr_gamma
        )
    # Rank 0 alone writes the run folder, event files included.
    logger = (TensorBoardLogger(out / TENSORBOARD_DIR, method)
              if args.tensorboard and distributed.is_main_process() else None)
    header = {**resolved_options(args), "val_class_ids": splits.val_class_ids}
    log.info("configuration: %s", json.dumps(resolved_options(args)))
    start = time.perf_counter()
    result = fit(
        method, train, optimizer, out,
        epochs=args.epochs, scheduler=scheduler, device=device, eval_every=args.eval_every,
        resume=args.resume, overwrite=args.overwrite,
        config={**run_config(args), "val_class_ids": splits.val_class_ids,
                "threads": torch.get_num_threads(), "data_root": args.data_root,
                "feature_cache": args.feature_cache}, amp=args.amp,
        progress=False if args.no_progress else None, callback=logger,
        checkpoint_every=args.checkpoint_every,
        clip_grad=args.clip_grad, freeze_bn=args.freeze_bn,
        header=header,
        select_on=args.select_on, **evaluation_plan(args, splits),
    )
    if logger is not None:  # each epoch flushes, so a run that stops early keeps its curves
        logger.close()
    if args.refine != ["none"]:
        log_refinements(args, evaluate_refine_request(args, method, splits, device),
                        result.epochs, result.selected_epoch)
    trained = result.epochs - result.start_epoch
    log.info("%s on %s: trained %s (%s) in %.0f s; test R@1 %.4f with the weights of epoch %s "
             "(%s); checkpoints in %s", row_name(args), args.dataset, plural(trained, "epoch"),
             f"{result.start_epoch + 1}–{result.epochs}" if trained else "none left",
             time.perf_counter() - start, result.test_metrics["recall@1"], result.selected_epoch,
             PROTOCOLS[args.select_on], out)
    return result.test_metrics


def build_run_method(
    args: argparse.Namespace, splits: Splits, device: torch.device
) -> tuple[nn.Module, Splits]:
    """The (untrained) method the options describe, and the splits it reads: with
    ``--freeze-backbone`` the splits of the frozen trunk's cached features, the trunk itself then
    replaced by ``Identity`` (the head, graph module and loss train on those features)."""
    samples_per_class = None if args.method == "proxygml" else args.samples_per_class
    backbone = build_backbone(args.backbone, args.embedding_dim, args.pretrained,
                              pooling=args.pooling or METHOD_POOLING.get(args.method, "avg"),
                              in_channels=1 if args.dataset == "demo" else 3,
                              graph_dim=args.graph_dim, image_size=args.image_size,
                              trainable_stages=args.trainable_stages)
    if args.freeze_backbone:
        splits = frozen_splits(args, splits, backbone.trunk, device)
        backbone.trunk = nn.Identity()
    method = build_method(args.method, backbone, splits.train.num_classes, loss=args.loss,
                          samples_per_class=samples_per_class, loss_options=loss_options(args),
                          **method_hparams(args))
    return method, splits


# ---------------------------------------------------------------------------- refinement


def add_refine_options(p: argparse.ArgumentParser, when: str) -> None:
    """``--refine``, ``--refine-k`` and ``--refine-alpha`` (shared with ``bgf-eval``)."""
    p.add_argument("--refine", type=refinement_list, default=["none"], metavar="NAMES",
                   help=f"{when} with each of these test-time refinements of the test set on "
                        "its kNN graph, comma-separated: none, qe (query expansion), bgformer "
                        "(the trained BGFormer's visual branch); one results row each")
    p.add_argument("--refine-k", type=positive_int, nargs="+", default=None, metavar="K",
                   help="neighbours of the refinement; several values are a grid, chosen on the "
                        "validation classes (default: qe 10, bgformer the training --k)")
    p.add_argument("--refine-alpha", type=non_negative_float, nargs="+", default=None,
                   metavar="ALPHA", help="query expansion's similarity exponent (0: plain "
                   "mean); several values are a grid, chosen on the validation classes "
                   "(default: 3)")


def check_refine_request(args: argparse.Namespace, method, splits: Splits) -> None:
    """Refuse, before any training or embedding, a refinement that cannot run on these sets."""
    if args.refine == ["none"]:
        return
    if distributed.is_distributed():
        raise ValueError("--refine runs in one process: evaluate the finished run with bgf-eval "
                         "instead of under torchrun")
    sizes = [len(d) for d in (splits.test, splits.gallery, splits.val) if d is not None]
    for name in args.refine:
        for setting in settings(name, method, args.refine_k, args.refine_alpha):
            if setting.get("k", 0) >= min(sizes):
                raise ValueError(f"--refine-k {setting['k']} ({name}) must be smaller than the "
                                 f"smallest set refined ({min(sizes)} items): an item's "
                                 "neighbours are other items")
    check_refinements(args.refine, method, args.refine_k, args.refine_alpha, sizes,
                      splits.val is not None)


def evaluate_refine_request(args: argparse.Namespace, method, splits: Splits,
                            device: torch.device) -> list[dict]:
    """The records of :func:`~bgf_pyg.refine.protocol.evaluate_refinements` for ``--refine``
    with the model's current weights."""
    test = embed_split(method, eval_loader(args, splits.test), device,
                       eval_loader(args, splits.gallery))
    val = None if splits.val is None else embed_split(method, eval_loader(args, splits.val),
                                                       device)
    return evaluate_refinements(method, test, val, args.refine, ks=args.refine_k,
                                alphas=args.refine_alpha)


def log_refinements(args: argparse.Namespace, records: list[dict], epochs: int,
                    selected_epoch: int | None) -> None:
    """Append the refinement records to ``metrics.jsonl`` as final records (rank 0)."""
    if not distributed.is_main_process():
        return
    for record in records:
        append_metrics(args.out, {"epoch": epochs, "final": True, "select_on": args.select_on,
                                  "selected_epoch": selected_epoch, **record})


def refinement_row(name: str, record: dict) -> str:
    """A results row's name: the model, the refinement and the setting it used."""
    setting = ", ".join(f"{key[len('refine_'):].replace('alpha', 'α')} {value:g}"
                        for key, value in record.items() if key in ("refine_k", "refine_alpha"))
    return f"{name}, refine {record['refine']}" + (f" ({setting})" if setting else "")


def refinement_tables(name: str, records: list[dict]) -> str:
    """The test table (one row per refinement, its setting chosen on validation) and, when
    there is one, the validation grid it was chosen from."""
    test = [(refinement_row(name, r), [r]) for r in records if r["split"] == "test"]
    val = [(refinement_row(name, r), [r]) for r in records if r["split"] == "val"]
    text = format_table(test)
    if val:
        text += ("\n\nValidation classes (each refinement's setting is the best of these by "
                 "R@1):\n" + format_table(val))
    return text


def plural(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def with_option_names(message: str, parameters: Collection[str]) -> str:
    """``message`` of a library error with the ``parameters`` it names (see
    :func:`~bgf_pyg.checks.naming`) written as this command's options: ``resume=True`` →
    ``--resume``, ``samples_per_class=1`` → ``--samples-per-class 1``, and a name with an
    underscore (never an English word) alone, ``classes_per_batch`` → ``--classes-per-batch``."""
    for name in parameters:
        flag = option_name(name)
        word = rf"(?<![\w\-/\\.]){name}"  # not part of a longer name, an option or a path
        message = re.sub(rf"{word}=True\b", flag, message)
        message = re.sub(rf"{word}=", f"{flag} ", message)
        if "_" in name:
            message = re.sub(rf"{word}(?![\w\-/\\]|\.\w)", flag, message)
    return message


def error_message(err: BaseException, args: argparse.Namespace) -> str:
    """The one-line message of a user error, the library parameters it names written as options;
    a diverging loss also names the options that set the run's step size and logit scale."""
    message = with_option_names(" ".join(str(err).split("\n")), named_parameters(err))
    if isinstance(err, DivergenceError):
        options = ", ".join(f"{option_name(d)} {show_value(getattr(args, d))}"
                            for d in DIVERGENCE_OPTIONS if applies(d, args))
        message += (f"; the options that set this run's step size and logit scale are {options}"
                    " (a smaller learning rate usually fixes it)")
    return message


def raw_pixel_metrics(dataset: Dataset) -> dict[str, float]:
    """Retrieval metrics of the flattened images themselves (the demo table's baseline row)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).flatten(1)
    return evaluate_retrieval(images, torch.as_tensor(dataset.labels))


def format_cell(values: Sequence[float]) -> str:
    """A table cell of fractions in percent: the value, mean ± std over several, – for none."""
    percent = [100 * v for v in values]
    if not percent:
        return "–"
    if len(percent) == 1:
        return f"{percent[0]:.1f}"
    return f"{statistics.mean(percent):.1f} ± {statistics.stdev(percent):.1f}"


def format_table(rows: Sequence[tuple[str, Sequence[dict[str, float]]]]) -> str:
    """A Markdown table, one row per ``(name, [metrics of each seed])``: mean (± std with
    several seeds), in percent."""
    header = "| method | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for name, runs in rows:
        cells = [format_cell([r[key] for r in runs if key in r]) for key, _ in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (callers and tests may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """Show the package's INFO lines (e.g. "resumed from ...") on stderr; under torchrun only rank
    0's (the others log warnings and errors)."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO if distributed.launcher_rank() == 0 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bgf-train``; returns the exit code (2 for a user error)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad option (2), already printed
        return int(exit_.code or 0)
    setup_logging()
    try:
        metrics = run(args)
    except USER_ERRORS as err:
        where = (f"[rank {distributed.launcher_rank()}] " if distributed.launched_distributed()
                 else "")
        print(f"{PROG}: error: {where}{error_message(err, args)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        distributed.destroy_distributed()
    if distributed.launcher_rank() == 0:
        print(results_caption(args))
        if args.refine == ["none"]:
            print(format_table([(row_name(args), [metrics])]))
        else:
            records = [r for r in read_metrics(args.out) if r.get("final") and "refine" in r]
            print(refinement_tables(row_name(args), records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
