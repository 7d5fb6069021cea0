"""BatchGraphLoss: the PML-style wrapper adding the batch graph and BGFormer to a metric loss."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from bgf_pyg import build_batch_graph
from bgf_pyg import graph as graph_module
from bgf_pyg.losses import BatchGraphLoss, LabelSmoothingCE, ProxyGMLLoss
from bgf_pyg.losses import batch_graph as batch_graph_module
from bgf_pyg.models import BGFormerMethod, EmbeddingNet, build_method
from bgf_pyg.nn import BGFormer

NUM_CLASSES, PER_CLASS, FEAT, EMB = 4, 3, 16, 8


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    features = torch.randn(labels.numel(), FEAT, generator=gen) + labels.view(-1, 1).float()
    return features.requires_grad_(True), labels


def reference(loss_fn, bgformer, head, features, labels, k, alpha, miner=None):
    """The loss as BGFormerMethod.forward wrote it before the wrapper existed (with a miner:
    each term mined on its own embeddings)."""
    graph = build_batch_graph(features.detach(), labels, k)
    g = bgformer(features, graph.visual_edge_index, graph.semantic_edge_index)

    def term(emb):
        return loss_fn(emb, labels) if miner is None else loss_fn(emb, labels, miner(emb, labels))

    return alpha * term(head(features)) + (1.0 - alpha) * term(head(g))


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_same_loss_and_grads(got, want, params):
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, params), grads(want, params), strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_method_matches_the_pre_wrapper_formula(seed):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(10, FEAT), nn.ReLU())
    method = build_method("bgformer", EmbeddingNet(trunk, FEAT, EMB), NUM_CLASSES, k=4, alpha=0.3,
                          heads=2)
    images = torch.randn(NUM_CLASSES * PER_CLASS, 10)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    want = reference(method.loss_fn, method.bgformer, method.backbone.head,
                     method.backbone.features(images), labels, k=4, alpha=0.3)
    params = list(method.parameters())
    assert_same_loss_and_grads(method(images, labels), want, params)


def test_method_loads_a_pre_wrapper_checkpoint():
    torch.manual_seed(0)
    trunk = nn.Linear(10, FEAT)
    method = build_method("bgformer", EmbeddingNet(trunk, FEAT, EMB), NUM_CLASSES,
                          loss="proxy_anchor", k=4, heads=2)
    old = {key.replace("graph_loss.loss.", "loss_fn.").replace("graph_loss.bgformer.", "bgformer."):
           value + 1.0 for key, value in method.state_dict().items()}
    assert any(key.startswith("loss_fn.proxies") for key in old)
    fresh = build_method("bgformer", EmbeddingNet(nn.Linear(10, FEAT), FEAT, EMB), NUM_CLASSES,
                         loss="proxy_anchor", k=4, heads=2)
    fresh.load_state_dict(old)  # strict: every key renamed and used
    torch.testing.assert_close(fresh.loss_fn.proxies, old["loss_fn.proxies"])
    layer = "bgformer.layers.0.attn.lin_out.weight"
    torch.testing.assert_close(fresh.bgformer.layers[0].attn.lin_out.weight, old[layer])


def test_parameters_are_registered_once():
    method = build_method("bgformer", EmbeddingNet(nn.Linear(10, FEAT), FEAT, EMB), NUM_CLASSES,
                          loss="proxy_anchor", k=4, heads=2)
    keys = list(method.state_dict())
    assert len(keys) == len(set(keys))
    assert not any(key.startswith(("loss_fn.", "bgformer.")) for key in keys)
    assert isinstance(method, BGFormerMethod) and method.loss_fn is method.graph_loss.loss


def test_multi_similarity_with_a_miner():
    torch.manual_seed(0)
    features, labels = batch(0)
    head = nn.Linear(FEAT, EMB)
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(epsilon=0.05)
    criterion = BatchGraphLoss(loss_fn, BGFormer(FEAT, heads=2), k=4, alpha=0.2, miner=miner)
    want = reference(loss_fn, criterion.bgformer, head, features, labels, 4, 0.2, miner)
    params = [features, *head.parameters(), *criterion.bgformer.parameters()]
    assert_same_loss_and_grads(criterion(features, labels, head=head), want, params)
    # The miner mines each term on its own embeddings: it drops pairs, so the loss changes.
    unmined = BatchGraphLoss(loss_fn, criterion.bgformer, k=4, alpha=0.2)(features, labels,
                                                                           head=head)
    assert not torch.allclose(unmined, want)


@pytest.mark.parametrize("make_loss", [
    lambda: losses.CrossBatchMemory(losses.MultiSimilarityLoss(), EMB, memory_size=64),
    lambda: losses.MultipleLosses([losses.ContrastiveLoss(), losses.MultiSimilarityLoss()],
                                  weights=[0.5, 1.0]),
], ids=["cross_batch_memory", "multiple_losses"])
def test_a_miner_with_pml_wrapper_losses(make_loss):
    """PML's wrappers are no BaseMetricLossFunction but take indices_tuple: the miner's pairs
    reach them, each term mined on its own embeddings."""
    import copy

    torch.manual_seed(0)
    features, labels = batch(2)
    head = nn.Linear(FEAT, EMB)
    loss_fn, mined = make_loss(), []
    ms_miner = miners.MultiSimilarityMiner(epsilon=0.05)

    def miner(embeddings, labels):
        mined.append(ms_miner(embeddings, labels))
        return mined[-1]

    reference_loss = copy.deepcopy(loss_fn)  # CrossBatchMemory's queue changes at every call
    criterion = BatchGraphLoss(loss_fn, BGFormer(FEAT, heads=2), k=4, alpha=0.2, miner=miner)
    params = [features, *head.parameters(), *criterion.bgformer.parameters()]
    got = criterion(features, labels, head=head)
    assert len(mined) == 2  # one mining per term
    want = reference(reference_loss, criterion.bgformer, head, features, labels, 4, 0.2, miner)
    assert_same_loss_and_grads(got, want, params)


@pytest.mark.parametrize("make_loss", [
    lambda: losses.NormalizedSoftmaxLoss(NUM_CLASSES, EMB),
    lambda: losses.ArcFaceLoss(NUM_CLASSES, EMB),
    lambda: losses.MultiSimilarityLoss(),
], ids=["normalized_softmax", "arcface", "multi_similarity"])
def test_an_empty_batch_is_refused(make_loss):
    """PML's NormalizedSoftmaxLoss and ArcFaceLoss would return NaN for 0 rows."""
    criterion = BatchGraphLoss(make_loss(), BGFormer(FEAT, heads=2), k=3)
    empty, no_labels = torch.empty(0, FEAT), torch.empty(0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"features needs at least 1 samples .*shape \(0, 16\)"):
        criterion(empty, no_labels, head=nn.Linear(FEAT, EMB))


