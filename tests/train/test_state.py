"""bgf_pyg.train.state: the training state round trip."""

from __future__ import annotations

import pytest
import torch

from bgf_pyg.train import seed_all

from .runs import Stop, make_state, through_a_file, train


@pytest.mark.parametrize("batches,stop_at", [
    ("shuffled", (1, 0)),  # between epochs: the loader's generator reshuffles
    ("balanced", (1, 2)),  # mid-epoch: the sampler restarts after 2 of its 4 batches
    ("augmented", (1, 2)),  # mid-epoch, the loader's augmentation stream where it stopped
])
def test_state_dict_round_trip_continues_bit_identically(batches, stop_at):
    seed_all(0)
    uninterrupted = make_state(0, batches)
    train(uninterrupted, 3)

    seed_all(0)
    interrupted = make_state(0, batches)
    with pytest.raises(Stop) as stopped:
        train(interrupted, 3, stop_at)
    saved = through_a_file(stopped.value.args[0])

    seed_all(123)  # other RNG states and other initial weights: all must come from the dict
    resumed = make_state(1, batches)
    first = next(iter(uninterrupted.method.state_dict()))
    assert not torch.equal(resumed.method.state_dict()[first],
                           uninterrupted.method.state_dict()[first])
    resumed.load_state_dict(saved)
    assert (resumed.epoch, resumed.step) == stop_at
    train(resumed, 3)
    for name, value in uninterrupted.method.state_dict().items():
        assert torch.equal(resumed.method.state_dict()[name], value), name
    assert resumed.scheduler.get_last_lr() == uninterrupted.scheduler.get_last_lr()
    assert resumed.epoch == 3 and resumed.step == 0


def test_state_dict_is_the_last_checkpoint_layout():
    state = make_state(0, "balanced")
    state.epoch, state.step, state.loss_sum, state.best_metric, state.best_epoch = 2, 1, 0.5, \
        0.75, 2
    saved = state.state_dict()
    assert set(saved) == {"model", "optimizer", "scheduler", "scaler", "epoch", "sampler_epoch",
                          "step", "loss_sum", "best_metric", "best_epoch", "best_metrics",
                          "last_metrics", "rng", "loader_generator", "augmentation_generator"}
    assert (saved["epoch"], saved["sampler_epoch"], saved["step"], saved["best_epoch"]) == \
        (2, 2, 1, 2)
