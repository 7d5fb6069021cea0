"""Fit / evaluate loop: one epoch of training, embedding + retrieval evaluation, checkpoints
(atomic, resumable to the bit), JSON-lines metrics and a PNG of the curves.

The pieces are small functions; :func:`fit` strings them together. A run directory ``out`` holds
``last.pt`` (written after every epoch), ``best.pt`` (best Recall@1 so far), ``metrics.jsonl`` (one
JSON object per epoch) and ``curves.png``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch_geometric import seed_everything
from tqdm.auto import tqdm

from .checks import InputError
from .metrics import evaluate_retrieval, recall_at_k_query_gallery
from .models import Method

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
#: The metric that selects the best checkpoint.
BEST_METRIC = "recall@1"
#: Recall@K values reported by evaluation.
DEFAULT_KS = (1, 2, 4, 8)
_NUMPY_SEED_MOD = 2**32


# ---------------------------------------------------------------------------- determinism


def seed_all(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (via PyG's ``seed_everything``); return a seeded generator
    for a ``DataLoader``."""
    seed_everything(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` seeding NumPy and ``random`` from the worker's torch seed."""
    seed = torch.initial_seed() % _NUMPY_SEED_MOD
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states, storable with ``weights_only`` load."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.copy()), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy(), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``, so a killed run leaves either the old checkpoint or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file raises several types
        raise InputError(f"could not read checkpoint {path}: {err}") from err


# ---------------------------------------------------------------------------- logging


def append_metrics(out: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line to ``<out>/metrics.jsonl``."""
    with open(Path(out) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics_until(out: str | os.PathLike, epoch: int) -> None:
    """Drop the records after ``epoch`` (a run killed after logging but before its checkpoint
    repeats that epoch on resume); ``epoch=0`` starts a fresh log."""
    records = [r for r in read_metrics(out) if r["epoch"] <= epoch]
    (Path(out) / METRICS_FILE).write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """All records of ``<out>/metrics.jsonl`` (empty when there is none)."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_curves(out: str | os.PathLike) -> Path | None:
    """Plot loss and evaluation metrics per epoch to ``<out>/curves.png`` (``None`` without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(out)
    if not records:
        return None
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in records], [r["loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    evals = [r for r in records if BEST_METRIC in r]
    for key in sorted({k for r in evals for k in r if k.startswith("recall@") or k in
                       ("nmi", "map@r")}):
        ax_eval.plot([r["epoch"] for r in evals if key in r], [r[key] for r in evals if key in r],
                     marker="o", label=key)
    ax_eval.set(xlabel="epoch", ylabel="test metric")
    if evals:
        ax_eval.legend()
    fig.tight_layout()
    path = Path(out) / CURVES_FILE
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- train / evaluate


def show_progress(flag: bool | None) -> bool:
    """Progress bars on when asked, or by default when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


@dataclass
class Precision:
    """Mixed precision on CUDA (autocast + GradScaler); off elsewhere."""

    device: torch.device
    enabled: bool = False
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.enabled and self.device.type != "cuda":
            warnings.warn("mixed precision needs CUDA; ignored on " + self.device.type,
                          stacklevel=3)
            self.enabled = False
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.enabled)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, enabled=self.enabled)


class FitCallback:
    """What :func:`fit` reports to a logger (e.g. :class:`bgf_pyg.monitor.TensorBoardLogger`);
    every hook does nothing here. ``step`` counts optimiser steps over the whole run."""

    def before_step(self, step: int) -> None:
        """Before the forward pass of step ``step``."""

    def after_step(self, step: int, loss: float, optimizer: torch.optim.Optimizer) -> None:
        """After the optimiser step; ``loss`` is the step's loss."""

    def after_epoch(self, epoch: int, record: dict) -> None:
        """After epoch ``epoch`` (1-based) with its ``metrics.jsonl`` record."""


def train_one_epoch(
    method: Method,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    *,
    progress: bool = False,
    desc: str = "train",
    callback: FitCallback | None = None,
    first_step: int = 0,
) -> float:
    """One pass over ``loader`` of ``(images, labels)`` batches; returns the mean loss.
    ``callback`` hears of each step, numbered from ``first_step``."""
    method.train()
    device = precision.device
    callback = callback or FitCallback()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        callback.before_step(first_step + steps)
        with precision.autocast():
            loss = method(images, labels)
        if not torch.isfinite(loss):
            raise InputError(f"training loss became {loss.item()}; lower the learning rate")
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total += loss.item()
        callback.after_step(first_step + steps, loss.item(), optimizer)
        steps += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if steps == 0:
        raise InputError("the training loader yielded no batch (dataset smaller than a batch?)")
    return total / steps


@torch.no_grad()
def compute_embeddings(
    method: Method, loader: Iterable, device: torch.device, *, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """L2-normalised embeddings ``method.embed`` of every batch of ``loader``, and the labels."""
    method.eval()
    embs, labels = [], []
    for images, y in tqdm(loader, desc="embed", disable=not progress, leave=False):
        embs.append(method.embed(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(embs), torch.cat(labels)


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
    emb, labels = compute_embeddings(method, loader, device, progress=progress)
    if gallery_loader is None:
        return evaluate_retrieval(emb, labels, ks=ks, with_nmi=with_nmi)
    g_emb, g_labels = compute_embeddings(method, gallery_loader, device, progress=progress)
    recalls = recall_at_k_query_gallery(emb, labels, g_emb, g_labels, ks)
    return {f"recall@{k}": v for k, v in recalls.items()}


# ---------------------------------------------------------------------------- fit


def _epoch_sampler(loader: DataLoader):
    """The loader's (batch) sampler that wants ``set_epoch``, if any."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            return sampler
    return None


@dataclass
class FitResult:
    """What :func:`fit` ends with: last epoch's and best evaluation metrics."""

    epochs: int
    best_metric: float | None
    best_epoch: int | None
    last_metrics: dict[str, float]
    best_metrics: dict[str, float]


def fit(
    method: Method,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    out: str | os.PathLike,
    *,
    epochs: int,
    eval_loader: Iterable | None = None,
    gallery_loader: Iterable | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    device: str | torch.device = "cpu",
    eval_every: int = 1,
    resume: bool = False,
    amp: bool = False,
    progress: bool | None = None,
    callback: FitCallback | None = None,
) -> FitResult:
    """Train ``method`` for ``epochs`` epochs, evaluating every ``eval_every`` epochs (and after
    the last), keeping ``last.pt`` / ``best.pt`` in ``out``.

    With ``resume`` the run continues from ``<out>/last.pt``: weights, optimiser, scheduler, grad
    scaler, RNG states, the loader's generator and the sampler's epoch are restored, so the result
    equals an uninterrupted run. ``callback`` hears of every step and epoch (logging).
    """
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = show_progress(progress)
    precision = Precision(device, amp)
    method.to(device)
    start, best, best_epoch, best_metrics, last_metrics = 0, None, None, {}, {}
    if resume:
        # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = load_checkpoint(out / LAST_CHECKPOINT)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])
        start, best, best_epoch = state["epoch"], state["best_metric"], state["best_epoch"]
        best_metrics, last_metrics = state["best_metrics"], state["last_metrics"]
        set_rng_state(state["rng"])
        if state.get("loader_generator") is not None and train_loader.generator is not None:
            train_loader.generator.set_state(state["loader_generator"])
        log.info("resumed from %s after epoch %d", out / LAST_CHECKPOINT, start)
    else:  # a fresh run: nothing of an earlier run in ``out`` may pass for this one's
        (out / BEST_CHECKPOINT).unlink(missing_ok=True)
    keep_metrics_until(out, start)
    sampler = _epoch_sampler(train_loader)
    for epoch in range(start, epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
        loss = train_one_epoch(method, train_loader, optimizer, precision, progress=progress,
                               desc=f"epoch {epoch + 1}/{epochs}", callback=callback,
                               first_step=epoch * len(train_loader))
        if scheduler is not None:
            scheduler.step()
        record: dict = {"epoch": epoch + 1, "loss": loss, "lr": lr}
        if eval_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            last_metrics = evaluate(method, eval_loader, device, gallery_loader=gallery_loader,
                                    progress=progress)
            record.update(last_metrics)
            if best is None or last_metrics[BEST_METRIC] > best:
                best, best_epoch, best_metrics = last_metrics[BEST_METRIC], epoch + 1, last_metrics
                save_checkpoint(out / BEST_CHECKPOINT, {"model": method.state_dict(),
                                                        "epoch": epoch + 1,
                                                        "metrics": last_metrics})
        append_metrics(out, record)
        if callback is not None:
            callback.after_epoch(epoch + 1, record)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                       if k != "epoch"))
        save_checkpoint(out / LAST_CHECKPOINT, {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": precision.scaler.state_dict(),
            "epoch": epoch + 1,
            "sampler_epoch": epoch + 1,
            "best_metric": best,
            "best_epoch": best_epoch,
            "best_metrics": best_metrics,
            "last_metrics": last_metrics,
            "rng": rng_state(),
            "loader_generator": None if train_loader.generator is None
            else train_loader.generator.get_state(),
        })
    plot_curves(out)
    return FitResult(epochs, best, best_epoch, last_metrics, best_metrics)


def build_optimizer(
    method: Method, lr: float, proxy_lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW over ``method.param_groups(lr, proxy_lr)``."""
    return torch.optim.AdamW(method.param_groups(lr, proxy_lr), weight_decay=weight_decay)

