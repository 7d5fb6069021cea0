"""The frozen backbone's feature cache (``bgf_pyg.data.features``): reused while nothing changed,
rebuilt when an input changes, never half-written, served to the class-balanced sampler; training
on the frozen features end to end; and the inputs both refuse."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from bgf_pyg import run_folder
from bgf_pyg.cli import main
from bgf_pyg.data import CUB200, ClassBalancedBatchSampler, eval_transform
from bgf_pyg.data.features import (
    FeatureDataset,
    HorizontalFlip,
    cache_path,
    cached_features,
    feature_dataset,
    feature_key,
)
from bgf_pyg.data.noise import CorruptedTraining
from bgf_pyg.data.splits import ClassSubset
from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.experiment import refinement
from bgf_pyg.models import build_backbone
from tests.data.test_datasets import make_cub
from tests.models.test_efficientnet import SIZE, needs_extra
from tests.test_cli import assert_user_error


class CountingTrunk(nn.Module):
    """A tiny trunk that counts the images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        return self.conv(images).mean(dim=(2, 3))


@pytest.fixture
def cub(tmp_path):
    return CUB200(make_cub(tmp_path), "train")  # 4 images of 2 classes


def direct(dataset, trunk, transform):
    with torch.no_grad():
        return trunk(torch.stack([transform(dataset.load(i)) for i in range(len(dataset))]))


def test_cache_is_reused_when_nothing_changed(cub, tmp_path):
    torch.manual_seed(0)
    trunk, transform = CountingTrunk(), eval_transform(SIZE)
    rng = torch.get_rng_state()
    first = cached_features(cub, trunk, transform, tmp_path / "cache")
    assert trunk.images_seen == len(cub) == 4
    torch.testing.assert_close(first, direct(cub, trunk, transform))
    again = cached_features(cub, trunk, transform, tmp_path / "cache")
    assert trunk.images_seen == 4 + 4  # direct() above, no extraction
    assert torch.equal(again, first)
    # computing or reading draws nothing from torch's generator (seeded runs stay the same)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def change_weights(cub, trunk, transform):
    with torch.no_grad():
        trunk.conv.bias += 1
    return cub, transform


def change_size(cub, trunk, transform):
    return cub, eval_transform(SIZE + 8)


def change_transform(cub, trunk, transform):
    return cub, T.Compose([HorizontalFlip(), transform])


def change_an_image(cub, trunk, transform):
    pixels = np.full((12, 10, 3), 200, dtype=np.uint8)
    Image.fromarray(pixels).save(cub.paths[1])
    return cub, transform


def change_the_split(cub, trunk, transform):
    return CUB200(cub.paths[0].parents[2], "test"), transform


@pytest.mark.parametrize("change", [change_weights, change_size, change_transform,
                                    change_an_image, change_the_split])
def test_cache_is_rebuilt_when_an_input_changes(cub, tmp_path, change):
    torch.manual_seed(0)
    trunk, transform = CountingTrunk(), eval_transform(SIZE)
    cached_features(cub, trunk, transform, tmp_path / "cache")
    dataset, transform = change(cub, trunk, transform)
    seen = trunk.images_seen
    features = cached_features(dataset, trunk, transform, tmp_path / "cache")
    assert trunk.images_seen == seen + len(dataset)
    torch.testing.assert_close(features, direct(dataset, trunk, transform))


def test_a_cache_of_another_key_or_half_written_is_never_used(cub, tmp_path, caplog):
    torch.manual_seed(0)
    trunk, transform = CountingTrunk(), eval_transform(SIZE)
    key = feature_key(cub, trunk, transform, "backbone")
    path = cache_path(tmp_path, key)
    expected = direct(cub, trunk, transform)
    # a file at the right name whose stored key differs (another backbone's weights)
    run_folder.save_checkpoint(path, {"key": {**key, "weights": "0" * 64},
                                      "features": torch.zeros(4, 5)})
    torch.testing.assert_close(cached_features(cub, trunk, transform, tmp_path), expected)
    assert "made for other inputs" in caplog.text
    # a truncated file (e.g. copied half)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    seen = trunk.images_seen
    torch.testing.assert_close(cached_features(cub, trunk, transform, tmp_path), expected)
    assert trunk.images_seen == seen + 4
    assert "unreadable" in caplog.text


