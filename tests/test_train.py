"""The fit loop: resume equals an uninterrupted run, atomic checkpoints, logs, evaluation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg.data import ClassBalancedBatchSampler, demo_train_transform, load_digits_demo
from bgf_pyg.models import build_backbone, build_method
from bgf_pyg.train import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    build_optimizer,
    evaluate,
    fit,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    seed_all,
    seed_worker,
)

PER_CLASS_TRAIN, PER_CLASS_TEST = 8, 6


class Augmented(TensorDataset):
    """A tensor dataset whose images go through the demo's random train transform (torch RNG)."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return demo_train_transform()(image), label


def _subset(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of each of the split's first 5 numbers, labelled 0..4."""
    images, numbers = load_digits_demo(split)
    classes = numbers.unique()[:5]
    keep = torch.cat([(numbers == c).nonzero().view(-1)[:per_class] for c in classes])
    return images[keep], torch.searchsorted(classes, numbers[keep])


@pytest.fixture(scope="module")
def demo() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": _subset("train", PER_CLASS_TRAIN), "test": _subset("test", PER_CLASS_TEST)}


def make_run(demo, method_name: str):
    """Model, loaders, optimiser and scheduler of a tiny demo run, built from seed 0."""
    generator = seed_all(0)
    images, labels = demo["train"]
    dataset = Augmented(images, labels)
    if method_name == "proxygml":
        loader = DataLoader(dataset, batch_size=10, shuffle=True, drop_last=True,
                            generator=generator, worker_init_fn=seed_worker)
    else:
        sampler = ClassBalancedBatchSampler(labels, 3, 4, num_batches=3, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, generator=generator,
                            worker_init_fn=seed_worker)
    method = build_method(method_name, build_backbone("smallcnn", 8), 5)
    optimizer = build_optimizer(method, 1e-3, 1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    test = DataLoader(TensorDataset(*demo["test"]), batch_size=16)
    return method, loader, optimizer, scheduler, test


def run_fit(demo, method_name, out, epochs, resume=False, overwrite=False):
    method, loader, optimizer, scheduler, test = make_run(demo, method_name)
    if resume:  # a new process: nothing of the killed run's RNG state survives
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)
    fit(method, loader, optimizer, out, epochs=epochs, eval_loader=test, scheduler=scheduler,
        resume=resume, overwrite=overwrite, progress=False)
    return method, optimizer


@pytest.mark.parametrize("method_name", ["intra-batch", "proxygml"])
def test_killed_and_resumed_equals_uninterrupted(demo, tmp_path, method_name):
    straight, straight_opt = run_fit(demo, method_name, tmp_path / "straight", epochs=2)
    run_fit(demo, method_name, tmp_path / "killed", epochs=1)  # "killed" after epoch 1
    resumed, resumed_opt = run_fit(demo, method_name, tmp_path / "killed", epochs=2, resume=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert straight_opt.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"]
    straight_log = read_metrics(tmp_path / "straight")
    assert straight_log == read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in straight_log] == [1, 2, 2]  # the epochs, then the final test
    assert straight_log[-1]["final"] and straight_log[-1]["split"] == "test"


def test_run_folder_contents(demo, tmp_path):
    run_fit(demo, "plain", tmp_path, epochs=2)
    state = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert state["epoch"] == 2 and state["sampler_epoch"] == 2
    assert {"model", "optimizer", "scheduler", "rng", "best_metric"} <= set(state)
    best = load_checkpoint(tmp_path / BEST_CHECKPOINT)
    assert best["metrics"]["recall@1"] == state["best_metric"]
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 2]
    assert {"loss", "recall@1", "nmi", "map@r"} <= set(json.loads(lines[-2]))
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_fresh_run_with_overwrite_restarts_the_log(demo, tmp_path):
    run_fit(demo, "plain", tmp_path, epochs=1)
    run_fit(demo, "plain", tmp_path, epochs=1, overwrite=True)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 1]  # epoch 1, final test


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def save_then_die(obj, f):
        assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint is intact while writing
        real_save(obj, f)
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial .tmp file left
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_without_checkpoint_names_the_path(demo, tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        run_fit(demo, "plain", tmp_path / "empty", epochs=1, resume=True)


def test_amp_on_cpu_is_ignored_with_a_warning(demo, tmp_path):
    method, loader, optimizer, _, _ = make_run(demo, "plain")
    with pytest.warns(UserWarning, match="mixed precision needs CUDA"):
        fit(method, loader, optimizer, tmp_path, epochs=1, amp=True, progress=False)


def test_evaluate_query_gallery(demo):
    method = build_method("plain", build_backbone("smallcnn", 8), 5)
    test = DataLoader(TensorDataset(*demo["test"]), batch_size=16)
    metrics = evaluate(method, test, torch.device("cpu"), gallery_loader=test)
    assert set(metrics) == {"recall@1", "recall@2", "recall@4", "recall@8"}
    assert metrics["recall@1"] == 1.0  # every query finds itself in the gallery
