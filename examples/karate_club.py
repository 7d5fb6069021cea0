"""BatchGraphConv inside an ordinary PyG model: node classification on Zachary's karate club.

PyG's built-in ``KarateClub`` graph needs no download. The model is a
``torch_geometric.nn.Sequential`` of two ``BatchGraphConv`` layers, trained on the 4 labelled
members and evaluated on the rest.

    python examples/karate_club.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch_geometric.datasets import KarateClub
from torch_geometric.nn import Sequential

from bgf_pyg.nn import BatchGraphConv


def build_model(in_channels: int, hidden: int, num_classes: int, heads: int) -> Sequential:
    return Sequential(
        "x, edge_index",
        [
            (BatchGraphConv(in_channels, hidden, heads=heads, dropout=0.1), "x, edge_index -> x"),
            torch.nn.ELU(),
            (BatchGraphConv(hidden * heads, num_classes, heads=1, root_weight=True),
             "x, edge_index -> x"),
        ],
    )


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = KarateClub()[0]
    model = build_model(data.num_features, args.hidden, int(data.y.max()) + 1, args.heads)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(args.epochs):
        model.train()
        optimizer.zero_grad()
        out = model(data.x, data.edge_index)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(data.x, data.edge_index).argmax(dim=1)
    test_mask = ~data.train_mask
    accuracy = float((pred[test_mask] == data.y[test_mask]).float().mean())
    print(model)
    print(f"test accuracy on the {int(test_mask.sum())} unlabelled members: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
