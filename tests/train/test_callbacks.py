"""bgf_pyg.train.callbacks: the events a callback of fit hears, and the records."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from bgf_pyg.run_folder import read_metrics
from bgf_pyg.train import Checkpointer, Evaluator, FitCallback, fit, run_callbacks, seed_all

from .runs import NoisyImages, make_state


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
    evaluator = Evaluator(state.method, torch.device("cpu"), loader=test, split="val",
                          select_on="val", test_loader=test)
    fit(state, Checkpointer(tmp_path), epochs=2, evaluator=evaluator,
        callbacks=[*run_callbacks(tmp_path, "val"), recorder], progress=False)
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
