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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import grad, jvp

from repinf_lens._tree import tdot
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = [
    "LatentInfluence",
    "example_influence",
    "latent_influence",
    "latent_influence_reference",
    "as_inputs",
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
    _, tangent = jvp(lambda p: split.inputs_loss(p, inp, reduction="none"), (params,), (s,))
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
            latent_influence(split, s_test, _slice_inputs(inp, i, i + chunk_size), params)
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
    r = inp.latents
    err = inp.error if inp.error is not None else _zero_error(split, inp)

    def inner(p: Params) -> tuple[Tensor, Tensor, Tensor]:
        def total(rr: Tensor, ee: Tensor) -> tuple[Tensor, Tensor]:
            losses = split.loss(rr, inp.batch, p, ee, inp.base, reduction="none", anchor=inp.anchor)
            return losses.sum(), losses

        (g_r, g_e), losses = grad(total, argnums=(0, 1), has_aux=True)(r, err)
        return losses, g_r, g_e

    _, (d_loss, d_r, d_e) = jvp(inner, (params,), (s,))
    d_r, d_e = d_r.detach(), d_e.detach()
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
    one = _slice_inputs(inp, example, example + 1)
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


def _slice_inputs(inp: SplitInputs, start: int, stop: int) -> SplitInputs:
    """Examples ``start:stop`` of prepared inputs (latents, error, base, batch and anchor sliced alike)."""
    import dataclasses

    sl = slice(start, stop)
    kw = {}
    for f in dataclasses.fields(inp.batch):  # type: ignore[arg-type]
        v = getattr(inp.batch, f.name)
        kw[f.name] = v[sl] if isinstance(v, (Tensor, list)) else v
    return SplitInputs(
        latents=inp.latents[sl],
        error=None if inp.error is None else inp.error[sl],
        base=inp.base[sl],
        batch=type(inp.batch)(**kw),
        anchor=None if inp.anchor is None else tuple(a[sl] for a in inp.anchor),  # type: ignore[arg-type]
    )
