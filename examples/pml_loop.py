"""Add BGFormer to a plain PyTorch + pytorch-metric-learning training loop.

    python examples/pml_loop.py                 # embedded digits demo, 10 epochs
    python examples/pml_loop.py --epochs 2 --batches-per-epoch 3   # what the test suite runs

The loop is the one a PML user already has: a model made of a trunk and a linear head, PML's
multi-similarity loss with its miner, PML's ``MPerClassSampler``, AdamW. The three lines marked
``BGFormer`` are all it takes to train it with the batch graph: wrap the loss, give the optimiser
the wrapper's parameters, call it on the trunk's features with the head. Nothing of
``bgf_pyg.train`` or ``bgf_pyg.cli`` is used; evaluation (Recall@1 on the unseen test numbers)
embeds with ``head(trunk(x))`` alone, as at test time the graph is not used.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, samplers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg.data import load_digits_demo
from bgf_pyg.losses import BatchGraphLoss
from bgf_pyg.metrics import recall_at_k
from bgf_pyg.nn import BGFormer

FEATURES, EMBEDDING = 128, 64
#: 8 training numbers × 6 images per batch, as the demo runs of examples/cub.py.
SAMPLES_PER_CLASS, BATCH_SIZE = 6, 48


class Net(nn.Module):
    """A user's model: a small CNN trunk (28×56 two-digit images → 128 features), a linear
    head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURES, EMBEDDING)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@torch.no_grad()
def recall_at_1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return recall_at_k(F.normalize(model(images), dim=1), labels, ks=(1,))[1]


def main(argv: Sequence[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batches-per-epoch", type=int, default=None,
                   help="default: as many as the training set fills (25)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # PML's sampler draws from NumPy
    random.seed(args.seed)

    train_x, train_y = load_digits_demo("train")
    test_x, test_y = load_digits_demo("test")
    epoch_size = len(train_y) if args.batches_per_epoch is None else (
        args.batches_per_epoch * BATCH_SIZE)
    sampler = samplers.MPerClassSampler(train_y, m=SAMPLES_PER_CLASS, batch_size=BATCH_SIZE,
                                        length_before_new_iter=epoch_size)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=BATCH_SIZE, sampler=sampler,
                        drop_last=True)
    model = Net()
    loss_fn = losses.MultiSimilarityLoss()
    miner = miners.MultiSimilarityMiner()

    # BGFormer: wrap the loss (and its miner); the wrapper owns the graph blocks' weights.
    # λ = 1 (visual branch only), α = 0.9, k = 10: the demo search's choice (docs/results.rst).
    criterion = BatchGraphLoss(loss_fn, BGFormer(FEATURES, num_layers=2, heads=4, lam=1.0),
                               k=10, alpha=0.9, miner=miner)
    # BGFormer: the optimiser also gets the wrapper's parameters.
    optimizer = torch.optim.AdamW([*model.parameters(), *criterion.parameters()], lr=1e-3)

    print(f"before training: test R@1 {recall_at_1(model, test_x, test_y):.3f}")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for images, labels in loader:
            optimizer.zero_grad()
            # BGFormer: the loss takes the trunk's features and the head (was:
            # loss = loss_fn(model(images), labels, miner(model(images), labels))).
            loss = criterion(model.trunk(images), labels, head=model.head)
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"epoch {epoch + 1}: loss {total / len(loader):.4f}")
    r1 = recall_at_1(model, test_x, test_y)
    print(f"after {args.epochs} epochs ({time.perf_counter() - start:.0f} s): test R@1 {r1:.3f}")
    return r1


if __name__ == "__main__":
    main()
