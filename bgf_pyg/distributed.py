"""Multi-process training on ``torch.distributed``: process-group set-up from ``torchrun``'s
environment, a gradient-carrying all-gather of the batch, and helpers for rank-0-only work.

Every function is a no-op (or the identity) in a single process, so the training loop and the
method wrappers call them unconditionally.

Why the all-gather sums the gradient (``docs/design.rst`` §13). Every rank computes the *same*
global loss L on the gathered batch X = [x_0; …; x_{W−1}]. The backward of
:func:`all_gather_with_grad` hands rank r the slice r of ∑_s ∂L_s/∂X = W·∂L/∂x_r;
DistributedDataParallel then divides the summed parameter gradients by W. Both factors cancel, for
the layers before the gather (trunk: W·∂L/∂θ on its own slice, averaged) and after it (head,
BGFormer, proxies: every rank computes the full ∂L/∂θ, averaged), so a step on W ranks × B samples
equals one process on the W·B batch with no loss scaling. pytorch-metric-learning's
``DistributedLossWrapper`` (``utils/distributed.py``) is not reused: it wraps a PML loss only
(BGFormer and the MPN are not losses), gathers the other ranks' rows without gradient, keeps the
local rows' and multiplies the loss by W (so the logged loss is W times too large); that is right
for a loss without parameters behind the gather but would give the head, BGFormer and the proxies W
times their gradient, and its gathered batch is ordered local-rank-first (a different batch graph
on every rank). torch's own ``torch.distributed.nn.functional.all_gather`` has the summing backward
but is deprecated in torch 2.14 and returns a tuple per rank; the 20 lines below are what we need
of it.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .checks import InputError
from .domains import positive_float

log = logging.getLogger(__name__)

T = TypeVar("T")
# torch 2.14 renamed the tensor collectives (the old names warn); older torch has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

#: How long a collective waits for the other ranks before it fails (a crashed or mis-launched rank
#: then ends the run with an error instead of a hang; torchrun also stops the group when one rank
#: exits).
DEFAULT_TIMEOUT_S = 600.0
#: torchrun's variables; WORLD_SIZE > 1 means we were launched distributed.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs and plots."""
    return get_rank() == 0


def launched_distributed() -> bool:
    """True when ``torchrun`` (or an equivalent launcher) set ``WORLD_SIZE`` > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launcher_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 without it), known before the process
    group exists and after it is gone."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group described by torchrun's environment and return this rank's device.

    NCCL when the device is CUDA (each rank takes ``cuda:LOCAL_RANK``), gloo otherwise. Without
    ``WORLD_SIZE`` > 1 nothing is initialised and the device is ``device`` (default: CUDA when
    available).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if not launched_distributed():
        return dev
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun")
    positive_float.check(timeout_s, "timeout_s")
    if dev.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             "CUDA devices: use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.debug("rank %d of %d on %s (%s)", get_rank(), get_world_size(), dev, backend)
    return dev


def destroy_distributed() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """Rows of every rank, rank-major; backward: this rank's slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _gather_equal(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((grad.size(0) // world, *grad.shape[1:]))
            _reduce_scatter_single(out, grad)
            return out
        summed = grad.clone()  # gloo has no reduce-scatter; autograd may still own ``grad``
        dist.all_reduce(summed)
        return summed.chunk(world)[rank]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` (same shape on all ranks) in rank order, keeping the
    gradient path: the backward returns each rank its slice of the gradient summed over ranks.
    The identity in a single process."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def _gather_equal(x: Tensor) -> Tensor:
    out = x.new_empty((dist.get_world_size() * x.size(0), *x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


def _row_counts(x: Tensor) -> list[int]:
    """``x.size(0)`` of every rank."""
    return _gather_equal(torch.tensor([x.size(0)], device=x.device)).tolist()


def all_gather_tensor(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` in rank order, no gradient; ranks may hold different
    numbers of rows (evaluation shards). The identity in a single process."""
    if not is_distributed():
        return x
    sizes = _row_counts(x)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.size(0)] = x
    chunks = _gather_equal(padded).chunk(len(sizes))
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)])


def gather_batch(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The global batch: every rank's rows of ``x`` (with gradient, see
    :func:`all_gather_with_grad`) and ``labels``, in rank order. Every rank must hold the same
    number of rows (the distributed samplers guarantee it); a mismatch is an error on every rank.
    The identity in a single process."""
    if not is_distributed():
        return x, labels
    sizes = _row_counts(x)
    if len(set(sizes)) > 1:
        raise InputError(f"the ranks' batches differ in size ({sizes}); a distributed step needs "
                         "equal per-rank batches (drop_last / a distributed batch sampler)")
    return all_gather_with_grad(x), _gather_equal(labels)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(values: dict[str, Any], what: str = "options") -> None:
    """Raise on every rank when some rank's ``values`` differ from rank 0's, naming the keys and
    the ranks (e.g. ranks launched with different command-line options)."""
    every = all_gather_objects(values)
    diffs = sorted({key for other in every[1:] for key in set(every[0]) | set(other)
                    if every[0].get(key) != other.get(key)})
    if diffs:
        detail = "; ".join(f"{key}: " + ", ".join(f"rank {r}={v.get(key)!r}"
                                                  for r, v in enumerate(every))
                           for key in diffs)
        raise InputError(f"the ranks were launched with different {what}: {detail}")


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank. An exception on rank 0 is
    re-raised on every rank (as :class:`InputError` with rank 0's message on the others), so no
    rank waits for a result that never comes."""
    if not is_distributed():
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if is_main_process():
        try:
            payload[0] = ("ok", fn())
        except Exception as err:  # forwarded to the other ranks, re-raised below
            error = err
            payload[0] = ("error", f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "error":
        raise InputError(f"rank 0 failed: {value}")
    return value


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` when distributed (its
    parameters are broadcast from rank 0, its gradients averaged over ranks), else ``module``."""
    if not is_distributed():
        return module
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them
    before each training forward, after which each rank updates them with its own batch; an
    evaluation right after training would otherwise embed each shard with slightly different
    statistics from the checkpoint's (rank 0's)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def shard(dataset: Dataset) -> Dataset:
    """This rank's contiguous block of ``dataset`` (sizes differ by at most one row), for
    evaluation: the rank-ordered concatenation of the shards is the dataset. The dataset itself
    in a single process."""
    if not is_distributed():
        return dataset
    world, rank = get_world_size(), get_rank()
    bounds = [len(dataset) * r // world for r in range(world + 1)]
    return Subset(dataset, range(bounds[rank], bounds[rank + 1]))
