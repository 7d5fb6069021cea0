"""Training: :func:`fit` trains a method, evaluates it and keeps a run folder (``last.pt``,
resumable to the bit; ``best.pt``; ``metrics.jsonl``; ``curves.png``), composed of parts of one
job each:

- :mod:`~bgf_pyg.train.state`: :class:`TrainingState`, everything a resumed run restores;
- :mod:`~bgf_pyg.train.checkpoint`: :class:`Checkpointer`, the run folder's lock, ``last.pt``
  and ``best.pt``;
- :mod:`~bgf_pyg.train.evaluation`: :func:`evaluate` and the :class:`Evaluator` of the protocol
  (selection split, selected checkpoint, final test);
- :mod:`~bgf_pyg.train.callbacks`: :class:`FitCallback` and the callbacks that write
  ``metrics.jsonl`` and ``curves.png`` and log the epochs;
- :mod:`~bgf_pyg.train.loop`: :func:`train_one_epoch` and :func:`fit`;
- :mod:`~bgf_pyg.train.rng` (seeds, RNG states) and :mod:`~bgf_pyg.train.precision` (AMP).

The optimiser factory is :func:`bgf_pyg.models.build_optimizer`.
"""

from ..run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from .callbacks import (
    CallbackList,
    CurvesCallback,
    FitCallback,
    LogCallback,
    MetricsCallback,
    plot_curves,
)
from .checkpoint import Checkpointer
from .errors import DivergenceError
from .evaluation import (
    BEST_METRIC,
    DEFAULT_KS,
    SELECT_ON,
    Evaluator,
    compute_embeddings,
    evaluate,
    split_label,
)
from .loop import FitResult, fit, show_progress, train_one_epoch
from .precision import Precision
from .rng import random_stream, rng_state, seed_all, seed_worker, set_rng_state, stream_seed
from .state import RESUME_KEYS, TrainingState

__all__ = [
    "BEST_CHECKPOINT",
    "BEST_METRIC",
    "DEFAULT_KS",
    "LAST_CHECKPOINT",
    "METRICS_FILE",
    "RESUME_KEYS",
    "SELECT_ON",
    "CallbackList",
    "Checkpointer",
    "CurvesCallback",
    "DivergenceError",
    "Evaluator",
    "FitCallback",
    "FitResult",
    "LogCallback",
    "MetricsCallback",
    "Precision",
    "TrainingState",
    "compute_embeddings",
    "evaluate",
    "fit",
    "load_checkpoint",
    "plot_curves",
    "random_stream",
    "read_metrics",
    "rng_state",
    "save_checkpoint",
    "seed_all",
    "seed_worker",
    "set_rng_state",
    "show_progress",
    "split_label",
    "stream_seed",
    "train_one_epoch",
]
