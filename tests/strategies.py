"""Shared settings and inputs of the hypothesis property tests (``test_*_properties.py``).

Examples are derandomised (the same ones on every run) and few, so each file stays within its time
budget; features come from seeded ``torch.randn`` so that similarities have no near-ties between
float32 and float64 except the exact ones built on purpose (duplicate and zero rows).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings


def bounded(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def features(seed: int, num_nodes: int, dim: int, zero_rows: int = 0, duplicates: int = 0,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded Gaussian rows; the first ``zero_rows`` set to 0, the last ``duplicates`` copies of
    earlier rows (exact cosine ties)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, dim, generator=gen, dtype=torch.float64)
    x[:zero_rows] = 0.0
    for i in range(max(num_nodes - duplicates, 1), num_nodes):
        x[i] = x[int(torch.randint(0, i, (1,), generator=gen))]
    return x.to(dtype)
