"""Launch a function on W gloo ranks (forked processes) with a deadline, for the distributed tests.

The ranks find each other through the same environment variables torchrun sets, so they go through
:func:`bgf_pyg.distributed.init_distributed` exactly as a ``torchrun`` launch does. Forked, not
spawned: a spawned rank re-imports torch and PyG (about 8 s each on the 2-core build machine), a
forked one starts at once; the test process itself never joins a process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

#: A test fails (instead of hanging) when its ranks have not all ended after this many seconds.
SPAWN_DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)  # the ranks share the cores, as torchrun's OMP_NUM_THREADS=1
    fn(rank, *args)


def spawn(fn: Callable, world: int, *args, deadline_s: float = SPAWN_DEADLINE_S) -> None:
    """Run ``fn(rank, *args)`` on ``world`` processes; raise if one fails or they hang."""
    context = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world,
                                 join=False, start_method="fork")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() > end:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {world} ranks did not finish within {deadline_s} s (a hang)")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we read
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it at once, as a scheduler killing a job does.

    ``killpg`` is not enough for torchrun: it starts each rank in a session of its own, so the ranks
    would outlive it and go on writing the run folder.
    """
    os.kill(pid, signal.SIGSTOP)  # no new ranks while the tree is read
    tree, pending = [], [pid]
    while pending:
        parent = pending.pop()
        tree.append(parent)
        pending.extend(_children(parent))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
