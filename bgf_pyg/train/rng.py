"""Seeds and random-number-generator states: what makes a run repeatable and a resumed run equal
to an uninterrupted one, and the separate streams that keep one consumer of randomness from
shifting another's draws (``docs/design.rst`` §17)."""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator

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


def stream_seed(seed: int, role: str, index: int = 0) -> int:
    """The seed of the random stream ``role`` (e.g. ``"backbone"``, ``"augmentation"``) of a run
    seeded with ``seed`` (``index``: e.g. the rank): streams of different roles are unrelated,
    and each depends on nothing but these three."""
    sequence = np.random.SeedSequence((seed, zlib.crc32(role.encode()), index))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


@contextlib.contextmanager
def random_stream(seed: int, role: str) -> Iterator[None]:
    """Inside the block torch's global CPU generator draws the stream ``role`` of ``seed``
    (:func:`stream_seed`); after it, the generator is as the block found it. What a module's
    constructor draws for its initial weights then depends on its role alone, not on what was
    built before it, and draws nothing from what follows (augmentation, dropout)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, role))
        yield


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
