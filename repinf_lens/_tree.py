"""Arithmetic on theta2-shaped vectors: dicts ``name -> Tensor`` with the keys of ``split.downstream_params()``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "tadd", "tcombine", "tdetach", "tdot", "tflatten", "tgram", "tnorm", "tnumel", "tscale", "tstack", "tunflatten",
    "tunstack", "tzeros_like",
]  # fmt: skip

Tree = Mapping[str, Tensor]


#: elements per float32 partial dot product in :func:`tdot` (the partials are summed in float64)
_DOT_CHUNK = 1 << 16


def tdot(a: Tree, b: Tree) -> Tensor:
    """Inner product ``sum_k <a[k], b[k]>``, accumulated in float64, returned in a's dtype.

    Each tensor's dot product is taken by BLAS (``torch.vdot``) in float64 over chunks of 65,536 elements (each
    chunk converted on its own, so no float64 copy of the whole operands and no elementwise product), reading a
    transposed weight gradient in memory order; CG and LiSSA take three of these per query per iteration. (float32
    partial sums were measured too: 2.4x cheaper again, but unconverged CG on an indefinite Hessian moved with
    their rounding.)
    """
    parts: list[Tensor] = []
    for k in a:
        x, y = a[k], b[k]
        if not x.is_contiguous() and x.dim() > 1:  # (e.g. a transposed weight gradient): read it in memory order
            strides = x.stride()
            order = sorted(range(x.dim()), key=lambda d: -strides[d])
            x, y = x.permute(order), y.permute(order)
        x, y = x.reshape(-1), y.reshape(-1)
        f64 = torch.float64
        parts.extend(
            torch.vdot(x[i : i + _DOT_CHUNK].to(f64), y[i : i + _DOT_CHUNK].to(f64))
            for i in range(0, x.numel(), _DOT_CHUNK)
        )
    total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
    return total.to(next(iter(a.values())).dtype)


def tadd(a: Tree, b: Tree, alpha: float | Tensor = 1.0) -> dict[str, Tensor]:
    """``a + alpha * b`` (a number ``alpha``: one fused ``torch.add`` per tensor)."""
    if isinstance(alpha, Tensor):
        return {k: a[k] + alpha * b[k] for k in a}
    return {k: torch.add(a[k], b[k], alpha=alpha) for k in a}


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


# ---- blocks of vectors: a tree whose tensors carry a leading block dimension [m, *shape] (block CG)
def tstack(trees: Sequence[Tree]) -> dict[str, Tensor]:
    """``[m, *shape]`` tensors from ``m`` trees of the same keys and shapes."""
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def tunstack(block: Tree) -> list[dict[str, Tensor]]:
    """The ``m`` trees of a block (views, no copies)."""
    m = next(iter(block.values())).shape[0]
    return [{k: v[i] for k, v in block.items()} for i in range(m)]


def tgram(a: Tree, b: Tree, *, product_dtype: torch.dtype | None = torch.float64) -> Tensor:
    """``G[i, j] = <a_i, b_j>`` for blocks ``a`` ``[m, ...]`` and ``b`` ``[n, ...]``, float64 ``[m, n]``.

    As in :func:`tdot`: BLAS products over chunks of 65,536 elements, summed in float64. ``product_dtype``: the
    dtype of each chunk's product (default float64); ``None``: ``a``'s own dtype, without converting the chunks
    (``b`` is cast to it), several times cheaper for float32 blocks, each partial product rounded to float32.
    """
    m, n = next(iter(a.values())).shape[0], next(iter(b.values())).shape[0]
    total = torch.zeros(m, n, dtype=torch.float64, device=next(iter(a.values())).device)
    for k in a:
        dt = a[k].dtype if product_dtype is None else product_dtype
        x, y = a[k].reshape(m, -1), b[k].reshape(n, -1)
        for i in range(0, x.shape[1], _DOT_CHUNK):
            total += (x[:, i : i + _DOT_CHUNK].to(dt) @ y[:, i : i + _DOT_CHUNK].to(dt).T).to(torch.float64)
    return total


def tcombine(block: Tree, coef: Tensor, *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``out_j = sum_i coef[i, j] block_i``: ``[m, ...]`` and ``coef`` ``[m, n]`` give an ``[n, ...]`` block.

    ``dtype`` (e.g. ``torch.float64``): compute and return in that dtype, over chunks of 65,536 elements (as
    :func:`tdot`), so that no full-size copy of ``block`` in it is made; ``None``: in the block's dtype.
    """
    out = {}
    for k, v in block.items():
        flat = v.reshape(v.shape[0], -1)
        if dtype is None:
            out[k] = (coef.to(flat.dtype).T @ flat).reshape(coef.shape[1], *v.shape[1:])
            continue
        c = coef.to(dtype).T
        res = torch.empty(coef.shape[1], flat.shape[1], dtype=dtype, device=flat.device)
        for i in range(0, flat.shape[1], _DOT_CHUNK):
            res[:, i : i + _DOT_CHUNK] = c @ flat[:, i : i + _DOT_CHUNK].to(dtype)
        out[k] = res.reshape(coef.shape[1], *v.shape[1:])
    return out
