"""Time BGFormer's two visual graphs: the cosine kNN graph and the authors' dynamic top-K.

One forward+backward of :class:`~bgf_pyg.nn.BGFormer` on a P×M batch of random features with
same-label semantic edges (the authors' ``label_propagation`` branch), as a training step of
:class:`~bgf_pyg.losses.BatchGraphLoss` runs it: ``knn`` builds the kNN graph of the detached
features first (timed with and without that build), ``attention_topk`` builds only the label
edges. Medians of ``--repeats`` interleaved rounds after one warm-up round, in wall-clock and in
process CPU time (with one thread the CPU time is the compute itself, and it is what a machine
shared with other jobs still measures reliably).

    python benchmarks/visual_graph.py --threads 1 --out benchmarks/results/visual_graph_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_geometric

from bgf_pyg.graph import build_batch_graph, label_edges
from bgf_pyg.nn import BGFormer


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall-clock ms, process CPU ms) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return 1e3 * (time.perf_counter() - wall), 1e3 * (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=45)
    parser.add_argument("--per-class", type=int, default=9)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/visual_graph.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    features = torch.randn(labels.numel(), args.channels)
    models = {form: BGFormer(args.channels, num_layers=args.layers, heads=args.heads, lam=0.3,
                             semantic_branch="label_propagation", visual_graph=form, k=args.k)
              for form in ("knn", "attention_topk")}
    knn_graph = build_batch_graph(features, labels, args.k)

    def step(form: str, build_graph: bool) -> Callable[[], None]:
        def run() -> None:
            f = features.clone().requires_grad_(True)
            if form == "attention_topk":  # as BatchGraphLoss: the label edges only
                visual, semantic = None, label_edges(labels)
            elif build_graph:
                graph = build_batch_graph(f.detach(), labels, args.k)
                visual, semantic = graph.visual_edge_index, graph.semantic_edge_index
            else:
                visual, semantic = knn_graph.visual_edge_index, knn_graph.semantic_edge_index
            models[form](f, visual, semantic).square().sum().backward()
        return run

    cases = {"knn (graph given)": step("knn", False), "knn + graph build": step("knn", True),
             "attention_topk": step("attention_topk", True)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, fn in cases.items():
            ms = timed(fn)
            if round_:
                times[name].append(ms)
    result = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "batch": labels.numel(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "torch_geometric": torch_geometric.__version__},
        "median_wall_ms": {name: statistics.median(w for w, _ in t) for name, t in times.items()},
        "median_cpu_ms": {name: statistics.median(c for _, c in t) for name, t in times.items()},
        "wall_cpu_ms": times,
    }
    for name in cases:
        print(f"{name:20s} wall {result['median_wall_ms'][name]:7.1f} ms   "
              f"CPU {result['median_cpu_ms'][name]:7.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
