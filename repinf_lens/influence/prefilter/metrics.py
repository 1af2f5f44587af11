"""Counting and comparing candidate sets: how many a top-k / top-fraction keeps, and how well sketches keep the
exact top candidates. Pure functions of score tensors (larger = kept; POSITIVE cosine = first-order proponent).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from repinf_lens.errors import SettingsError, check_float, check_int

__all__ = ["sketch_overlap", "top_count"]


def top_count(n: int, *, top_k: int | None = None, top_fraction: float | None = None) -> int:
    """How many of ``n`` candidates are kept: ``min(top_k, n)`` or ``max(1, ceil(top_fraction * n))``.

    Exactly one of ``top_k`` and ``top_fraction`` must be given.
    """
    if (top_k is None) == (top_fraction is None):
        raise SettingsError(
            f"Pass exactly one of top_k and top_fraction, got top_k={top_k} and top_fraction={top_fraction}. "
            "Fix: e.g. top_fraction=0.05 keeps the top 5 %, top_k=100 the best 100."
        )
    if top_k is not None:
        check_int("top_k", top_k, minimum=1, why="training examples kept per query")
        return min(int(top_k), n)
    assert top_fraction is not None
    check_float(
        "top_fraction", top_fraction, minimum=0.0, inclusive=False, maximum=1.0,
        fix="pass a share in (0, 1], e.g. 0.05 keeps the top 5 % (the paper: 0.01-0.1).",
    )  # fmt: skip
    return max(1, min(n, math.ceil(top_fraction * n - 1e-9)))


def sketch_overlap(
    exact_scores: Float[Tensor, "*q n"], sketch_scores: Float[Tensor, "*q n"], frac: float = 0.05
) -> float:
    """Share of the exact top-``frac`` candidates that the sketch's top-``frac`` also keeps (mean over queries).

    Both arguments are scores of the same N training examples (``[N]`` or ``[Q, N]``), e.g. exact cosines
    from ``exact=True`` sketches and approximate ones from projected sketches (larger = kept; POSITIVE cosine =
    first-order proponent). ``k = max(1, ceil(frac * N))``; 1.0 means the sketch keeps the same candidates.
    """
    a = exact_scores[None] if exact_scores.ndim == 1 else exact_scores
    b = sketch_scores[None] if sketch_scores.ndim == 1 else sketch_scores
    if a.shape != b.shape:
        raise ValueError(f"Score shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.")
    k = top_count(a.shape[1], top_fraction=frac)
    ta = torch.topk(a, k, dim=1).indices
    tb = torch.topk(b, k, dim=1).indices
    shared = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)]
    return float(sum(shared) / len(shared))
