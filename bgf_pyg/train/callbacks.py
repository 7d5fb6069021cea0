"""What :func:`~bgf_pyg.train.fit` reports while it runs: the :class:`FitCallback` hooks, and the
callbacks that keep a run folder's ``metrics.jsonl`` (:class:`MetricsCallback`) and
``curves.png`` (:class:`CurvesCallback`) and log each epoch (:class:`LogCallback`).
:class:`bgf_pyg.monitor.TensorBoardLogger` is another.

A run calls, in order: ``before_fit`` once, ``before_step`` / ``after_step`` around every
optimiser step, ``after_epoch`` after each epoch (once it is evaluated), ``after_train`` after
the last epoch, and ``after_fit`` after the final test evaluation (only when there is one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import distributed
from ..run_folder import CURVES_FILE, append_metrics, atomic_write, keep_metrics_until, read_metrics
from .evaluation import BEST_METRIC, format_metrics, split_label

log = logging.getLogger(__name__)

#: The keys of a ``metrics.jsonl`` record that are not metrics.
RECORD_KEYS = frozenset({"epoch", "loss", "lr", "split", "final", "select_on", "selected_epoch"})


class FitCallback:
    """What :func:`~bgf_pyg.train.fit` reports to a logger (e.g.
    :class:`bgf_pyg.monitor.TensorBoardLogger`); every hook does nothing here. ``step`` counts
    optimiser steps over the whole run."""

    def before_fit(self, start_epoch: int) -> None:
        """Before training, with the epochs already done (``0``, or those of a resumed run)."""

    def before_step(self, step: int) -> None:
        """Before the forward pass of step ``step``."""

    def after_step(self, step: int, loss: float, optimizer: torch.optim.Optimizer) -> None:
        """After the optimiser step; ``loss`` is the step's loss."""

    def after_epoch(self, epoch: int, record: dict) -> None:
        """After epoch ``epoch`` (1-based) with its ``metrics.jsonl`` record."""

    def after_train(self, epochs: int) -> None:
        """After the last epoch, before the final test evaluation."""

    def after_fit(self, record: dict) -> None:
        """After the final test evaluation, with its ``"final": true`` ``metrics.jsonl`` record
        (``selected_epoch`` names the weights it evaluated)."""


def run_callbacks(out: str | os.PathLike, select_on: str = "test",
                  header: dict | None = None) -> list[FitCallback]:
    """The callbacks of a run folder ``out``: ``metrics.jsonl`` (its first line ``header``, the
    resolved options) and ``curves.png``, written by rank 0 alone, and every rank's epoch log
    lines (the split named as ``select_on`` says)."""
    log_lines = LogCallback(select_on)
    if not distributed.is_main_process():
        return [log_lines]
    return [MetricsCallback(out, header), CurvesCallback(out), log_lines]


class CallbackList(FitCallback):
    """Several callbacks heard in the order given."""

    def __init__(self, callbacks: Iterable[FitCallback]) -> None:
        self.callbacks = list(callbacks)

    def before_fit(self, start_epoch: int) -> None:
        for callback in self.callbacks:
            callback.before_fit(start_epoch)

    def before_step(self, step: int) -> None:
        for callback in self.callbacks:
            callback.before_step(step)

    def after_step(self, step: int, loss: float, optimizer: torch.optim.Optimizer) -> None:
        for callback in self.callbacks:
            callback.after_step(step, loss, optimizer)

    def after_epoch(self, epoch: int, record: dict) -> None:
        for callback in self.callbacks:
            callback.after_epoch(epoch, record)

    def after_train(self, epochs: int) -> None:
        for callback in self.callbacks:
            callback.after_train(epochs)

    def after_fit(self, record: dict) -> None:
        for callback in self.callbacks:
            callback.after_fit(record)


class MetricsCallback(FitCallback):
    """``<out>/metrics.jsonl``: a fresh run's log starts with ``{"config": header}``; a resumed
    one drops the records after its checkpoint; every epoch's and the final record are
    appended."""

    def __init__(self, out: str | os.PathLike, header: dict | None = None) -> None:
        self.out, self.header = Path(out), header

    def before_fit(self, start_epoch: int) -> None:
        keep_metrics_until(self.out, start_epoch, self.header)

    def after_epoch(self, epoch: int, record: dict) -> None:
        append_metrics(self.out, record)

    def after_fit(self, record: dict) -> None:
        append_metrics(self.out, record)


class CurvesCallback(FitCallback):
    """``<out>/curves.png`` (:func:`plot_curves`) once training ends."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    def after_train(self, epochs: int) -> None:
        plot_curves(self.out)


class LogCallback(FitCallback):
    """One log line per epoch (loss, learning rate and the evaluated split's metrics, named as
    :func:`~bgf_pyg.train.split_label` says) and one for the final test."""

    def __init__(self, select_on: str) -> None:
        self.select_on = select_on

    def after_epoch(self, epoch: int, record: dict) -> None:
        evaluated = (f"; {split_label(record['split'], self.select_on)}: {_metrics(record)}"
                     if "split" in record else "")
        log.info("epoch %d: loss %.4g, lr %.4g%s", epoch, record["loss"], record["lr"], evaluated)

    def after_fit(self, record: dict) -> None:
        log.info("%s, weights of epoch %s (selected on: %s): %s",
                 split_label("test", self.select_on), record["selected_epoch"], self.select_on,
                 _metrics(record))


def _metrics(record: dict) -> str:
    return format_metrics({k: v for k, v in record.items() if k not in RECORD_KEYS})


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
