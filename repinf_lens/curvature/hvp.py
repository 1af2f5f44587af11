"""Pure curvature functions on theta2 (torch.func): gradients, Hessian- and Gauss-Newton-vector products.

All functions take the split, an explicit parameter dict ``params`` (theta2) and prepared upstream inputs
(:class:`repinf_lens.split.SplitInputs`); theta2-shaped vectors are dicts with the keys of ``params``.
The loss reduction is always the MEAN over the examples of a batch; dataset-level quantities are the
example-weighted mean over batches, so the result does not depend on how the data was batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor
from torch.func import grad, jvp, vjp

from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = ["dataset_grad", "dataset_hvp", "gnhvp", "hvp", "loss_grad", "prepared_dataset_hvp"]


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
