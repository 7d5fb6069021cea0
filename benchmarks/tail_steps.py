"""One tail-training step per cut, from the cached prefix: what a run at another cut or on
another backbone costs, measured without building its cache.

For EfficientNet-Lite0 at 96 px (its ImageNet weights, the ``pretrained`` extra) cuts 1 to 3 and
DINOv2 ViT-S/14 at 98 px (random weights: the time does not depend on them) cut 1: the prefix's
forward per image (a cache's build cost) and a ``--batch``-image step of the tail and a linear
head, forward and backward, from the prefix's output; medians of ``--reps`` after one warm-up.
docs/results.rst scales a measured epoch by these times to project the second emoji verdict.

    OMP_NUM_THREADS=1 python benchmarks/tail_steps.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bgf_pyg.arguments import argument_type
from bgf_pyg.domains import positive_int
from bgf_pyg.models.backbones import build_backbone
from bgf_pyg.models.tail import tail_trunk

#: backbone → (image size, cuts timed)
CASES = {"efficientnet_lite0": (96, (1, 2, 3)), "vit_small_dinov2": (98, (1,))}


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_cut(name: str, size: int, cut: int, batch: int, reps: int) -> str:
    """The prefix's time per image and a tail step's time at ``cut``, as one line."""
    trunk = tail_trunk(build_backbone(name, 128, image_size=size).trunk, cut)
    prefix = trunk.prefix_module()
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = prefix(images)
        per_image = median_seconds(lambda: prefix(images), reps) / batch
    head = torch.nn.Linear(trunk(cached[:2]).shape[-1], 128)
    trunk.train()

    def step() -> None:
        trunk.zero_grad()
        head(trunk(cached)).pow(2).mean().backward()

    return (f"{name} cut {cut}: cached {tuple(cached.shape[1:])}, prefix "
            f"{1000 * per_image:.1f} ms/image, tail step ({batch}) "
            f"{1000 * median_seconds(step, reps):.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=argument_type(positive_int), default=1)
    p.add_argument("--batch", type=argument_type(positive_int), default=64)
    p.add_argument("--reps", type=argument_type(positive_int), default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, (size, cuts) in CASES.items():
        for cut in cuts:
            print(time_cut(name, size, cut, args.batch, args.reps), flush=True)


if __name__ == "__main__":
    main()
