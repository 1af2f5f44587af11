"""``torch.distributed`` primitives: the process group, the sharding of training batches, the s_test broadcast.

A low-level module (it imports no attributor), so :meth:`InfluenceAttributor.attribute_distributed
<repinf_lens.influence.attributor.InfluenceAttributor.attribute_distributed>` can use it. Users import these names
from :mod:`repinf_lens.distributed`, which re-exports them and holds the self-test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from repinf_lens._tree import tflatten, tunflatten
from repinf_lens.split import Params

__all__ = ["DistInfo", "broadcast_s_test", "cleanup", "dist_info", "init_from_env", "is_distributed", "shard_ranges"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``0`` of ``1`` without torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that returns the assembled result)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> DistInfo:
    """The current process group's rank, size and backend (``DistInfo()`` when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        backend=str(dist.get_backend()),
    )


def init_from_env(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from ``torchrun``'s environment variables.

    A no-op (returns ``DistInfo()``: rank 0 of 1) when the process was not launched by ``torchrun``
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` or ``MASTER_PORT`` unset); returns the existing group's info when
    one is already initialised.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA and NCCL are available (each rank then uses
            GPU ``LOCAL_RANK``), else gloo.
        timeout_s: collective timeout (rank 0 solves the s_test vectors while the others wait at the broadcast).
    """
    if not dist.is_available():
        return DistInfo()
    if dist.is_initialized():
        return dist_info()
    if any(v not in os.environ for v in _TORCHRUN_VARS):
        return DistInfo()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist_info()


def cleanup() -> None:
    """Destroy the default process group if one is initialised (call at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_ranges(
    n: int, batch_size: int, rank: int, world_size: int, mode: str = "contiguous"
) -> list[tuple[int, int]]:
    """The training-example ranges ``[(start, stop), ...]`` rank ``rank`` scores, in whole batches.

    The batches are those of a single process (``range(0, n, batch_size)``), so each example is scored in the same
    batch whatever the number of ranks. ``"contiguous"``: the batches are cut into ``world_size`` consecutive
    blocks (sizes differ by at most one batch; one range per rank). ``"strided"``: batch ``b`` goes to rank
    ``b % world_size`` (one range per batch; balances batches whose cost grows along the set).
    """
    if mode not in ("contiguous", "strided"):
        raise ValueError(f"Unknown shard mode {mode!r}. Valid: 'contiguous', 'strided'.")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}.")
    starts = list(range(0, n, batch_size))
    if mode == "strided":
        return [(lo, min(n, lo + batch_size)) for b, lo in enumerate(starts) if b % world_size == rank]
    nb = len(starts)
    per, extra = divmod(nb, world_size)
    first = rank * per + min(rank, extra)
    count = per + (1 if rank < extra else 0)
    if count == 0:
        return []
    return [(starts[first], min(n, starts[first + count - 1] + batch_size))]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_s_test(s_list: Sequence[Params] | None, like: Params, n: int, src: int = 0) -> list[Params]:
    """Broadcast ``n`` theta2-shaped vectors from rank ``src`` (one flat tensor per vector).

    Args:
        s_list: the vectors on ``src`` (ignored elsewhere).
        like: theta2 (shapes, dtypes and the device the results are put on).
        n: the number of vectors (known on every rank).
        src: the sending rank.
    """
    dev = _comm_device()
    numel = sum(v.numel() for v in like.values())
    dtype = next(iter(like.values())).dtype
    out = []
    for q in range(n):
        if dist.get_rank() == src:
            assert s_list is not None
            flat = tflatten({k: s_list[q][k].to(dtype) for k in like}).to(dev)
        else:
            flat = torch.empty(numel, dtype=dtype, device=dev)
        dist.broadcast(flat, src=src)
        out.append({k: v.to(like[k].device) for k, v in tunflatten(flat, like).items()})
    return out
