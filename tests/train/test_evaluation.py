"""bgf_pyg.train.evaluation: the evaluator's schedule and selection."""

from __future__ import annotations

import pytest
import torch

from bgf_pyg.train import Checkpointer, Evaluator, evaluation

from .runs import make_state


def test_evaluator_evaluates_when_due_and_keeps_the_best(monkeypatch):
    script = iter([0.5, 0.7, 0.6])
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda *args, **kwargs: {"recall@1": next(script)})
    state = make_state(0, "balanced")
    evaluator = Evaluator(state.method, torch.device("cpu"), loader=[], split="val",
                          select_on="val", every=2)
    seen = []
    for epoch in range(1, 6):
        state.epoch = epoch
        record, best = evaluator.after_epoch(state, epochs=5)
        seen.append((epoch, record.get("recall@1"), best))
    assert seen == [(1, None, False), (2, 0.5, True), (3, None, False), (4, 0.7, True),
                    (5, 0.6, False)]
    assert (state.best_epoch, state.best_metric, state.last_metrics) == (4, 0.7,
                                                                        {"recall@1": 0.6})
    # No test split and a validation selection split: no test numbers, epoch 4 selected.
    assert evaluator.final(state, Checkpointer("unused"), epochs=5) == ({}, 4)


def test_evaluator_refuses_an_unknown_selection():
    with pytest.raises(ValueError, match="select_on"):
        Evaluator(make_state(0, "balanced").method, torch.device("cpu"), select_on="best")
