"""Sparse vs dense batch-graph attention: time and peak memory of BatchGraphConv and baselines.

For every (N, k) of the grid, on a cosine kNN graph with self-loops (``build_batch_graph``'s
``loop=True``: k + 1 in-edges per node, so every conv runs with ``add_self_loops=False``), D = 512
input channels and 8 heads of width 64, it measures

- forward time (``torch.no_grad``, eval mode) and forward+backward time (train mode, gradients
  of the input and all parameters), the median of ``--repeats`` runs after ``--warmup`` runs,
  with every method of one (N, k) interleaved in each round so that load changes hit all alike;
- peak memory of one forward+backward: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
  growth of the process's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the resident size before the run. The script re-executes
  itself with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that every tensor buffer is an
  ``mmap`` returned to the system when freed: the high-water mark then measures this run's
  tensors, not memory glibc cached from earlier runs.

Methods: ``BatchGraphConv`` with ``attention_path`` ``sparse`` / ``dense`` / ``auto`` /
``fused`` (CUDA only), PyG ``TransformerConv(root_weight=False)`` and ``GATConv`` on the same
edges, the GEMM floor (the three Q/K/V projections alone), and on request
``scaled_dot_product_attention`` (after a fused Q/K/V projection) with the N×N boolean mask of
the graph and without a mask (full attention). ``bgc_auto``, ``transformer`` and ``gemm_floor``
are also timed under ``torch.compile`` (``--no-compile`` skips that). The table's ``vs TC``
column divides by eager TransformerConv for eager rows and by compiled TransformerConv for
compiled rows. Writes JSON (machine info, every measurement, the sparse/dense crossover N per k
when both ``bgc_sparse`` and ``bgc_dense`` are measured),
a PNG plot next to it, and prints a table.

    python benchmarks/sparse_vs_dense.py --quick --out benchmarks/results/cpu_quick.json
    python benchmarks/sparse_vs_dense.py --threads 1 --out benchmarks/results/cpu.json
    python benchmarks/sparse_vs_dense.py --device cuda --full --out benchmarks/results/cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bgf_pyg  # noqa: F401  (before PyG: it silences PyG's import-time torch.jit.script warnings)

# isort: split
import torch
import torch.nn.functional as F
import torch_geometric
from machine import float_machine  # benchmarks/machine.py, beside this script
from rss import rss_growth_mib  # benchmarks/rss.py, beside this script
from torch import Tensor, nn
from torch_geometric.nn import GATConv, TransformerConv

from bgf_pyg.graph import knn_edges
from bgf_pyg.nn import BatchGraphConv
from bgf_pyg.nn.conv import DENSE_PAIRS_PER_EDGE

CHANNELS = 512
HEADS = 8
FULL_GRID_N = (256, 1024, 4096, 16384, 65536)
#: CPU default: the grid that fits in a few minutes on one core (add --n 16384 65536 for more).
DEFAULT_GRID_N = (256, 1024, 4096)
QUICK_GRID_N = (256, 1024)
GRID_K = (10, 30)
QUICK_GRID_K = (10,)
#: Methods whose cost grows with N² (an N×N score matrix per head): skipped above --max-dense-n.
QUADRATIC = ("bgc_dense", "sdpa_masked", "sdpa_full")
METHODS = (
    "bgc_sparse", "bgc_dense", "bgc_auto", "bgc_fused", "transformer", "gat", "gemm_floor",
    "sdpa_masked", "sdpa_full",
)
DEFAULT_METHODS = ("bgc_sparse", "bgc_auto", "bgc_fused", "transformer", "gat", "gemm_floor")
#: Methods also timed under torch.compile (unless --no-compile): what a user would compile.
COMPILED = ("bgc_auto", "transformer", "gemm_floor")
#: Fixed glibc mmap threshold (bytes): larger buffers are mmapped and unmapped on free.
MMAP_THRESHOLD = 65536
MIB = 2**20
COMPILE_CACHE_SIZE = 256


class SDPAttention(nn.Module):
    """Fused Q/K/V projection + ``scaled_dot_product_attention``, optionally with a bool mask."""

    def __init__(self, mask: Tensor | None) -> None:
        super().__init__()
        self.qkv = nn.Linear(CHANNELS, 3 * CHANNELS)
        self.mask = mask

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(-1, 3, HEADS, CHANNELS // HEADS).permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(0, 1).reshape(-1, CHANNELS)


class GEMMFloor(nn.Module):
    """The three Q/K/V projections alone (summed so that one output carries every gradient):
    the matrix-multiply cost every attention method above pays, the floor of their time."""

    def __init__(self) -> None:
        super().__init__()
        self.lin_query, self.lin_key, self.lin_value = (
            nn.Linear(CHANNELS, CHANNELS) for _ in range(3)
        )

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.lin_query(x) + self.lin_key(x) + self.lin_value(x)


def build(method: str, edge_index: Tensor, num_nodes: int, device: torch.device) -> nn.Module:
    """The module of ``method`` (all map (N, 512) features and the edge list to (N, 512))."""
    width = CHANNELS // HEADS
    if method.startswith("bgc_"):
        path = method.removeprefix("bgc_")
        module: nn.Module = BatchGraphConv(
            CHANNELS, width, heads=HEADS, add_self_loops=False, attention_path=path
        )
    elif method == "transformer":
        module = TransformerConv(CHANNELS, width, heads=HEADS, root_weight=False)
    elif method == "gat":
        module = GATConv(CHANNELS, width, heads=HEADS, add_self_loops=False)
    elif method == "sdpa_masked":
        mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=device)
        mask[edge_index[1], edge_index[0]] = True  # rows = targets
        module = SDPAttention(mask)
    elif method == "gemm_floor":
        module = GEMMFloor()
    elif method == "sdpa_full":
        module = SDPAttention(None)
    else:
        raise ValueError(f"unknown method {method!r}")
    return module.to(device)


class Timer:
    """Wall-clock (CPU) or CUDA-event timing of one call, in milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory growth of one call (see the module docstring for the method)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    return rss_growth_mib(fn)[1]


