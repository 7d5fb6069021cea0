"""The training loop: :func:`train_one_epoch` and :func:`fit`, which runs the parts of a run built
by its caller (:class:`~bgf_pyg.train.TrainingState`, :class:`~bgf_pyg.train.Checkpointer`,
:class:`~bgf_pyg.train.Evaluator` and the :mod:`~bgf_pyg.train.callbacks`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..checks import InputError, NonFiniteError, naming
from ..domains import positive_int
from .callbacks import CallbackList, FitCallback, run_callbacks
from .checkpoint import Checkpointer
from .errors import DivergenceError
from .evaluation import Evaluator
from .precision import Precision
from .state import TrainingState

log = logging.getLogger(__name__)


def show_progress(flag: bool | None) -> bool:
    """Progress bars on when asked, or by default when stderr is a terminal; on rank 0 alone."""
    return (sys.stderr.isatty() if flag is None else flag) and distributed.is_main_process()


@dataclass(frozen=True)
class StepOptions:
    """How every optimiser step is taken: ``clip_grad`` clips the gradients' global norm
    (BGFormer's authors: 3); ``freeze_bn`` keeps every ``BatchNorm2d`` in eval mode (running
    statistics frozen, affine parameters trained), as ProxyGML's ``--freeze_BN``."""

    clip_grad: float | None = None
    freeze_bn: bool = False


@dataclass(frozen=True)
class EpochStart:
    """Where a pass over the loader begins: ``first_step`` is the run-wide number of the epoch's
    first step (what callbacks hear); ``steps`` and ``loss_sum`` are what the epoch trained
    before the loader (a run resumed mid-epoch)."""

    first_step: int = 0
    steps: int = 0
    loss_sum: float = 0.0


def train_one_epoch(
    method: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    options: StepOptions = StepOptions(),
    *,
    start: EpochStart = EpochStart(),
    callback: FitCallback | None = None,
    after_step: Callable[[int, float], None] | None = None,
    progress: str | None = None,
) -> float:
    """One pass over ``loader`` of ``(images, labels)`` batches; returns the epoch's mean loss.

    ``method`` is a :class:`Method` or its DistributedDataParallel wrapper (then the loss is the
    global batch's, the same on every rank). ``callback`` hears of each step;
    ``after_step(steps, loss_sum)`` runs after every step with the epoch's counts (mid-epoch
    checkpoints). ``progress`` is the progress bar's title (none without it).

    A non-finite loss, or a ``NonFiniteError`` from a check inside the forward pass (e.g. the
    batch graph's features), raises a :class:`DivergenceError` naming the step and learning rate.
    """
    method.train()
    if options.freeze_bn:
        for module in method.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    callback = callback or FitCallback()
    steps, total = start.steps, start.loss_sum
    bar = tqdm(loader, desc=progress, disable=progress is None, leave=False)
    for images, labels in bar:
        callback.before_step(start.first_step + steps)
        loss = _step(method, images, labels, optimizer, precision, options, steps + 1)
        total += loss
        callback.after_step(start.first_step + steps, loss, optimizer)
        steps += 1
        bar.set_postfix(loss=f"{loss:.4f}")
        if after_step is not None:
            after_step(steps, total)
    if steps == 0:
        raise InputError("the training loader yielded no batch (dataset smaller than a batch?)")
    return total / steps


