"""Speed of the DINOv2 ViT-S/14 on a CPU: frozen CLS features (what ``bgf-train
--freeze-backbone`` computes once per image and view), and the last block's forward and
backward on cached tokens (what training the tail from a cached prefix costs per step), one line
of JSON (the tail as ``--train-tail 1`` cuts it: :mod:`bgf_pyg.models.tail`).

    OMP_NUM_THREADS=1 python benchmarks/dinov2_speed.py --pretrained vit_s_focus_timm.pth \\
        --size 98 --threads 1

Without ``--pretrained`` the weights are random (the timing does not depend on them). Only the
network is timed, on random images, after one warm-up; each figure is the median of
``--repeats`` batches, in milliseconds per batch: wall-clock time, and the process's CPU time
(with one thread, what the work costs when other processes share the cores: the wall-clock
time then includes the waiting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from bgf_pyg.models import build_backbone
from bgf_pyg.models.tail import tail_trunk


def median_ms(step: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median wall-clock and CPU milliseconds of ``step`` over ``repeats`` calls."""
    step()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_ms": round(1000 * statistics.median(wall), 1),
            "cpu_ms": round(1000 * statistics.median(cpu), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default=None, help="ViT-S/14 weights (any layout)")
    parser.add_argument("--size", type=int, default=98)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trunk = build_backbone("vit_small_dinov2", 16, args.pretrained, image_size=args.size).trunk
    trunk.eval()
    images = torch.randn(args.batch, 3, args.size, args.size,
                         generator=torch.Generator().manual_seed(0))

    def frozen() -> None:
        with torch.no_grad():
            trunk(images)

    tail = tail_trunk(trunk, 1)  # what --train-tail 1 trains: the last block and the norm
    with torch.no_grad():
        tokens = tail.prefix_module()(images)  # what the prefix cache holds

    def tail_step() -> None:
        tail(tokens).square().sum().backward()

    print(json.dumps({
        "size": args.size, "threads": args.threads, "batch": args.batch,
        "tokens": list(tokens.shape[1:]), "weights": args.pretrained or "random",
        "frozen_features": median_ms(frozen, args.repeats),
        "last_block_fwd_bwd": median_ms(tail_step, args.repeats),
    }))


if __name__ == "__main__":
    main()
