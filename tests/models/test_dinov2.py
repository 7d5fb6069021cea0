"""The DINOv2 backbones: one model from its timm, Meta and Hugging Face state dicts, any image
size, the position grid resampled for the run's size, cls+mean pooling, clear errors for other
architectures' weights, and ``bgf-train --backbone vit_small_dinov2`` end to end (random
weights saved by the test; nothing is downloaded)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from bgf_pyg.checks import InputError
from bgf_pyg.cli import main, parse_args
from bgf_pyg.data.features import module_fingerprint
from bgf_pyg.models import backbone_normalization, build_backbone
from bgf_pyg.models.tail import tail_trunk
from bgf_pyg.models.vit import dinov2_trunk, set_pooling
from tests.data.test_datasets import make_cub
from tests.test_cli import assert_user_error

timm = pytest.importorskip("timm", reason="the timm extra is not installed")

#: A small DINOv2-like ViT (16-d heads, layer scale) whose weights file has a 4 × 4 grid (56 px).
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}
WIDTH, GRID, PATCH = 48, 4, 14


def tiny_model(grid: int = GRID, **architecture) -> torch.nn.Module:
    """A random tiny timm DINOv2 ViT; its layer scales, CLS token and positions drawn large
    (timm's 1e-5 layer scales would make the blocks invisible in the features)."""
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                              img_size=grid * PATCH, dynamic_img_size=True,
                              **{**TINY, **architecture})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma") or name in ("cls_token", "pos_embed"):
                param.normal_(0, 0.5)
    return model.eval()


def meta_layout(state: dict) -> dict:
    """facebookresearch/dinov2's names: timm's, plus the masked-image token."""
    return {**state, "mask_token": torch.randn(1, WIDTH)}


