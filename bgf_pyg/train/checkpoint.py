"""The checkpointer of a run folder: its lock, ``last.pt`` (the :class:`TrainingState`, to resume
from) and ``best.pt`` (the selected weights), written atomically by rank 0 alone
(:mod:`bgf_pyg.run_folder`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path

from torch.utils.data import DataLoader

from .. import distributed
from ..checks import InputError
from ..data import ClassBalancedBatchSampler
from ..domains import positive_int
from ..models import Method
from ..run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    check_config,
    load_checkpoint,
    lock_run_folder,
    prepare_run_folder,
    require_keys,
    save_checkpoint,
)
from .state import RESUME_KEYS, TrainingState, epoch_sampler

log = logging.getLogger(__name__)


class Checkpointer:
    """``last.pt`` and ``best.pt`` of the run folder ``out``, each holding ``config`` (the run's
    options, JSON-like): a resume with another configuration is refused (its ``uncompared`` keys
    aside, which record how the run is executed). ``last.pt`` is written
    after every epoch and, with ``every``, every ``every`` steps mid-epoch with the sampler's
    position (a :class:`~bgf_pyg.data.ClassBalancedBatchSampler` restarts there; bit-identical
    with ``num_workers=0``, since worker RNG states are not saved). Under ``torch.distributed``
    every rank calls each method (saving is a collective), rank 0 writes."""

    def __init__(self, out: str | os.PathLike, config: dict | None = None,
                 every: int | None = None, uncompared: Collection[str] = ()) -> None:
        self.out, self.config = Path(out), config
        self.every = None if every is None else positive_int.check(every, "checkpoint_every")
        self.main = distributed.is_main_process()
        self.uncompared = uncompared

    @property
    def last(self) -> Path:
        return self.out / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.out / BEST_CHECKPOINT

    @contextlib.contextmanager
    def open(self, resume: bool, overwrite: bool) -> Iterator[Checkpointer]:
        """Hold the folder for a run: rank 0 locks it (another process training there is
        refused) and prepares it (:func:`~bgf_pyg.run_folder.prepare_run_folder`: a fresh run in
        a folder that holds one needs ``overwrite``); the other ranks learn whether that worked,
        so an occupied folder is an error on every rank, not a hang."""
        with contextlib.ExitStack() as stack:
            def prepare() -> None:
                stack.enter_context(lock_run_folder(self.out))
                prepare_run_folder(self.out, resume, overwrite)

            distributed.run_on_main(prepare)
            yield self

    def resume(self, state: TrainingState) -> None:
        """Load ``last.pt`` into ``state``. A checkpoint of another configuration, model, or
        number of processes ends in an ``InputError`` naming the file."""
        saved = load_checkpoint(self.last)  # on the CPU: RNG states must stay CPU tensors
        require_keys(saved, RESUME_KEYS, self.last)
        self._check_world_size(saved)
        check_config(saved.get("config"), self.config, self.last, self.uncompared)
        try:
            state.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, missing keys
            first = str(err).strip().splitlines()[0]
            raise InputError(f"{self.last} does not fit this model or optimiser: {first}") \
                from err
        log.info("resumed from %s after epoch %d and %d steps", self.last, state.epoch,
                 state.step)

    def save_last(self, state: TrainingState) -> None:
        """``last.pt``: ``state`` (mid-epoch too), the configuration and the world size."""
        saved = {**state.state_dict(), "config": self.config,
                 "world_size": distributed.get_world_size()}
        if self.main:
            save_checkpoint(self.last, saved)

    def check_loader(self, loader: DataLoader) -> None:
        """Mid-epoch checkpoints need a loader that can restart mid-epoch."""
        if self.every is not None and not isinstance(epoch_sampler(loader),
                                                     ClassBalancedBatchSampler):
            raise ValueError("checkpoint_every needs a class-balanced batch sampler (it restarts "
                             "mid-epoch); random batches (proxygml) checkpoint at epoch ends")

    def save_mid_epoch(self, state: TrainingState) -> None:
        """``last.pt`` after step ``state.step`` when it is a multiple of ``every`` and not the
        epoch's last (the epoch's end writes its own)."""
        if (self.every is not None and state.step % self.every == 0
                and state.step < state.sampler.num_batches):
            self.save_last(state)

    def save_best(self, state: TrainingState) -> None:
        """``best.pt``: the weights of ``state``'s best epoch, its metrics and configuration."""
        if self.main:
            save_checkpoint(self.best, {"model": state.method.state_dict(),
                                        "epoch": state.best_epoch,
                                        "metrics": state.best_metrics, "config": self.config})

    def load_best(self, method: Method) -> int:
        """Load ``best.pt``'s weights into ``method``; return their epoch."""
        saved = load_checkpoint(self.best)
        method.load_state_dict(saved["model"])
        return saved["epoch"]

    def _check_world_size(self, saved: dict) -> None:
        """A checkpoint resumes with the number of processes that wrote it: the batches, the
        per-rank RNG streams and the DDP gradient averaging depend on it."""
        written, now = saved.get("world_size", 1), distributed.get_world_size()
        if written != now:
            raise InputError(f"{self.last} was written by a run of {written} process(es) but "
                             f"this run has {now}; resume with torchrun --nproc_per_node "
                             f"{written}")