def step_fns(
    module: nn.Module, x: Tensor, edge_index: Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) closures of ``module`` on ``x``."""

    def forward() -> None:
        module.eval()
        with torch.no_grad():
            module(x, edge_index)

    def forward_backward() -> None:
        module.train()
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, edge_index).sum().backward()

    return forward, forward_backward


def run_config(
    num_nodes: int, k: int, methods: list[str], args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """Measure every method on one (N, k) graph; the methods are interleaved in each round."""
    torch.manual_seed(0)
    x = torch.randn(num_nodes, CHANNELS, device=device)
    edge_index, _ = knn_edges(x, k, loop=True)
    x.requires_grad_(True)
    timer = Timer(device)
    variants: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for method in methods:
        if method in QUADRATIC and num_nodes > args.max_dense_n:
            continue
        if method == "bgc_fused" and device.type != "cuda":
            continue  # the Triton kernel runs on CPU only in its (slow) interpreter
        module = build(method, edge_index, num_nodes, device)
        variants[method] = step_fns(module, x, edge_index)
        if args.compile and method in COMPILED:
            compiled = torch.compile(module, dynamic=False)
            variants[method + "+compile"] = step_fns(compiled, x, edge_index)
    times: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "forward_backward": []} for name in variants
    }
    for fwd, fwd_bwd in variants.values():
        for _ in range(args.warmup):
            fwd()
            fwd_bwd()
    for _ in range(args.repeats):
        for name, (fwd, fwd_bwd) in variants.items():
            times[name]["forward"].append(timer(fwd))
            times[name]["forward_backward"].append(timer(fwd_bwd))
    rows = []
    for name, (_, fwd_bwd) in variants.items():
        rows.append({
            "method": name,
            "N": num_nodes,
            "k": k,
            "num_edges": edge_index.size(1),
            "forward_ms": statistics.median(times[name]["forward"]),
            "forward_backward_ms": statistics.median(times[name]["forward_backward"]),
            "peak_memory_mib": peak_memory_mib(fwd_bwd, device),
        })
    return rows


def crossover(rows: list[dict], k: int, suffix: str = "") -> int | None:
    """Smallest measured N from which the sparse path's forward+backward is faster than the dense
    path's at every larger measured N (``None``: dense never loses)."""
    by_n: dict[int, dict[str, float]] = {}
    for row in rows:
        if row["k"] == k:
            by_n.setdefault(row["N"], {})[row["method"]] = row["forward_backward_ms"]
    sparse_wins = [
        n for n, t in sorted(by_n.items())
        if {"bgc_dense" + suffix, "bgc_sparse" + suffix} <= t.keys()
        and t["bgc_sparse" + suffix] < t["bgc_dense" + suffix]
    ]
    dense_wins = [
        n for n, t in by_n.items()
        if {"bgc_dense" + suffix, "bgc_sparse" + suffix} <= t.keys()
        and t["bgc_sparse" + suffix] >= t["bgc_dense" + suffix]
    ]
    above = [n for n in sparse_wins if all(n > d for d in dense_wins)]
    return min(above) if above else None


