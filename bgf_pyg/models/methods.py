"""The four training methods around one backbone: plain, BGFormer, intra-batch and ProxyGML.

Each method is an ``nn.Module`` with

- ``forward(images, labels) -> loss`` (training; the batch graph, if any, is built here). Under
  ``torch.distributed`` the per-sample part (backbone) runs on this rank's images and
  :func:`~bgf_pyg.distributed.gather_batch` joins every rank's rows right after it, so the
  batch-level part (graph, MPN, loss) sees the global batch (the identity in one process),
- ``embed(images) -> (B, D)`` L2-normalised embedding (evaluation: ``head(trunk(images))``, no
  graph and no labels, as in both BGFormer and intra-batch at test time; the same network for
  every method, so a BGFormer run whose graph term weighs 0 is a plain run),
- ``param_groups(lr, proxy_lr, graph_lr=None, backbone_lr=None)``: optimiser groups, loss
  parameters (proxies) at ``proxy_lr``, the graph module (BGFormer, the intra-batch MPN) at
  ``graph_lr`` and the backbone's trunk at ``backbone_lr`` when given; frozen parameters
  (``requires_grad`` false) in none.

:func:`~bgf_pyg.models.build_method` builds one by its name in :data:`~bgf_pyg.models.METHODS`
(:mod:`bgf_pyg.models.registry`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import defaults
from ..checks import naming
from ..distributed import gather_batch
from ..knn import normalize_rows
from ..losses import BatchGraphLoss, LabelSmoothingCE, ProxyGMLLoss, refuses_one_class
from ..nn import BGFormer, IntraBatchMPN, ProjectedGraph
from .backbones import EmbeddingNet

#: Label smoothing ε of the intra-batch cross-entropy (the original's value).
DEFAULT_SMOOTHING = 0.1


def check_two_classes(labels: Tensor) -> None:
    """A pair-based loss needs a negative pair: refuse a batch whose samples all share one class
    (its loss would be 0 and the step would silently train nothing)."""
    if labels.numel() > 0 and bool((labels == labels[0]).all()):
        raise naming(ValueError(
            "labels: every sample of the batch has the same class, so a pair-based metric loss "
            "has no negative pair; sample at least 2 classes per batch (the sampler's "
            "classes_per_batch >= 2)"
        ), "classes_per_batch")


class Method(nn.Module):
    """Base of the method wrappers: a backbone plus loss modules.

    Subclasses set ``loss_fn`` (its parameters, e.g. proxies, form the ``proxy_lr`` group) and
    implement ``forward``.
    """

    def __init__(self, backbone: EmbeddingNet, loss_fn: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss_fn = loss_fn

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised test-time embedding ``head(trunk(images))``."""
        emb = self.backbone(images)
        return normalize_rows(emb, dtype=emb.dtype)

    def graph_parameters(self) -> list[nn.Parameter]:
        """Parameters of the method's graph module (none here), trained at ``graph_lr``."""
        return []

    def param_groups(
        self,
        lr: float,
        proxy_lr: float,
        graph_lr: float | None = None,
        backbone_lr: float | None = None,
    ) -> list[dict]:
        """Networks at ``lr``, the loss parameters at ``proxy_lr`` and, when given, the graph
        module at ``graph_lr`` (BGFormer's authors: 3e-5 for backbone and head, 8.5e-4 to 1e-4
        for the graph blocks) and the backbone's trunk at ``backbone_lr`` (a pretrained trunk
        fine-tuned more gently than the new head). Frozen parameters are left out."""
        graph = self.graph_parameters() if graph_lr is not None else []
        trunk = list(self.backbone.trunk.parameters()) if backbone_lr is not None else []
        proxies = list(self.loss_fn.parameters())
        special = {id(p) for p in graph + trunk + proxies}
        groups = [{"params": [p for p in self.parameters() if id(p) not in special], "lr": lr}]
        for params, rate in ((graph, graph_lr), (trunk, backbone_lr), (proxies, proxy_lr)):
            if params:
                groups.append({"params": params, "lr": rate})
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        # the first group's rate is the one logged as the run's learning rate: always kept
        return [groups[0], *(g for g in groups[1:] if g["params"])]


class PlainMethod(Method):
    """Backbone + head + metric loss, no graph: the ablation every table needs."""

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        emb, labels = gather_batch(self.backbone(images), labels)
        if refuses_one_class(self.loss_fn):
            check_two_classes(labels)
        return self.loss_fn(emb, labels)


