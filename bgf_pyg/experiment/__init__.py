"""Run one experiment from its :class:`~bgf_pyg.config.Config`: the one way to train and
evaluate a method in Python, and what ``bgf-train``, ``bgf-sweep``, ``examples/cub.py`` and the
benchmarks call.

.. code-block:: python

    from bgf_pyg.config import configure
    from bgf_pyg.experiment import run

    config = configure(method="bgformer", epochs=5, out="runs/demo-bgformer")
    result = run(config)                       # datasets, method, optimiser, fit, final test
    print(result.table())
    for lr in (1e-3, 3e-4):                    # a sweep: each run its own resolved config
        run(config.replace(lr=lr, out=f"runs/demo-lr{lr:g}"))
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..config import EXECUTION_OPTIONS, Config, as_record, checkpoint_config
from ..monitor import TensorBoardLogger
from ..run_folder import check_run_folder
from ..tables import (
    PROTOCOLS,
    format_table,
    plural,
    refinement_tables,
    results_caption,
    row_name,
)
from ..train import (
    Checkpointer,
    Evaluator,
    Precision,
    StepOptions,
    TrainingState,
    fit,
    run_callbacks,
    seed_all,
    show_progress,
)
from .build import (
    build_optimization,
    build_run_method,
    check_against_data,
    check_batch_graph_k,
    eval_loader,
    log_random_backbone,
    train_loader,
)
from .refinement import check_refine_request, evaluate_refine_request, log_refinements
from .splits import Splits, config_splits

log = logging.getLogger("bgf_pyg")

#: Folder of the TensorBoard event files inside the run folder.
TENSORBOARD_DIR = "tensorboard"


@dataclass
class Result:
    """What :func:`run` returns: the test metrics of the selected weights, which epoch they are
    from, the refinement records (``config.refine``) and the run's configuration."""

    config: Config
    test_metrics: dict[str, float]
    selected_epoch: int | None
    epochs: int
    start_epoch: int
    seconds: float
    refinements: list[dict] = field(default_factory=list)

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.config.out)

    def table(self) -> str:
        """The results table with its caption (one row per refinement when there are some)."""
        name = row_name(self.config)
        if self.refinements:
            return f"{results_caption(self.config)}\n{refinement_tables(name, self.refinements)}"
        return f"{results_caption(self.config)}\n{format_table([(name, [self.test_metrics])])}"


def use_threads(count: int) -> None:
    """Run torch's CPU operations on ``count`` threads (``threads``): intra-op always, inter-op
    too while torch still allows it (only before its first parallel work)."""
    torch.set_num_threads(count)
    if torch.get_num_interop_threads() != count:
        # once started, the inter-op pool keeps its count (it runs few of the operations)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(count)


def evaluation_plan(config: Config, splits: Splits) -> dict:
    """The keyword arguments of the :class:`~bgf_pyg.train.Evaluator` that say what is
    evaluated when: the selection split every ``eval_every`` epochs, the test split once at the
    end (unless it is the selection split, ``select_on="test"``)."""
    test = {"test_loader": eval_loader(config, splits.test),
            "test_gallery_loader": eval_loader(config, splits.gallery)}
    if config.select_on == "test":
        return {"loader": test["test_loader"], "gallery_loader": test["test_gallery_loader"],
                "split": "test"}
    return {"loader": eval_loader(config, splits.val), "split": "val", **test}


def check_against_training_split(config: Config, train: Dataset) -> None:
    """The checks of ``config`` against its training split (the sampling options, BGFormer's k
    against the global batch): :func:`run` runs them once the method is built (its weights files
    read), before any training; ``bgf-sweep`` on every combination before its first run."""
    check_against_data(config, train)
    check_batch_graph_k(config, train.num_classes)


def run(config: Config) -> Result:
    """Train and evaluate one method as ``config`` (from :func:`~bgf_pyg.config.configure`)
    says: the datasets, the method, its optimiser, :func:`~bgf_pyg.train.fit`, the final test
    and the requested refinements. Under torchrun every rank calls it; rank 0 writes the run
    folder."""
    use_threads(config.threads)
    device = distributed.init_distributed(config.device, config.dist_timeout)
    # each rank its own threads default (its CPUs)
    distributed.check_same_on_all_ranks(
        {k: v for k, v in config.options().items() if k != "threads"}, "options")
    out = Path(config.out)
    check_run_folder(out, config.resume, config.overwrite)  # before any data is read
    # The same seed on every rank: identical initial weights and identical dropout masks in the
    # batch-level part, which every rank computes on the same global batch.
    generator = seed_all(config.seed)
    generator.manual_seed(config.seed + distributed.get_rank())  # per-rank worker augmentation
    splits = config_splits(config)
    method, splits = build_run_method(config, splits, device)
    check_against_training_split(config, splits.train)
    log_random_backbone(config)
    check_refine_request(config, method, splits)
    train = train_loader(config, splits.train, generator)  # its checks run before any training
    optimizer, scheduler = build_optimization(config, method)
    # Rank 0 alone writes the run folder, event files included.
    logger = (TensorBoardLogger(out / TENSORBOARD_DIR, method)
              if config.tensorboard and distributed.is_main_process() else None)
    record = as_record(config)
    log.info("configuration: %s", json.dumps(record))
    start = time.perf_counter()
    checkpointer = Checkpointer(out, {
        **checkpoint_config(config), "val_class_ids": splits.val_class_ids,
        **{name: getattr(config, name) for name in sorted(EXECUTION_OPTIONS)},
    }, every=config.checkpoint_every, uncompared=EXECUTION_OPTIONS)
    progress = False if config.no_progress else None
    evaluator = Evaluator(method, device, select_on=config.select_on, every=config.eval_every,
                          progress=show_progress(progress), **evaluation_plan(config, splits))
    callbacks = run_callbacks(out, config.select_on,
                              header={**record, "val_class_ids": splits.val_class_ids})
    fitted = fit(TrainingState(method, optimizer, train, Precision(device, config.amp), scheduler),
                 checkpointer, epochs=config.epochs, evaluator=evaluator,
                 callbacks=callbacks if logger is None else [*callbacks, logger],
                 options=StepOptions(config.clip_grad, config.freeze_bn), resume=config.resume,
                 overwrite=config.overwrite, progress=progress)
    if logger is not None:  # each epoch flushes, so a run that stops early keeps its curves
        logger.close()
    refinements = []
    if config.refine != ["none"]:
        refinements = evaluate_refine_request(config, method, splits, device)
        log_refinements(config, refinements, fitted.epochs, fitted.selected_epoch)
    seconds = time.perf_counter() - start
    trained = fitted.epochs - fitted.start_epoch
    log.info("%s on %s: trained %s (%s) in %.0f s; test R@1 %.4f with the weights of epoch %s "
             "(%s); checkpoints in %s", row_name(config), config.dataset, plural(trained, "epoch"),
             f"{fitted.start_epoch + 1}–{fitted.epochs}" if trained else "none left", seconds,
             fitted.test_metrics["recall@1"], fitted.selected_epoch, PROTOCOLS[config.select_on],
             out)
    return Result(config, fitted.test_metrics, fitted.selected_epoch, fitted.epochs,
                  fitted.start_epoch, seconds, refinements)
