"""Training throughput versus the number of processes (torch.distributed, DDP, global batch graph).

Weak scaling, as multi-GPU metric learning is used: every rank keeps a P×M batch of its own
(``--classes`` × ``--per-class`` synthetic images), so W ranks train on a W·P×M global batch that
the method's batch-level part (BGFormer's graph, the intra-batch MPN, ProxyGML) sees whole via
the all-gather. A step is the package's own :func:`bgf_pyg.train.train_one_epoch` step (forward,
backward with DDP's gradient all-reduce, AdamW). Reported: median step time over ``--steps`` steps
after ``--warmup``, and global samples per second. gloo on CPU, NCCL on CUDA (one GPU per rank).

    python benchmarks/distributed_throughput.py --nprocs 1 2 \
        --out benchmarks/results/distributed_cpu.json

The driver launches ``torchrun --nproc_per_node W`` for each W and collects rank 0's line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch_geometric

from bgf_pyg import distributed
from bgf_pyg.models import METHODS, build_backbone, build_method, build_optimizer
from bgf_pyg.train import Precision, train_one_epoch

RESULT_PREFIX = "THROUGHPUT "


def worker(args: argparse.Namespace) -> None:
    """One rank: time ``--steps`` training steps and print rank 0's result as one JSON line."""
    torch.set_num_threads(args.threads)
    device = distributed.init_distributed(args.device)
    world, rank = distributed.get_world_size(), distributed.get_rank()
    torch.manual_seed(0)
    channels = 1 if args.backbone == "smallcnn" else 3
    backbone = build_backbone(args.backbone, args.embedding_dim, in_channels=channels)
    num_classes = world * args.classes
    method = build_method(args.method, backbone, num_classes,
                          samples_per_class=args.per_class).to(device)
    model = distributed.wrap_ddp(method, device)
    optimizer = build_optimizer(method, 1e-4, 1e-2)
    precision = Precision(device)
    rows = args.classes * args.per_class
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(rows, channels, args.image_size, args.image_size, generator=generator)
    labels = (rank * args.classes + torch.arange(args.classes)).repeat_interleave(args.per_class)
    batch = [(images.to(device), labels.to(device))]
    times = []
    for step in range(args.warmup + args.steps):
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        train_one_epoch(model, batch, optimizer, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - begin)
    step_s = statistics.median(distributed.all_gather_objects(statistics.median(times)))
    if rank == 0:
        print(RESULT_PREFIX + json.dumps({
            "processes": world, "device": device.type, "method": args.method,
            "global_batch": world * rows, "per_rank_batch": rows,
            "step_ms": 1e3 * step_s, "samples_per_s": world * rows / step_s,
        }), flush=True)
    distributed.destroy_distributed()


#: Options the driver forwards to the workers.
WORKER_OPTIONS = ("method", "backbone", "image_size", "embedding_dim", "classes", "per_class",
                  "steps", "warmup", "threads", "device")


def drive(args: argparse.Namespace) -> None:
    """Launch torchrun for every ``--nprocs`` value and write the collected rows to ``--out``."""
    passthrough = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in WORKER_OPTIONS
                   if getattr(args, key) is not None]
    load_before = os.getloadavg()
    rows = []
    for nprocs in args.nprocs:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
               "--master_port", str(29500 + nprocs), __file__, "--worker", *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            sys.exit(f"torchrun with {nprocs} processes failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
        print(rows[-1])
    base = rows[0]["samples_per_s"] / rows[0]["processes"]
    for row in rows:
        row["scaling_efficiency"] = row["samples_per_s"] / (base * row["processes"])
    result = {
        "machine": {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
                    "cpu_count": os.cpu_count(),
                    "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "timing": "time.perf_counter around a barrier-aligned step, median over steps, "
                  "median over ranks",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", choices=METHODS, default="bgformer")
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=8, help="P of each rank's batch")
    parser.add_argument("--per-class", type=int, default=8, help="M")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank (torchrun sets 1 for W > 1 only)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/distributed_throughput.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        drive(args)

if __name__ == "__main__":
    main()
