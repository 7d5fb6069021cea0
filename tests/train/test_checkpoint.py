"""bgf_pyg.train.checkpoint: the run folder's lock, last.pt and best.pt."""

from __future__ import annotations

import pytest
import torch

from bgf_pyg.checks import InputError
from bgf_pyg.run_folder import load_checkpoint, lock_run_folder, save_checkpoint
from bgf_pyg.train import Checkpointer

from .runs import make_state


def test_checkpointer_refuses_a_locked_folder(tmp_path):
    with lock_run_folder(tmp_path):
        with pytest.raises(InputError, match="another process is training"):
            with Checkpointer(tmp_path).open(resume=False, overwrite=False):
                pass
    with Checkpointer(tmp_path).open(resume=False, overwrite=False):  # free again
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()


def test_checkpointer_writes_last_atomically(tmp_path, monkeypatch):
    state = make_state(0, "balanced")
    checkpointer = Checkpointer(tmp_path, {"lr": 0.01})
    state.epoch = 1
    checkpointer.save_last(state)
    real_save = torch.save

    def save_then_die(obj, f):
        real_save(obj, f)
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(torch, "save", save_then_die)
    state.epoch = 2
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save_last(state)
    monkeypatch.undo()
    saved = load_checkpoint(checkpointer.last)
    assert saved["epoch"] == 1 and saved["config"] == {"lr": 0.01} and saved["world_size"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial file left


def test_checkpointer_resume_refuses_other_options_and_world_sizes(tmp_path):
    state = make_state(0, "balanced")
    Checkpointer(tmp_path, {"lr": 0.01}).save_last(state)
    with pytest.raises(InputError, match="lr 0.02 now, 0.01 in the checkpoint"):
        Checkpointer(tmp_path, {"lr": 0.02}).resume(make_state(1, "balanced"))
    saved = load_checkpoint(tmp_path / "last.pt")
    save_checkpoint(tmp_path / "last.pt", {**saved, "world_size": 2})
    with pytest.raises(InputError, match="2 process"):
        Checkpointer(tmp_path, {"lr": 0.01}).resume(make_state(1, "balanced"))


def test_checkpointer_keeps_the_best_epoch_and_loads_it_back(tmp_path):
    state = make_state(0, "balanced")
    state.best_epoch, state.best_metrics = 3, {"recall@1": 0.5}
    checkpointer = Checkpointer(tmp_path, {"lr": 0.01})
    checkpointer.save_best(state)
    best_weights = {k: v.clone() for k, v in state.method.state_dict().items()}
    other = make_state(1, "balanced").method
    assert checkpointer.load_best(other) == 3
    assert all(torch.equal(other.state_dict()[k], v) for k, v in best_weights.items())
    assert load_checkpoint(checkpointer.best)["metrics"] == {"recall@1": 0.5}


def test_mid_epoch_checkpoints_every_given_steps_but_the_last(tmp_path):
    """``every`` is checked when the checkpointer is built; ``last.pt`` is written after every
    ``every``-th step of an epoch except its last (the epoch's end writes that one)."""
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1, got 0"):
        Checkpointer(tmp_path, every=0)
    state = make_state(0, "balanced")
    checkpointer = Checkpointer(tmp_path, every=2)
    checkpointer.check_loader(state.loader)
    written = []
    for step in range(1, state.sampler.num_batches + 1):
        state.step = step
        checkpointer.save_mid_epoch(state)
        if checkpointer.last.exists():
            written.append(load_checkpoint(checkpointer.last)["step"])
            checkpointer.last.unlink()
    assert written == list(range(2, state.sampler.num_batches, 2))
