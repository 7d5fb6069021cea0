"""BGFormer's recipe options: the --graph-dim projection on the backbone side, the graph
module's own learning rate, gradient clipping, the pce loss inside BGFormer training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgf_pyg.models import EmbeddingNet, build_method
from bgf_pyg.train import Precision, build_optimizer, train_one_epoch


def backbone(graph_dim=None) -> EmbeddingNet:
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 48))
    return EmbeddingNet(trunk, 48, 8, graph_dim=graph_dim)


def batch(p=3, m=4):
    torch.manual_seed(0)
    labels = torch.arange(p).repeat_interleave(m)
    return torch.randn(len(labels), 3, 4, 4), labels


def test_graph_dim_projects_before_graph_and_head():
    net = backbone(graph_dim=16)
    images, labels = batch()
    trunk = net.trunk(images)
    torch.testing.assert_close(net.features(images), net.proj(trunk))
    torch.testing.assert_close(net(images), net.head(net.proj(trunk)))  # test time as well
    method = build_method("bgformer", net, loss="pce", samples_per_class=4, k=3, heads=4)
    assert method.bgformer.channels == 16 and net.head.in_features == 16
    torch.testing.assert_close(method.embed(images), F.normalize(net.head(net.proj(trunk))))
    with pytest.raises(ValueError, match="divisible by heads"):
        build_method("bgformer", backbone(graph_dim=10), heads=4)


def test_graph_lr_group_and_defaults():
    method = build_method("bgformer", backbone(), loss="proxy_anchor", num_classes=3,
                          samples_per_class=4, k=3, heads=4)
    groups = build_optimizer(method, 3e-5, 1e-2, graph_lr=8.5e-4).param_groups
    assert [g["lr"] for g in groups] == [3e-5, 8.5e-4, 1e-2]
    graph = {id(p) for p in method.bgformer.parameters()}
    assert {id(p) for p in groups[1]["params"]} == graph
    assert not graph & {id(p) for p in groups[0]["params"]}
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(method.parameters()))
    assert len(build_optimizer(method, 3e-5, 1e-2).param_groups) == 2  # no graph_lr: one rate


def test_clip_grad_bounds_the_global_norm():
    images, labels = batch()
    method = build_method("bgformer", backbone(), loss="pce", samples_per_class=4, k=3, heads=4)
    seen = []
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)

    def record_norm():
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    optimizer.register_step_pre_hook(lambda *args: record_norm())
    precision = Precision(torch.device("cpu"))
    train_one_epoch(method, [(images, labels)], optimizer, precision)
    assert seen[-1] > 1e-3  # unclipped
    train_one_epoch(method, [(images, labels)], optimizer, precision, clip_grad=1e-3)
    assert seen[-1] == pytest.approx(1e-3, rel=1e-4)


def test_freeze_bn_keeps_running_statistics():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 12))
    method = build_method("plain", EmbeddingNet(trunk, 12, 8), loss="pce", samples_per_class=4)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    images, labels = batch()
    before = trunk[1].running_mean.clone()
    train_one_epoch(method, [(images, labels)], optimizer, Precision(torch.device("cpu")),
                    freeze_bn=True)
    torch.testing.assert_close(trunk[1].running_mean, before)
    assert trunk[1].weight.grad is not None  # the affine parameters still train
    train_one_epoch(method, [(images, labels)], optimizer, Precision(torch.device("cpu")))
    assert not torch.equal(trunk[1].running_mean, before)


@pytest.mark.parametrize("name,cls,decoupled", [("adamw", torch.optim.AdamW, None),
                                                ("adam", torch.optim.Adam, None),
                                                ("radam", torch.optim.RAdam, True)])
def test_optimizer_choice(name, cls, decoupled):
    method = build_method("plain", backbone(), loss="pce", samples_per_class=4)
    optimizer = build_optimizer(method, 1e-4, 1e-2, 5e-5, name=name, eps=0.01)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["eps"] == 0.01 and group["weight_decay"] == 5e-5
    if decoupled:
        assert group["decoupled_weight_decay"]
