"""What the emoji benchmarks share about their per-seed runs: a run folder's name, mean ± std
over seeds, differences paired by seed and the resumable JSON they keep their records in.

The benchmarks are scripts, not a package: each puts its own folder on ``sys.path`` to import
this module."""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from bgf_pyg.arguments import argument_type
from bgf_pyg.domains import positive_int
from bgf_pyg.run_folder import atomic_write


def run_name(label: str, seed: int) -> str:
    """The run folder's name of ``label`` (non-alphanumerics become single dashes) and ``seed``."""
    slug = re.sub(r"[\W_]+", "-", label).strip("-")
    return f"{slug}-s{seed}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(values: dict[int, float], reference: dict[int, float]) -> dict:
    """``values`` minus ``reference``, paired by seed (the seeds both have)."""
    seeds = [s for s in sorted(values) if s in reference]
    diffs = [values[s] - reference[s] for s in seeds]
    mean, std = mean_std(diffs)
    return {"seeds": seeds, "per_seed": diffs, "mean": mean, "std": std,
            "ahead": sum(d > 0 for d in diffs)}


def load(path: Path) -> dict:
    """The payload saved at ``path``, or an empty one (no runs yet)."""
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def save(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON, atomically (a killed benchmark leaves the last good file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))


def add_run_options(p: argparse.ArgumentParser, runs: str, out: str) -> None:
    """The options every seeded benchmark shares: ``--threads``, ``--runs`` (default: ``runs``),
    ``--out`` (default: ``out``, a JSON file) and ``--plot``."""
    p.add_argument("--threads", type=argument_type(positive_int), default=None,
                   help="threads of every run (default: the configuration's automatic count)")
    p.add_argument("--runs", default=runs, help="parent of the run folders")
    p.add_argument("--out", default=out)
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
