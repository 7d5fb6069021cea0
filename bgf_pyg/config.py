"""Typed configuration of an experiment: every option declared once, with its default, domain,
scope and help.

:class:`Config` is a dataclass with one field per option. Each field's metadata
(:class:`Option`) holds its value domain (a :class:`~bgf_pyg.domains.Number` or choices), where it
applies (:class:`~bgf_pyg.options.Scope`) and its help text; ``bgf-train``'s parser and
``--help`` are generated from it (:mod:`bgf_pyg.arguments`), and so is every check of a value.

A configuration is built by :func:`configure` from the options a user sets, over layers of
defaults, each later one winning (``docs/design.rst`` §16):

1. the field defaults (the shared hyperparameters from :mod:`bgf_pyg.defaults`);
2. the method's own defaults (:func:`method_defaults`: layers and heads of its graph module, the
   ResNet pooling), from its registry entry (:data:`~bgf_pyg.models.METHODS`) and constructor;
3. the dataset's (its registry entry's, :data:`~bgf_pyg.data.DATASETS`: the demo's
   :data:`DEMO_DEFAULTS` and each method's demo settings, the emoji's image size);
4. a preset (:mod:`bgf_pyg.presets`: an original's recipe, as data over these fields);
5. the options given.

Options whose default follows from others (``proxy_lr``: 100 × ``lr``, ``val_classes``: a fifth
of the classes when selecting on validation, ``out``, ``device``, ``threads``) are resolved last.
:meth:`Config.replace` changes options and resolves again, so ``cfg.replace(method="plain")``
gets plain's defaults and ``cfg.replace(seed=1)`` its own run folder. Every check runs in
:func:`configure`, before any work: a bad value, an option the run ignores, a conflict between
options is an :class:`~bgf_pyg.checks.InputError` naming the field.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

import torch

from . import defaults, distributed
from .checks import InputError, naming, show_value
from .data import DATASETS, DEMO_DEFAULTS, IMAGE_CHECKS
from .data.emoji import EMOJI_SIZE
from .data.transforms import INTERPOLATIONS
from .domains import (
    Number,
    device,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed_int,
    val_classes,
)
from .losses import LOSSES
from .losses.pce import SPACES
from .models import BACKBONES, METHODS, OPTIMIZERS
from .models.efficientnet import NUM_STAGES
from .models.resnet import POOLINGS
from .models.tail import EFFICIENTNET_TAIL_DEPTH
from .models.vit import VIT_POOLINGS
from .nn.bgformer import SEMANTIC_BRANCHES, VISUAL_GRAPHS
from .options import (
    IS_SET,
    RULES,
    Scope,
    auto_threads,
    check_scopes,
    refinement_list,
    stage_count,
)
from .presets import load_preset
from .registry import Registry
from .train import SELECT_ON

log = logging.getLogger("bgf_pyg")


def names_of(registry: Registry, **required: object) -> Callable[[], tuple[str, ...]]:
    """The names of ``registry`` whose entries have the ``required`` properties, read when a
    scope is checked (so an entry registered later is covered)."""
    return lambda: registry.names(**required)


def owners(registry: Registry, option: str) -> Callable[[], tuple[str, ...]]:
    """The names of ``registry`` whose entries declare ``option`` among their ``options``,
    read when a scope is checked."""
    return lambda: registry.declaring(option)


#: The registered datasets of image files (read when a scope is checked).
IMAGE_DATASETS = names_of(DATASETS, images=True)
ON_IMAGES = (Scope(dataset=IMAGE_DATASETS),)
BALANCED = (Scope(method=names_of(METHODS, balanced=True)),)
#: The methods that train with a metric loss of :data:`~bgf_pyg.losses.LOSSES`.
TAKES_LOSS = names_of(METHODS, takes_loss=True)
#: The backbones that load a ``pretrained`` weights file.
WEIGHTS_FILE = owners(BACKBONES, "pretrained")


@dataclass(frozen=True)
class Owned:
    """A scope: the option applies with each method whose registry entry declares it among its
    ``options``, and with each loss that declares it (under a method that takes a loss), with
    the further constraints ``when`` (e.g. ``pce_space=("hyperbolic",)``)."""

    when: tuple[tuple[str, tuple], ...] = ()

    def scopes(self, option: str) -> tuple[Scope, ...]:
        """The :class:`~bgf_pyg.options.Scope` alternatives of ``option``."""
        when = dict(self.when)
        return (Scope(method=owners(METHODS, option), **when),
                Scope(method=TAKES_LOSS, loss=owners(LOSSES, option), **when))


#: The scope of an option declared by methods' or losses' registry entries.
OWNED = (Owned(),)
HYPERBOLIC = (Owned(when=(("pce_space", ("hyperbolic",)),)),)

#: ``proxy_lr`` when not given, relative to ``lr`` (proxies move faster than the network, as in
#: the originals).
PROXY_LR_FACTOR = 100.0
#: ``val_classes`` when not given, with ``select_on="val"``: a fifth of the training classes
#: (CUB: 20 of 100, the demo: 10 of 50).
DEFAULT_VAL_FRACTION = 0.2
#: P of a P×M batch when not given (the intra-batch original's CUB batches: 6 classes × 9).
DEFAULT_CLASSES_PER_BATCH = 6


@dataclass(frozen=True)
class Option:
    """What a field of :class:`Config` is: its help text, its value domain (``domain``: a
    :class:`~bgf_pyg.domains.Number` or a parser of text; ``choices``; ``nargs`` values), an
    on/off switch (``switch``: ``"on"`` has only ``--name``, ``"on_off"`` also ``--no-name``),
    where it applies (``scope``: alternatives, any one suffices; empty: everywhere), and whether
    a resumed run may change it: ``resumable`` (every other option must match the checkpoint's)
    or ``execution`` (it records how the run is executed, not what it computes: stored in the
    checkpoint beside the others, never compared, so resumable too)."""

    help: str
    domain: Callable[[str], Any] | None = None
    choices: Collection | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    switch: str | None = None
    scope: tuple[Scope | Owned, ...] = ()
    resumable: bool = False
    execution: bool = False


def option(default: Any, help: str, **declaration: Any) -> Any:
    """A :class:`Config` field: ``default`` and its :class:`Option` declaration."""
    meta = {"option": Option(help, **declaration)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def switch(help: str, *, negatable: bool = False, **declaration: Any) -> Any:
    """An on/off :class:`Config` field (off by default)."""
    return option(False, help, switch="on_off" if negatable else "on", **declaration)


@dataclass(kw_only=True)
class Config:
    """Every option of one experiment (see :mod:`bgf_pyg.config`; build one with
    :func:`configure`). Field names are ``bgf-train``'s options with ``_`` for ``-``."""

    preset: str | None = option(
        None, "start from an original's configuration (see --list-presets); explicit options "
              "override it", metavar="NAME")
    dataset: str = option(DATASETS.default, "benchmark (see below)", choices=DATASETS)
    data_root: str | None = option(None, "dataset folder (not for demo; see below)",
                                   scope=ON_IMAGES, execution=True)
    check_images: str = option(
        "header", "before training, open every image: read its header (about 0.02 ms an image "
                  "with a warm file cache), decode it (about 2 ms), or skip; missing files are "
                  "always found", choices=IMAGE_CHECKS, scope=ON_IMAGES, resumable=True)
    method: str = option(METHODS.default, "training method", choices=METHODS)
    loss: str = option(
        LOSSES.default, "metric loss of plain and bgformer (pce: Hyp-ViT's pairwise "
                        "cross-entropy, BGFormer's authors' loss)", choices=LOSSES,
        scope=(Scope(method=TAKES_LOSS),))
    pce_space: str = option("sphere", "pce: similarity on the unit sphere or the Poincaré ball",
                            choices=SPACES, scope=OWNED)
    hyp_c: float = option(0.1, "pce: curvature of the ball", domain=positive_float,
                          scope=HYPERBOLIC)
    clip_r: float = option(2.3, "pce: feature clipping radius before the ball's exponential map",
                           domain=positive_float, scope=HYPERBOLIC)
    backbone: str = option(BACKBONES.default, "image network (vit_* need the timm extra)",
                           choices=BACKBONES)
    pretrained: str | None = option(
        None, "local weights: a torchvision ResNet state dict, a timm / DINO checkpoint for a "
              "ViT (DINOv2: timm, Meta or Hugging Face layout), an EfficientNet-Lite0 state dict "
              "(default: random weights, "
              "efficientnet_lite0: the installed package's ImageNet weights; never downloaded)",
        scope=(Scope(backbone=WEIGHTS_FILE),))
    freeze_backbone: bool = switch(
        "keep the pretrained backbone fixed: its features of every image (the test-time "
        "transform and, unless --no-augment, its mirror image for training) are computed once, "
        "cached, and the head, graph module and loss train on them (fast on a CPU)",
        scope=(Scope(dataset=IMAGE_DATASETS, backbone=WEIGHTS_FILE),))
    feature_cache: str | None = option(
        None, "folder of the cached features (--freeze-backbone) or prefix outputs "
              "(--train-tail) (default: <data-root>/.features)", metavar="DIR",
        scope=(Scope(freeze_backbone=IS_SET), Scope(train_tail=IS_SET)), execution=True)
    trainable_stages: int | None = option(
        None, f"efficientnet_lite0: train only its last N of {NUM_STAGES} stages (1: the head "
              f"convolution; {NUM_STAGES}: all), the others frozen (default: all train)",
        domain=stage_count, metavar="N",
        scope=(Scope(backbone=owners(BACKBONES, "trainable_stages")),))
    train_tail: int | None = option(
        None, "train only the tail of the pretrained backbone, from the output of its frozen "
              "prefix computed once per image and view and cached (as --freeze-backbone's "
              "features): efficientnet_lite0's last N of its "
              f"{EFFICIENTNET_TAIL_DEPTH} MBConv stages and its head convolution, a ViT's last N "
              "blocks and its final norm (the same parameters as --trainable-stages N+1 or "
              "training N blocks, at a fraction of the cost on a CPU)", domain=positive_int,
        metavar="N",
        scope=(Scope(dataset=IMAGE_DATASETS, backbone=names_of(BACKBONES, trains_tail=True)),))
    backbone_lr: float | None = option(
        None, "learning rate of the backbone's trainable layers (default: --lr)",
        domain=positive_float)
    pooling: str | None = option("avg", "ResNet global pooling (intra-batch's original: max)",
                                 choices=POOLINGS,
                                 scope=(Scope(backbone=owners(BACKBONES, "pooling")),))
    vit_pooling: str = option(
        "cls", "ViT feature: the CLS token after the final norm, or cls+mean: it and the mean "
               "patch token concatenated (twice the width; DINOv2's linear-evaluation feature)",
        choices=VIT_POOLINGS, scope=(Scope(backbone=owners(BACKBONES, "vit_pooling")),))
    graph_dim: int | None = option(
        None, "BGFormer: run the graph blocks at this width, between an in- and an "
              "out-projection on the graph's side (the head and the test-time network never "
              "see it; default: the backbone's own width)",
        domain=positive_int, scope=OWNED)
    epochs: int = option(30, "epochs to train in all", domain=positive_int, resumable=True)
    batch_size: int = option(32, "size of proxygml's random batches", domain=positive_int,
                             scope=(Scope(method=names_of(METHODS, balanced=False)),))
    classes_per_batch: int | None = option(
        None, f"P of a P×M batch (when not given: {DEFAULT_CLASSES_PER_BATCH}, or every class "
              "when there are fewer)", domain=positive_int, scope=BALANCED)
    samples_per_class: int = option(9, "M of a P×M batch", domain=positive_int,
                                    scope=BALANCED)
    k: int = option(
        defaults.K, "BGFormer's visual neighbours of each sample: the kNN graph's k (below the "
                    "batch size), or attention_topk's K (the sample itself a candidate; K >= the "
                    "batch size: full attention)", domain=positive_int, scope=OWNED)
    proxies_per_class: int = option(defaults.PROXIES_PER_CLASS, "ProxyGML's N",
                                    domain=positive_int, scope=OWNED)
    proxygml_r: float = option(
        defaults.PROXYGML_R, "ProxyGML's r: it keeps the top ceil(r·C·N) proxies of each sample",
        domain=fraction, scope=OWNED)
    graph_layers: int | None = option(
        None, "layers of the graph module: BGFormer's blocks or the intra-batch MPN's",
        domain=positive_int, scope=OWNED)
    graph_heads: int | None = option(
        None, "attention heads of BGFormer or of the MPN", domain=positive_int, scope=OWNED)
    alpha: float = option(defaults.ALPHA, "BGFormer: weight of the loss on the backbone features",
                          domain=probability, scope=OWNED)
    lam: float = option(defaults.LAM, "BGFormer: weight of the visual branch in dual SSA",
                        domain=probability, scope=OWNED)
    semantic_branch: str = option(
        "attention", "BGFormer's semantic branch (label_propagation is the authors' "
                     "D^-1(A_same + I) W x)", choices=SEMANTIC_BRANCHES, scope=OWNED)
    visual_graph: str = option(
        "knn", "BGFormer's visual branch (knn: attention over the cosine kNN graph of the "
               "features, fixed for the batch; attention_topk: the authors' form, each layer and "
               "head keeps every sample's --k largest attention scores in the batch)",
        choices=VISUAL_GRAPHS, scope=OWNED)
    detach_graph_input: bool = switch(
        "BGFormer: feed the graph blocks detached features, so the backbone learns from the "
        "loss on its own features alone (off: end to end, as the paper)", negatable=True,
        scope=OWNED)
    mpn_cat: bool = switch(
        "intra-batch: concatenate every MPN layer's output (the Cars original)", negatable=True,
scope=OWNED)
    proxygml_lambda: float = option(
        defaults.PROXYGML_LAMBDA, "ProxyGML's weight of the proxy regulariser",
        domain=non_negative_float, scope=OWNED)
    temperature: float = option(
        defaults.TEMPERATURE, "intra-batch: logit temperature T; pce: τ", domain=positive_float,
        scope=OWNED)
    embedding_dim: int = option(512, "width of the embedding head", domain=positive_int)
    lr: float = option(1e-4, "AdamW learning rate of the networks", domain=positive_float)
    proxy_lr: float | None = option(
        None, f"learning rate of the loss's proxies ({PROXY_LR_FACTOR:g} × --lr when not given)",
        domain=positive_float,
        scope=(Scope(method=names_of(METHODS, proxies=True)),
               Scope(method=TAKES_LOSS, loss=names_of(LOSSES, proxies=True))))
    graph_lr: float | None = option(
        None, "learning rate of the graph module (BGFormer, the MPN; default: --lr)",
        domain=positive_float, scope=(Scope(method=names_of(METHODS, graph=True)),))
    weight_decay: float = option(1e-4, "weight decay of the optimiser", domain=non_negative_float)
    optimizer: str = option("adamw", "adam: coupled L2 decay (ProxyGML); radam: decoupled "
                                     "(intra-batch)", choices=OPTIMIZERS)
    adam_eps: float = option(1e-8, "the optimiser's epsilon", domain=positive_float)
    clip_grad: float | None = option(
        None, "clip the gradients' global norm to this value (default: no clipping)",
        domain=positive_float)
    freeze_bn: bool = switch("keep the backbone's BatchNorm statistics frozen while training "
                             "(with --train-tail: the tail's; the prefix's always are)",
                             negatable=True)
    lr_milestones: list[int] | None = option(
        None, "multiply every learning rate by --lr-gamma after these epochs (strictly "
              "increasing, below --epochs; ProxyGML's original: 19 39, i.e. from its 20th and "
              "40th epoch)", domain=positive_int, nargs="+", metavar="EPOCH")
    lr_gamma: float = option(0.1, "factor of each --lr-milestones step", domain=fraction,
                             scope=(Scope(lr_milestones=IS_SET),))
    out: str | None = option(None, "run folder (when not given: runs/DATASET-METHOD-sSEED)",
                             resumable=True)
    resume: bool = switch("continue the run in --out from its last.pt (same options; --epochs "
                          "may grow)", resumable=True)
    checkpoint_every: int | None = option(
        None, "also write last.pt every STEPS steps inside an epoch (P×M batches only), so "
              "--resume continues mid-epoch", domain=positive_int, metavar="STEPS",
        scope=BALANCED, resumable=True)  # restarts a P×M sampler mid-epoch
    overwrite: bool = switch("replace the run already in --out (without it, such a folder is "
                             "refused)", resumable=True)
    device: str | None = option(
        None, "cpu, cuda or cuda:N (when not given: cuda if available, else cpu)", domain=device,
        resumable=True)
    seed: int = option(0, "seeds every random choice", domain=seed_int)
    eval_every: int = option(5, "evaluate the selection split every N epochs (and after the "
                                "last)", domain=positive_int, resumable=True)
    val_classes: int | float | None = option(
        None, "hold out this fraction (in (0, 1)) or number of the training classes as the "
              f"validation split; 0: none (when not given: {DEFAULT_VAL_FRACTION:g} of them with "
              "--select-on val; 0 otherwise)", domain=val_classes, metavar="FRACTION_OR_COUNT")
    label_noise: float = option(
        0.0, "robustness studies: flip this fraction of the training labels to another class "
             "(seeded by --seed; validation and test stay clean)", domain=probability,
        metavar="FRACTION")
    outliers: float = option(
        0.0, "robustness studies: add uniform-noise images with random labels to the training "
             "split, this fraction of its size (seeded by --seed)", domain=probability,
        metavar="FRACTION")
    val_seed: int = option(
        0, "seeds which training classes are held out (independent of --seed, so every seed of "
           "a sweep sees the same split)", domain=seed_int, scope=(Scope(val_classes=IS_SET),))
    select_on: str = option(
        "val", "the checkpoint whose test metrics are reported: best on the validation classes, "
               "best on the test split (the originals' protocol; labelled test-selected), or the "
               "last epoch's", choices=SELECT_ON)
    refine: list[str] = option(
        ["none"], "evaluate the selected weights (bgf-train: after training) with each of these "
                  "test-time refinements of the test set on its kNN graph, comma-separated: "
                  "none, qe (query expansion), bgformer (the trained BGFormer's visual branch); "
                  "one results row each", domain=refinement_list, metavar="NAMES", resumable=True)
    refine_k: list[int] | None = option(
        None, "neighbours of the refinement; several values are a grid, chosen on the "
              "validation classes (default: qe 10, bgformer the training --k)",
        domain=positive_int, nargs="+", metavar="K", resumable=True)
    refine_alpha: list[float] | None = option(
        None, "query expansion's similarity exponent (0: plain mean); several values are a "
              "grid, chosen on the validation classes (default: 3)", domain=non_negative_float,
        nargs="+", metavar="ALPHA", resumable=True)
    num_workers: int = option(0, "DataLoader worker processes", domain=non_negative_int,
                              resumable=True)
    no_augment: bool = switch("train on test-time transforms (no random augmentation)")
    image_size: int = option(224, f"crop side (and a ViT's input); --dataset emoji: {EMOJI_SIZE}",
                             domain=positive_int, scope=ON_IMAGES)
    crop_scale: list[float] = option([0.08, 1.0], "area range of the random resized crop",
                                     domain=fraction, nargs=2, metavar=("MIN", "MAX"),
                                     scope=ON_IMAGES)
    interpolation: str = option("bilinear", "resampling of crops and resizes",
                                choices=tuple(INTERPOLATIONS), scope=ON_IMAGES)
    test_resize: int | None = option(
        None, "test-time resize before the centre crop (when not given: size·256/224; "
              "--dataset emoji: the crop side)", domain=positive_int, scope=ON_IMAGES)
    random_erasing: float = option(
        0.0, "probability of random erasing in training (intra-batch: 0.5)", domain=probability,
        scope=ON_IMAGES)
    amp: bool = switch("mixed precision (CUDA only)", negatable=True)
    no_progress: bool = switch("no progress bars", resumable=True)
    tensorboard: bool = switch(
        "log losses, learning rates, metrics and BGFormer's attention entropy to "
        "<out>/tensorboard (needs the tensorboard package)")
    dist_timeout: float = option(
        distributed.DEFAULT_TIMEOUT_S, "under torchrun: how long a rank waits for the others "
                                       "before failing", domain=positive_float,
        metavar="SECONDS", resumable=True)
    threads: int | None = option(
        None, "CPU threads of torch's operations in this process; more than the free cores "
              "slows a run several times over on a shared machine, and results may differ in "
              "the last bits with the count (on CUDA it matters little). Auto: OMP_NUM_THREADS "
              "when set, else half the CPUs this process may use, divided among torchrun's "
              "processes on the node, at least 1 (default: %(default)s, the auto count here)",
        domain=positive_int, metavar="N", execution=True)
    #: The options :func:`configure` was given (what :meth:`replace` starts from); ``None``
    #: for a ``Config`` built directly (its fields are not resolved).
    given: dict | None = field(default=None, repr=False, compare=False)

    def options(self) -> dict[str, Any]:
        """Every option by name (what a run records as its configuration)."""
        return {f.name: getattr(self, f.name) for f in option_fields()}

    def replace(self, **changes: Any) -> Config:
        """This configuration's given options with ``changes``, every default resolved again
        (a new method's or dataset's defaults, a new seed's run folder). A change to ``None``
        takes the option back to its default (it no longer counts as given)."""
        if self.given is None:
            raise InputError("this Config was built directly, so which options were given is "
                             "unknown; build it with bgf_pyg.config.configure(...) to replace "
                             "options")
        options = {**self.given, **changes}
        return configure(**{k: v for k, v in options.items() if v is not None})


def option_fields() -> tuple[Field, ...]:
    """The fields of :class:`Config` that are options."""
    return tuple(f for f in fields(Config) if "option" in f.metadata)


def field_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in option_fields()}
#: Options a preset may not set: they say where a run lives or choose another preset.
NOT_PRESETTABLE = frozenset({"preset", "resume", "out", "data_root"})


