"""Shared test fixtures."""

from __future__ import annotations

import functools

import pytest

from bgf_pyg.train import callbacks, evaluation


@pytest.fixture
def tiny_eval(monkeypatch):
    """Runs of ``bgf-train`` on the dataset-layout fixtures (2-5 test images each): evaluate
    Recall@1 only (R@8 needs 9 images), no NMI, no curves plot."""
    monkeypatch.setattr(evaluation, "evaluate",
                        functools.partial(evaluation.evaluate, ks=(1,), with_nmi=False))
    monkeypatch.setattr(callbacks, "plot_curves", lambda out: None)
