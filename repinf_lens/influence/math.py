"""Pure influence math (torch.func): example scores, latent scores by the derivative swap, and a reference.

Sign convention, everywhere: score(z_train, z_test) = + g_test^T (H + lambda I)^-1 g_train = <s_test, G(z_train)>,
so a POSITIVE score marks a proponent (up-weighting the training example lowers the test loss); Koh & Liang's
I_up,loss is its negative.

Latent scores (paper Def. 4.2, gradient x input): for the latents r of a training example,
    score[t, j] = r[t, j] * d/dr[t, j] < G(r), s_test >,
with G(r) the gradient of the example's loss w.r.t. theta2. All of them come from ONE forward-over-reverse
differentiation: the JVP, along the parameter direction s_test, of r -> grad_r loss (mixed partials commute).
Each example's latents only enter its own loss term (the batch loss is a SUM inside the swap), so scores do not
depend on the batch they are computed in.

Many queries at once (:func:`latent_influence_multi`): the swap is linear in its tangent s_test, so Q queries are
one ``torch.func.vmap`` over the tangent of the same JVP. The primal forward and backward pass through theta2
(the part that does not depend on s_test) then runs ONCE per training batch instead of Q times, and the Q
tangent passes run as batched matrix products.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import grad, jvp, vmap

from repinf_lens._tree import tdot
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = [
    "LatentInfluence",
    "as_inputs",
    "example_influence",
    "latent_influence",
    "latent_influence_multi",
    "latent_influence_reference",
    "stack_queries",
]


@dataclass
class LatentInfluence:
    """Output of :func:`latent_influence` for one batch and one s_test (POSITIVE = proponent).

    Attributes:
        token_scores: ``[B, T, d_sae]`` r * grad_r <G(r), s_test> (zero where a latent is inactive).
        example_scores: ``[B]`` <s_test, G_i> = g_test^T (H + lambda I)^-1 g_train.
        latent_scores: ``[B, d_sae]`` token scores summed over positions (a row of the paper's IFR).
        error_term: ``[B]`` gradient x input share of the held SAE error e (sum over positions).
        bias_term: ``[B]`` gradient x input share of the decoder bias b_dec.
        latents: ``[B, T, d_sae]`` the latents r themselves.
    """

    token_scores: Float[Tensor, "batch pos d_sae"]
    example_scores: Float[Tensor, " batch"]
    error_term: Float[Tensor, " batch"]
    bias_term: Float[Tensor, " batch"]
    latents: Float[Tensor, "batch pos d_sae"]

    @property
    def latent_scores(self) -> Float[Tensor, "batch d_sae"]:
        return self.token_scores.sum(1)

    @property
    def latent_sum(self) -> Float[Tensor, " batch"]:
        """Sum of all latent scores per example (compare with ``example_scores``: completeness is first order)."""
        return self.token_scores.sum((1, 2))


def as_inputs(split: SplitModel, batch_or_inputs: object) -> SplitInputs:
    """Accept a task batch (run upstream now) or already prepared :class:`SplitInputs`."""
    if isinstance(batch_or_inputs, SplitInputs):
        return batch_or_inputs
    return split.prepare(batch_or_inputs)


def _zero_error(split: SplitModel, inp: SplitInputs) -> Tensor:
    with torch.no_grad():
        shape = split.downstream_input(inp.latents[:1, :1]).shape[2:]
    return torch.zeros((*inp.latents.shape[:2], *shape), dtype=split.model.cfg.dtype, device=inp.latents.device)


def example_influence(
    split: SplitModel, s_test: Params, batch: object, params: Params | None = None
) -> Float[Tensor, " batch"]:
    """Per-example influence ``<s_test, G_i>`` (POSITIVE = proponent), one forward-mode JVP for the whole batch."""
    inp = as_inputs(split, batch)
    params = split.downstream_params() if params is None else params
    s = {k: s_test[k].to(params[k].dtype) for k in params}
    tangent = jvp(lambda p: split.inputs_loss(p, inp, reduction="none"), (params,), (s,))[1]
    return tangent.detach()


def latent_influence(
    split: SplitModel, s_test: Params, batch: object, params: Params | None = None, *, chunk_size: int | None = None
) -> LatentInfluence:
    """Latent, example and error-term influence for a batch of training examples in ONE extra differentiation.

    Forward-over-reverse: ``jvp`` along ``s_test`` of ``theta2 -> (per-example losses, grad_(r, e) sum loss)``.
    POSITIVE = proponent. ``s_test`` is a dict with the keys of ``split.downstream_params()``.
    ``chunk_size`` processes the batch that many examples at a time (peak memory scales with it; the scores
    do not change, since each example's latents only enter its own loss).
    """
    inp = as_inputs(split, batch)
    params = split.downstream_params() if params is None else params
    if chunk_size is not None and chunk_size < len(inp):
        parts = [
            latent_influence(split, s_test, inp.slice(i, i + chunk_size), params)
            for i in range(0, len(inp), chunk_size)
        ]
        return LatentInfluence(
            token_scores=torch.cat([p.token_scores for p in parts]),
            example_scores=torch.cat([p.example_scores for p in parts]),
            error_term=torch.cat([p.error_term for p in parts]),
            bias_term=torch.cat([p.bias_term for p in parts]),
            latents=inp.latents,
        )
    s = {k: s_test[k].to(params[k].dtype) for k in params}
    err = inp.error if inp.error is not None else _zero_error(split, inp)
    d_loss, d_r, d_e = jvp(_swap_inner(split, inp, err), (params,), (s,))[1]
    return _finish(split, inp, err, d_loss.detach(), d_r.detach(), d_e.detach())


_Inner = Callable[[Params], tuple[Tensor, Tensor, Tensor]]


def _swap_inner(split: SplitModel, inp: SplitInputs, err: Tensor) -> _Inner:
    """``theta2 -> (per-example losses, grad_r sum loss, grad_e sum loss)``: the function whose JVP is the swap."""
    r = inp.latents

    def inner(p: Params) -> tuple[Tensor, Tensor, Tensor]:
        def total(rr: Tensor, ee: Tensor) -> tuple[Tensor, Tensor]:
            losses = split.loss(rr, inp.batch, p, ee, inp.base, reduction="none", anchor=inp.anchor)
            return losses.sum(), losses

        (g_r, g_e), losses = grad(total, argnums=(0, 1), has_aux=True)(r, err)
        return losses, g_r, g_e

    return inner


def _finish(
    split: SplitModel, inp: SplitInputs, err: Tensor, d_loss: Tensor, d_r: Tensor, d_e: Tensor
) -> LatentInfluence:
    """Token scores, error and bias terms from the swap's tangents for ONE s_test (``d_*`` without a query dim)."""
    r = inp.latents
    dims = tuple(range(2, d_e.ndim))
    error_term = (d_e * err).sum(dims).sum(1) if inp.error is not None else torch.zeros_like(d_loss)
    if split.sae is not None:
        b_dec = split.sae.b_dec.detach().reshape(d_e.shape[2:]).to(d_e.dtype)
        bias_term = (d_e * b_dec).sum(dims).sum(1)
    else:
        bias_term = torch.zeros_like(d_loss)
    return LatentInfluence(
        token_scores=(r * d_r).detach(),
        example_scores=d_loss.detach(),
        error_term=error_term.detach(),
        bias_term=bias_term.detach(),
        latents=r,
    )


def stack_queries(s_tests: Sequence[Params], params: Params) -> Params:
    """Stack Q s_test vectors into one theta2-shaped dict with a leading query dimension ``[Q, *shape]``.

    The result is what :func:`latent_influence_multi` takes (cast to theta2's dtype). It costs one copy of the Q
    vectors: stack once per attribution and reuse the stack for every training batch.
    """
    if not s_tests:
        raise ValueError("No s_test vectors to stack. Fix: pass at least one query.")
    return {k: torch.stack([s[k].to(params[k].dtype) for s in s_tests]) for k in params}


def _n_queries(s_tests: Sequence[Params] | Mapping[str, Tensor]) -> int:
    if isinstance(s_tests, Mapping):
        return int(next(iter(s_tests.values())).shape[0])
    return len(s_tests)


_VMAP_FALLBACK_WARNED = False


def latent_influence_multi(
    split: SplitModel,
    s_tests: Sequence[Params] | Mapping[str, Tensor],
    batch: object,
    params: Params | None = None,
    *,
    chunk_size: int | None = None,
    query_chunk_size: int | None = None,
) -> list[LatentInfluence]:
    """:func:`latent_influence` for Q queries at once: one shared primal pass, Q tangents under ``vmap``.

    The derivative swap is the JVP along s_test of ``theta2 -> (losses, grad_(r, e) sum loss)``. Its primal part
    (forward and backward through theta2 on the training batch) does not depend on s_test, so ``vmap`` over the
    tangent computes it once and pushes the Q tangents through as batched matrix products. The scores equal Q
    calls of :func:`latent_influence` up to float rounding. When the model has an operation without a ``vmap``
    batching rule, it falls back to one JVP per query (with a warning), with the same results.

    Sign convention: POSITIVE = proponent (up-weighting the training example lowers that query's loss).

    Args:
        split: the split model.
        s_tests: Q s_test vectors, either a sequence of theta2-shaped dicts or one dict stacked along a leading
            query dimension (:func:`stack_queries`; cheaper when reused for many training batches).
        batch: a task batch or prepared :class:`SplitInputs` of training examples.
        params: theta2 (default ``split.downstream_params()``).
        chunk_size: training examples per swap (peak memory scales with it; scores do not change).
        query_chunk_size: queries per ``vmap`` (the tangent part costs about ``query_chunk_size`` times the
            memory of one query's; the primal part is recomputed once per query chunk). ``None`` = all at once.

    Returns:
        One :class:`LatentInfluence` per query, in the order of ``s_tests``.
    """
    inp = as_inputs(split, batch)
    params = split.downstream_params() if params is None else params
    nq = _n_queries(s_tests)
    if nq == 0:
        return []
    if chunk_size is not None and chunk_size < len(inp):
        parts = [
            latent_influence_multi(
                split, s_tests, inp.slice(i, i + chunk_size), params, query_chunk_size=query_chunk_size
            )
            for i in range(0, len(inp), chunk_size)
        ]
        return [
            LatentInfluence(
                token_scores=torch.cat([p[q].token_scores for p in parts]),
                example_scores=torch.cat([p[q].example_scores for p in parts]),
                error_term=torch.cat([p[q].error_term for p in parts]),
                bias_term=torch.cat([p[q].bias_term for p in parts]),
                latents=inp.latents,
            )
            for q in range(nq)
        ]
    qc = nq if query_chunk_size is None else max(1, int(query_chunk_size))
    err = inp.error if inp.error is not None else _zero_error(split, inp)
    inner = _swap_inner(split, inp, err)
    out: list[LatentInfluence] = []
    for lo in range(0, nq, qc):
        hi = min(nq, lo + qc)
        if isinstance(s_tests, Mapping):
            stacked = {k: s_tests[k][lo:hi].to(params[k].dtype) for k in params}
        else:
            stacked = stack_queries(s_tests[lo:hi], params)
        out.extend(_multi_core(split, inp, err, inner, params, stacked))
    return out


def _multi_core(
    split: SplitModel, inp: SplitInputs, err: Tensor, inner: _Inner, params: Params, stacked: Params
) -> list[LatentInfluence]:
    """The swap for a stack of queries (leading dim of ``stacked``): vmap over the JVP's tangent."""
    global _VMAP_FALLBACK_WARNED
    nq = int(next(iter(stacked.values())).shape[0])
    if nq == 1:
        tangents = jvp(inner, (params,), ({k: v[0] for k, v in stacked.items()},))[1]
        tangents = tuple(t.detach()[None] for t in tangents)
    else:
        try:
            tangents = vmap(lambda s: jvp(inner, (params,), (s,))[1])(stacked)
            tangents = tuple(t.detach() for t in tangents)
        except (RuntimeError, NotImplementedError) as exc:  # an op without a batching rule: one JVP per query
            if not _VMAP_FALLBACK_WARNED:
                warnings.warn(
                    f"latent_influence_multi: vmap over the swap failed ({type(exc).__name__}: {str(exc)[:200]}); "
                    "falling back to one JVP per query (same scores, no shared primal pass).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _VMAP_FALLBACK_WARNED = True
            per_q = [jvp(inner, (params,), ({k: v[q] for k, v in stacked.items()},))[1] for q in range(nq)]
            tangents = tuple(torch.stack([t[i].detach() for t in per_q]) for i in range(3))
    d_loss, d_r, d_e = tangents
    return [_finish(split, inp, err, d_loss[q], d_r[q], d_e[q]) for q in range(nq)]


def latent_influence_reference(
    split: SplitModel,
    s_test: Params,
    batch: object,
    example: int = 0,
    latents: list[int] | None = None,
    params: Params | None = None,
) -> dict[int, float]:
    """The slow reference: ONE JVP per active latent of one example, contracted with s_test and discarded.

    For latent j the JVP of ``r -> <G(r), s_test>`` along ``r * e_j`` (latent j at every position) gives
    ``sum_t r[t, j] d/dr[t, j] <G(r), s_test>`` = the example's latent score for j. Returns ``{j: score}`` for
    ``latents`` (default: every latent active somewhere in the example). POSITIVE = proponent.
    """
    inp = as_inputs(split, batch)
    params = split.downstream_params() if params is None else params
    s = {k: s_test[k].to(params[k].dtype) for k in params}
    one = inp.slice(example, example + 1)
    r = one.latents

    def p_of_r(rr: Tensor) -> Tensor:
        g = grad(lambda p: split.loss(rr, one.batch, p, one.error, one.base, reduction="sum", anchor=one.anchor))(
            params
        )
        return tdot(g, s)

    if latents is None:
        latents = torch.nonzero((r != 0).any(dim=(0, 1))).flatten().tolist()
    out: dict[int, float] = {}
    for j in latents:
        tangent = torch.zeros_like(r)
        tangent[..., j] = r[..., j]
        out[int(j)] = float(jvp(p_of_r, (r,), (tangent,))[1].detach())
    return out