class Scopes(Mapping):
    """Where each option applies (options not listed apply everywhere): its declared
    :class:`~bgf_pyg.options.Scope` alternatives, an :class:`Owned` one expanded from the
    registries as they are when asked, alternatives that no registered name can meet left
    out."""

    def __getitem__(self, name: str) -> tuple[Scope, ...]:
        if not OPTIONS[name].scope:
            raise KeyError(name)
        scopes = []
        for scope in OPTIONS[name].scope:
            expanded = scope.scopes(name) if isinstance(scope, Owned) else (scope,)
            scopes += [s for s in expanded if all(s.allowed(o) for o in s.constraints)]
        return tuple(scopes)

    def __iter__(self) -> Iterator[str]:
        return (name for name, option in OPTIONS.items() if option.scope)

    def __len__(self) -> int:
        return sum(1 for _ in self)


SCOPES = Scopes()
#: Each method's settings on the demo set, over :data:`DEMO_DEFAULTS` (its registry entry's
#: ``demo_defaults``; how they were chosen: :data:`bgf_pyg.data.DEMO_DEFAULTS`).
DEMO_METHOD_DEFAULTS: Mapping[str, Mapping[str, Any]] = METHODS.view("demo_defaults")


def method_defaults(method: str) -> dict[str, Any]:
    """``method``'s own defaults: its constructor's default of each of its options that has no
    configuration default (its graph module's layers and heads), and its entry's ``defaults``
    (the ResNet pooling of its original)."""
    entry = METHODS[method]
    own = {name: entry.constructor_default(name) for name in entry.options
           if field_default(CONFIG_FIELDS[name]) is None}
    return {**{k: v for k, v in own.items() if v is not inspect.Parameter.empty},
            **entry.defaults}


