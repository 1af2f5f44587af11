"""Data-parallel attribution under ``torch.distributed``: shard the training examples across processes.

Launch the same script on every process with ``torchrun`` (gloo on CPU, nccl on CUDA)::

    torchrun --standalone --nproc_per_node=4 my_script.py

    # my_script.py
    from repinf_lens.distributed import init_from_env
    info = init_from_env()                     # reads torchrun's env vars; a no-op in a plain `python` run
    attributor = InfluenceAttributor(split, hessian=CG()).fit(hessian_data)
    result = attributor.attribute_distributed(queries, train)   # None on ranks != 0
    if info.is_main:
        result.save("out")

What happens: rank 0 computes the s_test vectors (solving, or reading them from its s_test cache) and broadcasts
them; every rank scores its shard of the training batches (``shard="contiguous"``: consecutive blocks of batches;
``"strided"``: batch ``b`` on rank ``b % world_size``); the per-example scores are gathered on rank 0 and
assembled, in training-set order, into exactly the :class:`~repinf_lens.influence.InfluenceResult` that
:meth:`~repinf_lens.influence.InfluenceAttributor.attribute` returns in one process (the batches are the same,
so the scores agree to float rounding). Only rank 0 needs the Hessian data (:meth:`fit`). Without an initialised
process group (or with one process) it is :meth:`attribute`.

Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test query's loss).

``python -m repinf_lens.distributed --selftest OUT`` runs a small seeded attribution on a tiny random model and
saves its results under ``OUT`` (``OUT/contiguous`` and ``OUT/strided``); run it once plainly and once under
``torchrun`` to check that both give the same result.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from repinf_lens._tree import tflatten, tunflatten
from repinf_lens.split import Params

__all__ = [
    "DistInfo",
    "init_from_env",
    "dist_info",
    "is_distributed",
    "shard_ranges",
    "broadcast_s_test",
    "attribute_distributed",
    "cleanup",
    "run_selftest",
]

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


def attribute_distributed(
    attributor: Any,
    queries: Any,
    train: Any,
    *,
    batch_size: int | None = None,
    shard: str = "contiguous",
    src: int = 0,
) -> Any:
    """:meth:`InfluenceAttributor.attribute` with the training examples sharded across ``torch.distributed`` ranks.

    Every rank must call it with the same queries, training set and attributor settings. Rank ``src`` computes
    the s_test vectors (solving them or reading its s_test cache; only it needs :meth:`fit`) and broadcasts them;
    each rank scores the training batches :func:`shard_ranges` assigns it; rank ``src`` gathers the scores and
    returns the assembled :class:`InfluenceResult`, identical in layout and order to a single-process
    :meth:`attribute` (``meta["distributed"]`` records the sharding). Other ranks return ``None``.
    Without an initialised process group of more than one process it simply calls :meth:`attribute`.
    Sign convention: POSITIVE = proponent (up-weighting the training example lowers the query's loss).

    Args:
        attributor: the :class:`InfluenceAttributor`.
        queries: test queries (dict, list of dicts, dataset).
        train: training examples.
        batch_size: training examples per influence batch (default: the attributor's).
        shard: ``"contiguous"`` or ``"strided"`` (see :func:`shard_ranges`).
        src: the rank that solves s_test and assembles the result.

    Raises:
        RuntimeError: on every rank when rank ``src`` could not compute s_test (e.g. no :meth:`fit`).
    """
    from repinf_lens.influence.attributor import _Scores, as_rows

    if not is_distributed():
        return attributor.attribute(queries, train, batch_size=batch_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    q_rows = as_rows(queries, "query set")
    t_rows = as_rows(train, "training set")
    bs = batch_size or attributor.batch_size
    ranges = shard_ranges(len(t_rows), bs, rank, world, shard)
    params = attributor.split.downstream_params()

    t0 = time.perf_counter()
    s_list, error = None, None
    if rank == src:
        try:
            s_list = attributor.s_test(q_rows)
        except Exception as exc:  # tell the other ranks instead of leaving them at the broadcast
            error = f"{type(exc).__name__}: {exc}"
    status = [error]
    dist.broadcast_object_list(status, src=src)
    if status[0] is not None:
        if error is not None:
            raise RuntimeError(f"s_test failed on rank {src}: {error}")
        raise RuntimeError(f"s_test failed on rank {src}: {status[0]}")
    s_list = broadcast_s_test(s_list, params, len(q_rows), src=src)
    infos = attributor.solve_infos if rank == src else []
    s_stacks = attributor._stack_queries(s_list)
    del s_list
    t_solve = time.perf_counter() - t0

    t1 = time.perf_counter()
    payload = []
    with tqdm(
        total=sum(b - a for a, b in ranges),
        desc=f"influence (rank {rank}/{world})",
        disable=not attributor.progress or rank != src,
    ) as bar:
        for lo, hi in ranges:
            part = attributor._score_range(s_stacks, t_rows, lo, hi, bs, bar)
            payload.append((lo, hi, part.to_tensors(attributor.store_token_scores)))
            del part
    t_local = time.perf_counter() - t1
    gathered: list[Any] | None = [None] * world if rank == src else None
    dist.gather_object((rank, t_local, payload), gathered, dst=src)
    if rank != src:
        return None
    assert gathered is not None
    nq, n = len(q_rows), len(t_rows)
    scores = _Scores.empty(nq, n, attributor.split.d_sae, 0)
    parts = sorted((lo, hi, t) for _, _, pl in gathered for lo, hi, t in pl)
    covered = 0
    for lo, hi, tensors in parts:
        if lo != covered:
            raise RuntimeError(f"Distributed shards do not tile the training set: gap at example {covered}.")
        scores.fill(_Scores.from_tensors(tensors, lo, hi, nq))
        covered = hi
    if covered != n:
        raise RuntimeError(f"Distributed shards cover {covered} of {n} training examples.")
    meta = attributor._meta(bs, t_solve, time.perf_counter() - t1, infos)
    meta["distributed"] = {
        "world_size": world,
        "backend": str(dist.get_backend()),
        "shard": shard,
        "seconds_per_rank": [round(t, 3) for _, t, _ in sorted(gathered, key=lambda x: x[0])],
    }
    return attributor._result(q_rows, t_rows, scores, meta)


# ---------------------------------------------------------------------------------------------- self-test


def _selftest_examples(n: int, seed: int) -> list[dict[str, Any]]:
    from repinf_lens.testing import toy_mcqa_rows

    return toy_mcqa_rows(n, seed=seed, prefix=f"s{seed}-")


def _selftest_attributor() -> Any:
    """A seeded tiny model + random TopK SAE + CG attributor (identical in every process)."""
    from repinf_lens import CG, InfluenceAttributor, SplitModel
    from repinf_lens.testing import random_sae, tiny_model

    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
    hook = "blocks.0.hook_resid_post"
    split = SplitModel(model, hook, random_sae(model, hook, d_sae=48, k=6, seed=0))
    att = InfluenceAttributor(
        split,
        hessian=CG(damping=0.1, max_iter=3, gauss_newton=True),
        use_cache=False,
        progress=False,
        batch_size=2,
        query_chunk_size=2,
    )
    return att.fit(_selftest_examples(4, seed=3))


def run_selftest(out: str | os.PathLike, modes: Sequence[str] = ("contiguous", "strided")) -> dict[str, Any]:
    """Attribute 3 queries x 11 training examples of a seeded tiny model and save the results under ``out``.

    Saves ``out/<mode>`` (:meth:`InfluenceResult.save`) on rank 0 for each shard mode. In a plain process (no
    process group) both are single-process :meth:`attribute` results. Returns ``{mode: result}`` on rank 0
    (``{}`` elsewhere).
    """
    att = _selftest_attributor()
    queries, train = _selftest_examples(3, seed=2), _selftest_examples(11, seed=1)
    results = {}
    for mode in modes:
        res = attribute_distributed(att, queries, train, shard=mode)
        if res is not None:
            res.save(Path(out) / mode)
            results[mode] = res
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m repinf_lens.distributed",
        description="Self-test of distributed attribution: run plainly and under torchrun, compare the outputs.",
    )
    p.add_argument("--selftest", metavar="OUT", required=True, help="folder for the results (OUT/<shard mode>)")
    p.add_argument("--shard", choices=["contiguous", "strided", "both"], default="both")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    args = p.parse_args(argv)
    info = init_from_env(args.backend)
    torch.manual_seed(0)
    try:
        modes = ("contiguous", "strided") if args.shard == "both" else (args.shard,)
        run_selftest(args.selftest, modes)
        if info.is_main:
            print(f"selftest: world_size={info.world_size} backend={info.backend} -> {args.selftest}")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
