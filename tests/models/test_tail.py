"""Tail training from a cached prefix (``bgf_pyg.models.tail``, ``train_tail``): the tail after
the prefix is the whole network (EfficientNet-Lite0 and timm ViTs), the prefix stays frozen, its
cache follows the feature cache's rules, a run from the cache trains the same weights as one
computing the prefix every step, bgf-eval and --resume rebuild such a run, and the inputs it
refuses."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
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
from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.experiment import refinement
from bgf_pyg.models import build_backbone, build_method, build_optimizer
from bgf_pyg.models.efficientnet import NUM_STAGES
from bgf_pyg.models.tail import EFFICIENTNET_TAIL_DEPTH, TailTrunk, tail_trunk
from bgf_pyg.train.loop import train_one_epoch
from bgf_pyg.train.precision import Precision
from tests.data.test_datasets import make_cub
from tests.models.test_efficientnet import SIZE, needs_extra
from tests.test_cli import assert_user_error

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="the timm extra is not installed")


def tiny_vit(seed: int = 0, **options) -> torch.nn.Module:
    """A random timm VisionTransformer of 4 blocks, 32-d tokens, on 32-px images."""
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, **options)


def random_images(count: int, size: int = 32, dtype=torch.float32, seed: int = 0):
    return torch.randn(count, 3, size, size, dtype=dtype,
                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the split


@pytest.mark.parametrize("options", [
    {},  # CLS token, position embedding over it (timm, JAX)
    {"reg_tokens": 2, "no_embed_class": True},  # register tokens, DeiT-3's embedding
    {"dynamic_img_size": True},  # as DINOv2: position grid resampled per input
])
@pytest.mark.parametrize("cut", [1, 2, 4])
def test_vit_tail_after_prefix_is_the_whole_model(options, cut):
    vit = tiny_vit(**options).double().eval()
    trunk = tail_trunk(vit, cut)
    assert isinstance(trunk, TailTrunk)
    images = random_images(3, dtype=torch.float64, seed=cut)
    with torch.no_grad():
        cached = trunk.prefix_module()(images)
        expected = vit(images)  # timm's own forward: features, final norm, CLS pooling
        torch.testing.assert_close(trunk(cached), expected, rtol=1e-12, atol=1e-12)
    tokens = 1 + options.get("reg_tokens", 0) + 16
    assert cached.shape == (3, tokens, 32)


@needs_extra
@pytest.mark.parametrize("cut", [1, 4, EFFICIENTNET_TAIL_DEPTH])
def test_efficientnet_tail_after_prefix_is_the_whole_network(cut):
    network = build_backbone("efficientnet_lite0", 8).trunk.double()
    reference = network.net  # the package's EfficientNet: extract_features, then the mean
    trunk = tail_trunk(network, cut).train()
    images = random_images(2, size=40, dtype=torch.float64, seed=cut)
    with torch.no_grad():
        cached = trunk.prefix_module()(images)
        trunk.eval()
        torch.testing.assert_close(trunk(cached), reference.extract_features(images).mean((2, 3)),
                                   rtol=1e-10, atol=1e-10)
        # training mode: the same drop connect of each tail block, the prefix in eval mode
        trunk.train()
        torch.manual_seed(1)
        from_cache = trunk(cached)
        torch.manual_seed(1)
        whole = network(images)
        torch.testing.assert_close(from_cache, whole, rtol=1e-10, atol=1e-10)
    torch.manual_seed(1)
    assert not torch.allclose(trunk(cached), trunk.eval()(cached))  # drop connect and BN ran
    if cut == 1:  # the input of the last MBConv stage
        assert cached.shape == (2, 192, 2, 2)


@needs_extra
def test_efficientnet_prefix_is_frozen_and_its_batchnorm_fixed():
    network = build_backbone("efficientnet_lite0", 8).trunk
    trunk = tail_trunk(network, 2)
    prefix = trunk.prefix_modules()
    prefix_ids = {id(p) for m in prefix for p in m.parameters()}
    # the same parameters as trainable_stages=3 (the last two MBConv stages and the head conv)
    trainable = {id(p) for stage in network.stages()[NUM_STAGES - 3:] for m in stage
                 for p in m.parameters()}
    assert {id(p) for p in trunk.parameters() if p.requires_grad} == trainable
    assert not prefix_ids & trainable
    before = {k: v.clone() for k, v in network.state_dict().items()}
    trunk.train()
    with torch.no_grad():
        trunk.network(random_images(4))  # the whole network in training mode
    after = network.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert trunk.first_tail_block == 1 + 2 + 2 + 3 + 3  # blocks of the first five stages
    tail = (*(f"net._blocks.{i}." for i in range(11, 16)), "net._bn1.")
    assert changed and all(k.startswith(tail) for k in changed)  # only the tail's statistics
    assert not any(m.training for m in prefix)


def test_prefix_module_holds_the_prefix_weights_alone():
    trunk = tail_trunk(tiny_vit(), 1)
    vit = trunk.network
    prefix = trunk.prefix_module()
    held = {id(t) for t in prefix.state_dict(keep_vars=True).values()}
    expected = {id(p) for m in (vit.patch_embed, *vit.blocks[:3]) for p in m.parameters()}
    expected |= {id(vit.cls_token), id(vit.pos_embed)}
    assert held == expected  # shared, not copied: the tail's blocks and final norm left out
    assert not any(p.requires_grad for p in prefix.parameters())
    assert all(p.requires_grad for p in vit.blocks[3].parameters())
    assert not prefix.train().training


# ---------------------------------------------------------------------------- the prefix cache


@pytest.fixture
def cub(tmp_path):
    return CUB200(make_cub(tmp_path), "train")  # 4 images of 2 classes


class Counter:
    """Counts the images a ViT's patch embedding sees (the prefix's computations)."""

    def __init__(self, vit) -> None:
        self.images = 0
        vit.patch_embed.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        self.images += len(inputs[0])


def prefix_outputs(cub, trunk, transform):
    with torch.no_grad():
        return trunk.prefix(torch.stack([transform(cub.load(i)) for i in range(len(cub))]))


def test_prefix_cache_is_reused_when_nothing_changed(cub, tmp_path):
    trunk, transform = tail_trunk(tiny_vit(), 2), eval_transform(32)
    counter = Counter(trunk.network)
    first = cached_features(cub, trunk.prefix_module(), transform, tmp_path, cut=2)
    assert counter.images == 4 and first.shape == (4, 17, 32)
    torch.testing.assert_close(first, prefix_outputs(cub, trunk, transform))
    with torch.no_grad():  # the tail's weights are not the prefix's: the cache still holds
        trunk.network.blocks[3].mlp.fc1.weight += 1
    again = cached_features(cub, trunk.prefix_module(), transform, tmp_path, cut=2)
    assert counter.images == 4 + 4 and torch.equal(again, first)  # prefix_outputs() only
    assert [p.name for p in tmp_path.glob("*.pt")] == [cache_path(tmp_path, feature_key(
        cub, trunk.prefix_module(), transform, "backbone", 2)).name]


def another_cut(cub, trunk, transform):
    return cub, tail_trunk(trunk.network, 1), transform


def another_prefix_weight(cub, trunk, transform):
    with torch.no_grad():
        trunk.network.blocks[0].attn.qkv.bias += 1
    return cub, trunk, transform


def another_image_size(cub, trunk, transform):
    return cub, trunk, eval_transform(24)


def another_image(cub, trunk, transform):
    Image.fromarray(np.full((12, 10, 3), 200, dtype=np.uint8)).save(cub.paths[1])
    return cub, trunk, transform


@pytest.mark.parametrize("change", [another_cut, another_prefix_weight, another_image_size,
                                    another_image])
def test_prefix_cache_is_recomputed_when_an_input_changes(cub, tmp_path, change):
    trunk, transform = tail_trunk(tiny_vit(dynamic_img_size=True), 2), eval_transform(32)
    counter = Counter(trunk.network)
    cached_features(cub, trunk.prefix_module(), transform, tmp_path, cut=2)
    cub, trunk, transform = change(cub, trunk, transform)
    outputs = cached_features(cub, trunk.prefix_module(), transform, tmp_path, cut=trunk.cut)
    assert counter.images == 4 + 4
    torch.testing.assert_close(outputs, prefix_outputs(cub, trunk, transform))


def test_a_cache_of_another_cut_is_never_used(cub, tmp_path, caplog):
    trunk, transform = tail_trunk(tiny_vit(), 2), eval_transform(32)
    prefix = trunk.prefix_module()
    key = feature_key(cub, prefix, transform, "vit", 2)
    # a file at this cut's name holding another cut's outputs (same shape: a ViT's tokens)
    run_folder.save_checkpoint(cache_path(tmp_path, key), {"key": {**key, "cut": 3},
                                                          "features": torch.zeros(4, 17, 32)})
    outputs = cached_features(cub, prefix, transform, tmp_path, name="vit", cut=2)
    assert "made for other inputs; computing it again" in caplog.text
    torch.testing.assert_close(outputs, prefix_outputs(cub, trunk, transform))


# ---------------------------------------------------------------------------- training


def train_steps(method, dataset, epochs: int = 3) -> None:
    """``epochs`` passes of seeded 2 × 2 class-balanced batches, AdamW."""
    optimizer = build_optimizer(method, 1e-3, 1e-2)
    sampler = ClassBalancedBatchSampler(dataset.labels, 2, 2, seed=0)
    for _ in range(epochs):
        train_one_epoch(method, DataLoader(dataset, batch_sampler=sampler), optimizer,
                        Precision(torch.device("cpu")))


@needs_extra
@pytest.mark.parametrize("method", ["plain", "bgformer"])
def test_training_from_the_cache_equals_computing_the_prefix_every_step(cub, tmp_path,
                                                                        method):
    """The same seed, the same views drawn: a tail trained from cached prefix outputs ends with
    the weights of the whole network trained from images with its first stages frozen
    (``trainable_stages``: an independent path through the network)."""
    center = eval_transform(SIZE)
    views = [center, T.Compose([HorizontalFlip(), center])]
    options = {"k": 2, "graph_dim": 16} if method == "bgformer" else {}

    def build(**backbone_options):
        torch.manual_seed(0)
        net = build_backbone("efficientnet_lite0", 8, **backbone_options)
        return net, build_method(method, net, samples_per_class=2, **options)

    cut = 2
    net, tail_method = build()
    net.trunk = tail_trunk(net.trunk, cut)
    prefix = net.trunk.prefix_module()
    cached = feature_dataset(cub, lambda images, view: cached_features(
        images, prefix, view, tmp_path, cut=cut), views, sample_views=True)
    torch.manual_seed(1)
    train_steps(tail_method, cached)

    whole, whole_method = build(trainable_stages=cut + 1)
    images = torch.stack([torch.stack([v(cub.load(i)) for i in range(len(cub))]) for v in views])
    torch.manual_seed(1)
    train_steps(whole_method, FeatureDataset(images, cub.labels, sample_views=True))

    trained = {k.replace("trunk.network.", "trunk."): v
               for k, v in tail_method.state_dict().items()}
    reference = whole_method.state_dict()
    assert set(trained) == set(reference)
    for key, value in trained.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    initial = build()[1].state_dict()
    assert not torch.equal(trained["backbone.trunk.net._conv_head.weight"],
                           initial["backbone.trunk.net._conv_head.weight"])  # the tail trained
    assert torch.equal(trained["backbone.trunk.net._blocks.10._bn1.running_mean"],
                       initial["backbone.trunk.net._blocks.10._bn1.running_mean"])


# ---------------------------------------------------------------------------- bgf-train, bgf-eval


def tail_argv(root, out, *extra):
    return ["--dataset", "cub", "--data-root", str(root), "--method", "bgformer",
            "--image-size", str(SIZE), "--epochs", "2", "--select-on", "last",
            "--embedding-dim", "16", "--lr", "1e-3", "--out", str(out), "--device", "cpu",
            "--no-progress", "--classes-per-batch", "2", "--samples-per-class", "2", "--k", "3",
            "--graph-dim", "32", *extra]


@needs_extra
def test_tail_run_is_rebuilt_by_bgf_eval_and_resume(tmp_path, capsys, tiny_eval, monkeypatch):
    monkeypatch.setattr(refinement, "evaluate_refinements", functools.partial(
        refinement.evaluate_refinements, metric_ks=(1,), with_nmi=False))  # 4 test images
    root = make_cub(tmp_path)
    run = tmp_path / "run"
    argv = tail_argv(root, run, "--backbone", "efficientnet_lite0", "--train-tail", "1")
    assert main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "prefix outputs (cut 1)" in captured.err and "computed and cached" in captured.err
    trained = captured.out.strip().splitlines()[-1]
    assert len(list((root / ".features").glob("efficientnet_lite0-tail1-*.pt"))) == 3

    assert eval_main([str(run), "--refine", "none", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "computed and cached" not in captured.err  # the cached test outputs were read
    assert trained.split("|")[2:] == captured.out.strip().splitlines()[-1].split("|")[2:]

    assert main([*argv[:argv.index("--epochs") + 1], "3",
                 *argv[argv.index("--epochs") + 2:], "--resume"]) == 0
    captured = capsys.readouterr()
    assert "epoch 3:" in captured.err and "computed and cached" not in captured.err


@needs_extra
def test_a_tail_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, capsys, tiny_eval):
    """The cached views' draws and the tail's weights continue exactly where the checkpoint
    left them: a run stopped after epoch 1 and resumed to epoch 2 ends with the weights of the
    run trained straight to epoch 2."""
    root = make_cub(tmp_path)
    runs = {name: tmp_path / name for name in ("straight", "killed")}
    argv = {name: tail_argv(root, out, "--backbone", "efficientnet_lite0", "--train-tail", "1")
            for name, out in runs.items()}
    assert main(argv["straight"]) == 0, capsys.readouterr().err
    epochs = argv["killed"].index("--epochs") + 1
    assert main([*argv["killed"][:epochs], "1", *argv["killed"][epochs + 1:]]) == 0
    assert main([*argv["killed"], "--resume"]) == 0, capsys.readouterr().err
    straight, resumed = (run_folder.load_checkpoint(out / run_folder.LAST_CHECKPOINT)["model"]
                         for out in runs.values())
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


@needs_extra
def test_the_full_network_embeds_as_the_cached_prefix(tmp_path, capsys, tiny_eval):
    """At test time the network is the whole backbone with the trained tail: embedding the
    images through it equals embedding the cached prefix outputs through the tail."""
    from bgf_pyg.config import configure
    from bgf_pyg.experiment.build import build_run_method
    from bgf_pyg.experiment.splits import config_splits

    root = make_cub(tmp_path)
    run = tmp_path / "run"
    assert main(tail_argv(root, run, "--backbone", "efficientnet_lite0", "--train-tail",
                          "2")) == 0, capsys.readouterr().err
    config = configure(dataset="cub", data_root=str(root), method="bgformer",
                       backbone="efficientnet_lite0", train_tail=2, image_size=SIZE,
                       embedding_dim=16, k=3, graph_dim=32, classes_per_batch=2,
                       samples_per_class=2, select_on="last", device="cpu")
    splits = config_splits(config, augment=False, check_images="off")
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    method, cached = build_run_method(config, splits, torch.device("cpu"))
    state = torch.load(run / "last.pt", weights_only=True)["model"]
    method.load_state_dict(state)
    method.eval()
    net = method.backbone
    pretrained = build_backbone("efficientnet_lite0", 16).trunk.state_dict()
    assert not torch.equal(net.trunk.network.state_dict()["net._conv_head.weight"],
                           pretrained["net._conv_head.weight"])  # the tail trained
    with torch.no_grad():
        from_cache = method.embed(cached.test.features[0])
        whole = torch.nn.functional.normalize(net.head(net.trunk.network(images)))
    torch.testing.assert_close(from_cache, whole, rtol=1e-5, atol=1e-6)


def test_vit_tail_through_the_cli(tmp_path, capsys, tiny_eval):
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                              img_size=32)
    weights = tmp_path / "vit.pth"
    torch.save(model.state_dict(), weights)
    root = make_cub(tmp_path)
    run = tmp_path / "run"
    assert main(tail_argv(root, run, "--backbone", "vit_small_in21k", "--pretrained",
                          str(weights), "--train-tail", "1", "--graph-heads", "4",
                          "--test-resize", str(SIZE), "--feature-cache",
                          str(tmp_path / "cache"))) == 0, capsys.readouterr().err
    state = torch.load(run / "last.pt", weights_only=True)["model"]
    for key, changes in (("blocks.0.attn.qkv.weight", False), ("blocks.11.attn.qkv.weight", True),
                         ("norm.weight", True)):
        trained = state[f"backbone.trunk.network.{key}"]
        assert torch.equal(trained, model.state_dict()[key]) != changes, key
    assert len(list((tmp_path / "cache").glob("vit_small_in21k-tail1-*.pt"))) == 3


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, fragments", [
    (["--backbone", "efficientnet_lite0", "--train-tail", "8"],
     ["--train-tail 8 is past the depth", "7 MBConv stages"]),
    pytest.param(["--backbone", "vit_small_in21k", "--pretrained", "x.pth", "--train-tail",
                  "13"], ["--train-tail 13 is past the depth", "12 blocks"], marks=needs_timm),
    (["--backbone", "resnet18", "--pretrained", "x.pth", "--train-tail", "1"],
     ["--train-tail has no effect", "--backbone resnet18"]),
    (["--backbone", "smallcnn", "--train-tail", "1"], ["--train-tail has no effect"]),
    pytest.param(["--backbone", "vit_small_dino", "--train-tail", "1"],
                 ["--train-tail trains the tail of a pretrained backbone", "--pretrained"],
                 marks=needs_timm),
    (["--backbone", "efficientnet_lite0", "--train-tail", "1", "--freeze-backbone"],
     ["--train-tail", "--freeze-backbone", "pass one"]),
    (["--backbone", "efficientnet_lite0", "--train-tail", "1", "--trainable-stages", "2"],
     ["--trainable-stages 2 runs the whole network", "pass one"]),
    (["--backbone", "efficientnet_lite0", "--train-tail", "1", "--outliers", "0.1"],
     ["--outliers", "--train-tail"]),
    (["--backbone", "efficientnet_lite0", "--train-tail", "0"], ["--train-tail", "got '0'"]),
])
def test_bad_tail_options(argv, fragments, capsys):
    assert_user_error(capsys, main(["--dataset", "cub", "--data-root", "unused", *argv]),
                      *fragments)


def test_tail_needs_an_image_dataset(capsys):
    assert_user_error(capsys, main(["--backbone", "efficientnet_lite0", "--train-tail", "1"]),
                      "--train-tail has no effect", "--dataset demo")


def test_tail_trunk_library_errors():
    resnet = build_backbone("resnet18", 8).trunk
    with pytest.raises(ValueError, match="train_tail cuts a backbone into stages"):
        tail_trunk(resnet, 1)
    for cut in (0, 5, True):
        with pytest.raises(ValueError, match=r"train_tail must be an integer in \[1, 4\]"):
            tail_trunk(tiny_vit(), cut)
