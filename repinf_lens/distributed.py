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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from repinf_lens._dist import (
    DistInfo,
    broadcast_s_test,
    cleanup,
    dist_info,
    init_from_env,
    is_distributed,
    shard_ranges,
)

__all__ = [
    "DistInfo",
    "attribute_distributed",
    "broadcast_s_test",
    "cleanup",
    "dist_info",
    "init_from_env",
    "is_distributed",
    "run_selftest",
    "shard_ranges",
]


def attribute_distributed(
    attributor: Any,
    queries: Any,
    train: Any,
    *,
    batch_size: int | None = None,
    shard: str = "contiguous",
    src: int = 0,
) -> Any:
    """The function form of :meth:`InfluenceAttributor.attribute_distributed` (same arguments, same result).

    Training examples sharded across ``torch.distributed`` ranks: rank ``src`` solves s_test and returns the
    assembled :class:`~repinf_lens.influence.InfluenceResult`, other ranks return ``None``; without a
    multi-process group it is :meth:`~repinf_lens.influence.InfluenceAttributor.attribute`.
    Sign convention: POSITIVE = proponent (up-weighting the training example lowers the query's loss).
    """
    return attributor.attribute_distributed(queries, train, batch_size=batch_size, shard=shard, src=src)


# ---------------------------------------------------------------------------------------------- self-test


def _selftest_examples(n: int, seed: int) -> list[dict[str, Any]]:
    from repinf_lens.testing import toy_mcqa_rows

    return toy_mcqa_rows(n, seed=seed, prefix=f"s{seed}-")


def _selftest_attributor() -> Any:
    """A seeded tiny model + random TopK SAE + CG attributor (identical in every process)."""
    from repinf_lens.curvature.solvers import CG
    from repinf_lens.influence.attributor import InfluenceAttributor
    from repinf_lens.split import SplitModel
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
