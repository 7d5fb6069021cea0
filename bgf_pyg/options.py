"""Validation of ``bgf-train``'s options: one declarative table, checked before any work starts.

Every user error in the options ends as one line on stderr, ``bgf-train: error: ...`` naming the
option, and exit code 2 (:class:`OneLineParser`). Three kinds of rule, each declared in one line per
option, so a new option is covered by registering it:

1. **Value** — the option's ``type=`` is a :class:`Number` (or :func:`device`): a declared domain
   such as :data:`positive_int` (≥ 1), :data:`non_negative_float` (≥ 0), :data:`positive_float`
   (finite, > 0), :data:`probability` ([0, 1]), :data:`fraction` ((0, 1]) or :data:`seed_int`.
   NaN and ±inf are never accepted. Example::

       p.add_argument("--clip-grad", type=positive_float, default=None, help="...")

   ``tests/test_cli_validation.py`` enumerates every numeric option of the parser and checks 0, -1,
   NaN and ±inf against the declared domain, so an option declared with a bare ``int``/``float``
   fails that test.
2. **Scope** — :data:`SCOPES` maps an option's ``dest`` to where it is read (methods, datasets,
   losses, backbones, or another option it needs). Setting it explicitly where it is ignored (say
   ``--proxies-per-class`` with ``--method bgformer``) is an error. One line per option::

       SCOPES["graph_lr"] = (Scope(method=("bgformer",)),)

   Options missing from the table apply everywhere. Only options given on the command line are
   checked (:func:`explicit_dests`): defaults, the demo's defaults and values a preset supplies
   never trip it. ``examples/cub.py --method all`` passes ``methods``: an option read by any one
   of them is accepted.
3. **Cross-option rules** — small functions in :data:`RULES` (increasing ``--lr-milestones`` below
   ``--epochs``, ``--resume`` with ``--overwrite``, ``--amp`` without CUDA); each returns an error
   message or ``None``.

:data:`DIVERGENCE_OPTIONS` lists the options a diverging (non-finite) loss names as likely causes.
:class:`HelpFormatter` appends every option's default to its help text (every option needs one;
the tests check both).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from .checks import InputError, show_value
from .data import DATASETS
from .models.efficientnet import EFFICIENTNET_BACKBONES, NUM_STAGES, import_efficientnet
from .models.methods import PROXY_LOSSES, BGFormerMethod
from .models.vit import VIT_BACKBONES, import_timm
from .refine import REFINEMENTS

SEED_MAX = 2**32 - 1  # NumPy's seed range


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Number:
    """An argparse ``type=``: parse ``kind`` (``int`` or ``float``) and require a finite value in
    the declared interval (``None``: unbounded; ``*_open``: the bound itself is excluded)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the domain (NaN and ±inf never do)."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return not (self.high is not None
                    and (value > self.high or self.high_open and value == self.high))

    @property
    def expected(self) -> str:
        """The domain in words, e.g. ``an integer >= 1`` or ``a finite number in (0, 1]``."""
        what = "an integer" if self.kind is int else "a finite number"
        low, high = (None if b is None else f"{b:g}" if self.kind is float else str(int(b))
                     for b in (self.low, self.high))
        if low is not None and high is not None:
            return (f"{what} in {'(' if self.low_open else '['}{low}, "
                    f"{high}{')' if self.high_open else ']'}")
        if low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return what

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}")
        return value


positive_int = Number(int, low=1)
non_negative_int = Number(int, low=0)
seed_int = Number(int, low=0, high=SEED_MAX)
positive_float = Number(float, low=0, low_open=True)
non_negative_float = Number(float, low=0)
probability = Number(float, low=0, high=1)
fraction = Number(float, low=0, high=1, low_open=True)
#: ``--trainable-stages``: the last 1 to all of EfficientNet-Lite0's stages.
stage_count = Number(int, low=1, high=NUM_STAGES)


