"""ViT backbones from timm: weights from a local file (a state dict the test saves, random
weights), the weight family's normalisation, one training step through ``bgf-train``; a clear
error without timm."""

from __future__ import annotations

import sys

import pytest
import torch
from torchvision import transforms as T

from bgf_pyg.cli import main
from bgf_pyg.data import TransformOptions, train_transform
from bgf_pyg.data.transforms import IMAGENET_MEAN
from bgf_pyg.models import backbone_normalization, build_backbone
from tests.data.test_datasets import make_cub
from tests.test_cli import assert_user_error


@pytest.fixture(scope="module")
def vit_state(tmp_path_factory):
    """A timm ViT-S/16 checkpoint with random weights and a 10-class head, saved as timm
    writes training checkpoints (``{"state_dict": ...}``)."""
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "vit_s16.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return path, model.state_dict()


def test_vit_loads_the_saved_weights(vit_state):
    path, saved = vit_state
    # A 32-px input: timm resamples the position embeddings, every other weight is the file's.
    net = build_backbone("vit_small_dino", 128, str(path), image_size=32)
    assert net.feature_dim == 384  # the CLS token of ViT-S
    own = net.trunk.state_dict()
    assert set(own) == {k for k in saved if not k.startswith("head.")}
    for key, value in own.items():
        if key != "pos_embed":
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    assert own["pos_embed"].shape == (1, 1 + 4, 384)
    torch.testing.assert_close(own["pos_embed"][:, 0], saved["pos_embed"][:, 0])  # CLS position
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_vit_trains_one_step_through_the_cli(vit_state, tmp_path, capsys, tiny_eval):
    path, saved = vit_state
    root = make_cub(tmp_path)
    out = tmp_path / "run"
    code = main(["--dataset", "cub", "--data-root", str(root), "--method", "bgformer",
                 "--backbone", "vit_small_in21k", "--pretrained", str(path), "--loss", "pce",
                 "--image-size", "32", "--test-resize", "32", "--classes-per-batch", "2",
                 "--samples-per-class", "2", "--k", "3", "--graph-heads", "6", "--epochs", "1",
                 "--select-on", "last",  # 2 training classes: none to hold out
                 "--embedding-dim", "16", "--lr", "1e-3", "--out", str(out), "--device", "cpu",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    model = torch.load(out / "last.pt", weights_only=True)["model"]
    trained = model["backbone.trunk.blocks.0.attn.qkv.weight"]
    assert trained.shape == saved["blocks.0.attn.qkv.weight"].shape
    assert not torch.equal(trained, saved["blocks.0.attn.qkv.weight"])  # it took a step


def test_vit_normalisation_and_transforms():
    assert backbone_normalization("vit_small_in21k") == ((0.5,) * 3, (0.5,) * 3)
    assert backbone_normalization("vit_small_dino")[0] == IMAGENET_MEAN
    assert backbone_normalization("resnet50")[0] == IMAGENET_MEAN
    options = TransformOptions(crop_scale=(0.2, 1.0), interpolation="bicubic",
                               mean=(0.5,) * 3, std=(0.5,) * 3)
    crop, flip, _, norm = train_transform(224, options).transforms
    assert crop.scale == (0.2, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and norm.mean == (0.5,) * 3


def test_vit_without_timm_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    code = main(["--dataset", "cub", "--data-root", "unused", "--backbone", "vit_small_dino",
                 "--no-progress"])
    assert_user_error(capsys, code, "timm", 'pip install -e ".[timm]"')
