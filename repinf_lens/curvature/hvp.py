"""Pure curvature functions on theta2 (torch.func): gradients, Hessian- and Gauss-Newton-vector products.

All functions take the split, an explicit parameter dict ``params`` (theta2) and prepared upstream inputs
(:class:`repinf_lens.split.SplitInputs`); theta2-shaped vectors are dicts with the keys of ``params``.
The loss reduction is always the MEAN over the examples of a batch; dataset-level quantities are the
example-weighted mean over batches, so the result does not depend on how the data was batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from repinf_lens.errors import SettingsError
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = [
    "dataset_grad", "dataset_hvp", "gauss_newton_directions", "gnhvp", "hvp", "loss_grad", "per_example_grads",
    "per_example_logit_vjps", "prepared_dataset_hvp",
]  # fmt: skip


def loss_grad(split: SplitModel, params: Params, inp: SplitInputs) -> Params:
    """Gradient of the batch's mean loss with respect to theta2."""
    return grad(lambda p: split.inputs_loss(p, inp))(params)


def hvp(split: SplitModel, params: Params, inp: SplitInputs, v: Params) -> Params:
    """Hessian-vector product ``H v`` of the batch's mean loss (forward-over-reverse)."""
    return jvp(lambda p: grad(lambda q: split.inputs_loss(q, inp))(p), (params,), (v,))[1]


def gnhvp(split: SplitModel, params: Params, inp: SplitInputs, v: Params) -> Params:
    """Gauss-Newton-vector product ``J^T H_z J v`` (always PSD for a convex loss of the logits z).

    ``J`` is the Jacobian of the answer-position logits w.r.t. theta2 and ``H_z`` the Hessian of the task loss
    w.r.t. those logits (the softmax covariance for cross-entropy).
    """
    batch = inp.batch

    def logits_fn(p: Params) -> Tensor:
        return split.logits(inp.latents, batch, p, inp.error, inp.base, inp.anchor, loss_only=True)

    z, jv = jvp(logits_fn, (params,), (v,))[:2]  # (torch types jvp/vjp as 2- or 3-tuples: has_aux)
    z = z.detach()
    hz = jvp(lambda zz: grad(lambda y: split.task.loss(y, batch))(zz), (z,), (jv,))[1]
    pullback = vjp(logits_fn, params)[1]
    return pullback(hz)[0]


def _weighted_sum(parts: Sequence[tuple[int, Params]]) -> Params:
    total = sum(n for n, _ in parts)
    out: Params = {}
    for n, tree in parts:
        for k, t in tree.items():
            out[k] = out[k] + t * (n / total) if k in out else t * (n / total)
    return out


def dataset_grad(split: SplitModel, params: Params, inputs: Sequence[SplitInputs]) -> Params:
    """Gradient of the mean loss over all examples of ``inputs`` (batches weighted by their size)."""
    return _weighted_sum(
        [(len(inp), {k: t.detach() for k, t in loss_grad(split, params, inp).items()}) for inp in inputs]
    )


def dataset_hvp(
    split: SplitModel, params: Params, inputs: Sequence[SplitInputs], v: Params, *, gauss_newton: bool = False
) -> Params:
    """``H v`` for the mean loss over all examples of ``inputs``: one pass over the Hessian data."""
    fn = gnhvp if gauss_newton else hvp
    return _weighted_sum([(len(inp), {k: t.detach() for k, t in fn(split, params, inp, v).items()}) for inp in inputs])


def _prepared_hvp(split: SplitModel, params: Params, inp: SplitInputs) -> Callable[[Params], Params]:
    """``v -> H v`` of one batch: the pullback of ``theta2 -> grad loss`` at ``params``, taken once."""

    def loss_grad_of(p: Params) -> Params:
        return grad(lambda q: split.inputs_loss(q, inp))(p)

    pullback = vjp(loss_grad_of, params)[1]

    def step(v: Params) -> Params:
        return pullback(v)[0]

    return step


def _prepared_gnhvp(split: SplitModel, params: Params, inp: SplitInputs) -> Callable[[Params], Params]:
    """``v -> J^T H_z J v`` of one batch: the logits' pullback ``J^T`` at ``params`` taken once; ``J v`` stays a
    forward-mode pass per call (``torch.func.linearize`` traces the model and breaks on in-place ops of
    TransformerLens' real checkpoints)."""
    batch = inp.batch

    def logits_fn(p: Params) -> Tensor:
        return split.logits(inp.latents, batch, p, inp.error, inp.base, inp.anchor, loss_only=True)

    def loss_of_logits(y: Tensor) -> Tensor:
        return split.task.loss(y, batch)

    primal = vjp(logits_fn, params)  # (torch types vjp as a 2- or 3-tuple: has_aux)
    z, pullback = primal[0].detach(), primal[1]
    grad_z = grad(loss_of_logits)

    def step(v: Params) -> Params:
        jv = jvp(logits_fn, (params,), (v,))[1]
        hz = jvp(grad_z, (z,), (jv,))[1]
        return pullback(hz)[0]

    return step


