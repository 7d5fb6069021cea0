"""Adding a method, a loss, a dataset or a backbone is one class and one registration: a toy
method, a toy loss, a toy dataset and a toy backbone, declared in this file alone, are choices of
``configure`` and of ``bgf-train`` (parsed, in ``--help``, validated), train one epoch through
``experiment.run`` and the command line, and leave the registries as they were."""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bgf_pyg.checks import InputError
from bgf_pyg.cli import main
from bgf_pyg.config import SCOPES, configure
from bgf_pyg.data import DATASETS, DatasetEntry
from bgf_pyg.data.base import LabelledDataset, reindex
from bgf_pyg.experiment import run
from bgf_pyg.losses import LOSSES, LossEntry
from bgf_pyg.models import (
    BACKBONES,
    METHODS,
    BackboneEntry,
    Method,
    MethodEntry,
    backbone_normalization,
    build_backbone,
)
from bgf_pyg.registry import Registry

TOY_METHOD, TOY_LOSS, TOY_DATASET = "toy-centroid", "toy_margin", "toy_blobs"
TOY_BACKBONE = "toy_convpool"


class ToyCentroidMethod(Method):
    """Pulls each embedding towards its class's mean in the batch (scaled by ``scale``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, scale: float = 1.0) -> None:
        super().__init__(backbone, nn.Identity())
        self.scale = scale

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        emb = self.embed(images)
        same = (labels[:, None] == labels[None]).float()
        centroids = same @ emb / same.sum(1, keepdim=True)
        return self.scale * (emb - centroids).pow(2).sum(1).mean()


class ToyMarginLoss(nn.Module):
    """A contrastive loss on cosine similarities: positives above 0, negatives below
    ``-margin``."""

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        sim = nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(
            embeddings, dim=1).T
        same = labels[:, None] == labels[None]
        return (torch.relu(-sim)[same].mean() + torch.relu(sim + self.margin)[~same].mean())


class ToyBlobs(LabelledDataset):
    """12 classes of 8 noisy (1, 16, 16) images around a fixed random pattern each."""

    LAYOUT = "embedded (random class patterns with noise; no --data-root)"
    SPLIT = "classes 0-11 train, 12-23 test"

    def __init__(self, split: str = "train", transform=None) -> None:
        first = 0 if split == "train" else 12
        generator = torch.Generator().manual_seed(first)
        patterns = torch.randn(12, 1, 16, 16, generator=generator)
        self.class_ids = [first + c for c in range(12) for _ in range(8)]
        self.images = (patterns.repeat_interleave(8, 0)
                       + 0.3 * torch.randn(96, 1, 16, 16, generator=generator))
        self.labels = torch.tensor(reindex(self.class_ids), dtype=torch.long)
        self.transform = transform

    def load(self, index: int) -> Tensor:
        return self.images[index]


TOY_WIDTH = 6


class ToyConvPool(nn.Module):
    """One 3×3 convolution to ``TOY_WIDTH`` channels, ReLU, then global average or max pooling."""

    def __init__(self, in_channels: int, pooling: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, TOY_WIDTH, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(1) if pooling == "max" else nn.AdaptiveAvgPool2d(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(torch.relu(self.conv(images))).flatten(1)


def toy_trunk(name: str, in_channels: int, pooling: str) -> tuple[nn.Module, int]:
    return ToyConvPool(in_channels, pooling), TOY_WIDTH


@pytest.fixture
def toys():
    """The three toys registered for one test, then removed."""
    METHODS.register(TOY_METHOD, MethodEntry(ToyCentroidMethod, options={"temperature": "scale"}))
    LOSSES.register(TOY_LOSS, LossEntry(ToyMarginLoss, options={"proxygml_r": "margin"},
                                        pairs=True))
    DATASETS.register(TOY_DATASET, DatasetEntry(
        ToyBlobs, images=False, channels=1,
        defaults=lambda size: {"backbone": "smallcnn", "embedding_dim": 8,
                               "classes_per_batch": 4, "samples_per_class": 4}))
    yield
    METHODS.unregister(TOY_METHOD)
    LOSSES.unregister(TOY_LOSS)
    DATASETS.unregister(TOY_DATASET)


SHORT = {"epochs": 1, "device": "cpu", "no_progress": True, "select_on": "last"}


def test_the_toys_train_one_epoch_through_configure_and_run(toys, tmp_path):
    method = run(configure(dataset=TOY_DATASET, method=TOY_METHOD, temperature=0.5,
                           out=str(tmp_path / "method"), **SHORT))
    assert method.config.temperature == 0.5 and 0 <= method.test_metrics["recall@1"] <= 1
    loss = run(configure(dataset=TOY_DATASET, method="plain", loss=TOY_LOSS, proxygml_r=0.2,
                         out=str(tmp_path / "loss"), **SHORT))
    assert 0 <= loss.test_metrics["recall@1"] <= 1


def test_a_registered_options_owner_is_in_its_scope(toys):
    """``temperature`` is the toy method's and intra-batch's, and pce's; ``proxygml_r`` is
    ProxyGML's and the toy loss's."""
    assert [s.describe(str) for s in SCOPES["temperature"]] == [
        f"method intra-batch|{TOY_METHOD}", "method plain|bgformer with loss pce"]
    assert [s.describe(str) for s in SCOPES["proxygml_r"]] == [
        "method proxygml", f"method plain|bgformer with loss {TOY_LOSS}"]
    with pytest.raises(InputError, match=f"temperature has no effect here .*{TOY_METHOD}"):
        configure(dataset=TOY_DATASET, method="plain", temperature=0.5)
    with pytest.raises(InputError, match="k has no effect here"):
        configure(dataset=TOY_DATASET, method=TOY_METHOD, k=3)


def test_the_toys_through_bgf_train(toys, tmp_path, capsys):
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert TOY_METHOD in help_text and TOY_LOSS in help_text and ToyBlobs.LAYOUT[:40] in help_text

    assert main(["--dataset", TOY_DATASET, "--method", TOY_METHOD, "--temperature", "0.5",
                 "--epochs", "1", "--select-on", "last", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "cli")]) == 0
    assert f"| {TOY_METHOD} |" in capsys.readouterr().out

    # validated: an option the toy does not read
    assert main(["--dataset", TOY_DATASET, "--method", TOY_METHOD, "--k", "3"]) == 2
    assert "--k has no effect here" in capsys.readouterr().err


def test_unregistering_restores_the_choices(toys):
    assert TOY_METHOD in METHODS and TOY_LOSS in LOSSES and TOY_DATASET in DATASETS


@pytest.fixture
def toy_backbone():
    """The toy backbone registered for one test (it reads the dataset's channels and the ResNets'
    ``pooling``), then removed."""
    BACKBONES.register(TOY_BACKBONE, BackboneEntry(
        toy_trunk, options={"in_channels": "in_channels", "pooling": "pooling"}))
    yield
    BACKBONES.unregister(TOY_BACKBONE)


def test_the_toy_backbone_trains_one_epoch_on_the_demo_through_configure_and_run(toy_backbone,
                                                                                   tmp_path):
    result = run(configure(backbone=TOY_BACKBONE, pooling="max", method="plain",
                           out=str(tmp_path / "run"), **SHORT))
    assert 0 <= result.test_metrics["recall@1"] <= 1
    model = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert model["backbone.trunk.conv.weight"].shape == (TOY_WIDTH, 1, 3, 3)  # the demo's 1 channel
    assert model["backbone.head.weight"].shape == (result.config.embedding_dim, TOY_WIDTH)


def test_the_toy_backbones_options_are_the_ones_it_reads(toy_backbone):
    assert [s.describe(str) for s in SCOPES["pooling"]] == [
        f"backbone resnet50|resnet18|{TOY_BACKBONE}"]
    assert TOY_BACKBONE not in SCOPES["pretrained"][0].allowed("backbone")
    with pytest.raises(InputError, match="pretrained has no effect here"):
        configure(backbone=TOY_BACKBONE, pretrained="weights.pth")
    with pytest.raises(InputError, match="train_tail has no effect here"):
        configure(dataset="cub", data_root="unused", backbone=TOY_BACKBONE, train_tail=1)

    net = build_backbone(TOY_BACKBONE, 4, pooling="max", in_channels=2)
    assert isinstance(net.trunk.pool, nn.AdaptiveMaxPool2d) and net.trunk.conv.in_channels == 2
    assert net(torch.randn(3, 2, 8, 8)).shape == (3, 4)
    assert backbone_normalization(TOY_BACKBONE) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match=f"{TOY_BACKBONE} has no ImageNet weights"):
        build_backbone(TOY_BACKBONE, 4, pretrained="weights.pth")
    with pytest.raises(ValueError, match=f"trainable_stages applies to efficientnet_lite0, not "
                                         f"to '{TOY_BACKBONE}'"):
        build_backbone(TOY_BACKBONE, 4, trainable_stages=1)


def test_the_toy_backbone_through_bgf_train(toy_backbone, tmp_path, capsys):
    assert main(["--help"]) == 0
    assert TOY_BACKBONE in capsys.readouterr().out

    assert main(["--backbone", TOY_BACKBONE, "--pooling", "max", "--method", "plain",
                 "--epochs", "1", "--select-on", "last", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "cli")]) == 0
    assert "| plain |" in capsys.readouterr().out

    # validated: an option the toy does not read
    assert main(["--backbone", TOY_BACKBONE, "--vit-pooling", "cls+mean"]) == 2
    assert "--vit-pooling has no effect here" in capsys.readouterr().err


@pytest.mark.parametrize("registry", [METHODS, LOSSES, DATASETS, BACKBONES])
def test_the_registries_are_what_they_were(registry):
    """No test leaves a toy behind (this runs after the toys' tests in file order)."""
    assert not any(name.startswith("toy") for name in registry)


def test_a_registry_refuses_a_taken_name_and_names_the_known_ones():
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    registry.register("b", 2, default=True)
    assert (list(registry), registry.default, registry["b"]) == (["a", "b"], "b", 2)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a", 3)
    with pytest.raises(ValueError, match="unknown widget 'c'; choose one of a, b"):
        registry["c"]
    with pytest.raises(ValueError, match="is the default"):
        registry.unregister("b")
    assert registry.register("a", 3, replace=True) == 3 and registry["a"] == 3


#: Modules that may spell a method, loss, dataset or backbone name: the registries (each entry's one
#: registration) and, by (module, name), the other things that share a name, with why.
REGISTRY_MODULES = {"bgf_pyg/models/registry.py", "bgf_pyg/losses/registry.py",
                    "bgf_pyg/data/registry.py", "bgf_pyg/models/backbones.py"}
SAME_WORD = {
    ("bgf_pyg/losses/batch_graph.py", "bgformer"): "BatchGraphLoss's parameter, in a message",
    ("bgf_pyg/refine/learned.py", "bgformer"): "the refinement's own name (--refine bgformer)",
    ("bgf_pyg/prepare.py", "emoji"): "bgf-data's subcommand that builds the emoji set",
}


#: The backbones' own modules: the code that builds a backbone may spell its name (a table of
#: architectures, a check of its argument, the weights a converter reads).
BACKBONE_MODULES = {"bgf_pyg/models/resnet.py", "bgf_pyg/models/smallcnn.py",
                    "bgf_pyg/models/vit.py", "bgf_pyg/models/dinov2.py",
                    "bgf_pyg/models/dinov2_onnx.py", "bgf_pyg/models/efficientnet.py"}
#: Backbone names spelled below the models' layer, which cannot import the registry, with why.
BELOW_MODELS = {
    ("bgf_pyg/data/registry.py", "smallcnn"): "the demo's defaults (data is layer 2, models 6)",
}


def name_literals(
    root, names: Collection[str] | None = None,
    allowed: Collection[tuple[str, str]] | None = None, own_modules: Collection[str] = (),
) -> list[tuple[str, int, str]]:
    """Every string constant of the package equal to one of ``names`` (default: a registered
    method, loss or dataset), outside the registries, the ``own_modules`` and the ``allowed``
    (module, name) pairs (default: :data:`SAME_WORD`), as (module, line, name)."""
    names = set(METHODS) | set(LOSSES) | set(DATASETS) if names is None else names
    allowed = SAME_WORD if allowed is None else allowed
    found = []
    for path in sorted(root.rglob("*.py")):
        module = path.relative_to(root.parent).as_posix()
        if module in REGISTRY_MODULES or module in own_modules:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value in names and (module, node.value) not in allowed):
                found.append((module, node.lineno, node.value))
    return found


def test_no_method_loss_or_dataset_name_is_spelled_outside_its_registry():
    assert name_literals(Path(__file__).resolve().parents[1] / "bgf_pyg") == []


def test_no_backbone_name_is_spelled_outside_its_registry_and_modules():
    assert name_literals(Path(__file__).resolve().parents[1] / "bgf_pyg", set(BACKBONES),
                         BELOW_MODELS, BACKBONE_MODULES) == []
