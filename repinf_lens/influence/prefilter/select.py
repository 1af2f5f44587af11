"""Selecting candidates: the training examples whose gradients are most similar to the query's (paper Sec. 5.3).

:func:`prefilter` ranks a :class:`~repinf_lens.influence.prefilter.store.SketchStore` by the cosine with each
query's sketch and keeps the top ``top_k`` / ``top_fraction`` (counted by
:func:`~repinf_lens.influence.prefilter.metrics.top_count`). Sign convention: POSITIVE cosine = the training
gradient points along the test gradient (a first-order proponent); ``absolute=True`` keeps the largest magnitudes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from repinf_lens._io import as_rows
from repinf_lens.errors import check_int
from repinf_lens.influence.prefilter.metrics import top_count
from repinf_lens.influence.prefilter.sketch import GradientSketcher
from repinf_lens.influence.prefilter.store import SketchStore

__all__ = ["PrefilterResult", "prefilter"]


# ---------------------------------------------------------------------------------------------- querying
@dataclass
class PrefilterResult:
    """Training candidates kept per query by the gradient-similarity prefilter.

    Attributes:
        indices: ``[Q, k]`` indices into the training set, best first.
        scores: ``[Q, k]`` their cosine similarity with the query gradient (POSITIVE = first-order proponent).
        ids: per query, the kept examples' ids (best first).
        all_scores: ``[Q, N]`` the cosine of every training example (for overlap checks and thresholds).
    """

    indices: Int[Tensor, "q k"]
    scores: Float[Tensor, "q k"]
    ids: list[list[str]]
    all_scores: Float[Tensor, "q n"] = field(repr=False)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def select(self, train: Any, q: int = 0) -> list[dict[str, Any]]:
        """The kept training examples for query ``q`` (best first), ready for ``attributor.attribute``."""
        rows = as_rows(train, "training set")
        if len(rows) != self.all_scores.shape[1]:
            raise ValueError(
                f"The training set has {len(rows)} examples but the prefilter scored {self.all_scores.shape[1]}. "
                "Fix: pass the training set the sketch store was built from."
            )
        return [rows[i] for i in self.indices[q].tolist()]

    def union(self) -> Int[Tensor, " m"]:
        """Sorted indices kept for at least one query."""
        return torch.unique(self.indices)


def prefilter(
    query: Any,
    store: SketchStore | str | os.PathLike,
    *,
    split: Any | None = None,
    top_fraction: float | None = None,
    top_k: int | None = None,
    over: str = "theta2",
    absolute: bool = False,
    batch_size: int = 8,
) -> PrefilterResult:
    """Keep the training examples whose gradients have the largest cosine with each query's gradient.

    Args:
        query: query sketches ``[dim]`` or ``[Q, dim]`` made with the store's projection (e.g.
            ``GradientSketcher.from_store(split, store).sketch(queries)``), or query examples (a dict, list of
            dicts or dataset), which are sketched here with the store's projection (needs ``split``).
        store: a :class:`SketchStore` or its folder.
        split: the ``SplitModel``/``InfluenceAttributor`` the store was built with (only for query examples).
        top_fraction: keep ``max(1, ceil(top_fraction * N))`` examples per query (the paper: 0.01-0.10).
        top_k: keep ``min(top_k, N)`` examples per query (exactly one of ``top_k``/``top_fraction``).
        over: the parameters the gradients are taken over; only ``"theta2"`` (the split's downstream
            parameters, those influence differentiates) is supported.
        absolute: rank by ``|cosine|`` (keep opponents too) instead of by cosine.
        batch_size: batch size for sketching query examples.

    Returns:
        A :class:`PrefilterResult`; its scores are cosines, POSITIVE = first-order proponent. Cost: one matrix
        product ``[Q, dim] x [dim, n_shard]`` per shard for all queries together.

    Raises:
        SettingsError: not exactly one of ``top_k`` / ``top_fraction``, or one out of range (checked first).
    """
    top_count(1, top_k=top_k, top_fraction=top_fraction)  # impossible settings fail before any gradient
    check_int("prefilter batch_size", batch_size, minimum=1)
    if over != "theta2":
        raise ValueError(
            f"over={over!r} is not supported: sketches are gradients w.r.t. theta2, the split's downstream "
            "parameters. Fix: pass over='theta2' (choose theta2 with SplitModel(..., downstream=...))."
        )
    if not isinstance(store, SketchStore):
        store = SketchStore.load(store)
    if store.config.get("over", "theta2") != over:
        raise ValueError(f"The store holds gradients over {store.config.get('over')!r}, not {over!r}.")
    if isinstance(query, Tensor):
        q = query.detach().float().cpu()
        q = q[None] if q.ndim == 1 else q
    else:
        if split is None:
            raise ValueError(
                "Query examples need the split to compute their gradients. Fix: prefilter(queries, store, "
                "split=attributor_or_split, ...), or pass query sketches from GradientSketcher.from_store(...)."
            )
        q = GradientSketcher.from_store(split, store).sketch(query, batch_size=batch_size)
    if q.ndim != 2 or q.shape[1] != store.dim:
        raise ValueError(
            f"Query sketches have shape {tuple(q.shape)} but the store's sketches have dim={store.dim}. Fix: sketch "
            "the queries with GradientSketcher.from_store(split, store) (same dim, seed and projection)."
        )
    k = top_count(store.n, top_k=top_k, top_fraction=top_fraction)
    all_scores = store.cosines(q)
    key = all_scores.abs() if absolute else all_scores
    idx = torch.topk(key, k, dim=1).indices
    return PrefilterResult(
        indices=idx,
        scores=all_scores.gather(1, idx),
        ids=[[store.ids[i] for i in row] for row in idx.tolist()],
        all_scores=all_scores,
    )