def prepared_dataset_hvp(
    split: SplitModel, params: Params, inputs: Sequence[SplitInputs], *, gauss_newton: bool = False
) -> Callable[[Params], Params]:
    """:func:`dataset_hvp` with the primal work done ONCE: ``v -> H v`` for many ``v`` (CG's iterations).

    Hessian: per batch, ``vjp`` of ``theta2 -> grad loss`` at ``params`` is taken once and its pullback kept
    (reverse-over-reverse: ``H v = pullback(v)``, H being symmetric), so each later product is one backward
    pass through the saved gradient graph instead of a fresh forward, backward and forward-mode pass.
    Gauss-Newton: the logits' ``vjp`` (``J^T u``) is kept; ``J v`` is a forward-mode pass per call and ``H_z`` of
    the task loss at the saved logits is applied in between. The returned function works under ``torch.func.vmap``
    (batched CG). Memory: the saved graphs of every Hessian batch stay alive as long as the function does
    (measured in ``benchmarks/bench_hvp.py``). Values equal :func:`dataset_hvp` up to float rounding.
    """
    sizes = [len(inp) for inp in inputs]
    total = sum(sizes)
    make = _prepared_gnhvp if gauss_newton else _prepared_hvp
    steps = [make(split, params, inp) for inp in inputs]

    def prepared(v: Params) -> Params:
        out: Params = {}
        for n, step in zip(sizes, steps, strict=True):
            for k, t in step(v).items():
                t = t.detach() * (n / total)
                out[k] = out[k] + t if k in out else t
        return out

    return prepared


# ------------------------------------------------------------------------------------------ per-example products
ItemFn = Callable[[Params, SplitInputs, Any], Tensor]  # (theta2, ONE example's inputs, its item) -> scalar


