"""Test-time refinement requested by an experiment (``refine``): checked before training,
evaluated with the selected weights after it."""

from __future__ import annotations

import torch

from .. import distributed
from ..checks import naming
from ..config import Config
from ..refine.protocol import check_refinements, embed_split, evaluate_refinements
from ..run_folder import append_metrics
from .build import eval_loader
from .splits import Splits


def check_refine_request(config: Config, method, splits: Splits) -> None:
    """Refuse, before any training or embedding, a refinement that cannot run on these sets."""
    if config.refine == ["none"]:
        return
    if distributed.is_distributed():
        raise naming(ValueError(f"refine={','.join(config.refine)} runs in one process: evaluate "
                                "the finished run with bgf-eval instead of under torchrun"),
                     "refine")
    sizes = [len(d) for d in (splits.test, splits.gallery, splits.val) if d is not None]
    check_refinements(config.refine, method, config.refine_k, config.refine_alpha, sizes,
                      splits.val is not None, k_parameter="refine_k")


def evaluate_refine_request(config: Config, method, splits: Splits,
                            device: torch.device) -> list[dict]:
    """The records of :func:`~bgf_pyg.refine.protocol.evaluate_refinements` for ``refine``
    with the model's current weights."""
    test = embed_split(method, eval_loader(config, splits.test), device,
                       eval_loader(config, splits.gallery))
    val = None if splits.val is None else embed_split(method, eval_loader(config, splits.val),
                                                       device)
    return evaluate_refinements(method, test, val, config.refine, ks=config.refine_k,
                                alphas=config.refine_alpha)


def log_refinements(config: Config, records: list[dict], epochs: int,
                    selected_epoch: int | None) -> None:
    """Append the refinement records to ``metrics.jsonl`` as final records (rank 0)."""
    if not distributed.is_main_process():
        return
    for record in records:
        append_metrics(config.out, {"epoch": epochs, "final": True, "select_on": config.select_on,
                                    "selected_epoch": selected_epoch, **record})
