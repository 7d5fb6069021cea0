"""The fit loop: resume equals an uninterrupted run, atomic checkpoints, logs, evaluation, the
weights selected on the split ``select_on`` names; and the recipe options: the graph_dim projection
on the graph's side, the graph module's own learning rate, gradient clipping, frozen BatchNorm
statistics and the optimizer choice."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg import build_batch_graph, train
from bgf_pyg.data import ClassBalancedBatchSampler, demo_train_transform, load_digits_demo
from bgf_pyg.models import EmbeddingNet, build_backbone, build_method, build_optimizer
from bgf_pyg.train import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    Precision,
    evaluate,
    fit,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    seed_all,
    seed_worker,
    train_one_epoch,
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


def weights_sum(method) -> float:
    return sum(p.detach().double().sum().item() for p in method.parameters())


@pytest.mark.parametrize("select_on,val_epoch,test_epoch", [
    ("val", 2, 2), ("test", None, 3), ("last", 3, 3),
])
def test_fit_selects_on_the_split_it_says(tmp_path, monkeypatch, select_on, val_epoch,
                                          test_epoch):
    """Scripted R@1 per split and epoch: val peaks at epoch 2, test at epoch 3. The final test
    number must come from the weights of the epoch the protocol selects (found by their sum)."""
    script = {"val": [0.5, 0.9, 0.6], "test": [0.7, 0.2, 0.95]}
    calls, epoch_of_weights = {"val": 0, "test": 0}, {}

    def scripted_evaluate(method, loader, device, *, gallery_loader=None, progress=False):
        split = loader.split
        if select_on == "test" or split == "val":  # a periodic evaluation
            calls[split] += 1
            epoch_of_weights[weights_sum(method)] = calls[split]
            return {"recall@1": script[split][calls[split] - 1]}
        epoch = epoch_of_weights[weights_sum(method)]  # the final test: whose weights?
        return {"recall@1": script["test"][epoch - 1], "weights_of_epoch": epoch}

    monkeypatch.setattr(train.evaluation, "evaluate", scripted_evaluate)
    torch.manual_seed(0)
    images, labels = torch.randn(24, 1, 28, 28), torch.arange(4).repeat_interleave(6)
    method = build_method("plain", build_backbone("smallcnn", 8), 4)
    loader = DataLoader(TensorDataset(images, labels), batch_size=12, shuffle=True)
    val, test = DataLoader([]), DataLoader([])
    val.split, test.split = "val", "test"
    plan = ({"eval_loader": test, "eval_split": "test"} if select_on == "test" else
            {"eval_loader": val, "eval_split": "val", "test_loader": test})
    result = fit(method, loader, build_optimizer(method, 1e-2, 1e-2), tmp_path, epochs=3,
                 select_on=select_on, progress=False, **plan)
    final = read_metrics(tmp_path)[-1]
    assert final["final"] and final["split"] == "test" and final["select_on"] == select_on
    assert final["selected_epoch"] == result.selected_epoch == test_epoch
    assert result.test_metrics["recall@1"] == script["test"][test_epoch - 1]
    if select_on != "test":
        assert result.test_metrics["weights_of_epoch"] == test_epoch
    epochs = [r for r in read_metrics(tmp_path) if not r.get("final")]
    assert [r["split"] for r in epochs] == [plan["eval_split"]] * 3
    if val_epoch is not None and select_on == "val":
        assert load_checkpoint(tmp_path / BEST_CHECKPOINT)["epoch"] == val_epoch


def backbone() -> EmbeddingNet:
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 48))
    return EmbeddingNet(trunk, 48, 8)


def batch(p=3, m=4):
    torch.manual_seed(0)
    labels = torch.arange(p).repeat_interleave(m)
    return torch.randn(len(labels), 3, 4, 4), labels


def test_graph_dim_projects_on_the_graph_side_only():
    net = backbone()
    images, labels = batch()
    method = build_method("bgformer", net, loss="pce", samples_per_class=4, k=3, heads=4,
                          alpha=0.3, graph_dim=16)
    graph = method.bgformer
    assert graph.lin_in.out_features == graph.graph.channels == 16
    assert net.head.in_features == 48  # the head sees the trunk's own width
    f = net.trunk(images)
    torch.testing.assert_close(method.embed(images), F.normalize(net.head(f)))  # test time
    edges = build_batch_graph(f.detach(), labels, k=3)  # the kNN graph of the trunk features
    refined = graph.lin_out(graph.graph(graph.lin_in(f), edges.visual_edge_index,
                                        edges.semantic_edge_index))
    expected = (0.3 * method.loss_fn(net.head(f), labels)
                + 0.7 * method.loss_fn(net.head(refined), labels))
    torch.testing.assert_close(method(images, labels), expected)
    with pytest.raises(ValueError, match="divisible by heads"):
        build_method("bgformer", backbone(), heads=4, graph_dim=10)


def test_graph_lr_group_and_defaults():
    method = build_method("bgformer", backbone(), loss="proxy_anchor", num_classes=3,
                          samples_per_class=4, k=3, heads=4)
    groups = build_optimizer(method, 3e-5, 1e-2, graph_lr=8.5e-4).param_groups
    assert [g["lr"] for g in groups] == [3e-5, 8.5e-4, 1e-2]
    graph = {id(p) for p in method.bgformer.parameters()}
    assert {id(p) for p in groups[1]["params"]} == graph
    assert not graph & {id(p) for p in groups[0]["params"]}
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(method.parameters()))
    assert len(build_optimizer(method, 3e-5, 1e-2).param_groups) == 2  # no graph_lr: one rate


def test_clip_grad_bounds_the_global_norm():
    images, labels = batch()
    method = build_method("bgformer", backbone(), loss="pce", samples_per_class=4, k=3, heads=4)
    seen = []
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)

    def record_norm():
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    optimizer.register_step_pre_hook(lambda *args: record_norm())
    precision = Precision(torch.device("cpu"))
    train_one_epoch(method, [(images, labels)], optimizer, precision)
    assert seen[-1] > 1e-3  # unclipped
    train_one_epoch(method, [(images, labels)], optimizer, precision, clip_grad=1e-3)
    assert seen[-1] == pytest.approx(1e-3, rel=1e-4)


def test_freeze_bn_keeps_running_statistics():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 12))
    method = build_method("plain", EmbeddingNet(trunk, 12, 8), loss="pce", samples_per_class=4)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    images, labels = batch()
    before = trunk[1].running_mean.clone()
    train_one_epoch(method, [(images, labels)], optimizer, Precision(torch.device("cpu")),
                    freeze_bn=True)
    torch.testing.assert_close(trunk[1].running_mean, before)
    assert trunk[1].weight.grad is not None  # the affine parameters still train
    train_one_epoch(method, [(images, labels)], optimizer, Precision(torch.device("cpu")))
    assert not torch.equal(trunk[1].running_mean, before)


@pytest.mark.parametrize("name,cls,decoupled", [("adamw", torch.optim.AdamW, None),
                                                ("adam", torch.optim.Adam, None),
                                                ("radam", torch.optim.RAdam, True)])
def test_optimizer_choice(name, cls, decoupled):
    method = build_method("plain", backbone(), loss="pce", samples_per_class=4)
    optimizer = build_optimizer(method, 1e-4, 1e-2, 5e-5, name=name, eps=0.01)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["eps"] == 0.01 and group["weight_decay"] == 5e-5
    if decoupled:
        assert group["decoupled_weight_decay"]