def _per_example(
    split: SplitModel, params: Params, inp: SplitInputs, index: Tensor, fn: ItemFn, items: Tensor | None,
    chunk_size: int | None,
) -> dict[str, Tensor]:  # fmt: skip
    """``grad(fn)(params, example index[r], items[r])`` for every item r, as ``{name: [R, *shape]}``.

    ``torch.func.vmap`` over the items (each a one-example :class:`SplitInputs`: the batch's tensors of length
    ``B`` are sliced, its other fields shared), ``chunk_size`` items per vmapped call (``None``: all).
    """
    bt = inp.batch
    n = len(inp)
    names = [f.name for f in fields(bt)]
    batched = {
        k: getattr(bt, k) for k in names if isinstance(getattr(bt, k), Tensor) and getattr(bt, k).shape[:1] == (n,)
    }
    constant = {k: getattr(bt, k) for k in names if k not in batched}

    def one(p: Params, lat: Tensor, err: Tensor | None, base: Tensor, anchor: Any, cols: dict[str, Tensor],
            item: Any) -> Tensor:  # fmt: skip
        batch = type(bt)(**{k: v[None] for k, v in cols.items()}, **constant)
        single = SplitInputs(
            latents=lat[None], error=None if err is None else err[None], base=base[None], batch=batch,
            anchor=None if anchor is None else tuple(a[None] for a in anchor),
        )  # fmt: skip
        return fn(p, single, item)

    dims = (None, 0, 0 if inp.error is not None else None, 0, 0 if inp.anchor is not None else None, 0,
            0 if items is not None else None)  # fmt: skip
    step = len(index) if chunk_size is None else max(1, int(chunk_size))
    parts: list[dict[str, Tensor]] = []
    for lo in range(0, len(index), step):
        take = index[lo : lo + step].to(inp.latents.device)

        def pick(t: Tensor, take: Tensor = take) -> Tensor:
            return t.index_select(0, take.to(t.device))

        out = vmap(grad(one), in_dims=dims)(
            params, pick(inp.latents), None if inp.error is None else pick(inp.error), pick(inp.base),
            None if inp.anchor is None else tuple(pick(a) for a in inp.anchor),
            {k: pick(v) for k, v in batched.items()}, None if items is None else items[lo : lo + step],
        )  # fmt: skip
        parts.append({k: v.detach() for k, v in out.items()})
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def per_example_grads(
    split: SplitModel, params: Params, inp: SplitInputs, *, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Gradient of each example's own loss w.r.t. theta2, ``{name: [B, *shape]}`` (one vmapped backward pass per
    ``chunk_size`` examples). The mean over the batch is :func:`loss_grad` of the batch whenever the task's mean
    loss is the mean of its per-example losses (the built-in tasks)."""

    def loss(p: Params, single: SplitInputs, _item: Any) -> Tensor:
        return split.inputs_loss(p, single)

    return _per_example(split, params, inp, torch.arange(len(inp)), loss, None, chunk_size)


def per_example_logit_vjps(
    split: SplitModel, params: Params, inp: SplitInputs, index: Tensor, cotangents: Tensor, *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """``J_i^T u`` for pairs (example ``i = index[r]``, cotangent ``u = cotangents[r]``), ``{name: [R, *shape]}``.

    ``J_i`` is the Jacobian of example ``i``'s loss-position logits (:meth:`SplitModel.logits` with
    ``loss_only=True``: ``[V]`` for one loss position, ``[P, V]`` for several) w.r.t. theta2, and ``u`` has that
    shape (0 in the columns the loss does not read, which are NaN there). With ``u = sqrt(e) v`` for the
    eigenpairs of the loss's Hessian in the logits, ``sum_r (J^T u_r)(J^T u_r)^T`` is the example's Gauss-Newton
    matrix ``J^T H_z J`` (:func:`gnhvp`).
    """

    def dot(p: Params, single: SplitInputs, u: Tensor) -> Tensor:
        z = split.logits(single.latents, single.batch, p, single.error, single.base, single.anchor, loss_only=True)
        return (torch.nan_to_num(z[0], nan=0.0) * u.to(z.dtype)).sum()

    return _per_example(split, params, inp, index, dot, cotangents, chunk_size)


#: eigenvalues of a loss Hessian in the logits below this times its largest are dropped (their directions are 0)
_EIG_TOL = 1e-10


def gauss_newton_directions(
    split: SplitModel, params: Params, inp: SplitInputs, *, max_outputs: int = 256, logits: Tensor | None = None,
    who: str = "The exact Gauss-Newton", fix: str = "fisher='empirical'",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The logit-space directions of each example's Gauss-Newton matrix: ``(example index [R], cotangents [R, ...])``.

    For example ``n``: the Hessian ``H_n`` of its loss ``task.loss(z_n)`` in the logits it reads (the loss columns,
    at its loss positions; ``torch.func.hessian`` at the model's logits, float64) and one cotangent ``sqrt(e_k)
    v_k`` per eigenpair with ``e_k > 0``, placed in the logits' shape (0 in the other columns), so that
    ``J_n^T H_n J_n = sum_k (J_n^T u_k)(J_n^T u_k)^T``. For the softmax cross-entropy over the answer options
    ``H_n = diag(p) - p p^T`` (rank = options - 1), and the sum is the exact true Fisher: the expectation over
    the model's own labels that a sampled true Fisher estimates. Cheap (no pass through theta2's backward).

    ``logits``: the loss-position logits of ``inp`` under ``params`` when the caller has them already (any values
    in the columns the loss does not read); ``None`` computes them. ``who`` and ``fix`` name the caller and its
    alternative in the errors.

    Raises:
        SettingsError: the loss reads more than ``max_outputs`` logits per example (the full vocabulary), or is not
            convex in them (an eigenvalue below ``-1e-6`` times the largest: no Gauss-Newton matrix).
    """
    task = split.task
    if logits is None:
        with torch.no_grad():
            logits = split.logits(inp.latents, inp.batch, params, inp.error, inp.base, inp.anchor, loss_only=True)
    z = logits.detach()
    cols = split.loss_columns()
    cols = torch.arange(z.shape[-1], device=z.device) if cols is None else cols.to(z.device)
    n_out = int(cols.numel()) * (int(z[0].numel()) // int(z.shape[-1]))
    if n_out > max_outputs:
        raise SettingsError(
            f"{who} takes one direction per logit the loss reads, and this loss reads {n_out} per example (more "
            f"than max_outputs={max_outputs}: the full vocabulary or many target tokens). Fix: {fix}, or a task "
            "whose loss reads few logits (MultipleChoiceTask(full_vocab=False))."
        )
    index, cots = [], []
    for i in range(len(inp)):
        one = inp.slice(i, i + 1)
        zi = z[i : i + 1]
        read = zi.index_select(-1, cols).double()

        def loss_of(r: Tensor, zi: Tensor = zi, one: SplitInputs = one) -> Tensor:
            full = torch.nan_to_num(zi.double(), nan=0.0).index_copy(-1, cols, r)
            return task.loss(full, one.batch)

        h = torch.func.hessian(loss_of)(read).reshape(read.numel(), read.numel())
        e, v = torch.linalg.eigh(0.5 * (h + h.T))
        top = float(e.abs().max()) if e.numel() else 0.0
        if top > 0 and float(e.min()) < -1e-6 * top:
            raise SettingsError(
                f"The task's loss is not convex in its logits (an eigenvalue {float(e.min()):.3e} of its Hessian for "
                f"example {i} of the batch, the largest {top:.3e}): {who} has no Gauss-Newton matrix to build. "
                f"Fix: {fix}, or CG() on the exact Hessian."
            )
        for k in torch.nonzero(e > _EIG_TOL * max(top, 1e-300)).flatten().tolist():
            u = torch.zeros_like(zi[0], dtype=torch.float64)
            u.index_copy_(-1, cols, (v[:, k] * e[k].sqrt()).reshape(read.shape[1:]))
            index.append(i)
            cots.append(u)
    if not cots:
        return torch.zeros(0, dtype=torch.long), z.new_zeros((0, *z.shape[1:]))
    return torch.tensor(index, dtype=torch.long), torch.stack(cots).to(z.dtype)