class BGFormerMethod(Method):
    """BGFormer training (Batch Graph Transformer, TMM 2023; our default from the authors'
    related code): trunk features f, a batch graph on ``f.detach()`` (kNN visual edges and
    same-label semantic edges), refined tokens g = BGFormer(f, edges), and
    loss = α·L(head(f), y) + (1 − α)·L(head(g), y) with the *same* head, computed by the
    :class:`~bgf_pyg.losses.BatchGraphLoss` submodule ``graph_loss``.

    ``visual_graph`` picks BGFormer's visual branch: ``"knn"`` (SSA on the cosine kNN graph of
    ``f.detach()``) or ``"attention_topk"`` (the authors' dynamic top-K attention, no kNN graph
    built); ``k`` is the number of visual neighbours in both: the kNN graph's k, or the top-K's K.
    ``detach_graph_input`` feeds BGFormer ``f.detach()`` (the backbone then learns from the first
    term alone; see :class:`~bgf_pyg.losses.BatchGraphLoss`). ``graph_dim`` runs BGFormer at that
    width between an in- and an out-projection (:class:`~bgf_pyg.nn.ProjectedGraph`), on the
    graph's side only: the test-time network is ``head(trunk(x))`` either way, and with α = 1
    the method trains exactly what :class:`PlainMethod` trains from the same seed.
    ``loss_fn`` and ``bgformer`` are the wrapper's ``graph_loss.loss`` and ``graph_loss.bgformer``
    (the :class:`~bgf_pyg.nn.ProjectedGraph` around BGFormer with ``graph_dim``); checkpoints
    saved before the wrapper existed (keys ``loss_fn.*``, ``bgformer.*``) still load.
    """

    def __init__(
        self,
        backbone: EmbeddingNet,
        loss_fn: nn.Module,
        k: int = defaults.K,
        alpha: float = defaults.ALPHA,
        num_layers: int = 2,
        heads: int = 8,
        dropout: float = 0.0,
        lam: float = defaults.LAM,
        semantic_branch: str = "attention",
        detach_graph_input: bool = False,
        visual_graph: str = "knn",
        graph_dim: int | None = None,
    ) -> None:
        super().__init__(backbone, loss_fn)
        del self.loss_fn  # registered once, inside graph_loss; ``loss_fn`` is an alias below
        width = backbone.feature_dim if graph_dim is None else graph_dim
        bgformer: nn.Module = BGFormer(
            width, num_layers=num_layers, heads=heads, dropout=dropout, lam=lam,
            semantic_branch=semantic_branch, visual_graph=visual_graph, k=k,
        )
        if graph_dim is not None:
            bgformer = ProjectedGraph(backbone.feature_dim, bgformer)
        self.graph_loss = BatchGraphLoss(loss_fn, bgformer, k=k, alpha=alpha,
                                         detach_graph_input=detach_graph_input)
        self.register_load_state_dict_pre_hook(_rename_pre_wrapper_keys)

    @property
    def loss_fn(self) -> nn.Module:
        return self.graph_loss.loss

    @property
    def bgformer(self) -> BGFormer | ProjectedGraph:
        return self.graph_loss.bgformer

    @property
    def visual_k(self) -> int:
        """The visual neighbours of each sample: the kNN graph's k, or attention_topk's K."""
        return self.graph_loss.k

    def graph_parameters(self) -> list[nn.Parameter]:
        return list(self.bgformer.parameters())

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        f, labels = gather_batch(self.backbone.features(images), labels)
        if refuses_one_class(self.loss_fn):
            check_two_classes(labels)
        return self.graph_loss(f, labels, head=self.backbone.head)


#: State-dict prefixes of BGFormerMethod before BatchGraphLoss held its loss and BGFormer.
_PRE_WRAPPER_PREFIXES = {"loss_fn.": "graph_loss.loss.", "bgformer.": "graph_loss.bgformer."}


def _rename_pre_wrapper_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: rename the keys of an older checkpoint in place."""
    for key in list(state_dict):
        for old, new in _PRE_WRAPPER_PREFIXES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


class IntraBatchMethod(Method):
    """Intra-batch (Seidenschwarz et al., ICML 2021): an encoder classifier on the un-normalised
    embedding and :class:`~bgf_pyg.nn.IntraBatchMPN` on the L2-normalised embedding over the
    complete batch graph; loss = LS-CE(enc / T) + LS-CE(mpn / T)."""

    def __init__(
        self,
        backbone: EmbeddingNet,
        num_classes: int,
        temperature: float = defaults.TEMPERATURE,
        epsilon: float = DEFAULT_SMOOTHING,
        num_layers: int = 1,
        heads: int = 2,
        dropout: float = 0.1,
        cat: bool = False,
    ) -> None:
        super().__init__(backbone, LabelSmoothingCE(temperature, epsilon))
        dim = backbone.embedding_dim
        self.classifier = nn.Linear(dim, num_classes)
        self.mpn = IntraBatchMPN(dim, num_layers, heads, dropout, num_classes=num_classes,
                                 cat=cat)

    def graph_parameters(self) -> list[nn.Parameter]:
        return list(self.mpn.parameters())

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        emb, labels = gather_batch(self.backbone(images), labels)
        mpn_logits, _ = self.mpn(normalize_rows(emb, dtype=emb.dtype))
        return self.loss_fn(self.classifier(emb), labels) + self.loss_fn(mpn_logits, labels)


class ProxyGMLMethod(Method):
    """ProxyGML (Zhu et al., NeurIPS 2020): :class:`~bgf_pyg.losses.ProxyGMLLoss` on the
    L2-normalised embedding; its proxies train at ``proxy_lr``."""

    def __init__(
        self,
        backbone: EmbeddingNet,
        num_classes: int,
        proxies_per_class: int = defaults.PROXIES_PER_CLASS,
        r: float = defaults.PROXYGML_R,
        weight_lambda: float = defaults.PROXYGML_LAMBDA,
    ) -> None:
        loss_fn = ProxyGMLLoss(num_classes, backbone.embedding_dim, proxies_per_class, r,
                               weight_lambda)
        super().__init__(backbone, loss_fn)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(*gather_batch(self.embed(images), labels))
