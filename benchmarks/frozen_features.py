"""Speed of frozen EfficientNet-Lite0 feature extraction (what ``bgf-train --freeze-backbone``
computes once per image and view) on random images, one line of JSON per image size.

    OMP_NUM_THREADS=1 python benchmarks/frozen_features.py --sizes 64 96 --threads 1

Needs the ``pretrained`` extra. Only the network is timed (no image decoding), in eval mode
without gradients, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bgf_pyg.models import build_backbone


def images_per_second(trunk: torch.nn.Module, size: int, batch: int, batches: int) -> float:
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        trunk(images)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            trunk(images)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trunk = build_backbone("efficientnet_lite0", 16).trunk.eval()
    for size in args.sizes:
        speed = images_per_second(trunk, size, args.batch, args.batches)
        print(json.dumps({"size": size, "threads": args.threads, "batch": args.batch,
                          "images_per_s": round(speed, 1)}))


if __name__ == "__main__":
    main()
