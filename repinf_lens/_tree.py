"""Arithmetic on theta2-shaped vectors: dicts ``name -> Tensor`` with the keys of ``split.downstream_params()``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["tadd", "tdetach", "tdot", "tflatten", "tnorm", "tnumel", "tscale", "tunflatten", "tzeros_like"]

Tree = Mapping[str, Tensor]


def tdot(a: Tree, b: Tree) -> Tensor:
    """Inner product ``sum_k <a[k], b[k]>`` (accumulated in float64 for stability, returned in a's dtype)."""
    total = sum((a[k].double() * b[k].double()).sum() for k in a)
    return torch.as_tensor(total).to(next(iter(a.values())).dtype)


def tadd(a: Tree, b: Tree, alpha: float | Tensor = 1.0) -> dict[str, Tensor]:
    """``a + alpha * b``."""
    return {k: a[k] + alpha * b[k] for k in a}


def tscale(a: Tree, alpha: float | Tensor) -> dict[str, Tensor]:
    """``alpha * a``."""
    return {k: alpha * v for k, v in a.items()}


def tnorm(a: Tree) -> Tensor:
    """Euclidean norm ``sqrt(<a, a>)`` (through :func:`tdot`, so accumulated in float64)."""
    return tdot(a, a).clamp_min(0).sqrt()


def tzeros_like(a: Tree) -> dict[str, Tensor]:
    """Zeros with the keys, shapes, dtypes and devices of ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tdetach(a: Tree) -> dict[str, Tensor]:
    """Every tensor detached from the autograd graph."""
    return {k: v.detach() for k, v in a.items()}


def tnumel(a: Tree) -> int:
    """Total number of elements."""
    return sum(v.numel() for v in a.values())


def tflatten(a: Tree) -> Tensor:
    """Concatenate into one flat vector (in key order)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def tunflatten(flat: Tensor, like: Tree) -> dict[str, Tensor]:
    """Inverse of :func:`tflatten` for the shapes of ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = flat[i : i + n].reshape(v.shape).to(v.dtype)
        i += n
    return out
