"""The vocabulary of an experiment's options: value domains, scopes and cross-option rules.

Three kinds of rule, each declared once per option in :class:`bgf_pyg.config.Config`'s field
metadata or here, so a new option is covered by declaring it:

1. **Value** — a domain of :mod:`bgf_pyg.domains` (the library's own: a
   :class:`~bgf_pyg.domains.Number` such as ``positive_int`` or ``probability``, or a parser of
   text such as ``device``), or one of the options' own here (:data:`stage_count`,
   :func:`refinement_list`); each raises ``ValueError``. NaN and ±inf are never accepted.
   ``tests/test_cli_validation.py`` enumerates every numeric option and checks 0, -1, NaN and
   ±inf against the declared domain.
2. **Scope** — a :class:`Scope` per option says where it is read (methods, datasets, losses,
   backbones, or another option it needs). Setting it where it is ignored (say
   ``proxies_per_class`` with ``method="bgformer"``) is an error. Only options the user set are
   checked: defaults, the demo's defaults and a preset's values never trip it.
3. **Cross-option rules** — small functions in :data:`RULES` (increasing ``lr_milestones`` below
   ``epochs``, ``resume`` with ``overwrite``, ``amp`` without CUDA); each returns an error
   message or ``None``.

Every message names options through a ``name`` function: the field name in Python
(:func:`bgf_pyg.config.configure`), the option on the command line (``--lr-milestones``).
:data:`DIVERGENCE_OPTIONS` lists the options a diverging (non-finite) loss names as likely causes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import torch

from .checks import InputError, Name, show_value
from .data import DATASETS
from .domains import Number
from .losses import LOSSES
from .models import BACKBONES, METHODS, BGFormerMethod
from .models.backbones import tail_depth
from .models.efficientnet import NUM_STAGES
from .refine import REFINEMENTS, BGFormerRefinement

#: ``trainable_stages``: the last 1 to all of EfficientNet-Lite0's stages.
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


def refinement_list(text: str) -> list[str]:
    """The domain of ``refine``: comma-separated names among :data:`REFINEMENTS` (order kept,
    repeats dropped); ``ValueError`` otherwise."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in REFINEMENTS]
    if unknown:
        raise ValueError(f"expected comma-separated names among {', '.join(REFINEMENTS)}, got "
                         f"{text!r}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- scopes

#: A scope value that matches any setting except ``None`` / empty (``lr_gamma`` needs
#: ``lr_milestones``).
IS_SET = ("<set>",)


class Scope:
    """Where an option is read: every constraint must hold (an option → allowed values, a
    function returning them when asked, e.g. the methods of a registry with some property, or
    :data:`IS_SET`), e.g. ``Scope(method=("proxygml",))``."""

    def __init__(self, **constraints: tuple | Callable[[], tuple]) -> None:
        self.constraints = constraints

    def allowed(self, option: str) -> tuple:
        """The values ``option`` may take in this scope (read now, for a function)."""
        allowed = self.constraints[option]
        return allowed() if callable(allowed) else allowed

    def matches(self, config: object) -> bool:
        for option in self.constraints:
            value, allowed = getattr(config, option), self.allowed(option)
            if not (bool(value) if allowed is IS_SET else value in allowed):
                return False
        return True

    def describe(self, name: Name) -> str:
        """``--method proxygml with --loss pce`` (with ``name`` writing the options)."""
        return " with ".join(
            f"{name(o)} {'set' if self.allowed(o) is IS_SET else '|'.join(self.allowed(o))}"
            for o in self.constraints)


def applies(option: str, config: Any, scopes: Mapping[str, tuple[Scope, ...]],
            methods: Collection[str] | None = None) -> bool:
    """Whether ``option`` is read by the run ``config`` describes (or, with ``methods``, by the
    run of any one of them: ``examples/cub.py --method all``)."""
    alternatives = scopes.get(option)
    if alternatives is None:
        return True
    candidates = [config] if methods is None else [replace(config, method=m) for m in methods]
    return any(s.matches(c) for s in alternatives for c in candidates)


def check_scopes(
    config: object,
    explicit: Collection[str],
    scopes: Mapping[str, tuple[Scope, ...]],
    name: Name,
    methods: Collection[str] | None = None,
) -> str | None:
    """The error for the first explicitly set option that the run ignores, else ``None``."""
    for option in explicit:
        if not applies(option, config, scopes, methods):
            where = " or ".join(s.describe(name) for s in scopes[option])
            used = ", ".join(f"{name(o)} {show_value(getattr(config, o))}"
                             for o in dict.fromkeys(c for s in scopes[option]
                                                    for c in s.constraints))
            return f"{name(option)} has no effect here ({used}); it applies to {where}"
    return None


# ---------------------------------------------------------------------------- cross-option rules

def check_milestones(c, name: Name) -> str | None:
    milestones = c.lr_milestones or []
    if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
        return f"{name('lr_milestones')} must be strictly increasing, got {show_value(milestones)}"
    if milestones and milestones[-1] >= c.epochs:
        return (f"{name('lr_milestones')} {milestones[-1]} is not below {name('epochs')} "
                f"{c.epochs}, so it never takes effect")
    return None


def check_data_root(c, name: Name) -> str | None:
    if DATASETS[c.dataset].images and c.data_root is None:
        return f"{name('data_root')} is required for {name('dataset')} {c.dataset}"
    return None


def check_resume_overwrite(c, name: Name) -> str | None:
    if c.resume and c.overwrite:
        return (f"{name('resume')} continues the run in {name('out')} and {name('overwrite')} "
                "replaces it: pass one")
    return None


def check_select_on(c, name: Name) -> str | None:
    if c.select_on == "val" and not c.val_classes:
        return (f"{name('select_on')} val needs a validation split: set {name('val_classes')} "
                f"to a fraction or count of training classes, or pass {name('select_on')} test "
                "or last")
    return None


def check_amp(c, name: Name) -> str | None:
    if c.amp and torch.device(c.device).type != "cuda":
        return f"{name('amp')} needs a CUDA {name('device')}, got {c.device}"
    return None


def check_graph_dim(c, name: Name) -> str | None:
    if c.graph_dim is None or "graph_dim" not in METHODS[c.method].options:
        return None
    if c.graph_dim % c.graph_heads != 0:
        return (f"{name('graph_dim')} ({c.graph_dim}) must be divisible by "
                f"{name('graph_heads')} ({c.graph_heads}), the number of BGFormer's attention "
                "heads")
    return None


def check_pce_layout(c, name: Name) -> str | None:
    if (METHODS[c.method].takes_loss and LOSSES[c.loss].balanced and LOSSES[c.loss].pairs
            and c.samples_per_class < 2):
        return (f"{name('loss')} {c.loss} pairs the samples of a class: "
                f"{name('samples_per_class')} must be >= 2, got {c.samples_per_class}")
    return None


def check_crop_scale(c, name: Name) -> str | None:
    low, high = c.crop_scale
    if low > high:
        return f"{name('crop_scale')} MIN must not exceed MAX, got {low:g} {high:g}"
    return None


def check_backbone_extra(c, name: Name) -> str | None:
    """The backbone's optional extra (its entry's import check, which names it) is installed."""
    import_extra = BACKBONES[c.backbone].extra
    if import_extra is not None:
        try:
            import_extra()
        except InputError as err:
            return str(err)
    return None


def check_frozen_backbone(c, name: Name) -> str | None:
    if not c.freeze_backbone:
        return None
    if c.trainable_stages is not None:
        return (f"{name('freeze_backbone')} trains no stage of the backbone and "
                f"{name('trainable_stages')} {c.trainable_stages} trains the last ones: pass one")
    if c.backbone_lr is not None:
        return (f"{name('backbone_lr')} has no effect with {name('freeze_backbone')}: the "
                "backbone does not train")
    return cached_regime_problem(c, name, "freeze_backbone", "keeps the backbone fixed",
                                 "random features would", "features")


def cached_regime_problem(c, name: Name, option: str, what_it_does: str, random_part: str,
                          cached: str) -> str | None:
    """The rules of a regime that caches what a fixed network computes (``freeze_backbone``:
    its features; ``train_tail``: its prefix's output): pretrained weights, no noise images."""
    if c.pretrained is None and not BACKBONES[c.backbone].packaged_weights:
        return (f"{name(option)} {what_it_does}, so {name('backbone')} {c.backbone} needs its "
                f"{name('pretrained')} weights ({random_part} never train)")
    if c.outliers:
        return (f"{name('outliers')} adds noise images, which have no image file whose {cached} "
                f"could be cached: not with {name(option)}")
    return None


def check_train_tail(c, name: Name) -> str | None:
    if c.train_tail is None:
        return None
    if c.freeze_backbone:
        return (f"{name('train_tail')} trains the backbone's tail and {name('freeze_backbone')} "
                "keeps all of it fixed: pass one")
    if c.trainable_stages is not None:
        return (f"{name('train_tail')} {c.train_tail} trains the last stages from a cached prefix "
                f"and {name('trainable_stages')} {c.trainable_stages} runs the whole network "
                f"every step: pass one ({name('train_tail')} N trains what "
                f"{name('trainable_stages')} N+1 does)")
    try:
        depth, unit = tail_depth(c.backbone)
    except InputError:
        return None  # a ViT without timm: check_backbone_extra names the extra
    if c.train_tail > depth:
        return (f"{name('train_tail')} {c.train_tail} is past the depth of {name('backbone')} "
                f"{c.backbone}: it has {depth} {unit}, so 1 to {depth}")
    return cached_regime_problem(c, name, "train_tail", "trains the tail of a pretrained "
                                 "backbone from its cached prefix", "a random prefix would",
                                 "prefix output")


def check_tensorboard(c, name: Name) -> str | None:
    if c.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            return (f"{name('tensorboard')} needs the tensorboard package: pip install "
                    "'bgf_pyg[tensorboard]'")
    return None


def check_refine(c, name: Name) -> str | None:
    refine, learned = c.refine, BGFormerRefinement.name
    if learned in refine and not issubclass(METHODS[c.method].cls, BGFormerMethod):
        return (f"{name('refine')} {learned} needs a trained BGFormer, and {name('method')} is "
                f"{c.method}; use {name('refine')} none,qe")
    if c.refine_alpha is not None and "qe" not in refine:
        return f"{name('refine_alpha')} has no effect here: it applies to {name('refine')} qe"
    if c.refine_k is not None and refine == ["none"]:
        return (f"{name('refine_k')} has no effect here: it applies to {name('refine')} qe or "
                f"{learned}")
    grid = len(c.refine_k or ()) > 1 or len(c.refine_alpha or ()) > 1
    if grid and not c.val_classes:
        return (f"{name('refine_k')} / {name('refine_alpha')}: a grid of settings is chosen on "
                f"the validation classes, and this run has none ({name('val_classes')} 0); give "
                "one value of each")
    return None


#: Rules over several options, run once the defaults are resolved.
RULES: list[Callable[[object, Name], str | None]] = [
    check_data_root, check_milestones, check_resume_overwrite, check_amp, check_graph_dim,
    check_pce_layout, check_crop_scale, check_frozen_backbone, check_train_tail,
    check_backbone_extra, check_tensorboard, check_select_on, check_refine,
]

#: Options that set a step size or a logit scale: a diverging loss names those that apply.
DIVERGENCE_OPTIONS = ("lr", "proxy_lr", "temperature")
