"""Backbones: output shapes and local ImageNet weights (loaded, missing, corrupt or foreign)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from bgf_pyg.models import EmbeddingNet, build_backbone


@pytest.mark.parametrize("name,feature_dim,pooling", [("resnet18", 512, "avg"),
                                                      ("resnet50", 2048, "max")])
def test_resnet_shapes(name, feature_dim, pooling):
    net = build_backbone(name, 32, pooling=pooling).eval()
    images = torch.randn(2, 3, 32, 32)
    assert net.features(images).shape == (2, feature_dim)
    assert net(images).shape == (2, 32)
    pool = torch.nn.AdaptiveMaxPool2d if pooling == "max" else torch.nn.AdaptiveAvgPool2d
    assert isinstance(net.trunk.avgpool, pool)


def test_smallcnn_shapes():
    net = build_backbone("smallcnn", 8)
    assert net.features(torch.randn(3, 1, 28, 28)).shape == (3, net.feature_dim)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 8)
    assert build_backbone("smallcnn", 8, in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 8)


def test_pretrained_loads_local_state_dict(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # fc.* included, as torchvision ships it
    net = build_backbone("resnet18", 8, pretrained=str(path))
    torch.testing.assert_close(net.trunk.conv1.weight, reference.conv1.weight, atol=0, rtol=0)
    torch.testing.assert_close(net.trunk.layer4[1].bn2.running_var,
                               reference.layer4[1].bn2.running_var, atol=0, rtol=0)


def test_pretrained_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", 8, pretrained=str(path))


def test_pretrained_corrupt_or_foreign_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        build_backbone("resnet18", 8, pretrained=str(corrupt))
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(RuntimeError, match="does not match"):
        build_backbone("resnet18", 8, pretrained=str(foreign))


def test_weights_with_a_projection_between_trunk_and_head_are_refused():
    net = EmbeddingNet(nn.Linear(6, 12), 12, 4)
    older = {**net.state_dict(), "proj.weight": torch.zeros(12, 12), "proj.bias": torch.zeros(12)}
    with pytest.raises(ValueError, match="graph_dim now projects on the graph module's side"):
        net.load_state_dict(older)
    net.load_state_dict(net.state_dict())  # its own weights load