def test_a_killed_cache_write_leaves_no_file(cub, tmp_path, monkeypatch):
    trunk, transform = CountingTrunk(), eval_transform(SIZE)

    def killed(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        cached_features(cub, trunk, transform, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_feature_dataset_serves_views_to_the_class_balanced_sampler(cub, tmp_path):
    torch.manual_seed(0)
    trunk, center = CountingTrunk(), eval_transform(SIZE)
    views = [center, T.Compose([HorizontalFlip(), center])]

    def features_of(images, transform):
        return cached_features(images, trunk, transform, tmp_path)

    train = feature_dataset(cub, features_of, views, sample_views=True)
    assert train.num_views == 2 and len(train) == 4 and torch.equal(train.labels, cub.labels)
    both = torch.stack([direct(cub, trunk, v) for v in views])
    sampler = ClassBalancedBatchSampler(train.labels, 2, 2, seed=0)
    for features, labels in DataLoader(train, batch_sampler=sampler):
        assert features.shape == (4, 5) and labels.unique().numel() == 2
    drawn = []
    for _ in range(40):  # each draw is one of the item's two views, both come up
        feature = train[0][0]
        drawn.append([v for v in range(2) if torch.allclose(feature, both[v, 0])])
    assert all(len(d) == 1 for d in drawn) and {d[0] for d in drawn} == {0, 1}
    # a class subset (the validation split) indexes the image list's features
    val = ClassSubset(cub, [cub.class_ids[-1]])  # as the validation split is made
    assert val.indices != list(range(len(cub)))
    val_features = feature_dataset(val, features_of, [center])
    torch.testing.assert_close(val_features.features[0], both[0, val.indices])
    assert isinstance(val_features[0][0], torch.Tensor) and val_features[0][0].shape == (5,)
    # flipped labels (robustness studies): the images' features with the corrupted labels
    noisy = CorruptedTraining(cub, label_noise=1.0, seed=0)
    noisy_features = feature_dataset(noisy, features_of, [center])
    torch.testing.assert_close(noisy_features.features[0], both[0])
    assert torch.equal(noisy_features.labels, noisy.labels)
    assert not torch.equal(noisy_features.labels, cub.labels)
    with pytest.raises(ValueError, match="outliers"):
        feature_dataset(CorruptedTraining(cub, outliers=0.5), features_of, [center])
    with pytest.raises(ValueError, match=r"\(V, N, D\)"):
        FeatureDataset(torch.zeros(2, 3, 4), [0, 1])


def frozen_argv(root, out, method, *extra):
    argv = ["--dataset", "cub", "--data-root", str(root), "--method", method, "--freeze-backbone",
            "--image-size", str(SIZE), "--epochs", "2", "--select-on", "last",
            "--embedding-dim", "16", "--lr", "1e-3", "--out", str(out), "--device", "cpu",
            "--no-progress", *extra]
    if method != "proxygml":
        argv += ["--classes-per-batch", "2", "--samples-per-class", "2"]
    else:
        argv += ["--batch-size", "4"]
    if method == "bgformer":  # BGFormer at the trunk's 1,280-d width: a 591 MB last.pt
        argv += ["--k", "3", "--graph-dim", "32"]
    return argv


@needs_extra
@pytest.mark.parametrize("method", ["bgformer", "plain", "intra-batch", "proxygml"])
def test_frozen_training_end_to_end(tmp_path, capsys, tiny_eval, method):
    root = make_cub(tmp_path)
    for run in ("first", "second"):  # the second run reads every feature from the cache
        code = main(frozen_argv(root, tmp_path / run, method, "--backbone",
                                "efficientnet_lite0"))
        err = capsys.readouterr().err
        assert code == 0, err
    assert "computed and cached" not in err and "read from" in err
    assert len(list((root / ".features").glob("efficientnet_lite0-*.pt"))) == 3  # 2 views + test
    model = torch.load(tmp_path / "second" / "last.pt", weights_only=True)["model"]
    computed = torch.load(tmp_path / "first" / "last.pt", weights_only=True)["model"]
    for key, value in model.items():  # reading the cache trains exactly as computing it
        assert torch.equal(value, computed[key]), key
    assert not any(k.startswith("backbone.trunk.") for k in model)  # the trunk stayed fixed
    assert model["backbone.head.weight"].shape[1] == 1280  # it learnt from the pooled features


def test_frozen_training_with_a_resnet_weights_file(tmp_path, capsys, tiny_eval):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18", 8).trunk.state_dict(), weights)
    root = make_cub(tmp_path)
    code = main(frozen_argv(root, tmp_path / "run", "bgformer", "--backbone", "resnet18",
                            "--pretrained", str(weights), "--no-augment",
                            "--feature-cache", str(tmp_path / "features")))
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "features").glob("resnet18-*.pt"))) == 2  # train, test


def test_bgf_eval_rebuilds_a_frozen_run_from_its_checkpoint(tmp_path, capsys, tiny_eval,
                                                            monkeypatch):
    """bgf-eval reads the run's data folder and feature cache from its checkpoint (no
    --data-root) and evaluates the cached features of a frozen run as bgf-train did."""
    monkeypatch.setattr(refinement, "evaluate_refinements", functools.partial(
        refinement.evaluate_refinements, metric_ks=(1,), with_nmi=False))  # 4 test images
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18", 8).trunk.state_dict(), weights)
    root = make_cub(tmp_path)
    run = tmp_path / "run"
    assert main(frozen_argv(root, run, "bgformer", "--backbone", "resnet18", "--pretrained",
                            str(weights), "--no-augment", "--feature-cache",
                            str(tmp_path / "features"))) == 0
    trained = capsys.readouterr().out.strip().splitlines()[-1]
    assert eval_main([str(run), "--refine", "none", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "computed and cached" not in captured.err  # the cached features were read
    assert trained.split("|")[2:] == captured.out.strip().splitlines()[-1].split("|")[2:]


def test_frozen_needs_an_image_dataset(capsys):
    assert_user_error(capsys, main(["--backbone", "resnet18", "--pretrained", "x.pth",
                                    "--freeze-backbone"]), "--freeze-backbone has no effect",
                      "--dataset demo")


def test_cached_features_needs_an_image_list(tmp_path):
    with pytest.raises(TypeError, match="ImageListDataset"):
        cached_features(FeatureDataset(torch.zeros(2, 3), [0, 1]), CountingTrunk(),
                        eval_transform(SIZE), tmp_path)
