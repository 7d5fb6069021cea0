"""The training loop: :func:`train_one_epoch` and :func:`fit`, which composes the parts of a run
(:class:`~bgf_pyg.train.TrainingState`, :class:`~bgf_pyg.train.Checkpointer`,
:class:`~bgf_pyg.train.Evaluator` and the :mod:`~bgf_pyg.train.callbacks`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed
from ..checks import InputError, NonFiniteError, check_positive_int, naming
from ..data import ClassBalancedBatchSampler
from ..models import Method
from .callbacks import CallbackList, CurvesCallback, FitCallback, LogCallback, MetricsCallback
from .checkpoint import Checkpointer
from .errors import DivergenceError
from .evaluation import Evaluator
from .precision import Precision
from .state import TrainingState, epoch_sampler

log = logging.getLogger(__name__)


def show_progress(flag: bool | None) -> bool:
    """Progress bars on when asked, or by default when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


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

    Under ``torch.distributed`` (see :mod:`bgf_pyg.distributed`) every rank runs :func:`fit` on
    its own loaders; the model trains in DistributedDataParallel, rank 0 alone writes the run
    folder and shows progress, ``last.pt`` holds every rank's RNG states, and evaluation gathers
    the ranks' embeddings before retrieval. A loss or embedding that stops being finite ends the
    run with a :class:`DivergenceError`.
    """
    check_positive_int(epochs, "epochs")
    device, main = torch.device(device), distributed.is_main_process()
    progress = show_progress(progress) and main
    evaluator = Evaluator(method, device, loader=eval_loader, gallery_loader=gallery_loader,
                          split=eval_split, select_on=select_on, every=eval_every,
                          test_loader=test_loader, test_gallery_loader=test_gallery_loader,
                          progress=progress)
    if checkpoint_every is not None:
        _check_checkpoint_every(checkpoint_every, train_loader)
    run_files = [MetricsCallback(out, header), CurvesCallback(out)] if main else []
    user = [] if callback is None else [callback]
    callbacks = CallbackList([*run_files, LogCallback(select_on), *user])
    with Checkpointer(out, config).open(resume, overwrite) as checkpointer:
        method.to(device)
        state = TrainingState(method, optimizer, train_loader, Precision(device, amp), scheduler)
        if resume:
            checkpointer.resume(state)
            _check_epochs_left(state.epoch, epochs, checkpointer)
        start = state.epoch
        callbacks.before_fit(start)
        model = distributed.wrap_ddp(method, device)

        def checkpoint_mid_epoch(step: int, loss_sum: float) -> None:
            state.step, state.loss_sum = step, loss_sum
            if step % checkpoint_every == 0 and step < state.sampler.num_batches:
                checkpointer.save_last(state)

        while state.epoch < epochs:
            state.begin_epoch()
            lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
            try:
                loss = train_one_epoch(
                    model, train_loader, optimizer, state.precision, progress=progress,
                    desc=f"epoch {state.epoch + 1}/{epochs}", callback=callbacks,
                    # len() of a resumed epoch's loader counts the steps left
                    first_step=state.epoch * (len(train_loader) + state.step),
                    done=(state.step, state.loss_sum), clip_grad=clip_grad, freeze_bn=freeze_bn,
                    checkpoint=checkpoint_mid_epoch if checkpoint_every else None)
            except DivergenceError as err:
                raise DivergenceError(f"epoch {state.epoch + 1}: {err}") from err
            if scheduler is not None:
                scheduler.step()
            state.end_epoch()
            evaluated, best = evaluator.after_epoch(state, epochs)
            if best:
                checkpointer.save_best(state)
            callbacks.after_epoch(state.epoch, {"epoch": state.epoch, "loss": loss, "lr": lr,
                                                **evaluated})
            checkpointer.save_last(state)
        callbacks.after_train(epochs)
        distributed.barrier()  # best.pt is on disk before any rank reads it
        test_metrics, selected = evaluator.final(state, checkpointer, epochs)
        if test_metrics:
            callbacks.after_fit(evaluator.final_record(test_metrics, selected, epochs))
        distributed.barrier()  # the run directory is complete when fit returns on any rank
        return FitResult(epochs, state.best_metric, state.best_epoch, state.last_metrics,
                         state.best_metrics, start_epoch=start, test_metrics=test_metrics,
                         selected_epoch=selected)


def _check_checkpoint_every(checkpoint_every: int, train_loader: DataLoader) -> None:
    check_positive_int(checkpoint_every, "checkpoint_every")
    if not isinstance(epoch_sampler(train_loader), ClassBalancedBatchSampler):
        raise ValueError("checkpoint_every needs a class-balanced batch sampler (it restarts "
                         "mid-epoch); random batches (proxygml) checkpoint at epoch ends")


def _check_epochs_left(start: int, epochs: int, checkpointer: Checkpointer) -> None:
    """A resumed run trains on to ``epochs``: fewer than it has done is an error."""
    if start > epochs:
        raise naming(InputError(
            f"epochs={epochs} is below the {start} epochs that {checkpointer.last} has already "
            f"trained; pass epochs={start + 1} or more to train on"), "epochs")
    if start == epochs:
        log.info("the run has already trained its %d epochs; nothing to do", epochs)