@pytest.mark.parametrize("make_loss", [
    lambda: losses.ProxyAnchorLoss(NUM_CLASSES, EMB),
    lambda: ProxyGMLLoss(NUM_CLASSES, EMB, proxies_per_class=2, r=0.5),
], ids=["proxy_anchor", "proxygml"])
def test_proxy_losses_train_their_proxies(make_loss):
    torch.manual_seed(0)
    features, labels = batch(1)
    head = nn.Sequential(nn.Linear(FEAT, EMB), nn.Tanh())
    loss_fn = make_loss()
    criterion = BatchGraphLoss(loss_fn, BGFormer(FEAT, heads=2), k=4, alpha=0.5)
    names = {name for name, _ in criterion.named_parameters()}
    assert "loss.proxies" in names and any(n.startswith("bgformer.") for n in names)
    want = reference(loss_fn, criterion.bgformer, head, features, labels, 4, 0.5)
    assert_same_loss_and_grads(criterion(features, labels, head=head), want,
                               [*criterion.parameters(), *head.parameters()])
    optimizer = torch.optim.SGD(criterion.parameters(), lr=0.1)
    before = loss_fn.proxies.detach().clone()
    criterion(features, labels, head=head).backward()
    assert loss_fn.proxies.grad is not None and loss_fn.proxies.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(loss_fn.proxies, before)


def test_any_loss_of_embeddings_and_labels():
    """Not only PML: our label-smoothed CE on a head that outputs class logits."""
    torch.manual_seed(0)
    features, labels = batch(3)
    head = nn.Linear(FEAT, NUM_CLASSES)
    loss_fn = LabelSmoothingCE(temperature=0.5, epsilon=0.1)
    criterion = BatchGraphLoss(loss_fn, BGFormer(FEAT, heads=2), k=4, alpha=0.3)
    want = reference(loss_fn, criterion.bgformer, head, features, labels, 4, 0.3)
    assert_same_loss_and_grads(criterion(features, labels, head=head), want,
                               [features, *head.parameters(), *criterion.parameters()])


def test_pce_loss():
    """The authors' loss (Hyp-ViT's pairwise cross-entropy) in the wrapper, as they train."""
    pce = pytest.importorskip("bgf_pyg.losses.pce", reason="the PCE loss is not merged yet (#8)")
    torch.manual_seed(0)
    features, labels = batch(4)  # P × m consecutive samples, the layout PCE needs
    head = nn.Linear(FEAT, EMB)
    loss_fn = pce.PairwiseCrossEntropyLoss(samples_per_class=PER_CLASS)
    criterion = BatchGraphLoss(loss_fn, BGFormer(FEAT, heads=2), k=4, alpha=0.01)
    want = reference(loss_fn, criterion.bgformer, head, features, labels, 4, 0.01)
    assert_same_loss_and_grads(criterion(features, labels, head=head), want,
                               [features, *head.parameters(), *criterion.parameters()])


