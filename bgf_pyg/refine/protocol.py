"""Evaluating a trained model with and without test-time refinement, settings chosen on validation.

Each named refinement (``"none"``, ``"qe"``, ``"bgformer"``) is evaluated on the test split with
one setting (k, and α for query expansion): the best of a grid by validation Recall@1 when a
validation split is given (every grid point's validation metrics are reported too), else the one
setting given. The test split never chooses anything. Labels are read by the metrics only.

Without a gallery the test set is refined transductively (all items at once); with a gallery
(In-Shop) the gallery is refined transductively and each query inductively against it. The kNN
search of the unrefined embeddings is run once, as deep as the metrics and the deepest query
expansion need, and shared by both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product

import torch
from torch import Tensor

from ..checks import naming
from ..knn import cosine_topk, normalize_rows
from ..metrics import evaluate_retrieval, recall_at_k_query_gallery, retrieval_depth
from ..models.methods import Method
from ..train import DEFAULT_KS, compute_embeddings
from . import REFINEMENTS
from .common import Neighbors
from .learned import BGFormerRefinement, check_trained_bgformer
from .qe import QueryExpansion

#: Query expansion's setting when none is given (α = 3 as in the αQE literature).
DEFAULT_QE_K = 10
DEFAULT_QE_ALPHA = 3.0
#: The metric that chooses a refinement's setting on the validation split.
SELECT_METRIC = "recall@1"


@dataclass
class EvalSet:
    """One evaluation split as refinement needs it: backbone features (N, C), unit embeddings
    ``head(features)`` (N, E), labels (N,), and the gallery's when queries search a gallery."""

    features: Tensor
    embeddings: Tensor
    labels: Tensor
    gallery: EvalSet | None = None

    @property
    def sizes(self) -> list[int]:
        return [len(self.labels)] + ([] if self.gallery is None else [len(self.gallery.labels)])


def embed_split(
    method: Method, loader: Iterable, device: torch.device, gallery_loader: Iterable | None = None
) -> EvalSet:
    """Features and embeddings of one split (one pass over the images)."""
    features, labels = compute_embeddings(method, loader, device,
                                          embed=method.backbone.features)
    with torch.no_grad():
        emb = method.backbone.head(features.to(device)).float().cpu()
    gallery = None if gallery_loader is None else embed_split(method, gallery_loader, device)
    return EvalSet(features, normalize_rows(emb), labels, gallery)


def settings(name: str, method: Method, ks: Sequence[int] | None,
             alphas: Sequence[float] | None) -> list[dict]:
    """The grid of settings of refinement ``name`` (``{}`` for ``"none"``)."""
    if name == "none":
        return [{}]
    if name == BGFormerRefinement.name:
        return [{"k": k} for k in (ks or [method.visual_k])]
    return [{"k": k, "alpha": float(a)}
            for k, a in product(ks or [DEFAULT_QE_K], alphas or [DEFAULT_QE_ALPHA])]


def check_refinements(
    refinements: Sequence[str],
    method: Method,
    ks: Sequence[int] | None,
    alphas: Sequence[float] | None,
    set_sizes: Sequence[int],
    has_val: bool,
    k_parameter: str | None = None,
) -> None:
    """Every refinement request that cannot run, as a ``ValueError`` naming the argument, before
    any embedding is computed (``set_sizes``: the items of every set to be refined;
    ``k_parameter``: the name a caller gives ``ks``, see :func:`check_k_below_sets`)."""
    unknown = [r for r in refinements if r not in REFINEMENTS]
    if unknown or not refinements:
        raise ValueError(f"refinements must be names among {', '.join(REFINEMENTS)}, got "
                         f"{', '.join(map(repr, unknown)) or 'none'}")
    if BGFormerRefinement.name in refinements:
        check_trained_bgformer(method)
    grids = {r: settings(r, method, ks, alphas) for r in refinements}
    if not has_val and any(len(g) > 1 for g in grids.values()):
        raise ValueError("refine_k / refine_alpha: a grid of settings is chosen on the "
                         "validation split, and this run has none; give one k and one alpha")
    for name, grid in grids.items():
        for setting in grid:
            if "k" in setting:
                check_k_below_sets(setting["k"], set_sizes, name, k_parameter)


def check_k_below_sets(
    k: int, set_sizes: Sequence[int], refinement: str, parameter: str | None = None
) -> None:
    """Refuse a ``k`` of ``refinement`` that is not below the smallest set refined (an item's k
    neighbours are k other items): a ``ValueError`` saying ``k (K)``, or with ``parameter`` (the
    name a caller gives k, e.g. ``refine_k``) ``refine_k=K (qe)`` and naming it."""
    smallest = min(set_sizes)
    if k < smallest:
        return
    where = f"k ({k})" if parameter is None else f"{parameter}={k} ({refinement})"
    raise naming(ValueError(f"{where} must be smaller than the smallest set refined ({smallest} "
                            "items): an item's neighbours are other items"),
                 *(() if parameter is None else (parameter,)))