def _step(method: nn.Module, images: torch.Tensor, labels: torch.Tensor,
          optimizer: torch.optim.Optimizer, precision: Precision, options: StepOptions,
          number: int) -> float:
    """One optimiser step on a batch (step ``number`` of the epoch, for errors); its loss."""
    images, labels = images.to(precision.device), labels.to(precision.device)
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    try:
        with precision.autocast():
            loss = method(images, labels)
    except NonFiniteError as err:
        if not bool(torch.isfinite(images).all()):
            raise InputError(f"step {number}: the input images contain NaN or inf") from err
        raise DivergenceError(f"training diverged at step {number} (learning rate {lr:g}): "
                              f"the network's outputs stopped being finite ({err})") from err
    if not torch.isfinite(loss):
        raise DivergenceError(f"training diverged at step {number} (learning rate {lr:g}): "
                              f"the loss became {loss.item()}")
    precision.scaler.scale(loss).backward()
    if options.clip_grad is not None:
        precision.scaler.unscale_(optimizer)  # clip the true gradients, not scaled ones
        torch.nn.utils.clip_grad_norm_(
            [p for group in optimizer.param_groups for p in group["params"]], options.clip_grad
        )
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return loss.item()


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
    state: TrainingState,
    checkpointer: Checkpointer,
    *,
    epochs: int,
    evaluator: Evaluator | None = None,
    callbacks: Sequence[FitCallback] | None = None,
    options: StepOptions = StepOptions(),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> FitResult:
    """Train ``state`` (method, optimiser, loader, precision: the device and AMP, scheduler) up
    to ``epochs`` epochs, with ``options`` for every step, evaluating as ``evaluator`` says (none
    by default) and keeping the run folder with ``checkpointer``; ``callbacks`` hear every step
    and epoch (by default :func:`~bgf_pyg.train.callbacks.run_callbacks`: ``metrics.jsonl``,
    ``curves.png``, one log line per epoch).

    With ``resume`` the run continues from ``last.pt``, so the result equals an uninterrupted run
    (see :class:`TrainingState`); without it, a folder that already holds a run is refused unless
    ``overwrite`` (:meth:`Checkpointer.open`). ``progress`` shows progress bars (by default when
    stderr is a terminal, :func:`show_progress`).

    Under ``torch.distributed`` (see :mod:`bgf_pyg.distributed`) every rank runs :func:`fit` on
    its own loaders; the model trains in DistributedDataParallel, rank 0 alone writes the run
    folder and shows progress. A loss or embedding that stops being finite ends the run with a
    :class:`DivergenceError`.
    """
    positive_int.check(epochs, "epochs")
    checkpointer.check_loader(state.loader)
    evaluator = evaluator or Evaluator(state.method, state.precision.device)
    hooks = CallbackList(run_callbacks(checkpointer.out, evaluator.select_on)
                         if callbacks is None else callbacks)
    with checkpointer.open(resume, overwrite):
        state.method.to(state.precision.device)
        if resume:
            checkpointer.resume(state)
            _check_epochs_left(state.epoch, epochs, checkpointer)
        start = state.epoch
        hooks.before_fit(start)
        model = distributed.wrap_ddp(state.method, state.precision.device)
        while state.epoch < epochs:
            title = f"epoch {state.epoch + 1}/{epochs}" if show_progress(progress) else None
            record = _train_epoch(model, state, checkpointer, options, hooks, title)
            evaluated, best = evaluator.after_epoch(state, epochs)
            if best:
                checkpointer.save_best(state)
            hooks.after_epoch(state.epoch, {**record, **evaluated})
            checkpointer.save_last(state)
        hooks.after_train(epochs)
        distributed.barrier()  # best.pt is on disk before any rank reads it
        test_metrics, selected = evaluator.final(state, checkpointer, epochs)
        if test_metrics:
            hooks.after_fit(evaluator.final_record(test_metrics, selected, epochs))
        distributed.barrier()  # the run directory is complete when fit returns on any rank
        return FitResult(epochs, state.best_metric, state.best_epoch, state.last_metrics,
                         state.best_metrics, start_epoch=start, test_metrics=test_metrics,
                         selected_epoch=selected)


def _train_epoch(model: nn.Module, state: TrainingState, checkpointer: Checkpointer,
                 options: StepOptions, callbacks: FitCallback, title: str | None) -> dict:
    """Epoch ``state.epoch + 1`` of ``model`` (``state.method`` or its DDP wrapper), from where a
    resumed epoch stopped, with ``checkpointer``'s mid-epoch ``last.pt``; the epoch's record."""
    state.begin_epoch()
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with

    def after_step(steps: int, loss_sum: float) -> None:
        state.step, state.loss_sum = steps, loss_sum
        checkpointer.save_mid_epoch(state)

    # len() of a resumed epoch's loader counts the steps left
    start = EpochStart(state.epoch * (len(state.loader) + state.step), state.step,
                       state.loss_sum)
    try:
        loss = train_one_epoch(model, state.loader, state.optimizer, state.precision, options,
                               start=start, callback=callbacks, after_step=after_step,
                               progress=title)
    except DivergenceError as err:
        raise DivergenceError(f"epoch {state.epoch + 1}: {err}") from err
    if state.scheduler is not None:
        state.scheduler.step()
    state.end_epoch()
    return {"epoch": state.epoch, "loss": loss, "lr": lr}


def _check_epochs_left(start: int, epochs: int, checkpointer: Checkpointer) -> None:
    """A resumed run trains on to ``epochs``: fewer than it has done is an error."""
    if start > epochs:
        raise naming(InputError(
            f"epochs={epochs} is below the {start} epochs that {checkpointer.last} has already "
            f"trained; pass epochs={start + 1} or more to train on"), "epochs")
    if start == epochs:
        log.info("the run has already trained its %d epochs; nothing to do", epochs)