def auto_threads(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """``--threads``' default: ``OMP_NUM_THREADS`` when it is set to a count (a per-process
    setting: torchrun sets it to 1), else half the ``cpus`` this process may run on (default:
    ``os.sched_getaffinity``), divided among torchrun's ``LOCAL_WORLD_SIZE`` processes; at
    least 1. Half, because torch's own default (one thread per core) stalls when another
    process holds a core: every parallel operation waits for its slowest thread."""
    environ = os.environ if environ is None else environ
    first = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2": nested levels
    if first.isdigit() and int(first) > 0:
        return int(first)
    if cpus is None:
        cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
    local = environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cpus // 2 // (int(local) if local.isdigit() and int(local) > 0 else 1))


def val_classes(text: str) -> int | float:
    """An argparse ``type=`` for ``--val-classes``: ``0`` (no validation split), a fraction in
    (0, 1) of the training classes, or an integer count (whether the training split has enough
    classes is checked once it is read: :func:`bgf_pyg.data.splits.val_class_count`)."""
    expected = f"expected 0, a fraction in (0, 1) or a class count >= 1, got {text!r}"
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(expected)
    return value


def refinement_list(text: str) -> list[str]:
    """An argparse ``type=`` for ``--refine``: comma-separated names among :data:`REFINEMENTS`
    (order kept, repeats dropped)."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in REFINEMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated names among "
                                         f"{', '.join(REFINEMENTS)}, got {text!r}")
    return list(dict.fromkeys(names))


def device(text: str) -> str:
    """An argparse ``type=``: a torch device that exists on this machine (``cpu``, ``cuda``,
    ``cuda:N``, ``mps``)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


# ---------------------------------------------------------------------------- scopes

#: A scope value that matches any setting except ``None`` / empty (``--lr-gamma`` needs
#: ``--lr-milestones``).
IS_SET = ("<set>",)


class Scope:
    """Where an option is read: every constraint must hold (a ``dest`` → allowed values, or
    :data:`IS_SET`), e.g. ``Scope(method=("bgformer",))``."""

    def __init__(self, **constraints: tuple) -> None:
        self.constraints = constraints

    def matches(self, args: argparse.Namespace) -> bool:
        for dest, allowed in self.constraints.items():
            value = getattr(args, dest)
            if not (bool(value) if allowed is IS_SET else value in allowed):
                return False
        return True

    def __str__(self) -> str:
        return " with ".join(f"{option_name(d)} {'set' if a is IS_SET else '|'.join(a)}"
                             for d, a in self.constraints.items())


IMAGE_DATASETS = tuple(DATASETS)
BALANCED_METHODS = ("plain", "bgformer", "intra-batch")
GRAPH_METHODS = ("bgformer", "intra-batch")
RESNETS = ("resnet50", "resnet18")
PRETRAINED_BACKBONES = (*RESNETS, *VIT_BACKBONES, *EFFICIENTNET_BACKBONES)
#: BGFormer's heads when --graph-heads is not given (to check --graph-dim before any work).
BGFORMER_HEADS = inspect.signature(BGFormerMethod).parameters["heads"].default

#: Where each option is read (alternatives: any one suffices); absent options apply everywhere.
SCOPES: dict[str, tuple[Scope, ...]] = {
    "data_root": (Scope(dataset=IMAGE_DATASETS),),
    "check_images": (Scope(dataset=IMAGE_DATASETS),),
    "pretrained": (Scope(backbone=PRETRAINED_BACKBONES),),
    "pooling": (Scope(backbone=RESNETS),),
    "freeze_backbone": (Scope(dataset=IMAGE_DATASETS, backbone=PRETRAINED_BACKBONES),),
    "feature_cache": (Scope(freeze_backbone=IS_SET),),
    "trainable_stages": (Scope(backbone=EFFICIENTNET_BACKBONES),),
    "loss": (Scope(method=("plain", "bgformer")),),
    "batch_size": (Scope(method=("proxygml",)),),
    "classes_per_batch": (Scope(method=BALANCED_METHODS),),
    "samples_per_class": (Scope(method=BALANCED_METHODS),),
    "checkpoint_every": (Scope(method=BALANCED_METHODS),),  # restarts a P×M sampler mid-epoch
    "k": (Scope(method=("bgformer",)),),
    "alpha": (Scope(method=("bgformer",)),),
    "lam": (Scope(method=("bgformer",)),),
    "proxies_per_class": (Scope(method=("proxygml",)),),
    "proxygml_r": (Scope(method=("proxygml",)),),
    "graph_layers": (Scope(method=GRAPH_METHODS),),
    "graph_heads": (Scope(method=GRAPH_METHODS),),
    "temperature": (Scope(method=("intra-batch",)),
                    Scope(method=("plain", "bgformer"), loss=("pce",))),
    "pce_space": (Scope(method=("plain", "bgformer"), loss=("pce",)),),
    "hyp_c": (Scope(method=("plain", "bgformer"), loss=("pce",), pce_space=("hyperbolic",)),),
    "clip_r": (Scope(method=("plain", "bgformer"), loss=("pce",), pce_space=("hyperbolic",)),),
    "semantic_branch": (Scope(method=("bgformer",)),),
    "visual_graph": (Scope(method=("bgformer",)),),
    "detach_graph_input": (Scope(method=("bgformer",)),),
    "graph_dim": (Scope(method=("bgformer",)),),
    "graph_lr": (Scope(method=GRAPH_METHODS),),
    "mpn_cat": (Scope(method=("intra-batch",)),),
    "proxygml_lambda": (Scope(method=("proxygml",)),),
    "image_size": (Scope(dataset=IMAGE_DATASETS),),
    "crop_scale": (Scope(dataset=IMAGE_DATASETS),),
    "interpolation": (Scope(dataset=IMAGE_DATASETS),),
    "test_resize": (Scope(dataset=IMAGE_DATASETS),),
    "random_erasing": (Scope(dataset=IMAGE_DATASETS),),
    "proxy_lr": (Scope(method=("proxygml",)),
                 Scope(method=("plain", "bgformer"), loss=tuple(PROXY_LOSSES))),
    "lr_gamma": (Scope(lr_milestones=IS_SET),),
    "val_seed": (Scope(val_classes=IS_SET),),
}

#: Options that set a step size or a logit scale: a diverging loss names those that apply.
DIVERGENCE_OPTIONS = ("lr", "proxy_lr", "temperature")


def option_name(dest: str) -> str:
    """``lr_milestones`` → ``--lr-milestones``."""
    return "--" + dest.replace("_", "-")


def applies(dest: str, args: argparse.Namespace, methods: Collection[str] | None = None) -> bool:
    """Whether option ``dest`` is read by the run ``args`` describes (or, with ``methods``, by
    the run of any one of them: ``examples/cub.py --method all``)."""
    scopes = SCOPES.get(dest)
    if scopes is None:
        return True
    candidates = [args] if methods is None else [
        argparse.Namespace(**{**vars(args), "method": m}) for m in methods]
    return any(s.matches(a) for s in scopes for a in candidates)


def check_scopes(
    args: argparse.Namespace, explicit: Collection[str], methods: Collection[str] | None = None
) -> str | None:
    """The error for the first explicitly set option that the run ignores, else ``None``."""
    for dest in explicit:
        if not applies(dest, args, methods):
            where = " or ".join(str(s) for s in SCOPES[dest])
            used = ", ".join(f"{option_name(d)} {show_value(getattr(args, d))}"
                             for d in dict.fromkeys(c for s in SCOPES[dest] for c in s.constraints))
            return f"{option_name(dest)} has no effect here ({used}); it applies to {where}"
    return None



# ---------------------------------------------------------------------------- cross-option rules


def check_milestones(args: argparse.Namespace) -> str | None:
    milestones = args.lr_milestones or []
    if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
        return f"--lr-milestones must be strictly increasing, got {show_value(milestones)}"
    if milestones and milestones[-1] >= args.epochs:
        return (f"--lr-milestones {milestones[-1]} is not below --epochs {args.epochs}, so it "
                "never takes effect")
    return None


def check_data_root(args: argparse.Namespace) -> str | None:
    if args.dataset in IMAGE_DATASETS and args.data_root is None:
        return f"--data-root is required for --dataset {args.dataset}"
    return None


def check_resume_overwrite(args: argparse.Namespace) -> str | None:
    if args.resume and args.overwrite:
        return "--resume continues the run in --out and --overwrite replaces it: pass one"
    return None


def check_select_on(args: argparse.Namespace) -> str | None:
    if args.select_on == "val" and not args.val_classes:
        return ("--select-on val needs a validation split: set --val-classes to a fraction or "
                "count of training classes, or pass --select-on test or last")
    return None


def check_amp(args: argparse.Namespace) -> str | None:
    if args.amp and torch.device(args.device).type != "cuda":
        return f"--amp needs a CUDA --device, got {args.device}"
    return None


def check_graph_dim(args: argparse.Namespace) -> str | None:
    if args.method != "bgformer" or args.graph_dim is None:
        return None
    heads = args.graph_heads if args.graph_heads is not None else BGFORMER_HEADS
    if args.graph_dim % heads != 0:
        return (f"--graph-dim ({args.graph_dim}) must be divisible by --graph-heads ({heads}), "
                "the number of BGFormer's attention heads")
    return None


def check_pce_layout(args: argparse.Namespace) -> str | None:
    if args.loss == "pce" and args.method in ("plain", "bgformer") and args.samples_per_class < 2:
        return ("--loss pce pairs the samples of a class: --samples-per-class must be >= 2, got "
                f"{args.samples_per_class}")
    return None


def check_crop_scale(args: argparse.Namespace) -> str | None:
    low, high = args.crop_scale
    if low > high:
        return f"--crop-scale MIN must not exceed MAX, got {low:g} {high:g}"
    return None


#: The backbones an optional extra provides, and the import that names the extra when missing.
BACKBONE_EXTRAS = ((VIT_BACKBONES, import_timm), (EFFICIENTNET_BACKBONES, import_efficientnet))


def check_backbone_extra(args: argparse.Namespace) -> str | None:
    for backbones, import_extra in BACKBONE_EXTRAS:
        if args.backbone in backbones:
            try:
                import_extra()
            except InputError as err:
                return str(err)
    return None


def check_frozen_backbone(args: argparse.Namespace) -> str | None:
    if not args.freeze_backbone:
        return None
    if args.trainable_stages is not None:
        return ("--freeze-backbone trains no stage of the backbone and --trainable-stages "
                f"{args.trainable_stages} trains the last ones: pass one")
    if args.backbone_lr is not None:
        return "--backbone-lr has no effect with --freeze-backbone: the backbone does not train"
    if args.pretrained is None and args.backbone not in EFFICIENTNET_BACKBONES:
        return (f"--freeze-backbone keeps the backbone fixed, so --backbone {args.backbone} "
                "needs its --pretrained weights (random features would never train)")
    if args.outliers:
        return ("--outliers adds noise images, which have no image file whose features could "
                "be cached: not with --freeze-backbone")
    return None


def check_tensorboard(args: argparse.Namespace) -> str | None:
    if args.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            return "--tensorboard needs the tensorboard package: pip install 'bgf_pyg[tensorboard]'"
    return None


def check_refine(args: argparse.Namespace) -> str | None:
    refine = args.refine
    if "bgformer" in refine and args.method != "bgformer":
        return (f"--refine bgformer needs a trained BGFormer, and --method is {args.method}; "
                "use --refine none,qe")
    if args.refine_alpha is not None and "qe" not in refine:
        return "--refine-alpha has no effect here: it applies to --refine qe"
    if args.refine_k is not None and refine == ["none"]:
        return "--refine-k has no effect here: it applies to --refine qe or bgformer"
    grid = len(args.refine_k or ()) > 1 or len(args.refine_alpha or ()) > 1
    if grid and not args.val_classes:
        return ("--refine-k / --refine-alpha: a grid of settings is chosen on the validation "
                "classes, and this run has none (--val-classes 0); give one value of each")
    return None


#: Rules over several options, run after parsing (and after the dataset's defaults are set).
RULES: list[Callable[[argparse.Namespace], str | None]] = [
    check_data_root, check_milestones, check_resume_overwrite, check_amp, check_graph_dim,
    check_pce_layout, check_crop_scale, check_frozen_backbone, check_backbone_extra,
    check_tensorboard, check_select_on, check_refine,
]


def validate(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    explicit: Collection[str],
    methods: Collection[str] | None = None,
) -> None:
    """Run the scope check and :data:`RULES`; the first failure ends in ``parser.error``."""
    for rule in (lambda a: check_scopes(a, explicit, methods), *RULES):
        message = rule(args)
        if message is not None:
            parser.error(message)


def explicit_dests(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option given in ``argv`` (parsed again with every default
    suppressed, so abbreviations and ``--opt=value`` count as well)."""
    parser = build()
    for action in parser._actions:  # argparse has no public way to list the actions
        action.default = argparse.SUPPRESS
    parser.set_defaults(**{k: argparse.SUPPRESS for k in parser._defaults})
    return set(vars(parser.parse_args(argv)))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends ``(default: X)`` to every option whose default is
    a value (``None`` and switches say their default in their help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default != argparse.SUPPRESS
                and "%(default)" not in text and action.option_strings):
            text += f" (default: {show_value(default)})"
        return text

