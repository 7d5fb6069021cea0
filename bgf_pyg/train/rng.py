"""Seeds and random-number-generator states: what makes a run repeatable and a resumed run equal
to an uninterrupted one."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch_geometric import seed_everything

_NUMPY_SEED_MOD = 2**32


def seed_all(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (via PyG's ``seed_everything``); return a seeded generator
    for a ``DataLoader``."""
    seed_everything(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` seeding NumPy and ``random`` from the worker's torch seed."""
    seed = torch.initial_seed() % _NUMPY_SEED_MOD
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states, storable with ``weights_only`` load."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.copy()), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["key"].numpy(), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