def demo_defaults(method: str) -> dict[str, Any]:
    """The demo set's defaults of ``method``."""
    return {**DEMO_DEFAULTS, **METHODS[method].demo_defaults}


def dataset_defaults(dataset: str, method: str, image_size: int | None = None) -> dict[str, Any]:
    """The defaults ``dataset`` changes (its registry entry's; given the ``image_size`` asked
    for), and on the demo set ``method``'s demo settings over them."""
    entry = DATASETS[dataset]
    return {**entry.defaults(image_size), **(METHODS[method].demo_defaults if entry.demo else {})}


def identity(name: str) -> str:
    return name


def check_value(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` of option ``name`` checked against its declaration (type, domain, choices, number
    of values) and converted as the command line would (a path to ``str``); ``InputError``
    naming ``where`` (default: the option) otherwise."""
    spec = OPTIONS[name]
    where = where or name
    if spec.switch is not None:
        if not isinstance(value, bool):
            raise InputError(f"{where} must be true or false, got {_kind(value)}")
        return value
    if value is None and field_default(CONFIG_FIELDS[name]) is None:
        return None
    if spec.domain is refinement_list:
        if not isinstance(value, list | tuple) or not value:
            raise InputError(f"{where} must be a list of refinement names, got {_kind(value)}")
        return _scalar(spec, ",".join(map(str, value)), where)
    if spec.nargs is not None:
        count = spec.nargs if isinstance(spec.nargs, int) else None
        if not isinstance(value, list | tuple) or (count is not None and len(value) != count) \
                or not value:
            size = f"{count} values" if count else "values"
            raise InputError(f"{where} must be an array of {size}, got {_kind(value)}")
        return [_scalar(spec, v, where) for v in value]
    return _scalar(spec, value, where)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _scalar(spec: Option, value: Any, where: str) -> Any:
    kind = spec.domain.kind if isinstance(spec.domain, Number) else None
    if isinstance(value, bool) or isinstance(value, dict | list | tuple):
        raise InputError(f"{where} must be a single {getattr(kind, '__name__', 'value')}, "
                         f"got {_kind(value)}")
    if kind in (int, float) and isinstance(value, str):
        raise InputError(f"{where} must be a number ({kind.__name__}), got {_kind(value)}")
    if kind is int and not isinstance(value, int):
        raise InputError(f"{where} must be an int, got {_kind(value)}")
    if spec.domain is None and spec.choices is None:  # a path or name
        if not isinstance(value, str | bytes) and not hasattr(value, "__fspath__"):
            raise InputError(f"{where} must be a string, got {_kind(value)}")
        return str(value) if hasattr(value, "__fspath__") else value
    if spec.domain is not None:
        try:
            value = spec.domain(str(value) if kind is None else repr(value))
        except ValueError as err:
            raise InputError(f"{where}: {err}") from err
    if spec.choices is not None and value not in spec.choices:
        raise InputError(f"{where} must be one of {', '.join(map(str, spec.choices))}, got "
                         f"{value!r}")
    return value


CONFIG_FIELDS: dict[str, Field] = {f.name: f for f in option_fields()}


def check_preset(preset: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Validate ``preset``'s values against the options: every key an option a preset may set,
    every value of that option's type (switches: booleans; several values: arrays). Returns the
    values converted; raises ``InputError`` naming the preset and the key."""
    resolved = {}
    for key, value in preset.items():
        if key not in OPTIONS or key in NOT_PRESETTABLE:
            raise InputError(f"preset {name!r}: unknown key {key!r} (not an option a preset "
                             "may set)")
        resolved[key] = check_value(key, value, where=f"preset {name!r}: {key}")
    return resolved


def configure(**options: Any) -> Config:
    """The :class:`Config` of the given ``options`` (field names), every other option at the
    default that applies (see :mod:`bgf_pyg.config`), checked before any work: an
    :class:`~bgf_pyg.checks.InputError` naming the option otherwise."""
    return resolve(options)


def resolve(
    given: Mapping[str, Any],
    *,
    methods: Collection[str] | None = None,
    name: Callable[[str], str] = identity,
    note: Callable[[str], None] | None = None,
    check: bool = True,
) -> Config:
    """:func:`configure` for a front end: ``name`` writes a field as the front end does (the
    command line: ``--lr-milestones``), ``note`` reports a value resolved differently from what
    a preset asked (default: a log warning); ``methods``: the methods these options serve
    (``examples/cub.py --method all``: an option of any one of them applies). ``check=False``
    skips the checks of the result (for ``--help``)."""
    note = note or log.warning
    unknown = [key for key in given if key not in OPTIONS]
    if unknown:
        raise naming(InputError(f"unknown option(s) {', '.join(map(repr, unknown))}; the "
                                "options are the fields of bgf_pyg.config.Config"), *unknown)
    given = {key: check_value(key, value, where=name(key)) for key, value in given.items()}
    values = {f.name: field_default(f) for f in option_fields()}
    method = given.get("method", values["method"])
    dataset = given.get("dataset", values["dataset"])
    preset: dict[str, Any] = {}
    if given.get("preset") is not None:
        preset = check_preset(load_preset(given["preset"]), given["preset"])
        method, dataset = preset.get("method", method), preset.get("dataset", dataset)
        method, dataset = given.get("method", method), given.get("dataset", dataset)
    values.update(method_defaults(method))
    values.update(dataset_defaults(dataset, method,
                                   given.get("image_size", preset.get("image_size"))))
    values.update(preset)
    values.update(given)
    if "lr_milestones" in preset and "lr_milestones" not in given:
        # a preset's schedule cut short by ``epochs`` keeps the steps that fall inside the run
        milestones = values["lr_milestones"]
        kept = [m for m in milestones if m < values["epochs"]]
        if len(kept) < len(milestones):
            note(f"{name('epochs')} {values['epochs']} ends before the preset's "
                 f"{name('lr_milestones')} {show_value(milestones)}; keeping "
                 f"{show_value(kept) if kept else 'none'}")
        values["lr_milestones"] = kept or None
    if values["device"] is None:
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if preset.get("amp") and "amp" not in given and torch.device(values["device"]).type != "cuda":
        # a recipe's mixed precision is a GPU setting: on CPU it trains in float32 (an explicit
        # ``amp`` on CPU is still refused)
        note(f"preset {values['preset']} uses mixed precision, which needs CUDA; training in "
             f"float32 on {values['device']}")
        values["amp"] = False
    if values["out"] is None:
        values["out"] = f"runs/{values['dataset']}-{values['method']}-s{values['seed']}"
    if values["proxy_lr"] is None:
        values["proxy_lr"] = PROXY_LR_FACTOR * values["lr"]
    if values["val_classes"] is None:
        values["val_classes"] = DEFAULT_VAL_FRACTION if values["select_on"] == "val" else 0
    if values["threads"] is None:
        values["threads"] = auto_threads()
    config = Config(**values, given=dict(given))
    if check:
        check_config(config, given, methods=methods, name=name)
    return config


def check_config(
    config: Config,
    explicit: Collection[str],
    *,
    methods: Collection[str] | None = None,
    name: Callable[[str], str] = identity,
) -> None:
    """The scope of every ``explicit`` option and every rule over several options
    (:data:`~bgf_pyg.options.RULES`); the first failure is an ``InputError``."""
    for rule in (lambda c, n: check_scopes(c, explicit, SCOPES, n, methods), *RULES):
        message = rule(config, name)
        if message is not None:
            raise InputError(message)


#: Options that may change when a run is resumed (declared ``resumable`` or ``execution``);
#: every other one must match its checkpoint's.
RESUMABLE = frozenset(name for name, o in OPTIONS.items() if o.resumable or o.execution)
#: Options that record how a run is executed (declared ``execution``): stored in its
#: checkpoints beside :func:`checkpoint_config`, never compared on resume.
EXECUTION_OPTIONS = frozenset(name for name, o in OPTIONS.items() if o.execution)


def checkpoint_config(config: Config) -> dict[str, Any]:
    """The options a resumed run must share with its checkpoint, by field name."""
    return {k: v for k, v in sorted(config.options().items()) if k not in RESUMABLE}


def essential_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` (every one resolved, as a run records them) that resolving the others
    does not reproduce: what a user must have given (``proxy_lr`` at 100 × ``lr``, a method's
    own layer count or a preset's values are left out). ``None`` means the default."""
    options = {name: value for name, value in options.items() if value is not None}
    return {name: value for name, value in options.items()
            if getattr(resolve({k: v for k, v in options.items() if k != name},
                               note=lambda message: None, check=False), name) != value}


def from_checkpoint(stored: Mapping[str, Any], **changes: Any) -> Config:
    """The configuration of a run from its checkpoint's :func:`checkpoint_config` (as
    :func:`~bgf_pyg.run_folder.load_checkpoint` reads it: older checkpoints' keys too), with
    ``changes``; its options are not checked again (they were when the run started). Its
    ``given`` holds the :func:`essential_options`, so :meth:`Config.replace` resolves the
    derived ones (``proxy_lr``, a method's defaults) again instead of keeping stale values."""
    options = {name: stored[name] for name in OPTIONS
               if name not in RESUMABLE and stored.get(name) is not None}  # None: the default
    return resolve({**essential_options(options), **changes}, check=False)


def as_record(config: Config) -> dict[str, Any]:
    """The configuration as a run records it (``metrics.jsonl``'s first line, the log)."""
    return dict(sorted(config.options().items()))