def hf_layout(state: dict, prefix: str = "dinov2.") -> dict:
    """Hugging Face Dinov2ForImageClassification's names, written out independently of the
    package's table: separate query/key/value, ``layer_scaleN.lambda1``, a classifier beside
    the encoder."""
    out = {f"{prefix}embeddings.mask_token": torch.randn(1, WIDTH),
           "classifier.weight": torch.randn(10, 2 * WIDTH)}
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1"}
    for key, value in state.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        index, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
        layer = f"{prefix}encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
                out[f"{layer}attention.attention.{part}.{kind}"] = chunk
            continue
        for timm_name, hf_name in block.items():
            rest = rest.replace(timm_name, hf_name)
        out[layer + rest] = value
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model and its state dict saved in each layout."""
    torch.manual_seed(0)
    model = tiny_model()
    folder = tmp_path_factory.mktemp("dinov2")
    state = model.state_dict()
    paths = {"timm": folder / "timm.pth", "meta": folder / "meta.pth", "hf": folder / "hf.bin",
             "hf_safetensors": folder / "model.safetensors"}
    torch.save({"state_dict": state, "epoch": 3}, paths["timm"])  # a timm training checkpoint
    torch.save(meta_layout(state), paths["meta"])
    torch.save(hf_layout(state), paths["hf"])
    safetensors = pytest.importorskip("safetensors.torch")  # timm depends on it
    safetensors.save_file({k: v.contiguous().clone() for k, v in hf_layout(state).items()},
                          paths["hf_safetensors"])
    return model, paths


@pytest.mark.parametrize("layout", ["timm", "meta", "hf", "hf_safetensors"])
def test_every_layout_gives_the_same_model(source, layout):
    model, paths = source
    trunk = dinov2_trunk("vit_small_dinov2", paths[layout], **TINY).eval()
    assert isinstance(trunk, timm.models.VisionTransformer)  # the parts tail training cuts
    assert trunk.patch_embed.grid_size == (GRID, GRID) and len(trunk.blocks) == 2
    images = torch.randn(3, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        torch.testing.assert_close(trunk(images), model(images))
        assert trunk(images).shape == (3, WIDTH)  # the CLS token after the final norm


def test_any_image_size_works(source):
    model, paths = source
    trunk = dinov2_trunk("vit_small_dinov2", paths["meta"], **TINY).eval()
    with torch.no_grad():
        for side in (5, 14, 30, 56, 101):  # below a patch, non-multiples of 14, above the grid
            features = trunk(torch.randn(2, 3, side, side))
            assert features.shape == (2, WIDTH) and torch.isfinite(features).all()


def hf_resampled(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """Hugging Face Dinov2's ``interpolate_pos_encoding``: the patch grid resized bicubically to
    ``side`` × ``side`` (no antialiasing), the CLS position kept."""
    grid = pos_embed[:, 1:].reshape(1, GRID, GRID, WIDTH).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)], 1)


@pytest.mark.parametrize("image_size,side", [(84, 6), (28, 2), (33, 3)])
def test_the_grid_is_resampled_once_for_the_image_size(source, image_size, side):
    model, paths = source
    trunk = dinov2_trunk("vit_small_dinov2", paths["hf"], image_size=image_size, **TINY)
    assert trunk.patch_embed.grid_size == (side, side)  # 33 px: a padded partial patch
    torch.testing.assert_close(trunk.pos_embed, hf_resampled(model.pos_embed, side))


def test_cls_mean_pooling_concatenates_the_mean_patch_token(source):
    model, paths = source
    trunk = dinov2_trunk("vit_small_dinov2", paths["timm"], **TINY).eval()
    cls_fingerprint = module_fingerprint(trunk)
    assert set_pooling(trunk, "cls+mean") == 2 * WIDTH
    images = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        tokens = model.forward_features(images)  # after the final norm: CLS, then 9 patches
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
        torch.testing.assert_close(trunk(images), expected)
    assert module_fingerprint(trunk) != cls_fingerprint  # cached features are not shared


@pytest.mark.parametrize("pooling", ["cls", "cls+mean"])
def test_the_tail_after_the_cached_prefix_is_the_whole_model(source, pooling):
    model, paths = source
    trunk = dinov2_trunk("vit_small_dinov2", paths["timm"], image_size=42, **TINY).eval()
    set_pooling(trunk, pooling)
    images = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        expected = trunk(images)
        tail = tail_trunk(trunk, 1)
        cached = tail.prefix_module()(images)
        assert cached.shape == (3, 1 + 3 * 3, WIDTH)  # the tokens entering the last block
        torch.testing.assert_close(tail(cached), expected)


def test_backbone_name_normalisation_and_random_weights():
    assert backbone_normalization("vit_small_dinov2") == backbone_normalization("vit_small_dino")
    net = build_backbone("vit_small_dinov2", 16, image_size=28, vit_pooling="cls+mean")
    assert net.trunk_dim == 2 * 384 and net.trunk.patch_embed.grid_size == (2, 2)
    assert net(torch.randn(1, 3, 28, 28)).shape == (1, 16)
    padded = build_backbone("vit_small_dinov2", 16, image_size=29)  # a partial third patch
    assert padded.trunk.patch_embed.grid_size == (3, 3) and padded.trunk_dim == 384


def test_weights_of_another_architecture_are_refused(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(10, 512)},
               resnet)
    with pytest.raises(InputError) as caught:
        build_backbone("vit_small_dinov2", 16, str(resnet))
    message = str(caught.value)
    assert f"{resnet} holds no DINOv2 weights" in message
    assert all(layout in message for layout in ("timm", "Meta", "Hugging Face"))
    # A ViT-S/16 has timm's names and the same width, but 16-px patches and no layer scale.
    vit_s16 = tmp_path / "vit_s16.pth"
    torch.save(timm.create_model("vit_small_patch16_224", depth=1).state_dict(), vit_s16)
    with pytest.raises(InputError, match=rf"{vit_s16} does not match vit_small_dinov2 \(a "
                                         r"DINOv2 state dict in the timm"):
        build_backbone("vit_small_dinov2", 16, str(vit_s16))


def test_the_pooling_option_is_scoped_to_vits(tmp_path):
    argv = ["--dataset", "cub", "--data-root", str(tmp_path), "--backbone", "vit_small_dinov2"]
    config = parse_args([*argv, "--vit-pooling", "cls+mean"])
    assert (config.backbone, config.vit_pooling) == ("vit_small_dinov2", "cls+mean")
    assert parse_args(argv).vit_pooling == "cls"


@pytest.fixture(scope="module")
def full_size_hf_file(tmp_path_factory):
    """A random ViT-S/14 (full architecture, a 2 × 2 grid: 28 px) in the Hugging Face layout."""
    torch.manual_seed(1)
    model = tiny_model(grid=2, depth=12, embed_dim=384, num_heads=6)
    path = tmp_path_factory.mktemp("hf") / "model.bin"
    torch.save(hf_layout(model.state_dict()), path)
    return path


def test_bad_weights_file_is_one_line_through_the_cli(tmp_path, capsys):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.randn(4, 3, 7, 7)}, foreign)
    code = main(["--dataset", "cub", "--data-root", str(make_cub(tmp_path)), "--backbone",
                 "vit_small_dinov2", "--pretrained", str(foreign), "--image-size", "28",
                 "--epochs", "1", "--select-on", "last", "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress"])
    assert_user_error(capsys, code, str(foreign), "holds no DINOv2 weights", "Hugging Face")


def test_frozen_cls_mean_features_train_through_the_cli(full_size_hf_file, tmp_path, capsys,
                                                        tiny_eval):
    out = tmp_path / "run"
    code = main(["--dataset", "cub", "--data-root", str(make_cub(tmp_path)), "--method", "plain",
                 "--backbone", "vit_small_dinov2", "--pretrained", str(full_size_hf_file),
                 "--vit-pooling", "cls+mean", "--freeze-backbone", "--image-size", "28",
                 "--test-resize", "28", "--classes-per-batch", "2", "--samples-per-class", "2",
                 "--epochs", "1", "--select-on", "last", "--embedding-dim", "16",
                 "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    head = torch.load(out / "last.pt", weights_only=True)["model"]["backbone.head.weight"]
    assert head.shape == (16, 2 * 384)  # CLS and mean patch token of ViT-S


def test_the_last_block_trains_from_cached_tokens_through_the_cli(full_size_hf_file, tmp_path,
                                                                  capsys, tiny_eval):
    out = tmp_path / "run"
    code = main(["--dataset", "cub", "--data-root", str(make_cub(tmp_path)), "--method", "plain",
                 "--backbone", "vit_small_dinov2", "--pretrained", str(full_size_hf_file),
                 "--train-tail", "1", "--image-size", "28", "--test-resize", "28",
                 "--classes-per-batch", "2", "--samples-per-class", "2", "--epochs", "1",
                 "--select-on", "last", "--embedding-dim", "16", "--lr", "1e-3",
                 "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    saved = torch.load(full_size_hf_file, weights_only=True)
    first = torch.cat([saved[f"dinov2.encoder.layer.0.attention.attention.{p}.weight"]
                       for p in ("query", "key", "value")])
    last = saved["dinov2.encoder.layer.11.mlp.fc1.weight"]
    assert torch.equal(state["backbone.trunk.network.blocks.0.attn.qkv.weight"], first)
    assert not torch.equal(state["backbone.trunk.network.blocks.11.mlp.fc1.weight"], last)
