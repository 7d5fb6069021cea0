"""The parts :func:`bgf_pyg.train.fit` is made of: the training state, the checkpointer, the
evaluator and the callbacks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bgf_pyg.checks import InputError
from bgf_pyg.data import ClassBalancedBatchSampler
from bgf_pyg.models import EmbeddingNet, build_method, build_optimizer
from bgf_pyg.run_folder import load_checkpoint, lock_run_folder, read_metrics, save_checkpoint
from bgf_pyg.train import (
    Checkpointer,
    Evaluator,
    FitCallback,
    Precision,
    TrainingState,
    evaluation,
    fit,
    seed_all,
    train_one_epoch,
)

NUM_CLASSES, PER_CLASS, SIDE = 4, 6, 4


class NoisyImages(Dataset):
    """Images whose noise is drawn from NumPy's and torch's global RNGs at every access: a
    resumed run repeats the uninterrupted one only if both come back."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.images = torch.randn(NUM_CLASSES * PER_CLASS, 1, SIDE, SIDE, generator=generator)
        self.labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        noise = torch.from_numpy(np.random.standard_normal((1, SIDE, SIDE))).float()
        return self.images[index] + 0.1 * noise + 0.1 * torch.randn(1, SIDE, SIDE), \
            self.labels[index]


def make_state(init_seed: int, batches: str) -> TrainingState:
    """A fresh run: weights from ``init_seed``, a loader of shuffled or class-balanced batches,
    a model with dropout (the torch RNG) and a scheduler."""
    torch.manual_seed(init_seed)
    trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(SIDE * SIDE, 12))
    method = build_method("plain", EmbeddingNet(trunk, 12, 6), NUM_CLASSES)
    optimizer = build_optimizer(method, 1e-2, 1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    data = NoisyImages()
    if batches == "shuffled":
        loader = DataLoader(data, batch_size=6, shuffle=True,
                            generator=torch.Generator().manual_seed(7))
    else:
        loader = DataLoader(data, batch_sampler=ClassBalancedBatchSampler(data.labels, 2, 3),
                            generator=torch.Generator().manual_seed(7))
    return TrainingState(method, optimizer, loader, Precision(torch.device("cpu")), scheduler)


class Stop(Exception):
    """Ends a run at a chosen point, carrying the state dict taken there."""


def train(state: TrainingState, epochs: int, stop_at: tuple[int, int] | None = None) -> None:
    """The loop of ``fit`` without its run folder; ``stop_at=(epochs_done, step)`` raises
    :class:`Stop` with the state dict taken after that step (or epoch end, step 0)."""

    def after_step(step: int, loss_sum: float) -> None:
        state.step, state.loss_sum = step, loss_sum
        if (state.epoch, step) == stop_at:
            raise Stop(state.state_dict())

    while state.epoch < epochs:
        state.begin_epoch()
        train_one_epoch(state.method, state.loader, state.optimizer, state.precision,
                        done=(state.step, state.loss_sum), checkpoint=after_step)
        state.scheduler.step()
        state.end_epoch()
        if (state.epoch, 0) == stop_at:
            raise Stop(state.state_dict())


def through_a_file(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


@pytest.mark.parametrize("batches,stop_at", [
    ("shuffled", (1, 0)),  # between epochs: the loader's generator reshuffles
    ("balanced", (1, 2)),  # mid-epoch: the sampler restarts after 2 of its 4 batches
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
                          "last_metrics", "rng", "loader_generator"}
    assert (saved["epoch"], saved["sampler_epoch"], saved["step"], saved["best_epoch"]) == \
        (2, 2, 1, 2)


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


class Recorder(FitCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_fit(self, start_epoch):
        self.events.append(("before_fit", start_epoch))

    def before_step(self, step):
        self.events.append(("before_step", step))

    def after_step(self, step, loss, optimizer):
        self.events.append(("after_step", step))

    def after_epoch(self, epoch, record):
        self.events.append(("after_epoch", epoch, record))

    def after_train(self, epochs):
        self.events.append(("after_train", epochs))

    def after_fit(self, record):
        self.events.append(("after_fit", record))


def test_a_callback_hears_the_events_in_order(tmp_path, tiny_eval):
    seed_all(0)
    state = make_state(0, "balanced")
    test = DataLoader(NoisyImages(), batch_size=8)
    recorder = Recorder()
    fit(state.method, state.loader, state.optimizer, tmp_path, epochs=2, eval_loader=test,
        eval_split="val", select_on="val", test_loader=test, callback=recorder, progress=False)
    steps = len(state.loader)
    per_epoch = [event for step in range(steps)
                 for event in (("before_step", step), ("after_step", step))]
    names = [event[:2] if event[0].endswith("step") else event[0] for event in recorder.events]
    assert names == ["before_fit", *per_epoch, "after_epoch",
                     *[(name, steps + step) for name, step in per_epoch], "after_epoch",
                     "after_train", "after_fit"]
    assert recorder.events[0] == ("before_fit", 0)
    # The callback's records are those of metrics.jsonl, which fit's own callback wrote.
    records = [event[-1] for event in recorder.events if event[0] in ("after_epoch", "after_fit")]
    assert records == read_metrics(tmp_path)
    assert records[-1]["final"] and records[-1]["split"] == "test"
    assert [r["epoch"] for r in records[:2]] == [1, 2] and records[0]["split"] == "val"
