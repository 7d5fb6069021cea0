"""Corrupted training data (--label-noise, --outliers) and the robustness benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bgf_pyg.cli import parse_args
from bgf_pyg.data.base import LabelledDataset
from bgf_pyg.data.noise import CorruptedTraining, flip_labels, noise_like
from bgf_pyg.experiment.splits import load_splits

ROOT = Path(__file__).resolve().parents[2]


class Tensors(LabelledDataset):
    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.class_ids = [f"c{int(label)}" for label in labels]

    def load(self, index):
        return self.images[index]


def test_flip_labels_changes_exactly_the_fraction_and_never_keeps_the_class():
    labels = torch.arange(7).repeat(30)
    for seed in range(3):
        flipped = flip_labels(labels, 0.4, torch.Generator().manual_seed(seed))
        changed = flipped != labels
        assert int(changed.sum()) == round(0.4 * len(labels))
        assert flipped.min() >= 0 and flipped.max() < 7
    again = flip_labels(labels, 0.4, torch.Generator().manual_seed(2))
    assert torch.equal(flipped, again)
    assert torch.equal(flip_labels(labels, 0.0, torch.Generator()), labels)
    # every wrong class is reachable (uniform over the C - 1 others)
    many = flip_labels(torch.zeros(2000, dtype=torch.long).index_fill_(0, torch.tensor([1]), 6),
                       1.0, torch.Generator().manual_seed(0))
    assert set(many[2:].tolist()) == set(range(1, 7))


def test_corrupted_training_keeps_clean_items_and_appends_outliers():
    images = torch.rand(40, 1, 4, 6)
    labels = torch.arange(4).repeat_interleave(10)
    base = Tensors(images, labels, transform=lambda x: x * 2)
    data = CorruptedTraining(base, label_noise=0.25, outliers=0.5, seed=3)
    assert len(data) == 60 and data.num_outliers == 20
    assert int((data.labels[:40] != labels).sum()) == 10
    assert torch.equal(data.clean_labels, labels)
    image, label = data[5]  # the original pixels, through the dataset's transform
    assert torch.equal(image, images[5] * 2) and label == int(data.labels[5])
    outlier, label = data[45]
    assert outlier.shape == (1, 4, 6) and 0 <= outlier.min() and outlier.max() <= 2
    assert torch.equal(outlier, data[45][0])  # the same noise every time it is read
    assert not torch.equal(outlier, data[46][0])
    assert 0 <= label < 4 and data.class_ids[45] == f"c{label}"
    with pytest.raises(ValueError, match="label_noise"):
        CorruptedTraining(base, label_noise=1.5)


def test_noise_like_makes_images_of_the_same_kind():
    generator = torch.Generator().manual_seed(0)
    rgb = noise_like(Image.new("RGB", (7, 5)), generator)
    gray = noise_like(Image.new("L", (7, 5)), generator)
    assert rgb.size == gray.size == (7, 5) and (rgb.mode, gray.mode) == ("RGB", "L")
    with pytest.raises(TypeError, match="tensor or PIL"):
        noise_like("not an image", generator)


def test_cli_corrupts_only_the_training_split():
    args = parse_args(["--method", "plain", "--label-noise", "0.2", "--outliers", "0.1"])
    clean = load_splits("demo", None, val_classes=args.val_classes)
    noisy = load_splits("demo", None, val_classes=args.val_classes, label_noise=0.2,
                        outliers=0.1, corruption_seed=0)
    size = len(clean.train)
    assert len(noisy.train) == size + round(0.1 * size)
    assert int((noisy.train.labels[:size] != clean.train.labels).sum()) == round(0.2 * size)
    assert torch.equal(noisy.val.labels, clean.val.labels)
    assert torch.equal(noisy.test.labels, clean.test.labels)


def load_robustness():
    """``benchmarks/robustness.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("robustness",
                                                  ROOT / "benchmarks" / "robustness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_robustness_benchmark_writes_json_and_plot_and_skips_finished_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = load_robustness()
    out = tmp_path / "r.json"
    argv = ["--epochs", "1", "--seeds", "0", "--models", "bgformer-full",
            "--label-noise", "0", "0.4", "--outliers", "0", "--runs", str(tmp_path / "runs"),
            "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["corruption"], r["level"]) for r in runs] == [("clean", 0.0), ("label_noise", 0.4)]
    assert all(0 <= r["recall@1"] <= 1 for r in runs)
    assert result["config"]["models"]["bgformer-full"][1] == {"k": 47}
    assert out.with_suffix(".png").stat().st_size > 0
    assert (tmp_path / "runs" / "bgformer-full-label_noise0.4-s0" / "metrics.jsonl").is_file()
    capsys.readouterr()
    assert bench.main(argv) == 0  # again: both runs are read back, none is retrained
    assert "[1/2]" not in capsys.readouterr().err
    assert json.loads(out.read_text())["runs"] == runs


def test_robustness_alpha_reaches_bgformer_runs_and_keeps_their_own_json(tmp_path):
    bench = load_robustness()
    args = bench.parse(["--alpha", "0.5", "--runs", str(tmp_path)])
    knn = bench.run_config(args, "bgformer-knn", "label_noise", 0.2, 1)
    assert knn.alpha == 0.5 and knn.label_noise == 0.2
    assert knn.out == str(tmp_path / "bgformer-knn-a0.5-label_noise0.2-s1")
    intra = bench.run_config(args, "intra-batch", "clean", 0.0, 0)
    assert "alpha" not in intra.given
    assert intra.out == str(tmp_path / "intra-batch-clean0-s0")
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"config": {"epochs": 15, "alpha": None}, "runs": []}))
    with pytest.raises(SystemExit, match="holds runs with --alpha None; pass another --out"):
        bench.main(["--alpha", "0.5", "--epochs", "15", "--out", str(out)])
