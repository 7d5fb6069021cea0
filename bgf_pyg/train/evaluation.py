"""Evaluation of a run: embeddings and retrieval metrics of a split (:func:`evaluate`), and the
:class:`Evaluator` that applies the protocol (``docs/design.rst`` §12).

Every ``eval_every`` epochs (and after the last) the *selection* split is evaluated (the
validation classes, or the test split as the originals do) and its best epoch is the selected
checkpoint (``select_on``: ``val`` / ``test``, or ``last`` for the final weights); the test split
is then evaluated once, at the end, with the selected weights. Every metrics record names the
split its numbers come from (``"split"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed
from ..checks import InputError
from ..domains import positive_int
from ..metrics import evaluate_retrieval, recall_at_k_query_gallery
from ..models import Method
from .checkpoint import Checkpointer
from .errors import DivergenceError
from .state import TrainingState

#: The metric that selects the best checkpoint.
BEST_METRIC = "recall@1"
#: ``select_on``: the best epoch on the validation classes or on the test split (the
#: originals' protocol, labelled "test-selected"), or the last epoch.
SELECT_ON = ("val", "test", "last")
#: Recall@K values reported by evaluation.
DEFAULT_KS = (1, 2, 4, 8)


@torch.no_grad()
def compute_embeddings(
    method: Method,
    loader: Iterable,
    device: torch.device,
    *,
    progress: bool = False,
    embed: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """L2-normalised embeddings ``method.embed`` of every batch of ``loader``, and the labels
    (``embed``: another map of the images, e.g. ``method.backbone.features``)."""
    method.eval()
    embed = method.embed if embed is None else embed
    embs, labels = [], []
    for images, y in tqdm(loader, desc="embed", disable=not progress, leave=False):
        embs.append(embed(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    if not embs:
        raise InputError("the evaluation loader yielded no batch (empty evaluation split?)")
    emb = torch.cat(embs)
    if not bool(torch.isfinite(emb).all()):
        raise DivergenceError("training diverged: the evaluation embeddings contain NaN or inf")
    return emb, torch.cat(labels)


def evaluate(
    method: Method,
    loader: Iterable,
    device: torch.device,
    *,
    gallery_loader: Iterable | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    with_nmi: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Retrieval metrics of the test split (``loader``), or of ``loader`` as queries against
    ``gallery_loader`` (In-Shop: Recall@K only)."""
    emb, labels = _gathered_embeddings(method, loader, device, progress)
    if gallery_loader is None:
        return distributed.run_on_main(
            lambda: evaluate_retrieval(emb, labels, ks=ks, with_nmi=with_nmi))
    g_emb, g_labels = _gathered_embeddings(method, gallery_loader, device, progress)
    recalls = distributed.run_on_main(
        lambda: recall_at_k_query_gallery(emb, labels, g_emb, g_labels, ks))
    return {f"recall@{k}": v for k, v in recalls.items()}


def _gathered_embeddings(
    method: Method, loader: Iterable, device: torch.device, progress: bool
) -> tuple[Tensor, Tensor]:
    """Embeddings of ``loader``; under torch.distributed ``loader`` holds this rank's shard
    (:func:`bgf_pyg.distributed.shard`) and the result is every rank's rows in rank order, embedded
    with rank 0's weights and buffers (those of the checkpoint)."""
    distributed.broadcast_buffers(method)
    emb, labels = compute_embeddings(method, loader, device, progress=progress)
    if not distributed.is_distributed():
        return emb, labels
    # Collectives run on the rank's device (NCCL cannot gather CPU tensors).
    return (distributed.all_gather_tensor(emb.to(device)).cpu(),
            distributed.all_gather_tensor(labels.to(device)).cpu())


def split_label(split: str, select_on: str) -> str:
    """How a split's numbers are named in log lines: ``val``, ``test``, or
    ``test [test-selected]`` when the checkpoint is chosen on the test split itself."""
    return f"{split} [test-selected]" if split == "test" and select_on == "test" else split


def format_metrics(metrics: dict) -> str:
    """``metrics`` as one log line's ``name value, ...``."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, int | float) and k != "epoch")


class Evaluator:
    """The evaluation protocol of a run of ``method`` on ``device``.

    ``loader`` (with ``gallery_loader``) is the selection split, named ``split`` (``"val"`` or
    ``"test"``), evaluated every ``every`` epochs and after the last; with ``select_on``
    ``"val"`` or ``"test"`` its best epoch (by :data:`BEST_METRIC`) is selected, with ``"last"``
    (or without ``loader``) the final weights are. ``test_loader`` (with
    ``test_gallery_loader``) is evaluated once, after training, with the selected weights.
    """

    def __init__(
        self,
        method: Method,
        device: torch.device,
        *,
        loader: Iterable | None = None,
        gallery_loader: Iterable | None = None,
        split: str = "test",
        select_on: str = "test",
        every: int = 1,
        test_loader: Iterable | None = None,
        test_gallery_loader: Iterable | None = None,
        progress: bool = False,
    ) -> None:
        if select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
        self.method, self.device, self.progress = method, device, progress
        self.loader, self.gallery_loader, self.split = loader, gallery_loader, split
        self.select_on, self.every = select_on, positive_int.check(every, "every")
        self.test_loader, self.test_gallery_loader = test_loader, test_gallery_loader
        #: Whether a best epoch is selected (there is something to select on).
        self.select_best = select_on != "last" and loader is not None

    def after_epoch(self, state: TrainingState, epochs: int) -> tuple[dict, bool]:
        """Evaluate the selection split after epoch ``state.epoch`` of ``epochs`` when it is due
        (into ``state.last_metrics``, and the best so far); return the record's fields
        (``split`` and the metrics; none when not due) and whether the epoch is the new best."""
        if self.loader is None or (state.epoch % self.every and state.epoch != epochs):
            return {}, False
        metrics = evaluate(self.method, self.loader, self.device,
                           gallery_loader=self.gallery_loader, progress=self.progress)
        state.last_metrics = metrics
        best = self.select_best and (state.best_metric is None
                                     or metrics[BEST_METRIC] > state.best_metric)
        if best:
            state.best_metric, state.best_epoch = metrics[BEST_METRIC], state.epoch
            state.best_metrics = metrics
        return {"split": self.split, **metrics}, best

    def final(self, state: TrainingState, checkpointer: Checkpointer,
              epochs: int) -> tuple[dict[str, float], int | None]:
        """The test metrics of the selected weights (loaded from ``best.pt`` into ``method``
        when a best epoch is selected and there is a test split), and the epoch they are from.
        Without ``test_loader``, a selection split that is the test split gives its numbers."""
        selected = state.best_epoch if self.select_best else epochs
        if self.test_loader is not None:
            if self.select_best:
                selected = checkpointer.load_best(self.method)
            metrics = evaluate(self.method, self.test_loader, self.device,
                               gallery_loader=self.test_gallery_loader, progress=self.progress)
            return metrics, selected or epochs
        if self.split == "test":  # the selection split is the test split (the originals)
            return (state.best_metrics if self.select_best else state.last_metrics), selected
        return {}, selected

    def final_record(self, metrics: dict[str, float], selected: int | None, epochs: int) -> dict:
        """The ``"final": true`` ``metrics.jsonl`` record of the test metrics."""
        return {"epoch": epochs, "final": True, "split": "test", "select_on": self.select_on,
                "selected_epoch": selected, **metrics}
