"""Fit / evaluate loop: one epoch of training, embedding + retrieval evaluation, checkpoints
(atomic, resumable to the bit), JSON-lines metrics and a PNG of the curves.

Evaluation protocol (``docs/design.rst`` §12): every ``eval_every`` epochs the *selection* split is
evaluated (the validation classes, or the test split as the originals do) and the best epoch on it
is kept in ``best.pt``; the test split is then evaluated once, at the end, with the selected
weights. Every metrics record names the split its numbers come from (``"split"``).

The pieces are small functions; :func:`fit` strings them together. The run folder ``out``
(``last.pt`` after every epoch, ``best.pt``, ``metrics.jsonl``, ``curves.png``) is kept by
:mod:`bgf_pyg.run_folder`. A loss or embedding that stops being finite ends the run with a
:class:`DivergenceError`.

Under ``torch.distributed`` (see :mod:`bgf_pyg.distributed`) every rank runs :func:`fit` on its own
loaders; the model trains in DistributedDataParallel, rank 0 alone writes the run folder and shows
progress, ``last.pt`` holds every rank's RNG states, and evaluation gathers the ranks' embeddings
before retrieval.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch_geometric import seed_everything
from tqdm.auto import tqdm

from . import distributed
from .checks import InputError, NonFiniteError, check_positive_int, naming
from .data import ClassBalancedBatchSampler
from .metrics import evaluate_retrieval, recall_at_k_query_gallery
from .models import Method
from .run_folder import (
    BEST_CHECKPOINT,
    CURVES_FILE,
    LAST_CHECKPOINT,
    append_metrics,
    atomic_write,
    check_config,
    keep_metrics_until,
    load_checkpoint,
    lock_run_folder,
    prepare_run_folder,
    read_metrics,
    require_keys,
    save_checkpoint,
)
from .run_folder import (
    METRICS_FILE as METRICS_FILE,  # re-exported: the run-folder names were defined here
)

log = logging.getLogger(__name__)

#: The metric that selects the best checkpoint.
BEST_METRIC = "recall@1"
#: ``--select-on``: the best epoch on the validation classes or on the test split (the
#: originals' protocol, labelled "test-selected"), or the last epoch.
SELECT_ON = ("val", "test", "last")
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


# ---------------------------------------------------------------------------- curves


def plot_curves(out: str | os.PathLike) -> Path | None:
    """Plot loss and evaluation metrics per epoch to ``<out>/curves.png`` (``None`` without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [r for r in read_metrics(out) if "loss" in r]  # the epochs, not the final test
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
    splits = sorted({r.get("split", "test") for r in evals})
    ax_eval.set(xlabel="epoch", ylabel=f"{'/'.join(splits) or 'evaluation'} metric")
    if evals:
        ax_eval.legend()
    fig.tight_layout()
    path = Path(out) / CURVES_FILE
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
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

    def after_fit(self, record: dict) -> None:
        """After the final test evaluation, with its ``"final": true`` ``metrics.jsonl`` record
        (``selected_epoch`` names the weights it evaluated)."""


class DivergenceError(InputError):
    """Training diverged: the loss or the network's outputs stopped being finite (usually a step
    size or logit scale too large for the model); the CLI adds the options that set them."""


def train_one_epoch(
    method: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    *,
    progress: bool = False,
    desc: str = "train",
    callback: FitCallback | None = None,
    first_step: int = 0,
    done: tuple[int, float] = (0, 0.0),
    checkpoint: Callable[[int, float], None] | None = None,
    clip_grad: float | None = None,
    freeze_bn: bool = False,
) -> float:
    """One pass over ``loader`` of ``(images, labels)`` batches; returns the mean loss.

    ``method`` is a :class:`Method` or its DistributedDataParallel wrapper (then the loss is the
    global batch's, the same on every rank). ``callback`` hears of each step, numbered from
    ``first_step``. ``done``: steps and loss sum of this epoch before ``loader`` (a run resumed
    mid-epoch); ``checkpoint(steps, loss_sum)`` runs after every step (mid-epoch checkpoints).
    ``clip_grad`` clips the gradients' global norm (BGFormer's authors: 3); ``freeze_bn`` keeps
    every ``BatchNorm2d`` in eval mode (running statistics frozen, affine parameters trained), as
    ProxyGML's ``--freeze_BN``.

    A non-finite loss, or a ``NonFiniteError`` from a check inside the forward pass (e.g. the
    batch graph's features), raises a :class:`DivergenceError` naming the step and learning rate.
    """
    method.train()
    if freeze_bn:
        for module in method.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    device = precision.device
    callback = callback or FitCallback()
    steps, total = done
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        callback.before_step(first_step + steps)
        lr = optimizer.param_groups[0]["lr"]
        try:
            with precision.autocast():
                loss = method(images, labels)
        except NonFiniteError as err:
            if not bool(torch.isfinite(images).all()):
                raise InputError(f"step {steps + 1}: the input images contain NaN or inf") \
                    from err
            raise DivergenceError(f"training diverged at step {steps + 1} (learning rate {lr:g}): "
                                  f"the network's outputs stopped being finite ({err})") from err
        if not torch.isfinite(loss):
            raise DivergenceError(f"training diverged at step {steps + 1} (learning rate {lr:g}): "
                                  f"the loss became {loss.item()}")
        precision.scaler.scale(loss).backward()
        if clip_grad is not None:
            precision.scaler.unscale_(optimizer)  # clip the true gradients, not scaled ones
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], clip_grad
            )
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total += loss.item()
        callback.after_step(first_step + steps, loss.item(), optimizer)
        steps += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint is not None:
            checkpoint(steps, total)
    if steps == 0:
        raise InputError("the training loader yielded no batch (dataset smaller than a batch?)")
    return total / steps


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


