"""The four method wrappers: training steps, embeddings, parameter groups and the batches each
loss accepts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg.data import ClassBalancedBatchSampler
from bgf_pyg.models import METHODS, EmbeddingNet, build_backbone, build_method, build_optimizer
from bgf_pyg.train import random_stream

NUM_CLASSES, PER_CLASS, DIM = 4, 4, 16


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    images = torch.randn(labels.numel(), 1, 28, 28) + labels.view(-1, 1, 1, 1).float()
    return images, labels


def tiny_backbone() -> EmbeddingNet:
    """A conv + linear trunk of 32 features: keeps the method tests fast."""
    trunk = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 13 * 13, 32))
    return EmbeddingNet(trunk, 32, DIM)


def small_method(name: str, **hparams):
    if name == "bgformer":
        hparams = {"k": 5, "heads": 4, **hparams}
    return build_method(name, tiny_backbone(), NUM_CLASSES, **hparams)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg", 8)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("arcface", build_backbone("smallcnn", 8), 3)
    with pytest.raises(ValueError, match="unknown loss"):
        build_method("plain", build_backbone("smallcnn", 8), 3, loss="npair")


@pytest.mark.parametrize("name", METHODS)
def test_a_few_steps_lower_the_loss(name, batch):
    torch.manual_seed(0)
    method = small_method(name)
    optimizer = torch.optim.Adam(method.param_groups(1e-3, 1e-2))
    images, labels = batch
    method.train()
    before = method(images, labels).item()
    for _ in range(5):
        optimizer.zero_grad()
        method(images, labels).backward()
        optimizer.step()
    assert method(images, labels).item() < before


@pytest.mark.parametrize("name", METHODS)
def test_embed_is_normalised_and_graph_free(name, batch):
    method = small_method(name).eval()
    emb = method.embed(batch[0])
    assert emb.shape == (batch[0].size(0), DIM)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(emb.size(0)))
    # Test time is head(trunk(x)) only: one image's embedding does not depend on the batch.
    torch.testing.assert_close(method.embed(batch[0][:1]), emb[:1])


@pytest.mark.parametrize("name,loss,proxy_groups", [
    ("plain", "multi_similarity", 0),
    ("plain", "proxy_anchor", 1),
    ("plain", "normalized_softmax", 1),
    ("bgformer", "proxy_anchor", 1),
    ("proxygml", None, 1),
])
def test_param_groups_put_proxies_apart(name, loss, proxy_groups):
    hparams = {} if loss is None else {"loss": loss}
    method = small_method(name, **hparams)
    groups = method.param_groups(0.1, 0.5)
    assert len(groups) == 1 + proxy_groups
    if proxy_groups:
        assert groups[1]["lr"] == 0.5
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.loss_fn.parameters()}
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in method.parameters())


@pytest.mark.parametrize("name,loss", [("plain", "multi_similarity"), ("plain", "contrastive"),
                                       ("plain", "triplet"), ("bgformer", "proxy_anchor")])
def test_one_sample_per_class_with_pairs_is_refused(name, loss):
    with pytest.raises(ValueError, match="no positive pairs"):
        build_method(name, build_backbone("smallcnn", 8), 3, loss=loss, samples_per_class=1)


def test_one_sample_per_class_with_proxies_is_fine():
    build_method("plain", build_backbone("smallcnn", 8), 3, loss="proxy_anchor",
                 samples_per_class=1)
    build_method("intra-batch", build_backbone("smallcnn", 8), 3, samples_per_class=1)


def test_intra_batch_loss_is_the_sum_of_two_label_smoothed_ces(batch):
    method = small_method("intra-batch", temperature=0.5).eval()
    images, labels = batch
    emb = method.backbone(images)
    mpn_logits, _ = method.mpn(F.normalize(emb, dim=1))
    expected = (F.cross_entropy(method.classifier(emb) / 0.5, labels, label_smoothing=0.1)
                + F.cross_entropy(mpn_logits / 0.5, labels, label_smoothing=0.1))
    torch.testing.assert_close(method(images, labels), expected)


def test_bgformer_alpha_one_is_the_plain_loss(batch):
    torch.manual_seed(0)
    method = small_method("bgformer", alpha=1.0).eval()
    images, labels = batch
    plain = method.loss_fn(method.backbone(images), labels)
    torch.testing.assert_close(method(images, labels), plain)


@pytest.mark.parametrize("graph_dim", [None, 8])
def test_bgformer_with_alpha_one_trains_the_plain_network(batch, graph_dim):
    images, labels = batch

    def build(name: str, **hparams):
        with random_stream(0, "backbone"):
            backbone = tiny_backbone()
        with random_stream(0, "method"):
            return build_method(name, backbone, NUM_CLASSES, loss="proxy_anchor", **hparams)

    plain = build("plain")
    control = build("bgformer", alpha=1.0, k=3, heads=4, dropout=0.2, graph_dim=graph_dim)
    start = {k: v.clone() for k, v in plain.backbone.state_dict().items()}
    torch.manual_seed(1)  # graph dropout draws from the global generator; the trunk has none
    for method in (plain, control):
        optimizer = build_optimizer(method, 1e-2, 1e-1)
        loader = DataLoader(TensorDataset(images, labels), batch_sampler=ClassBalancedBatchSampler(
            labels, 2, 3, num_batches=5, seed=4))
        for step_images, step_labels in loader:  # 5 steps
            optimizer.zero_grad()
            method(step_images, step_labels).backward()
            optimizer.step()
    for key, value in plain.backbone.state_dict().items():
        assert torch.equal(control.backbone.state_dict()[key], value), key
    assert not torch.equal(plain.backbone.head.weight, start["head.weight"])  # it did train
    assert torch.equal(control.loss_fn.proxies, plain.loss_fn.proxies)
    plain.eval(), control.eval()
    with torch.no_grad():
        assert torch.equal(control.embed(images), plain.embed(images))


def test_sampler_batches_feed_every_method(batch):
    images, labels = batch
    loader = DataLoader(TensorDataset(images, labels),
                        batch_sampler=ClassBalancedBatchSampler(labels, 3, 2, num_batches=2))
    for name in METHODS:
        method = small_method(name)
        for x, y in loader:
            assert x.shape[0] == 6 and y.unique().numel() == 3
            loss = method(x, y)
            loss.backward()
            assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["plain", "bgformer"])
def test_a_batch_with_one_class_is_refused_by_pair_losses(name):
    extra = {"k": 2} if name == "bgformer" else {}
    method = build_method(name, build_backbone("smallcnn", 8), 3, loss="multi_similarity", **extra)
    images = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError, match="same class.*no negative pair"):
        method(images, torch.zeros(4, dtype=torch.long))
