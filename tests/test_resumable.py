"""The options a resumed run may change, declared once on their ``Config`` fields: the lists
derived from the declarations (what a checkpoint compares, what it stores without comparing) are
today's, and a run's checkpoint holds exactly the compared options plus the execution ones."""

from __future__ import annotations

import pytest
import torch

from bgf_pyg.checks import InputError
from bgf_pyg.config import (
    EXECUTION_OPTIONS,
    OPTIONS,
    RESUMABLE,
    checkpoint_config,
    configure,
)
from bgf_pyg.experiment import run, use_threads
from bgf_pyg.train import LAST_CHECKPOINT, load_checkpoint

SHORT = {"method": "plain", "epochs": 1, "embedding_dim": 8, "samples_per_class": 60,
         "device": "cpu", "no_progress": True, "no_augment": True, "select_on": "last"}


def test_the_declared_lists_are_todays():
    assert EXECUTION_OPTIONS == {"threads", "data_root", "feature_cache"}
    assert RESUMABLE == EXECUTION_OPTIONS | {
        "epochs", "eval_every", "resume", "overwrite", "out", "device", "num_workers",
        "no_progress", "check_images", "checkpoint_every", "dist_timeout", "refine",
        "refine_k", "refine_alpha"}
    assert all(OPTIONS[name].resumable != OPTIONS[name].execution for name in RESUMABLE)


def test_the_checkpoint_compares_all_but_the_resumable_options():
    assert len(checkpoint_config(configure(**SHORT))) == len(OPTIONS) - len(RESUMABLE)


@pytest.fixture
def keep_threads():
    count = torch.get_num_threads()
    yield
    use_threads(count)


def test_a_run_stores_the_execution_options_and_resumes_with_others(tmp_path, tiny_eval,
                                                                     keep_threads):
    config = configure(**SHORT, threads=1, out=str(tmp_path))
    run(config)
    stored = load_checkpoint(tmp_path / LAST_CHECKPOINT)["config"]
    assert set(stored) == {*checkpoint_config(config), "val_class_ids", *EXECUTION_OPTIONS}
    assert {name: stored[name] for name in EXECUTION_OPTIONS} == {
        name: getattr(config, name) for name in EXECUTION_OPTIONS}
    resumed = run(config.replace(resume=True, epochs=2, eval_every=2, threads=2))
    assert (resumed.start_epoch, resumed.epochs) == (1, 2)
    with pytest.raises(InputError, match=r"\(lr 0.5 now, 0.001 in the checkpoint"):
        run(config.replace(resume=True, epochs=3, lr=0.5))