# ---------------------------------------------------------------------------- fit


def _epoch_sampler(loader: DataLoader):
    """The loader's (batch) sampler that wants ``set_epoch``, if any."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            return sampler
    return None


@dataclass
class FitResult:
    """What :func:`fit` ends with: the epochs trained by this call (``start_epoch`` to
    ``epochs``), last epoch's and best evaluation metrics (of the selection split), and the
    test split's metrics with the selected weights (``selected_epoch``; empty without a test
    loader)."""

    epochs: int
    best_metric: float | None
    best_epoch: int | None
    last_metrics: dict[str, float]
    best_metrics: dict[str, float]
    start_epoch: int = 0
    test_metrics: dict[str, float] = field(default_factory=dict)
    selected_epoch: int | None = None


def split_label(split: str, select_on: str) -> str:
    """How a split's numbers are named in log lines: ``val``, ``test``, or
    ``test [test-selected]`` when the checkpoint is chosen on the test split itself."""
    return f"{split} [test-selected]" if split == "test" and select_on == "test" else split


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, int | float) and k != "epoch")


def evaluate_selected(
    method: Method,
    out: Path,
    select_best: bool,
    test_loader: Iterable,
    test_gallery_loader: Iterable | None,
    device: torch.device,
    progress: bool,
) -> tuple[dict[str, float], int]:
    """Test metrics with the selected weights (``best.pt``'s when ``select_best``, else the
    current ones), and the epoch they are from. Loads them into ``method``."""
    epoch = None
    if select_best:
        state = load_checkpoint(out / BEST_CHECKPOINT)
        method.load_state_dict(state["model"])
        epoch = state["epoch"]
    return evaluate(method, test_loader, device, gallery_loader=test_gallery_loader,
                    progress=progress), epoch


#: What a ``last.pt`` must hold to resume from it.
RESUME_KEYS = ("model", "optimizer", "scaler", "epoch", "best_metric", "best_epoch",
               "best_metrics", "last_metrics", "rng")


def restore(
    path: Path,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    precision: Precision,
    train_loader: DataLoader,
    config: dict | None,
) -> dict:
    """Load ``path`` into the run's objects; a checkpoint of another configuration or model ends
    in an ``InputError`` naming the file (and the differing options when ``config`` is given)."""
    # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = load_checkpoint(path)
    require_keys(state, RESUME_KEYS, path)
    _check_world_size(state, path)
    check_config(state.get("config"), config, path)
    try:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, missing keys
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path} does not fit this model or optimiser: {first}") from err
    set_rng_state(_this_rank(state["rng"]))
    loader_state = _this_rank(state.get("loader_generator"))
    if loader_state is not None and train_loader.generator is not None:
        train_loader.generator.set_state(loader_state)
    return state


@contextlib.contextmanager
def _run_folder(out: Path, resume: bool, overwrite: bool) -> Iterator[None]:
    """Rank 0 locks and prepares ``out`` for the whole run; the other ranks learn whether that
    worked (an occupied folder is an error on every rank, not a hang)."""
    with contextlib.ExitStack() as stack:
        def prepare() -> None:
            stack.enter_context(lock_run_folder(out))
            prepare_run_folder(out, resume, overwrite)

        distributed.run_on_main(prepare)
        yield


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
    overwrite: bool = False,
    config: dict | None = None,
    amp: bool = False,
    progress: bool | None = None,
    callback: FitCallback | None = None,
    checkpoint_every: int | None = None,
    clip_grad: float | None = None,
    freeze_bn: bool = False,
    header: dict | None = None,
    eval_split: str = "test",
    select_on: str = "test",
    test_loader: Iterable | None = None,
    test_gallery_loader: Iterable | None = None,
) -> FitResult:
    """Train ``method`` for ``epochs`` epochs, evaluating every ``eval_every`` epochs (and after
    the last), keeping ``last.pt`` / ``best.pt`` in ``out``.

    With ``resume`` the run continues from ``<out>/last.pt``: weights, optimiser, scheduler, grad
    scaler, RNG states, the loader's generator and the sampler's epoch are restored, so the result
    equals an uninterrupted run. ``callback`` hears of every step and epoch (logging). Without
    ``resume``, a folder that already holds a run is refused unless ``overwrite`` (see
    :func:`~bgf_pyg.run_folder.prepare_run_folder`). ``config`` (the run's options, JSON-like) is
    stored in the checkpoints; a resume with a different one is refused.
    Every ``checkpoint_every`` steps ``last.pt`` is also written mid-epoch with the sampler's
    position (a :class:`~bgf_pyg.data.ClassBalancedBatchSampler` is needed to restart there;
    bit-identical with ``num_workers=0``, since worker RNG states are not saved).
    ``header`` (all the resolved options) is the first line of a fresh ``metrics.jsonl``.
    ``clip_grad`` and ``freeze_bn`` are as in :func:`train_one_epoch`.

    ``eval_loader`` (with ``gallery_loader``) is the split named ``eval_split`` (``"val"`` or
    ``"test"``) evaluated periodically; with ``select_on`` ``"val"`` or ``"test"`` its best
    epoch is kept in ``best.pt``, with ``"last"`` (or without ``eval_loader``) the final
    weights are the selected ones.
    ``test_loader`` (with ``test_gallery_loader``), when given, is evaluated once after training
    with the selected weights and logged as a ``"final"`` record of ``metrics.jsonl``.
    """
    check_positive_int(epochs, "epochs")
    check_positive_int(eval_every, "eval_every")
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    select_best = select_on != "last" and eval_loader is not None  # nothing to select on else
    label = split_label(eval_split, select_on)
    device = torch.device(device)
    out = Path(out)
    main = distributed.is_main_process()
    progress = show_progress(progress) and main
    sampler = _epoch_sampler(train_loader)
    if checkpoint_every is not None:
        check_positive_int(checkpoint_every, "checkpoint_every")
        if not isinstance(sampler, ClassBalancedBatchSampler):
            raise ValueError("checkpoint_every needs a class-balanced batch sampler (it restarts "
                             "mid-epoch); random batches (proxygml) checkpoint at epoch ends")
    with _run_folder(out, resume, overwrite):
        precision = Precision(device, amp)
        method.to(device)
        start, best, best_epoch, best_metrics, last_metrics = 0, None, None, {}, {}
        resume_done = (0, 0.0)
        if resume:
            state = restore(out / LAST_CHECKPOINT, method, optimizer, scheduler, precision,
                            train_loader, config)
            start, best, best_epoch = state["epoch"], state["best_metric"], state["best_epoch"]
            best_metrics, last_metrics = state["best_metrics"], state["last_metrics"]
            resume_done = (state.get("step", 0), state.get("loss_sum", 0.0))
            if start > epochs:
                raise naming(InputError(
                    f"epochs={epochs} is below the {start} epochs that {out / LAST_CHECKPOINT} "
                    f"has already trained; pass epochs={start + 1} or more to train on"),
                    "epochs")
            log.info("resumed from %s after epoch %d and %d steps", out / LAST_CHECKPOINT, start,
                     resume_done[0])
            if start == epochs:
                log.info("the run has already trained its %d epochs; nothing to do", epochs)
        if main:
            keep_metrics_until(out, start, header)
        model = distributed.wrap_ddp(method, device)

        def save_last(epochs_done: int, generator_state, step: int = 0,
                      loss_sum: float = 0.0) -> None:
            """``last.pt`` after ``epochs_done`` epochs and ``step`` steps of the next one."""
            last = {
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "scaler": precision.scaler.state_dict(),
                "epoch": epochs_done,
                "sampler_epoch": epochs_done,
                "step": step,
                "loss_sum": loss_sum,
                "best_metric": best,
                "best_epoch": best_epoch,
                "best_metrics": best_metrics,
                "last_metrics": last_metrics,
                "config": config,
                "world_size": distributed.get_world_size(),
                "rng": _every_rank(rng_state()),
                "loader_generator": _every_rank(generator_state),
            }
            if main:
                save_checkpoint(out / LAST_CHECKPOINT, last)

        for epoch in range(start, epochs):
            done = resume_done if epoch == start else (0, 0.0)
            if sampler is not None and done[0]:
                sampler.set_epoch(epoch, start_batch=done[0])
            elif sampler is not None:
                sampler.set_epoch(epoch)
            # A mid-epoch checkpoint keeps the generator as the epoch found it: the resumed
            # loader iterator draws its seed from it again.
            epoch_generator = _generator_state(train_loader)

            def checkpoint_mid_epoch(step: int, loss_sum: float, epoch=epoch,
                                     generator=epoch_generator) -> None:
                if step % checkpoint_every == 0 and step < sampler.num_batches:
                    save_last(epoch, generator, step, loss_sum)

            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
            try:
                loss = train_one_epoch(
                    model, train_loader, optimizer, precision, progress=progress,
                    desc=f"epoch {epoch + 1}/{epochs}", callback=callback,
                    # len() of a resumed epoch's loader counts the steps left
                    first_step=epoch * (len(train_loader) + done[0]), done=done,
                    checkpoint=checkpoint_mid_epoch if checkpoint_every else None,
                    clip_grad=clip_grad, freeze_bn=freeze_bn)
            except DivergenceError as err:
                raise DivergenceError(f"epoch {epoch + 1}: {err}") from err
            if scheduler is not None:
                scheduler.step()
            record: dict = {"epoch": epoch + 1, "loss": loss, "lr": lr}
            if eval_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
                last_metrics = evaluate(method, eval_loader, device,
                                        gallery_loader=gallery_loader, progress=progress)
                record.update(split=eval_split, **last_metrics)
                if select_best and (best is None or last_metrics[BEST_METRIC] > best):
                    best, best_epoch = last_metrics[BEST_METRIC], epoch + 1
                    best_metrics = last_metrics
                    if main:
                        save_checkpoint(out / BEST_CHECKPOINT, {
                            "model": method.state_dict(), "epoch": epoch + 1,
                            "metrics": last_metrics, "config": config})
            if main:
                append_metrics(out, record)
            if callback is not None:
                callback.after_epoch(epoch + 1, record)
            log.info("epoch %d: loss %.4g, lr %.4g%s", epoch + 1, loss, lr,
                     f"; {label}: {_format_metrics(last_metrics)}" if "split" in record else "")
            save_last(epoch + 1, _generator_state(train_loader))
        if main:
            plot_curves(out)
        distributed.barrier()  # best.pt is on disk before any rank reads it
        result = FitResult(epochs, best, best_epoch, last_metrics, best_metrics,
                           start_epoch=start, selected_epoch=best_epoch if select_best else epochs)
        if test_loader is not None:
            result.test_metrics, selected = evaluate_selected(
                method, out, select_best, test_loader, test_gallery_loader, device, progress)
            result.selected_epoch = selected or epochs
        elif eval_split == "test":  # the selection split is the test split (the originals)
            result.test_metrics = best_metrics if select_best else last_metrics
        if result.test_metrics:
            final = {"epoch": epochs, "final": True, "split": "test", "select_on": select_on,
                     "selected_epoch": result.selected_epoch, **result.test_metrics}
            if main:
                append_metrics(out, final)
            if callback is not None:
                callback.after_fit(final)
            log.info("%s, weights of epoch %s (selected on: %s): %s",
                     split_label("test", select_on), result.selected_epoch, select_on,
                     _format_metrics(result.test_metrics))
        distributed.barrier()  # the run directory is complete when fit returns on any rank
        return result


def _generator_state(loader: DataLoader) -> Tensor | None:
    generator = getattr(loader, "generator", None)
    return None if generator is None else generator.get_state()


def _every_rank(value):
    """``value`` in a single process; every rank's ``value`` (a list in rank order) when
    distributed, so that ``last.pt`` restores each rank's own RNG streams."""
    if not distributed.is_distributed():
        return value
    # torch.save bytes: all_gather_object's own pickling of tensors fails to load in torch 2.14.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return [torch.load(io.BytesIO(data), weights_only=True)
            for data in distributed.all_gather_objects(buffer.getvalue())]


