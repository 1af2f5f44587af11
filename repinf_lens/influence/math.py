"""Pure influence math (torch.func): example scores, latent scores by the derivative swap, and a reference.

Sign convention, everywhere: score(z_train, z_test) = + g_test^T (H + lambda I)^-1 g_train = <s_test, G(z_train)>,
so a POSITIVE score marks a proponent (up-weighting the training example lowers the test loss); Koh & Liang's
I_up,loss is its negative.

Latent scores, two methods (``method=``), both POSITIVE = proponent. With P(r) = < G(r), s_test >, G(r) the
gradient of the training example's loss w.r.t. theta2 and r its SAE latents at the hook (the SAE error e and the
decoder bias b_dec held):

* ``"grad_x_input"`` (the default; paper Def. 4.2): ``score[t, j] = r[t, j] * d/dr[t, j] P(r)``, a first-order
  estimate. All of them come from ONE forward-over-reverse differentiation: the JVP, along the parameter direction
  s_test, of r -> grad_r loss (mixed partials commute). Its latent sum is NOT complete: it approximates
  P(r) - P(0) to first order only (on the shipped model at layer 22: 0.21 against an example score of 2.97).
* ``"ig"`` (integrated gradients, :func:`latent_influence_ig`): along the straight path r(a) = a r, a in [0, 1]
  (e and b_dec held, so P(0) = "all latents off, error and decoder bias kept"),
  ``score[t, j] = r[t, j] * integral_0^1 d/dr[t, j] P(a r) da``, by an m-node quadrature rule (``steps`` = m,
  :func:`ig_quadrature`). Exactly complete up to the quadrature error:
  ``sum_(t, j) score[t, j] + P(0) = P(r)`` = the example score. It costs m + 1 swaps (the m nodes, batched by
  stacking the batch m times, plus the full point for P(r) and the error / bias terms) and one forward JVP for
  P(0).

``baseline_scores`` = P(0) (one forward JVP at r = 0) is filled by IG always and by gradient x input on request
(``baseline=True``), so completeness ``latent_sum / (P(r) - P(0))`` can be reported for both.

Each example's latents only enter its own loss term (the batch loss is a SUM inside the swap), so scores do not
depend on the batch they are computed in, nor on ``chunk_size``.

Many queries at once (:func:`latent_influence_multi`): the swap is linear in its tangent s_test, so Q queries are
one ``torch.func.vmap`` over the tangent of the same JVP. The primal forward and backward pass through theta2
(the part that does not depend on s_test) then runs ONCE per training batch instead of Q times, and the Q
tangent passes run as batched matrix products.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import grad, jvp, vmap

from repinf_lens._tree import tdot
from repinf_lens.errors import check_choice, check_int
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = [
    "IG_RULES",
    "LATENT_METHODS",
    "LatentInfluence",
    "as_inputs",
    "check_latent_method",
    "example_influence",
    "ig_quadrature",
    "latent_influence",
    "latent_influence_ig",
    "latent_influence_multi",
    "latent_influence_reference",
    "stack_queries",
]

#: the latent-score methods: gradient x input (paper Def. 4.2, one swap), integrated gradients (exact completeness)
#: and ``"none"`` (example scores only: one forward-mode JVP of the per-example losses along each s_test, no swap)
LATENT_METHODS = ("grad_x_input", "ig", "none")
#: the quadrature rules of integrated gradients: Gauss-Legendre on panels graded towards a = 0 (the default),
#: plain Gauss-Legendre, and the midpoint rule (:func:`ig_quadrature`)
IG_RULES = ("gauss", "graded", "midpoint")


@dataclass
class LatentInfluence:
    """Output of :func:`latent_influence` / :func:`latent_influence_ig` for one batch and one s_test.

    POSITIVE = proponent (up-weighting the training example lowers the test loss), for every field.

    Attributes:
        token_scores: ``[B, T, d_sae]`` per token and latent (zero where a latent is inactive): for
            ``method="grad_x_input"`` r * grad_r P(r); for ``method="ig"`` r * (quadrature of grad_r P(a r) over
            a in [0, 1]).
        example_scores: ``[B]`` P(r) = <s_test, G_i> = g_test^T (H + lambda I)^-1 g_train (the same for both
            methods).
        latent_scores: ``[B, d_sae]`` token scores summed over positions (a row of the paper's IFR).
        error_term: ``[B]`` gradient x input share of the held SAE error e at the full point r (sum over positions),
            ``e * grad_e P(r)``, for both methods. For IG it is a diagnostic only, NOT a term of the IG identity:
            IG holds e on its path, so e's contribution is inside ``baseline_scores`` = P(0); the full-point value
            keeps the column comparable across methods (and costs nothing: the full-point swap gives P(r)).
        bias_term: ``[B]`` gradient x input share of the decoder bias b_dec at the full point, the same way.
        latents: ``[B, T, d_sae]`` the latents r themselves.
        baseline_scores: ``[B]`` P(0) = <s_test, G(0)>, the score with all latents off (SAE error and decoder
            bias kept), or ``None`` when not computed (gradient x input without ``baseline=True``).
        method: ``"grad_x_input"``, ``"ig"`` or ``"none"`` (example scores only: ``token_scores`` ``[B, T, 0]``,
            ``error_term`` and ``bias_term`` NaN).
    """

    token_scores: Float[Tensor, "batch pos d_sae"]
    example_scores: Float[Tensor, " batch"]
    error_term: Float[Tensor, " batch"]
    bias_term: Float[Tensor, " batch"]
    latents: Float[Tensor, "batch pos d_sae"]
    baseline_scores: Float[Tensor, " batch"] | None = None
    method: str = "grad_x_input"

    @property
    def latent_scores(self) -> Float[Tensor, "batch d_sae"]:
        return self.token_scores.sum(1)

    @property
    def latent_sum(self) -> Float[Tensor, " batch"]:
        """Sum of all latent scores per example (compare with ``example_scores - baseline_scores``); NaN for
        ``method="none"`` (no latent scores were computed)."""
        if self.method == "none":
            return torch.full_like(self.example_scores, float("nan"))
        return self.token_scores.sum((1, 2))

    @property
    def residual(self) -> Float[Tensor, " batch"] | None:
        """``example_scores - baseline_scores - latent_sum``: what the latent scores miss of P(r) - P(0).

        The quadrature error for IG (-> 0 as ``steps`` grows), the first-order gap for gradient x input; ``None``
        without ``baseline_scores``.
        """
        if self.baseline_scores is None:
            return None
        return self.example_scores - self.baseline_scores - self.latent_sum


def check_latent_method(
    method: str, steps: int = 64, rule: str = "graded", *, where: str = "latent_influence_multi", prefix: str = ""
) -> tuple[str, int, str]:
    """``(method, steps, rule)`` if valid, else :class:`~repinf_lens.errors.SettingsError` naming the fix.

    ``where`` is the caller as the user wrote it (``"InfluenceAttributor"``), ``prefix`` the settings' prefix
    there (``"ig_"`` for ``ig_steps`` / ``ig_rule``; the method is ``latent_method`` then).
    """
    mname = "latent_method" if prefix else "method"
    check_choice(
        f"{where} {mname}", method, LATENT_METHODS,
        fix=f"pass {mname}='grad_x_input' (gradient x input, the paper's Def. 4.2: one swap per batch), "
        f"{mname}='ig' (integrated gradients: exactly complete latent scores, {prefix}steps + 1 swaps per batch) "
        f"or {mname}='none' (example scores only: one forward JVP per batch, no latent or token scores).",
    )  # fmt: skip
    check_int(
        f"{where} {prefix}steps", steps, minimum=1,
        why="the quadrature nodes of integrated gradients on the path from all latents off to r",
        fix=f"pass {prefix}steps=64 (the default: a median identity error of 0.3 % on the shipped model) or "
        "another count >= 1.",
    )  # fmt: skip
    check_choice(
        f"{where} {prefix}rule", rule, IG_RULES,
        fix=f"pass {prefix}rule='graded' (the default: Gauss-Legendre on the panels [0, 1/8, 1/4, 1/2, 1]), "
        f"{prefix}rule='gauss' (Gauss-Legendre on [0, 1]; both converge exponentially in {prefix}steps on smooth "
        f"models) or {prefix}rule='midpoint' (error O({prefix}steps^-2)).",
    )  # fmt: skip
    return str(method), int(steps), str(rule)


def ig_quadrature(steps: int, rule: str = "graded") -> tuple[Tensor, Tensor]:
    """Nodes ``a_k`` in (0, 1) and weights ``w_k`` (summing to 1) of the ``steps``-node rule for ``int_0^1 f``.

    ``"gauss"``: Gauss-Legendre mapped to [0, 1], exact for polynomials of degree ``2 steps - 1``; for an analytic
    integrand (the path a -> grad P(a r) through a transformer with smooth activations: GELU, SiLU, softmax,
    LayerNorm / RMSNorm) the error falls exponentially, ``O(rho^(-2 steps))`` for some rho > 1 set by the nearest
    complex singularity. ``"graded"`` (the default): the same rule on the panels [0, 1/8], [1/8, 1/4], [1/4, 1/2],
    [1/2, 1] (``steps`` split evenly, the remainder to the panels nearest 0; fewer panels below 4 nodes), so half
    of the nodes lie in a < 1/4: exact for piecewise polynomials of degree ``2 floor(steps / 4) - 1`` on those
    panels, also exponential, with a better constant when the integrand varies fastest near "all latents off" (as
    on real models, below) and a worse one when it is smooth everywhere (tiny random models: 16 nodes give ~3e-4
    there, plain Gauss ~3e-8; at 64 both are at float64 rounding). ``"midpoint"``: nodes ``(k + 1/2) / steps``,
    equal weights, error ``O(steps^-2)`` for a twice differentiable integrand. With ReLU-like kinks on the path all
    fall to about ``O(steps^-2)``. No rule evaluates the endpoints. Returns float64 CPU tensors.

    Measured on the shipped model (SmolLM2-135M finetune, SAE at ``blocks.22.hook_resid_post``, error held;
    ``benchmarks/completeness.py``, 3 test questions x 4 training examples), identity errors relative to
    max(|P(r)|, |P(r) - P(0)|): the ray P(a r) is smooth for a > 0.5 but swings by up to 200x |P(r) - P(0)| for
    a < 0.4 (all latents nearly off is far from the data), so both Gauss rules are pre-asymptotic below m ~ 64.
    At m = 64, ``"graded"``: median 0.3 %, max 10 %; ``"gauss"``: median 0.7 %, max 75 % (graded better on 8 of
    the 12 pairs, by up to 2700x; 8 equal panels and the substitution a = t^2 were tried on 4 pairs and were no
    better). At m = 32, graded: median 1.8 %, max 211 %. 128 plain Gauss nodes (8 pairs): 4e-7 to 4e-2. The worst
    pairs are those whose P(r) is tiny next to P(0) and the swing of the path. The latent ranking converges sooner
    than the identity: mean IFR at 32 vs 64 graded nodes within 0.1-2 % (L2), Spearman >= 0.999.
    """
    check_latent_method("ig", steps, rule, where="ig_quadrature")
    if rule == "gauss":
        x, w = np.polynomial.legendre.leggauss(int(steps))
        return torch.from_numpy((x + 1.0) / 2.0), torch.from_numpy(w / 2.0)
    if rule == "graded":
        n_panels = min(4, int(steps))
        breaks = [0.0] + [2.0 ** -(n_panels - 1 - i) for i in range(n_panels)]  # 4: [0, 1/8, 1/4, 1/2, 1]
        counts = [steps // n_panels + (1 if i < steps % n_panels else 0) for i in range(n_panels)]
        nodes, weights = [], []
        for lo, hi, c in zip(breaks[:-1], breaks[1:], counts):
            x, w = np.polynomial.legendre.leggauss(c)
            nodes.append(lo + (hi - lo) * (x + 1.0) / 2.0)
            weights.append((hi - lo) * w / 2.0)
        return torch.from_numpy(np.concatenate(nodes)), torch.from_numpy(np.concatenate(weights))
    a = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    return a, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


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
    split: SplitModel,
    s_test: Params,
    batch: object,
    params: Params | None = None,
    *,
    chunk_size: int | None = None,
    baseline: bool = False,
) -> LatentInfluence:
    """Gradient x input latent, example and error-term influence for a batch in ONE extra differentiation.

    Forward-over-reverse: ``jvp`` along ``s_test`` of ``theta2 -> (per-example losses, grad_(r, e) sum loss)``.
    POSITIVE = proponent. ``s_test`` is a dict with the keys of ``split.downstream_params()``.
    ``chunk_size`` processes the batch that many examples at a time (peak memory scales with it; the scores
    do not change, since each example's latents only enter its own loss). ``baseline=True`` also fills
    ``baseline_scores`` with P(0) (one forward JVP at r = 0), for completeness ``latent_sum / (P(r) - P(0))``.
    For integrated gradients (exact completeness) see :func:`latent_influence_ig`.
    """
    check_int("latent_influence chunk_size", chunk_size, minimum=1, allow_none=True)
    inp = as_inputs(split, batch)
    params = split.downstream_params() if params is None else params
    if chunk_size is not None and chunk_size < len(inp):
        parts = [
            latent_influence(split, s_test, inp.slice(i, i + chunk_size), params, baseline=baseline)
            for i in range(0, len(inp), chunk_size)
        ]
        return _concat(parts, inp.latents)
    s = {k: s_test[k].to(params[k].dtype) for k in params}
    err = inp.error if inp.error is not None else _zero_error(split, inp)
    d_loss, d_r, d_e = jvp(_swap_inner(split, inp, err), (params,), (s,))[1]
    p0 = jvp(_baseline_fn(split, inp, err), (params,), (s,))[1][0].detach() if baseline else None
    return _finish(split, inp, err, d_loss.detach(), d_r.detach(), d_e.detach(), p0)


def latent_influence_ig(
    split: SplitModel,
    s_test: Params,
    batch: object,
    params: Params | None = None,
    *,
    steps: int = 64,
    rule: str = "graded",
    chunk_size: int | None = None,
) -> LatentInfluence:
    """Integrated-gradients latent influence: exactly complete latent scores (up to the quadrature error).

    Along the path r(a) = a r, a in [0, 1], with the SAE error e and the decoder bias b_dec held (so r = 0 means
    "all latents off, error and decoder bias kept"), with P(r) = <G(r), s_test>:

        token_scores[t, j] = r[t, j] * sum_k w_k d/dr[t, j] P(a_k r)   ~=   r[t, j] * int_0^1 d/dr[t, j] P(a r) da

    for the nodes and weights of :func:`ig_quadrature` (``steps`` nodes; ``rule`` ``"graded"``, ``"gauss"`` or
    ``"midpoint"``).
    Summed over tokens and latents, plus ``baseline_scores`` = P(0), it gives ``example_scores`` = P(r) up to the
    quadrature error (``LatentInfluence.residual``). The ``steps`` gradient evaluations are batched: the batch is
    stacked once per node and differentiated by the same forward-over-reverse swap as :func:`latent_influence`
    (one JVP per evaluation), ``chunk_size`` evaluations (training example x node) at a time (``None``: all
    ``B * steps`` in one swap; peak memory scales with it, the scores do not change). ``example_scores``,
    ``error_term`` and ``bias_term`` come from one more swap at the full point (the gradient x input values, see
    :class:`LatentInfluence`), ``baseline_scores`` from one forward JVP at r = 0.

    Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test loss).
    """
    return latent_influence_multi(split, [s_test], batch, params, chunk_size=chunk_size, method="ig", steps=steps,
                                  rule=rule)[0]  # fmt: skip


_Inner = Callable[[Params], tuple[Tensor, ...]]


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


def _baseline_fn(split: SplitModel, inp: SplitInputs, err: Tensor) -> _Inner:
    """``theta2 -> (per-example losses at r = 0,)``: its JVP along s_test is P(0) (error and decoder bias kept)."""
    zeros = torch.zeros_like(inp.latents)

    def inner(p: Params) -> tuple[Tensor]:
        return (split.loss(zeros, inp.batch, p, err, inp.base, reduction="none", anchor=inp.anchor),)

    return inner


def _finish(
    split: SplitModel,
    inp: SplitInputs,
    err: Tensor,
    d_loss: Tensor,
    d_r: Tensor,
    d_e: Tensor,
    baseline: Tensor | None = None,
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
        baseline_scores=None if baseline is None else baseline.detach(),
    )


def _concat(parts: Sequence[LatentInfluence], latents: Tensor) -> LatentInfluence:
    """The :class:`LatentInfluence` of consecutive example chunks, concatenated."""
    base = [p.baseline_scores for p in parts]
    return LatentInfluence(
        token_scores=torch.cat([p.token_scores for p in parts]),
        example_scores=torch.cat([p.example_scores for p in parts]),
        error_term=torch.cat([p.error_term for p in parts]),
        bias_term=torch.cat([p.bias_term for p in parts]),
        latents=latents,
        baseline_scores=None if any(b is None for b in base) else torch.cat([b for b in base if b is not None]),
        method=parts[0].method,
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
    method: str = "grad_x_input",
    steps: int = 64,
    rule: str = "graded",
    baseline: bool = False,
) -> list[LatentInfluence]:
    """:func:`latent_influence` (or :func:`latent_influence_ig`) for Q queries at once: one shared primal pass,
    Q tangents under ``vmap``.

    The derivative swap is the JVP along s_test of ``theta2 -> (losses, grad_(r, e) sum loss)``. Its primal part
    (forward and backward through theta2 on the training batch) does not depend on s_test, so ``vmap`` over the
    tangent computes it once and pushes the Q tangents through as batched matrix products. The scores equal Q
    calls of :func:`latent_influence` / :func:`latent_influence_ig` up to float rounding. When the model has an
    operation without a ``vmap`` batching rule, it falls back to one JVP per query (with a warning), with the same
    results.

    Sign convention: POSITIVE = proponent (up-weighting the training example lowers that query's loss).

    Args:
        split: the split model.
        s_tests: Q s_test vectors, either a sequence of theta2-shaped dicts or one dict stacked along a leading
            query dimension (:func:`stack_queries`; cheaper when reused for many training batches).
        batch: a task batch or prepared :class:`SplitInputs` of training examples.
        params: theta2 (default ``split.downstream_params()``).
        chunk_size: evaluations per swap (peak memory scales with it; scores do not change): training examples
            for ``"grad_x_input"``, (training example x quadrature node) pairs for ``"ig"`` (``None``: the whole
            batch, ``B * steps`` evaluations for IG).
        query_chunk_size: queries per ``vmap`` (the tangent part costs about ``query_chunk_size`` times the
            memory of one query's; the primal part is recomputed once per query chunk). ``None`` = all at once.
        method: ``"grad_x_input"`` (the paper's Def. 4.2, one swap), ``"ig"`` (integrated gradients, exactly
            complete up to the quadrature error; ``steps + 1`` swaps and a forward JVP) or ``"none"`` (example
            scores only: the JVP of the per-example losses along each s_test, a forward pass with Q tangents and no
            backward; ``token_scores`` is ``[B, T, 0]``, ``error_term`` / ``bias_term`` are NaN).
        steps, rule: the quadrature of ``"ig"`` (:func:`ig_quadrature`); checked but unused for gradient x input.
        baseline: also compute ``baseline_scores`` = P(0) for ``"grad_x_input"`` (one forward JVP per batch);
            ``"ig"`` always computes it.

    Returns:
        One :class:`LatentInfluence` per query, in the order of ``s_tests``.

    Raises:
        SettingsError: an unknown ``method`` or ``rule``, ``steps < 1``, ``chunk_size < 1``.
    """
    method, steps, rule = check_latent_method(method, steps, rule)
    check_int("latent_influence_multi chunk_size", chunk_size, minimum=1, allow_none=True)
    inp = as_inputs(split, batch)
    params = split.downstream_params() if params is None else params
    nq = _n_queries(s_tests)
    if nq == 0:
        return []
    qc = nq if query_chunk_size is None else max(1, int(query_chunk_size))
    err = inp.error if inp.error is not None else _zero_error(split, inp)
    out: list[LatentInfluence] = []
    for lo in range(0, nq, qc):
        hi = min(nq, lo + qc)
        if isinstance(s_tests, Mapping):
            stacked = {k: s_tests[k][lo:hi].to(params[k].dtype) for k in params}
        else:
            stacked = stack_queries(s_tests[lo:hi], params)
        if method == "ig":
            out.extend(_ig_core(split, inp, err, params, stacked, steps, rule, chunk_size))
        elif method == "none":
            out.extend(_examples_only(split, inp, err, params, stacked, baseline))
        else:
            out.extend(_gxi_chunked(split, inp, err, params, stacked, chunk_size, baseline))
    return out


def _examples_only(
    split: SplitModel, inp: SplitInputs, err: Tensor, params: Params, stacked: Params, baseline: bool
) -> list[LatentInfluence]:
    """Example scores only, for a stack of queries: the JVP of ``theta2 -> per-example losses`` along each s_test
    (``<s_test, G_i>``, the same P(r) the swap returns), one primal forward shared under ``vmap``, no backward."""

    def losses(p: Params) -> tuple[Tensor]:
        return (split.loss(inp.latents, inp.batch, p, err, inp.base, reduction="none", anchor=inp.anchor),)

    nq = int(next(iter(stacked.values())).shape[0])
    (d_loss,) = _tangents(losses, params, stacked)
    p0 = _tangents(_baseline_fn(split, inp, err), params, stacked)[0] if baseline else None
    empty = inp.latents.new_zeros((*inp.latents.shape[:2], 0))
    nan = torch.full((len(inp),), float("nan"), dtype=d_loss.dtype, device=d_loss.device)
    return [
        LatentInfluence(
            token_scores=empty,
            example_scores=d_loss[q],
            error_term=nan,
            bias_term=nan,
            latents=inp.latents,
            baseline_scores=None if p0 is None else p0[q],
            method="none",
        )
        for q in range(nq)
    ]


def _gxi_chunked(
    split: SplitModel,
    inp: SplitInputs,
    err: Tensor,
    params: Params,
    stacked: Params,
    chunk_size: int | None,
    baseline: bool,
) -> list[LatentInfluence]:
    """Gradient x input for a stack of queries, ``chunk_size`` training examples per swap."""
    n = len(inp)
    c = n if chunk_size is None else min(n, chunk_size)
    if c >= n:
        return _multi_core(split, inp, err, _swap_inner(split, inp, err), params, stacked, baseline)
    parts = []
    for lo in range(0, n, c):
        sub, e_sub = inp.slice(lo, lo + c), err[lo : lo + c]
        parts.append(_multi_core(split, sub, e_sub, _swap_inner(split, sub, e_sub), params, stacked, baseline))
    return [_concat([p[q] for p in parts], inp.latents) for q in range(len(parts[0]))]


def _tangents(fn: _Inner, params: Params, stacked: Params) -> tuple[Tensor, ...]:
    """JVPs of ``fn`` at ``params`` along every query of ``stacked``: each output gets a leading query dim.

    One query: a plain JVP. Several: ``vmap`` over the tangent (one shared primal pass); an op without a batching
    rule falls back to one JVP per query, with a warning (once).
    """
    global _VMAP_FALLBACK_WARNED
    nq = int(next(iter(stacked.values())).shape[0])
    if nq == 1:
        out = jvp(fn, (params,), ({k: v[0] for k, v in stacked.items()},))[1]
        return tuple(t.detach()[None] for t in out)
    try:
        out = vmap(lambda s: jvp(fn, (params,), (s,))[1])(stacked)
        return tuple(t.detach() for t in out)
    except (RuntimeError, NotImplementedError) as exc:  # an op without a batching rule: one JVP per query
        if not _VMAP_FALLBACK_WARNED:
            warnings.warn(
                f"latent_influence_multi: vmap over the swap failed ({type(exc).__name__}: {str(exc)[:200]}); "
                "falling back to one JVP per query (same scores, no shared primal pass).",
                RuntimeWarning,
                stacklevel=4,
            )
            _VMAP_FALLBACK_WARNED = True
        per_q = [jvp(fn, (params,), ({k: v[q] for k, v in stacked.items()},))[1] for q in range(nq)]
        return tuple(torch.stack([t[i].detach() for t in per_q]) for i in range(len(per_q[0])))


def _multi_core(
    split: SplitModel,
    inp: SplitInputs,
    err: Tensor,
    inner: _Inner,
    params: Params,
    stacked: Params,
    baseline: bool = False,
) -> list[LatentInfluence]:
    """The swap for a stack of queries (leading dim of ``stacked``): vmap over the JVP's tangent."""
    nq = int(next(iter(stacked.values())).shape[0])
    d_loss, d_r, d_e = _tangents(inner, params, stacked)
    p0 = _tangents(_baseline_fn(split, inp, err), params, stacked)[0] if baseline else None
    return [_finish(split, inp, err, d_loss[q], d_r[q], d_e[q], None if p0 is None else p0[q]) for q in range(nq)]


def _take(inp: SplitInputs, idx: Tensor) -> SplitInputs:
    """Examples ``idx`` (with repeats) of ``inp``: latents, error, base, batch and anchor gathered alike."""
    rows = idx.tolist()
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(inp.batch):
        v = getattr(inp.batch, f.name)
        if isinstance(v, Tensor):
            kw[f.name] = v[idx.to(v.device)]
        elif isinstance(v, list):
            kw[f.name] = [v[i] for i in rows]
        else:
            kw[f.name] = v
    ix = idx.to(inp.latents.device)
    anchor = None
    if inp.anchor is not None:
        x0, recon0, e0 = inp.anchor
        anchor = (x0[idx.to(x0.device)], recon0[idx.to(recon0.device)], e0[idx.to(e0.device)])
    return SplitInputs(
        latents=inp.latents[ix],
        error=None if inp.error is None else inp.error[idx.to(inp.error.device)],
        base=inp.base[idx.to(inp.base.device)],
        batch=type(inp.batch)(**kw),
        anchor=anchor,
    )


def _ig_core(
    split: SplitModel,
    inp: SplitInputs,
    err: Tensor,
    params: Params,
    stacked: Params,
    steps: int,
    rule: str,
    chunk_size: int | None,
) -> list[LatentInfluence]:
    """Integrated gradients for a stack of queries: ``steps`` path points per example, stacked into swaps.

    Evaluation ``p`` of the ``B * steps`` is node ``p // B`` of example ``p % B``; ``chunk_size`` of them share a
    swap. The weighted latent gradients are summed per example; the full point (a = 1) gives P(r) and the error
    and bias terms, and a forward JVP at r = 0 gives P(0).
    """
    nq = int(next(iter(stacked.values())).shape[0])
    n = len(inp)
    total = n * steps
    per = total if chunk_size is None else min(total, chunk_size)
    full = _gxi_chunked(split, inp, err, params, stacked, per, baseline=True)
    nodes, weights = ig_quadrature(steps, rule)
    r = inp.latents
    acc: Tensor | None = None
    for lo in range(0, total, per):
        rows = torch.arange(lo, min(total, lo + per))
        node, ex = rows // n, rows % n
        sub = _take(inp, ex)
        a = nodes[node].to(r.device, r.dtype).reshape(-1, *([1] * (r.ndim - 1)))
        sub.latents = sub.latents * a
        d_r = _tangents(_swap_inner(split, sub, err[ex.to(err.device)]), params, stacked)[1]  # [Q, rows, T, d]
        if acc is None:
            acc = torch.zeros((nq, *r.shape), dtype=torch.promote_types(d_r.dtype, torch.float32), device=d_r.device)
        w = weights[node].to(acc.device, acc.dtype).reshape(1, -1, *([1] * (r.ndim - 1)))
        acc.index_add_(1, ex.to(acc.device), d_r.to(acc.dtype) * w)
        del d_r, sub
    assert acc is not None  # total >= 1
    out_dtype = torch.promote_types(r.dtype, full[0].token_scores.dtype)
    return [
        dataclasses.replace(full[q], token_scores=(r.to(acc.dtype) * acc[q]).to(out_dtype).detach(), method="ig")
        for q in range(nq)
    ]


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
    ``sum_t r[t, j] d/dr[t, j] <G(r), s_test>`` = the example's gradient x input latent score for j. Returns
    ``{j: score}`` for ``latents`` (default: every latent active somewhere in the example). POSITIVE = proponent.
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
