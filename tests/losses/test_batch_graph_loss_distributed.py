"""BatchGraphLoss under data parallelism (2 gloo ranks): PML's DistributedLossWrapper takes it and
hands it the global batch, and gather_batch is the exact equivalent, against one process on the
concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch import nn

from bgf_pyg import distributed
from bgf_pyg.losses import BatchGraphLoss
from bgf_pyg.nn import BGFormer

from ..dist_helpers import spawn

WORLD, ROWS, NUM_CLASSES, FEAT, EMB = 2, 6, 4, 8, 5


def setup(seed: int) -> tuple[BatchGraphLoss, nn.Linear, torch.Tensor, torch.Tensor]:
    """The same criterion, head and global batch in every process (float64: the rows' order
    differs between ranks, so sums round differently)."""
    torch.manual_seed(seed)
    criterion = BatchGraphLoss(losses.MultiSimilarityLoss(), BGFormer(FEAT, heads=2), k=3,
                               alpha=0.3).double()
    head = nn.Linear(FEAT, EMB).double()
    labels = torch.randint(NUM_CLASSES, (WORLD * ROWS,))
    features = torch.randn(WORLD * ROWS, FEAT, dtype=torch.float64) + labels.view(-1, 1)
    return criterion, head, features, labels


def loss_and_grads(loss: torch.Tensor, features: torch.Tensor, modules: list[nn.Module]) -> dict:
    """``loss``, its gradient on ``features`` and on every parameter of ``modules``."""
    params = [p for module in modules for p in module.parameters()]
    grads = torch.autograd.grad(loss, [features, *params])
    return {"loss": loss.detach(), "features": grads[0], "params": grads[1:]}


def _worker(rank: int, seed: int, out: str) -> None:
    distributed.init_distributed("cpu", timeout_s=30)
    criterion, head, features, labels = setup(seed)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    local, local_labels = features[rows].clone().requires_grad_(), labels[rows]
    wrapped = DistributedLossWrapper(criterion)(local, local_labels)
    pml = loss_and_grads(wrapped, local, [criterion])
    gathered = criterion(*distributed.gather_batch(local, local_labels), head=head)
    exact = loss_and_grads(gathered, local, [criterion, head])
    torch.save({"pml": pml, "exact": exact}, Path(out) / f"rank{rank}.pt")
    distributed.destroy_distributed()


@pytest.mark.parametrize("seed", [0, 1])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, seed):
    """DistributedLossWrapper: world_size × the one-process loss; the rows' gradients are
    world_size × theirs (DDP's averaging makes the model's gradient the one-process one), the
    criterion's parameters get world_size × theirs, as its docstring says. gather_batch (with a
    head): the one-process loss and parameter gradients, world_size × the rows' gradients."""
    spawn(_worker, WORLD, seed, str(tmp_path))
    criterion, head, features, labels = setup(seed)
    features.requires_grad_()
    alone = loss_and_grads(criterion(features, labels), features, [criterion])
    with_head = loss_and_grads(criterion(features, labels, head=head), features,
                               [criterion, head])
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        for name, want, factor in (("pml", alone, WORLD), ("exact", with_head, 1)):
            torch.testing.assert_close(got[name]["loss"], factor * want["loss"])
            torch.testing.assert_close(got[name]["features"], WORLD * want["features"][rows])
            assert len(got[name]["params"]) == len(want["params"])
            for a, b in zip(got[name]["params"], want["params"], strict=True):
                torch.testing.assert_close(a, factor * b)
        assert want["loss"] > 0


def test_pml_arguments_it_cannot_honour_are_refused():
    criterion, _, features, labels = setup(0)
    with pytest.raises(ValueError, match="ref_emb is not taken.*efficient=False"):
        criterion(features, labels, ref_emb=features, ref_labels=labels)
    with pytest.raises(ValueError, match="indices_tuple is not taken.*miner"):
        criterion(features, labels, indices_tuple=(torch.tensor([0]),) * 3)


def test_the_wrapper_states_its_inner_distance():
    criterion = BatchGraphLoss(losses.ContrastiveLoss(), BGFormer(FEAT, heads=2))
    assert criterion.distance is criterion.loss.distance
    assert criterion.distance.__class__.__name__ == "LpDistance"
    assert BatchGraphLoss(nn.Module(), BGFormer(FEAT, heads=2)).distance is None
