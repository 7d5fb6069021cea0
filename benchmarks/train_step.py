"""Time one training step of each method and the share of its graph/proxy module.

A synthetic class-balanced batch (``--classes`` × ``--per-class`` random images of
``--image-size``², ResNet-18 backbone, 512-d embedding) goes through
:func:`bgf_pyg.models.build_method`; a step is forward (loss), backward and an Adam update. The
method's own module (BGFormer with its batch-graph construction, the intra-batch MPN, the
ProxyGML loss) is also timed alone, forward+backward on the backbone's (detached) output, so the
table shows what fraction of a step it costs. Medians of ``--repeats`` interleaved rounds after
one warm-up round.

    python benchmarks/train_step.py --out benchmarks/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_geometric
from torch import Tensor

from bgf_pyg.graph import build_batch_graph
from bgf_pyg.models.backbones import build_backbone
from bgf_pyg.models.methods import (
    METHODS,
    BGFormerMethod,
    IntraBatchMethod,
    Method,
    ProxyGMLMethod,
    build_method,
)

EMBEDDING_DIM = 512


def graph_module_step(method: Method, images: Tensor, labels: Tensor) -> Callable[[], None] | None:
    """Forward+backward of the method's own module on fixed backbone outputs (None for plain)."""
    with torch.no_grad():
        features = method.backbone.features(images)
        embedding = method.backbone.head(features)
    if isinstance(method, BGFormerMethod):
        def step() -> None:
            f = features.detach().requires_grad_(True)
            graph = build_batch_graph(f.detach(), labels, method.graph_loss.k)
            method.bgformer(f, graph.visual_edge_index, graph.semantic_edge_index).sum().backward()
    elif isinstance(method, IntraBatchMethod):
        def step() -> None:
            emb = embedding.detach().requires_grad_(True)
            logits, _ = method.mpn(F.normalize(emb, dim=1))
            method.loss_fn(logits, labels).backward()
    elif isinstance(method, ProxyGMLMethod):
        def step() -> None:
            emb = embedding.detach().requires_grad_(True)
            method.loss_fn(F.normalize(emb, dim=1), labels).backward()
    else:
        return None
    return step


def timed(fn: Callable[[], None]) -> float:
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = args.classes * args.per_class
    images = torch.randn(batch, 3, args.image_size, args.image_size)
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)

    steps: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {}
    for name in METHODS:
        backbone = build_backbone(args.backbone, EMBEDDING_DIM)
        method = build_method(name, backbone, args.classes, samples_per_class=args.per_class)
        optimizer = torch.optim.Adam(method.parameters(), lr=1e-4)

        def train_step(method: Method = method, optimizer: torch.optim.Optimizer = optimizer):
            optimizer.zero_grad(set_to_none=True)
            method(images, labels).backward()
            optimizer.step()

        steps[name] = (train_step, graph_module_step(method, images, labels))

    times: dict[str, dict[str, list[float]]] = {n: {"step": [], "module": []} for n in steps}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, (step, module) in steps.items():
            step_ms = timed(step)
            module_ms = timed(module) if module is not None else 0.0
            if round_:
                times[name]["step"].append(step_ms)
                times[name]["module"].append(module_ms)

    rows = []
    print(f"{'method':<12} {'step ms':>9} {'module ms':>10} {'share':>6}")
    for name, t in times.items():
        step_ms, module_ms = statistics.median(t["step"]), statistics.median(t["module"])
        rows.append({"method": name, "step_ms": step_ms, "module_ms": module_ms,
                     "module_share": module_ms / step_ms})
        print(f"{name:<12} {step_ms:>9.1f} {module_ms:>10.1f} {module_ms / step_ms:>6.1%}")
    result = {
        "machine": {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
                    "threads": torch.get_num_threads(), "device": "cpu"},
        "settings": {"batch": batch, "classes": args.classes, "per_class": args.per_class,
                     "image_size": args.image_size, "backbone": args.backbone,
                     "embedding_dim": EMBEDDING_DIM, "repeats": args.repeats,
                     "timing": "time.perf_counter, median of interleaved rounds"},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
