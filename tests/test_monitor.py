"""``bgf-train --tensorboard``: the logger's curves, and a one-line error without tensorboard."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg import experiment
from bgf_pyg.cli import main
from bgf_pyg.data import ClassBalancedBatchSampler
from bgf_pyg.models import EmbeddingNet, build_method, build_optimizer
from bgf_pyg.train import FitResult, fit


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    ).EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_logger_writes_losses_rates_metrics_and_attention_entropy(tmp_path):
    monitor = pytest.importorskip("bgf_pyg.monitor")
    pytest.importorskip("torch.utils.tensorboard")
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(8)
    images = torch.randn(labels.numel(), 6) + labels.view(-1, 1).float()
    method = build_method("bgformer", EmbeddingNet(nn.Linear(6, 16), 16, 8), 3, k=3, heads=2)
    loader = DataLoader(TensorDataset(images, labels),
                        batch_sampler=ClassBalancedBatchSampler(labels, 3, 4, num_batches=3))
    optimizer = build_optimizer(method, 1e-3, 1e-1)
    with monitor.TensorBoardLogger(tmp_path / "tb", method, every=2) as logger:
        fit(method, loader, optimizer, tmp_path / "run", epochs=2, progress=False,
            eval_loader=DataLoader(TensorDataset(images, labels), batch_size=12), callback=logger,
            eval_split="val", select_on="val")
    curves = scalars(tmp_path / "tb")
    assert [step for step, _ in curves["train/loss"]] == [0, 2, 4]  # 6 steps, every 2
    assert [v for _, v in curves["train/lr/group0"]] == pytest.approx([1e-3] * 3)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    records = [r for r in records if not r.get("final")]  # the final test record is no epoch
    for key in ("recall@1", "nmi", "map@r"):
        assert [v for _, v in curves[f"eval/val/{key}"]] == pytest.approx(
            [r[key] for r in records])
    assert not any(tag.startswith("eval/test/") for tag in curves)  # the split is in the tag
    assert [v for _, v in curves["epoch/loss"]] == pytest.approx([r["loss"] for r in records])
    for layer in (0, 1):
        for kind in ("visual", "semantic"):
            entropy = [v for _, v in curves[f"attention_entropy/layer{layer}/{kind}"]]
            uniform = [v for _, v in curves[f"attention_entropy_uniform/layer{layer}/{kind}"]]
            assert len(entropy) == 3
            assert all(0 < e <= u + 1e-6 for e, u in zip(entropy, uniform, strict=True))


def test_logger_writes_the_final_test_metrics(tmp_path):
    """The test split, evaluated once with the selected weights, reaches TensorBoard too, at the
    selected epoch, under its own tag (a test-selected run's per-epoch curve is eval/test/)."""
    monitor = pytest.importorskip("bgf_pyg.monitor")
    pytest.importorskip("torch.utils.tensorboard")
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(8)
    images = torch.randn(labels.numel(), 6) + labels.view(-1, 1).float()
    method = build_method("plain", EmbeddingNet(nn.Linear(6, 16), 16, 8), 3)
    loader = DataLoader(TensorDataset(images, labels),
                        batch_sampler=ClassBalancedBatchSampler(labels, 3, 4, num_batches=2))
    evaluation = DataLoader(TensorDataset(images, labels), batch_size=12)
    with monitor.TensorBoardLogger(tmp_path / "tb", method) as logger:
        fit(method, loader, build_optimizer(method, 1e-3, 1e-1), tmp_path / "run", epochs=3,
            progress=False, eval_loader=evaluation, test_loader=evaluation, callback=logger,
            eval_split="val", select_on="val")
    curves = scalars(tmp_path / "tb")
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()][-1]
    assert final["final"]
    for key in ("recall@1", "recall@8", "map@r", "r_precision", "nmi"):
        assert curves[f"eval/test/final/{key}"] == [
            (final["selected_epoch"], pytest.approx(final[key]))]


def test_cli_hands_the_logger_to_fit(tmp_path, monkeypatch):
    monitor = pytest.importorskip("bgf_pyg.monitor")
    pytest.importorskip("torch.utils.tensorboard")
    seen = {}

    def fake_fit(method, *args, callback=None, **kwargs):  # the run itself is tested above
        seen["callback"] = callback
        return FitResult(1, 0.5, 1, {"recall@1": 0.5}, {"recall@1": 0.5},
                         test_metrics={"recall@1": 0.4}, selected_epoch=1)

    monkeypatch.setattr(experiment, "fit", fake_fit)
    argv = ["--method", "bgformer", "--embedding-dim", "16", "--graph-layers", "1",
            "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main([*argv, "--tensorboard"]) == 0
    logger = seen["callback"]
    assert isinstance(logger, monitor.TensorBoardLogger)
    assert logger.log_dir == str(tmp_path / "tensorboard")
    # the demo's lam = 1: no semantic branch to record
    assert list(logger.attention.branches) == ["layer0/visual"]
    assert main(argv) == 0 and seen["callback"] is None


def test_missing_tensorboard_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    code = main(["--method", "plain", "--epochs", "1", "--tensorboard", "--out", str(tmp_path),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "bgf-train: error: --tensorboard needs the tensorboard package: "
        "pip install 'bgf_pyg[tensorboard]'")
    assert not (tmp_path / "last.pt").exists()