def _this_rank(value):
    """This rank's entry of what :func:`_every_rank` stored."""
    return value[distributed.get_rank()] if distributed.is_distributed() else value


def _check_world_size(state: dict, path: Path) -> None:
    """A checkpoint resumes with the number of processes that wrote it: the batches, the per-rank
    RNG streams and the DDP gradient averaging depend on it."""
    written, now = state.get("world_size", 1), distributed.get_world_size()
    if written != now:
        raise InputError(f"{path} was written by a run of {written} process(es) but this run has "
                         f"{now}; resume with torchrun --nproc_per_node {written}")


#: The originals' optimisers: AdamW (BGFormer's authors), Adam with coupled L2 weight decay
#: (ProxyGML), RAdam with decoupled weight decay (intra-batch; its RAdam.py matches torch's).
OPTIMIZERS = ("adamw", "adam", "radam")


def build_optimizer(
    method: Method,
    lr: float,
    proxy_lr: float,
    weight_decay: float = 0.0,
    *,
    graph_lr: float | None = None,
    backbone_lr: float | None = None,
    name: str = "adamw",
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``name`` (see :data:`OPTIMIZERS`) over ``method.param_groups(lr, proxy_lr, graph_lr,
    backbone_lr)``."""
    groups = method.param_groups(lr, proxy_lr, graph_lr, backbone_lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay, eps=eps)
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay, eps=eps)
    if name == "radam":
        return torch.optim.RAdam(groups, weight_decay=weight_decay, eps=eps,
                                 decoupled_weight_decay=True)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")

