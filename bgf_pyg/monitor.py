"""TensorBoard logging of a :func:`~bgf_pyg.train.fit` run (``bgf-train --tensorboard``).

Every ``every`` steps: the training loss, each parameter group's learning rate and the mean
attention entropy of BGFormer's visual and semantic branches per layer (with the entropy of
uniform attention beside it: a branch whose entropy stays at that bound only averages its
neighbours). Every epoch: the epoch's loss, learning rate and evaluation metrics, tagged
with the split they come from (``eval/val/recall@1``). At the end: the final test metrics of the
selected weights, at their epoch (``eval/test/final/recall@1``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checks import InputError
from .domains import positive_int
from .nn import AttentionEntropy
from .train import FitCallback

#: Steps between two logged steps (the demo's 30 epochs of 15 steps give 45 points).
DEFAULT_LOG_EVERY = 10


class TensorBoardLogger(FitCallback):
    """Write a run's curves to ``log_dir`` with ``torch.utils.tensorboard``.

    Raises :class:`~bgf_pyg.checks.InputError` at construction when the optional ``tensorboard``
    package is missing. The event file is created at the first logged value, so nothing is
    written before training starts. Use as a context manager (or call :meth:`close`).
    """

    def __init__(
        self, log_dir: str | os.PathLike, model: nn.Module, every: int = DEFAULT_LOG_EVERY
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise InputError(
                "TensorBoardLogger needs the tensorboard package: "
                "pip install 'bgf_pyg[tensorboard]'"
            ) from err
        self._writer_class = SummaryWriter
        self._writer = None
        self.log_dir = os.fspath(log_dir)
        self.every = positive_int.check(every, "every")
        self.attention = AttentionEntropy(model)

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._writer_class(self.log_dir)
        return self._writer

    def before_step(self, step: int) -> None:
        if step % self.every == 0 and self.attention.branches:
            self.attention.start()

    def after_step(self, step: int, loss: float, optimizer: torch.optim.Optimizer) -> None:
        if step % self.every:
            return
        self.writer.add_scalar("train/loss", loss, step)
        for i, group in enumerate(optimizer.param_groups):
            self.writer.add_scalar(f"train/lr/{group.get('name', f'group{i}')}", group["lr"], step)
        for name, (entropy, uniform) in self.attention.stop().items():
            self.writer.add_scalar(f"attention_entropy/{name}", entropy, step)
            self.writer.add_scalar(f"attention_entropy_uniform/{name}", uniform, step)

    def after_epoch(self, epoch: int, record: dict) -> None:
        """The epoch's loss and rate under ``epoch/``, its metrics under ``eval/<split>/`` (the
        split the record names: ``val``, or ``test`` when the run selects on the test split)."""
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float):
                section = "epoch" if key in ("loss", "lr") else f"eval/{record['split']}"
                self.writer.add_scalar(f"{section}/{key}", value, epoch)
        self.writer.flush()

    def after_fit(self, record: dict) -> None:
        """The final test metrics under ``eval/test/final/``, at the selected epoch."""
        for key, value in record.items():
            if key.startswith(("recall@", "map@r", "r_precision", "nmi")):
                self.writer.add_scalar(f"eval/test/final/{key}", value, record["selected_epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.attention.stop()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
