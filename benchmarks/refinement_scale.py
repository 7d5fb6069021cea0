"""Scale of test-time refinement: kNN search, query expansion, learned refinement, metrics (CPU).

Random unit embeddings up to Stanford Online Products' test size (N = 60,502, D = 512, k = 20),
labels in groups of 5 (SOP's test split has about 5 images a class). Each phase runs once and is
timed and measured separately:

- ``knn``: the evaluation's self-excluded top-k search (:func:`bgf_pyg.knn.cosine_topk`), as deep
  as the metrics need (``max(8, largest class − 1)``) and at least k;
- ``qe``: :class:`bgf_pyg.refine.QueryExpansion` reusing that search (``neighbors=``);
- ``bgformer``: :class:`bgf_pyg.refine.BGFormerRefinement` of an untrained BGFormer (2 layers,
  8 heads, width D) with a Linear(D, D) head, reusing the same search as its graph (in a real
  evaluation the graph is searched on the backbone features, one more search of the same cost);
- ``metrics``: Recall@1/2/4/8, MAP@R and R-Precision from the search (no NMI: KMeans into 12,000
  clusters is another matter). Evaluating the *refined* embeddings needs a search of their own.

Peak memory is the growth of the process's resident-set high-water mark (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) during the phase, above what was resident before
it (the embeddings included): an N × N float32 matrix would be 13.6 GiB at full size.

Usage (the JSON goes to benchmarks/results/)::

    python benchmarks/refinement_scale.py --threads 1 --n 8192 60502
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rss import rss_growth_mib  # benchmarks/rss.py, beside this script

from bgf_pyg.knn import cosine_topk, normalize_rows
from bgf_pyg.metrics import evaluate_retrieval, retrieval_depth
from bgf_pyg.nn import BGFormer
from bgf_pyg.refine import BGFormerRefinement, QueryExpansion

SOP_TEST_SIZE = 60_502
CLASS_SIZE = 5


def measure(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``(result, seconds, peak RSS growth in MiB)`` of one call."""
    start = time.perf_counter()
    result, mib = rss_growth_mib(fn)
    return result, time.perf_counter() - start, mib


def run(n: int, k: int, dim: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    emb = normalize_rows(torch.randn(n, dim, generator=generator))
    labels = torch.arange(n) // CLASS_SIZE
    depth = max(k, retrieval_depth(labels, (1, 2, 4, 8), n))
    torch.manual_seed(seed)
    model = BGFormer(dim, num_layers=2, heads=8).eval()
    learned = BGFormerRefinement(model, torch.nn.Linear(dim, dim), k=k)
    phases = {}
    search, phases["knn"], knn_mib = measure(lambda: cosine_topk(emb, k=depth, exclude_self=True))
    phases_mib = {"knn": knn_mib}
    _, phases["qe"], phases_mib["qe"] = measure(
        lambda: QueryExpansion(k=k, alpha=3.0).refine(emb, neighbors=search))
    _, phases["bgformer"], phases_mib["bgformer"] = measure(
        lambda: learned.refine(emb, neighbors=search))
    _, phases["metrics"], phases_mib["metrics"] = measure(
        lambda: evaluate_retrieval(emb, labels, with_nmi=False, neighbors=search))
    return {
        "n": n, "k": k, "dim": dim, "search_depth": depth,
        "seconds": phases, "peak_rss_growth_mib": phases_mib,
        "embeddings_mib": emb.numel() * emb.element_size() / 2**20,
        "qe_over_knn": phases["qe"] / phases["knn"],
        "bgformer_over_knn": phases["bgformer"] / phases["knn"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[SOP_TEST_SIZE], help="set sizes")
    parser.add_argument("--k", type=int, default=20, help="refinement neighbours")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--threads", type=int, required=True, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/refinement_scale.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    info = {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}
    rows = []
    for n in args.n:
        with torch.no_grad():
            row = run(n, args.k, args.dim, args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
