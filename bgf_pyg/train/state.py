"""The training state: everything a run must restore to continue bit-identically (weights,
optimiser, LR scheduler, grad scaler, RNG states, the loader's generators and the sampler's
position), as one object with ``state_dict()`` / ``load_state_dict()``.

Under ``torch.distributed`` the RNG states and the loader's generator are every rank's (a list in
rank order), so that each rank restores its own streams; :meth:`TrainingState.state_dict` is then
a collective (every rank calls it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .. import distributed
from ..data import AugmentedLoader
from ..models import Method
from .precision import Precision
from .rng import rng_state, set_rng_state

#: What a ``last.pt`` must hold to resume from it.
RESUME_KEYS = ("model", "optimizer", "scaler", "epoch", "best_metric", "best_epoch",
               "best_metrics", "last_metrics", "rng")


def epoch_sampler(loader: DataLoader):
    """The loader's (batch) sampler that wants ``set_epoch``, if any."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            return sampler
    return None


@dataclass
class TrainingState:
    """The objects a run trains (``method``, ``optimizer``, ``scheduler``, ``precision``'s grad
    scaler, ``loader``'s generator and sampler) and its counters: ``epoch`` epochs done, ``step``
    steps and ``loss_sum`` of the epoch under way (0 between epochs), the best selection metric
    so far (``best_metric`` at ``best_epoch``, with all its ``best_metrics``) and the latest
    evaluation (``last_metrics``).

    :meth:`begin_epoch` positions the sampler (past the ``step`` batches a resumed epoch has
    already trained); :meth:`state_dict` is the ``last.pt`` layout. A mid-epoch state resumes
    bit-identically when ``loader`` has its own ``generator`` (without one, each new loader
    iterator draws its seed from torch's global RNG, once more on resume).
    """

    method: Method
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    precision: Precision
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    _epoch_generator: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def sampler(self):
        """The loader's sampler that wants ``set_epoch`` (``None`` for a plain loader)."""
        return epoch_sampler(self.loader)

    def begin_epoch(self) -> None:
        """Set the sampler to epoch ``epoch`` (past ``step`` batches when resumed mid-epoch) and
        remember the loader's generator as the epoch found it: a mid-epoch checkpoint keeps that
        one, since the resumed loader iterator draws its seed from it again."""
        sampler = self.sampler
        if sampler is not None and self.step:
            sampler.set_epoch(self.epoch, start_batch=self.step)
        elif sampler is not None:
            sampler.set_epoch(self.epoch)
        self._epoch_generator = _generator_state(self.loader)

    def end_epoch(self) -> None:
        """Count the epoch as done."""
        self.epoch, self.step, self.loss_sum = self.epoch + 1, 0, 0.0

    def state_dict(self) -> dict:
        """Weights, optimiser, scheduler, scaler, counters, best metric, every rank's RNG states,
        loader generator (the epoch-start one mid-epoch, see :meth:`begin_epoch`) and
        augmentation stream (an :class:`~bgf_pyg.data.AugmentedLoader`'s)."""
        generator = self._epoch_generator if self.step else _generator_state(self.loader)
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "epoch": self.epoch,
            "sampler_epoch": self.epoch,
            "step": self.step,
            "loss_sum": self.loss_sum,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "last_metrics": self.last_metrics,
            "rng": _every_rank(rng_state()),
            "loader_generator": _every_rank(generator),
            "augmentation_generator": _every_rank(_augmentation_state(self.loader)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (this rank's RNG streams); a checkpoint
        without ``step`` / ``loss_sum`` (written at an epoch's end) resumes at the epoch's start.
        """
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.step, self.loss_sum = state.get("step", 0), state.get("loss_sum", 0.0)
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.best_metrics, self.last_metrics = state["best_metrics"], state["last_metrics"]
        set_rng_state(_this_rank(state["rng"]))
        generator = _this_rank(state.get("loader_generator"))
        if generator is not None and self.loader.generator is not None:
            self.loader.generator.set_state(generator)
        augmentation = _this_rank(state.get("augmentation_generator"))
        if augmentation is not None and isinstance(self.loader, AugmentedLoader):
            self.loader.augmentation.set_state(augmentation)
        self._epoch_generator = _generator_state(self.loader)  # mid-epoch: the epoch-start one


def _generator_state(loader: DataLoader) -> Tensor | None:
    generator = getattr(loader, "generator", None)
    return None if generator is None else generator.get_state()


def _augmentation_state(loader: DataLoader) -> Tensor | None:
    """The state of an :class:`~bgf_pyg.data.AugmentedLoader`'s augmentation stream: as it is now,
    mid-epoch too (the batches it drew for are trained, a resumed epoch skips them unloaded)."""
    return loader.augmentation.get_state() if isinstance(loader, AugmentedLoader) else None


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