def machine_info(device: torch.device) -> dict:
    try:
        import torch_scatter  # noqa: F401

        has_scatter = True
    except ImportError:
        has_scatter = False
    return {
        **float_machine(),  # the CPU, its vector instructions, torch
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch_geometric": torch_geometric.__version__,
        "torch_scatter": has_scatter,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_at_start": os.getloadavg(),
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'N':>6} {'k':>3} {'method':<22} {'fwd ms':>10} {'fwd+bwd ms':>11} "
          f"{'peak MiB':>9} {'vs TC':>6}")
    # Eager rows against eager TransformerConv, compiled rows against compiled TransformerConv.
    reference = {
        (r["N"], r["k"], r["method"].removeprefix("transformer")): r["forward_backward_ms"]
        for r in rows if r["method"].startswith("transformer")
    }
    for r in rows:
        suffix = "+compile" if r["method"].endswith("+compile") else ""
        ratio = r["forward_backward_ms"] / reference.get((r["N"], r["k"], suffix), float("nan"))
        print(f"{r['N']:>6} {r['k']:>3} {r['method']:<22} {r['forward_ms']:>10.2f} "
              f"{r['forward_backward_ms']:>11.2f} {r['peak_memory_mib']:>9.1f} {ratio:>6.2f}")


def plot(rows: list[dict], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ks), figsize=(5 * len(ks), 8), squeeze=False)
    for col, k in enumerate(ks):
        for method in sorted({r["method"] for r in rows}):
            sel = sorted((r for r in rows if r["k"] == k and r["method"] == method),
                         key=lambda r: r["N"])
            if not sel:
                continue
            ns = [r["N"] for r in sel]
            style = "--" if "compile" in method else "-"
            axes[0][col].plot(ns, [r["forward_backward_ms"] for r in sel], style, marker="o",
                              label=method)
            axes[1][col].plot(ns, [r["peak_memory_mib"] for r in sel], style, marker="o",
                              label=method)
        axes[0][col].set_title(f"k = {k}: forward+backward")
        axes[1][col].set_title(f"k = {k}: peak memory")
        axes[0][col].set_ylabel("ms")
        axes[1][col].set_ylabel("MiB")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (nodes)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid: N 256, 1024, k = 10")
    parser.add_argument("--full", action="store_true", help="N up to 65536")
    parser.add_argument("--n", type=int, nargs="+", help="node counts (overrides the grid)")
    parser.add_argument("--k", type=int, nargs="+", help="neighbour counts (overrides the grid)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-dense-n", type=int, default=4096,
                        help="skip the N²-memory methods above this N")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help=f"skip the torch.compile'd variants of {', '.join(COMPILED)}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_vs_dense.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    if args.compile:
        # Every BatchGraphConv instance shares one forward code object: without a larger cache,
        # dynamo stops recompiling after 8 variants and silently runs the rest eagerly.
        torch._dynamo.config.cache_size_limit = COMPILE_CACHE_SIZE
    ns = args.n or (QUICK_GRID_N if args.quick else FULL_GRID_N if args.full else DEFAULT_GRID_N)
    ks = args.k or (QUICK_GRID_K if args.quick else GRID_K)
    rows: list[dict] = []
    for num_nodes in ns:
        for k in ks:
            rows.extend(run_config(num_nodes, k, args.methods, args, device))
            print(f"done N={num_nodes} k={k}", file=sys.stderr, flush=True)
    print_table(rows)
    suffixes = ["", "+compile"] if args.compile else [""]
    measured = {r["method"] for r in rows}
    # Only where both paths were measured (bgc_dense is not among the default --methods).
    crossovers = {
        f"k={k}{suffix}": crossover(rows, k, suffix) for k in ks for suffix in suffixes
        if {"bgc_sparse" + suffix, "bgc_dense" + suffix} <= measured
    }
    for key, n in crossovers.items():
        print(f"crossover, {key}: " + (f"sparse faster than dense from N = {n} on" if n
                                       else "dense faster at some N up to the largest measured"))
    result = {
        "machine": machine_info(device),
        "settings": {
            "channels": CHANNELS, "heads": HEADS, "repeats": args.repeats,
            "warmup": args.warmup, "compile": args.compile,
            "compiled_methods": list(COMPILED) if args.compile else [],
            "graph": "knn_edges(loop=True)",
            "dense_pairs_per_edge": DENSE_PAIRS_PER_EDGE,
            "forward": "eval mode, torch.no_grad",
            "forward_backward": "train mode, sum().backward()",
            "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter, median",
            "peak_memory": (
                "torch.cuda.max_memory_allocated - memory_allocated before" if device.type == "cuda"
                else "VmHWM after one forward+backward - VmRSS before (VmHWM reset via "
                f"/proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})"
            ),
        },
        "crossover_n": crossovers,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, list(ks), args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