def test_identity_head_and_alpha_weights():
    torch.manual_seed(0)
    features, labels = batch(2)
    loss_fn = losses.MultiSimilarityLoss()
    bgformer = BGFormer(FEAT, heads=2)
    only_f = BatchGraphLoss(loss_fn, bgformer, k=3, alpha=1.0)(features, labels)
    torch.testing.assert_close(only_f, loss_fn(features, labels))
    graph = build_batch_graph(features.detach(), labels, 3)
    g = bgformer(features, graph.visual_edge_index, graph.semantic_edge_index)
    only_g = BatchGraphLoss(loss_fn, bgformer, k=3, alpha=0.0)(features, labels)
    torch.testing.assert_close(only_g, loss_fn(g, labels))


@pytest.mark.parametrize("visual_graph", ["knn", "attention_topk"])
def test_lam_one_builds_no_semantic_edges(visual_graph, monkeypatch):
    torch.manual_seed(0)
    features, labels = batch(3)
    loss_fn, head = losses.MultiSimilarityLoss(), nn.Linear(FEAT, EMB)
    bgformer = BGFormer(FEAT, heads=2, lam=1.0, visual_graph=visual_graph, k=4)
    visual = (None if visual_graph != "knn"
              else build_batch_graph(features.detach(), labels, 3).visual_edge_index)
    g = bgformer(features, visual, None)  # the visual branch alone, by construction
    expected = 0.4 * loss_fn(head(features), labels) + 0.6 * loss_fn(head(g), labels)

    def refuse(*args, **kwargs):
        raise AssertionError("semantic edges were built")

    for module in (batch_graph_module, graph_module):
        monkeypatch.setattr(module, "label_edges", refuse)
    got = BatchGraphLoss(loss_fn, bgformer, k=3, alpha=0.4)(features, labels, head=head)
    torch.testing.assert_close(got, expected)


def test_detached_graph_input_leaves_the_backbone_to_its_own_term():
    torch.manual_seed(0)
    features, labels = batch(3)
    head, bgformer = nn.Linear(FEAT, EMB), BGFormer(FEAT, heads=2)
    loss_fn = losses.MultiSimilarityLoss()
    criterion = BatchGraphLoss(loss_fn, bgformer, k=3, alpha=0.4, detach_graph_input=True)
    got = criterion(features, labels, head=head)
    # The same value as end to end; only the gradient that reaches the features differs.
    graph = build_batch_graph(features.detach(), labels, 3)
    g = bgformer(features.detach(), graph.visual_edge_index, graph.semantic_edge_index)
    want = 0.4 * loss_fn(head(features), labels) + 0.6 * loss_fn(head(g), labels)
    assert_same_loss_and_grads(got, want, [features, *head.parameters(), *bgformer.parameters()])
    (feature_grad,) = grads(criterion(features, labels, head=head), [features])
    (own_term_grad,) = grads(0.4 * loss_fn(head(features), labels), [features])
    torch.testing.assert_close(feature_grad, own_term_grad)
    end_to_end = BatchGraphLoss(loss_fn, bgformer, k=3, alpha=0.4)(features, labels, head=head)
    torch.testing.assert_close(end_to_end, want.detach())
    assert not torch.allclose(grads(end_to_end, [features])[0], feature_grad)
    assert "detach_graph_input=True" in repr(criterion)


def test_bad_calls_name_the_argument():
    features, labels = batch(0)
    criterion = BatchGraphLoss(losses.MultiSimilarityLoss(), BGFormer(FEAT, heads=2), k=3)
    with pytest.raises(ValueError, match=r"labels must have shape \(12,\)"):
        criterion(features, labels[:-1], head=nn.Linear(FEAT, EMB))
    with pytest.raises(ValueError, match=r"head could not be applied to features of shape \(12,"):
        criterion(features, labels, head=nn.Linear(FEAT + 1, EMB))
    with pytest.raises(ValueError, match="features must have 16 columns"):
        criterion(features[:, :-1], labels, head=nn.Linear(FEAT - 1, EMB))
    with pytest.raises(ValueError, match="head must map"):
        criterion(features, labels, head=lambda x: x.sum(1))
    with pytest.raises(ValueError, match=r"features contains NaN or inf values \(in 1 of 12"):
        criterion(features.detach().index_fill(0, torch.tensor([5]), float("nan")), labels)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        BatchGraphLoss(losses.MultiSimilarityLoss(), BGFormer(FEAT, heads=2), k=0)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        BatchGraphLoss(losses.MultiSimilarityLoss(), BGFormer(FEAT, heads=2), alpha=1.5)
    with pytest.raises(TypeError, match="miner needs a pytorch-metric-learning loss"):
        BatchGraphLoss(ProxyGMLLoss(NUM_CLASSES, EMB), BGFormer(FEAT, heads=2),
                       miner=miners.MultiSimilarityMiner())
    with pytest.raises(TypeError, match="loss must be an nn.Module"):
        BatchGraphLoss(lambda e, y: e.sum(), BGFormer(FEAT, heads=2))