def refiner(name: str, method: Method, setting: dict) -> QueryExpansion | BGFormerRefinement:
    if name == QueryExpansion.name:
        return QueryExpansion(setting["k"], setting["alpha"])
    return BGFormerRefinement.from_method(method, setting["k"])


def refine_set(name: str, method: Method, setting: dict, data: EvalSet,
               neighbors: Neighbors | None = None) -> tuple[Tensor, Tensor | None]:
    """Refined query embeddings (and gallery embeddings) of ``data``; ``neighbors``: the
    search of the refined input already run (queries against themselves, or against the
    gallery). Labels are not read."""
    if name == "none":
        return data.embeddings, None if data.gallery is None else data.gallery.embeddings
    refine = refiner(name, method, setting)
    device = next(method.parameters()).device
    field = "embeddings" if name == QueryExpansion.name else "features"
    query = getattr(data, field).to(device)
    if neighbors is not None:
        neighbors = (neighbors[0].to(device), neighbors[1].to(device))
    if data.gallery is None:
        return refine.refine(query, neighbors=neighbors).cpu(), None
    gallery = refine.refine_gallery(getattr(data.gallery, field).to(device))
    return (refine.refine_queries(query, gallery, neighbors=neighbors).cpu(),
            gallery.embeddings.cpu())


def _metrics(emb: Tensor, gallery_emb: Tensor | None, data: EvalSet, ks: Sequence[int],
             with_nmi: bool, neighbors: Neighbors | None = None) -> dict[str, float]:
    if gallery_emb is None:
        return evaluate_retrieval(emb, data.labels, ks=ks, with_nmi=with_nmi, neighbors=neighbors)
    recalls = recall_at_k_query_gallery(emb, data.labels, gallery_emb, data.gallery.labels, ks)
    return {f"recall@{k}": v for k, v in recalls.items()}


def base_search(data: EvalSet, depth: int) -> Neighbors | None:
    """The one self-excluded search of the unrefined embeddings, ``depth`` deep, that the metrics
    of ``"none"`` and every query expansion of the grid share (``None`` with a gallery: there
    the metrics search queries against the gallery)."""
    if data.gallery is not None:
        return None
    return cosine_topk(data.embeddings, k=depth, exclude_self=True)


def evaluate_refinements(
    method: Method,
    test: EvalSet,
    val: EvalSet | None,
    refinements: Sequence[str],
    *,
    ks: Sequence[int] | None = None,
    alphas: Sequence[float] | None = None,
    metric_ks: Sequence[int] = DEFAULT_KS,
    with_nmi: bool = True,
) -> list[dict]:
    """One record per (refinement, split, setting): each refinement's validation grid (when
    ``val`` is given) and its test metrics with the setting chosen on validation.

    Records hold ``refine`` (the name), ``split``, ``refine_k`` / ``refine_alpha`` (where they
    apply), ``selected_on`` (test records: ``"val"``, or ``"given"`` without a validation split)
    and the metrics.
    """
    sizes = test.sizes + ([] if val is None else val.sizes)
    check_refinements(refinements, method, ks, alphas, sizes, val is not None)
    deepest = max((s.get("k", 1) for r in refinements if r == QueryExpansion.name
                   for s in settings(r, method, ks, alphas)), default=1)
    searches = {}
    for split, data in (("test", test), ("val", val)):
        if data is not None and data.gallery is None:
            depth = retrieval_depth(data.labels, metric_ks, len(data.labels))
            searches[split] = base_search(data, max(depth, deepest))
    records = []
    for name in dict.fromkeys(refinements):
        grid = settings(name, method, ks, alphas)
        chosen = grid[0]
        if val is not None:
            scores = []
            for setting in grid:
                metrics = _evaluate_one(name, method, setting, val, metric_ks, with_nmi,
                                        searches.get("val"))
                records.append(_record(name, "val", setting, metrics))
                scores.append(metrics[SELECT_METRIC])
            chosen = grid[max(range(len(grid)), key=scores.__getitem__)]  # first of the best
        metrics = _evaluate_one(name, method, chosen, test, metric_ks, with_nmi,
                                searches.get("test"))
        records.append({**_record(name, "test", chosen, metrics),
                        "selected_on": "val" if val is not None else "given"})
    return records


def _evaluate_one(name: str, method: Method, setting: dict, data: EvalSet,
                  ks: Sequence[int], with_nmi: bool, search: Neighbors | None) -> dict[str, float]:
    """Metrics of ``data`` refined by ``name`` with ``setting``; ``search``: the unrefined
    embeddings' shared search (read by ``"none"``'s metrics and by query expansion)."""
    reuse = search if name in ("none", QueryExpansion.name) else None
    emb, gallery_emb = refine_set(name, method, setting, data, reuse)
    return _metrics(emb, gallery_emb, data, ks, with_nmi, search if name == "none" else None)


def _record(name: str, split: str, setting: dict, metrics: dict) -> dict:
    fields = {f"refine_{key}": value for key, value in setting.items()}
    return {"refine": name, "split": split, **fields, **metrics}
