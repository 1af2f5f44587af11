"""Self-check of a split against TransformerLens' own forward: can these scores be trusted on this setup?

:func:`check_split` (``rl.check_split(split, batch)``) recomputes, for a few examples, everything the engine computes
through a path that shares none of the split's downstream code: ``torch.func.functional_call`` on the WHOLE
model with a forward hook that writes ``decode(r) + e`` at the splice point (the model's own embedding, blocks,
final norm, unembedding and logit softcap; SAEs attached to a ``HookedSAETransformer`` included, their error
terms held at their values). It compares

1. the spliced logits with the model's own logits (``model(tokens)``; with ``use_error_term=False`` with
   the hook set to ``decode(r)``);
2. the example score ``<s_test, G>`` with a reverse-mode gradient of that reference loss;
3. the swap's latent scores with one forward-over-reverse JVP per latent through the reference.

Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp

from repinf_lens._tree import tdot
from repinf_lens.errors import RepinfLensError
from repinf_lens.split import Params, SplitInputs, SplitModel
from repinf_lens.task import gather_positions

__all__ = ["SplitCheck", "SplitCheckError", "check_split", "random_direction", "reference_logits"]


class SplitCheckError(RepinfLensError, AssertionError):
    """The split's numbers disagree with TransformerLens' own forward (see the :class:`SplitCheck` report)."""


@dataclass
class SplitCheck:
    """What :func:`check_split` measured (errors are max abs for logits, relative for scores)."""

    logits_max_abs: float
    example_rel: float
    latent_rel: float
    latents_checked: dict[int, list[int]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    logits_tol: float = 1e-4
    rel_tol: float = 1e-3

    @property
    def ok(self) -> bool:
        return (
            self.logits_max_abs <= self.logits_tol
            and self.example_rel <= self.rel_tol
            and self.latent_rel <= self.rel_tol
        )

    def summary(self) -> str:
        return (
            f"spliced logits vs the model's own forward: max |diff| {self.logits_max_abs:.2e} "
            f"(tol {self.logits_tol:g}); "
            f"example score vs reverse-mode gradient: rel {self.example_rel:.2e}; latent scores vs per-latent JVPs "
            f"through the whole model: rel {self.latent_rel:.2e} (tol {self.rel_tol:g}) -> "
            + ("OK" if self.ok else "MISMATCH")
        )


def random_direction(split: SplitModel, seed: int = 0) -> Params:
    """A random unit theta2 direction (a stand-in s_test: the check tests the differentiation, not the solve)."""
    g = torch.Generator().manual_seed(seed)
    params = split.downstream_params()
    out = {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) for k, v in params.items()}
    norm = float(tdot(out, out)) ** 0.5
    return {k: v / norm for k, v in out.items()}


def _full_params(split: SplitModel, theta2: Params) -> dict[str, Tensor]:
    """Every model parameter, with theta2 substituted (a trimmed unembedding scattered into the full matrix)."""
    named = {n: p.detach() for n, p in split.model.named_parameters()}
    cols = split.unembed_columns()
    dims = {"unembed.W_U": 1, "unembed.b_U": 0}
    for n, v in theta2.items():
        if cols is not None and n in dims and v.shape != named[n].shape:
            named[n] = named[n].index_copy(dims[n], cols, v)
        else:
            named[n] = v
    return named


def _attached_error_constants(split: SplitModel, tokens: Tensor) -> dict[str, Tensor]:
    """Values of the error terms of SAEs attached downstream (held constant in the reference)."""
    names = [f"{a.hook_out}.hook_sae_error" for a in split.downstream_saes if a.use_error_term]
    if not names:
        return {}
    with torch.no_grad():
        _, cache = split.model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n].detach() for n in names}


def _constant(value: Tensor) -> Any:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return value

    return hook


def reference_logits(split: SplitModel, batch: Any, value: Tensor | None, theta2: Params | None = None) -> Tensor:
    """Loss-position logits (at ``batch.answer_pos``: ``[B, V]`` or ``[B, P, V]``) of TransformerLens' own forward
    on ``batch.tokens``, with ``value`` written at the splice point (``None``: the model's own activation) and
    theta2 replaced by ``theta2``.

    Runs ``functional_call`` on the whole model; SAEs attached downstream keep their error terms at their values.
    """
    model = split.model
    tokens = batch.tokens.to(split.device)
    consts = _attached_error_constants(split, tokens)
    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [(n, _constant(c)) for n, c in consts.items()]
    if value is not None:
        shaped = value.reshape(*value.shape[:2], *split.act_shape) if value.ndim == 3 else value
        hooks.append((split.out_hook, lambda act, hook: shaped.to(act.dtype)))
    params = _full_params(split, theta2 if theta2 is not None else split.downstream_params())
    with model.hooks(fwd_hooks=hooks):
        logits = functional_call(model, params, (tokens,))
    return gather_positions(logits, batch.answer_pos)


def _value(split: SplitModel, r: Tensor, error: Tensor | None) -> Tensor:
    if split.sae is None:
        return r
    x = split.sae.decode(r)
    x = x.reshape(*x.shape[:2], *split.act_shape)
    return x if error is None else x + error.to(x.dtype)


def check_split(
    split: SplitModel,
    batch: Any,
    s_test: Params | None = None,
    *,
    examples: Sequence[int] | None = None,
    n_latents: int = 3,
    logits_tol: float = 1e-4,
    rel_tol: float = 1e-3,
    raise_on_failure: bool = True,
) -> SplitCheck:
    """Check the split's logits, example scores and latent scores against TransformerLens' own forward.

    Args:
        split: the split to check.
        batch: a task batch (a few examples are enough; ``task.collate(rows[:2])``).
        s_test: theta2 direction to contract with (default: a random unit direction; the check tests the
            differentiation, so any direction will do).
        examples: which examples of the batch to check (default: all).
        n_latents: latents checked per example (the most active ones).
        logits_tol: max abs difference allowed between spliced and reference logits.
        rel_tol: max difference of example and latent scores, relative to the largest reference score of the
            example (its example score or a checked latent's).
        raise_on_failure: raise :class:`SplitCheckError` (with the report) instead of returning a failed report.

    Returns:
        A :class:`SplitCheck` (``.ok``, ``.summary()``).
    """
    from repinf_lens.influence.math import latent_influence

    inp = split.prepare(batch)
    params = split.downstream_params()
    s = random_direction(split) if s_test is None else {k: s_test[k].to(params[k].dtype) for k in params}
    idx = list(range(len(inp))) if examples is None else [int(i) for i in examples]
    # 1. logits
    with torch.no_grad():
        got = split.logits(inp.latents, inp.batch, params, inp.error, inp.base, anchor=inp.anchor)
        if split.use_error_term or split.sae is None:
            want = reference_logits(split, inp.batch, None, params)
        else:
            want = reference_logits(split, inp.batch, _value(split, inp.latents, None), params)
    logits_err = float((got - want).abs().max())
    # 2. + 3. scores
    swap = latent_influence(split, s, inp, params)
    ex_rel, lat_rel, checked, rows = 0.0, 0.0, {}, []
    for i in idx:
        one = inp.slice(i, i + 1)
        r0 = one.latents

        def loss_of(p: Params, r: Tensor, one: SplitInputs = one) -> Tensor:
            logits = reference_logits(split, one.batch, _value(split, r, one.error), p)
            return split.task.loss(logits, one.batch, reduction="sum")

        g = grad(loss_of)(params, r0)
        ex_ref = float(tdot(g, s).detach())

        def p_of_r(r: Tensor) -> Tensor:
            return tdot(grad(loss_of)(params, r), s)

        act = r0[0].abs().sum(0)
        lat = [int(j) for j in torch.argsort(act, descending=True)[:n_latents] if float(act[j]) > 0]
        refs = {}
        for j in lat:
            tangent = torch.zeros_like(r0)
            tangent[..., j] = r0[..., j]
            refs[j] = float(jvp(p_of_r, (r0,), (tangent,))[1].detach())
        got_lat = {j: float(swap.latent_scores[i, j]) for j in lat}
        # relative to the example's largest reference score: an example score is a sum of latent-level parts,
        # and float32 cancellation among them must not read as a mismatch
        scale = max([abs(ex_ref), *(abs(v) for v in refs.values()), 1e-12])
        ex_rel = max(ex_rel, abs(float(swap.example_scores[i]) - ex_ref) / scale)
        lat_rel = max([lat_rel, *(abs(got_lat[j] - refs[j]) / scale for j in lat)])
        checked[i] = lat
        rows.append({"example": i, "example_score": float(swap.example_scores[i]), "example_reference": ex_ref,
                     "latents": {j: (got_lat[j], refs[j]) for j in lat}})  # fmt: skip
    report = SplitCheck(logits_err, ex_rel, lat_rel, checked, rows, logits_tol, rel_tol)
    if raise_on_failure and not report.ok:
        raise SplitCheckError(
            f"The split at {split.hook_name!r} disagrees with TransformerLens' own forward: {report.summary()}. "
            "Fix: this model or SAE does something after the splice point that repinf_lens does not reproduce; "
            "please report it with the model's cfg (and, meanwhile, do not trust its scores)."
        )
    return report
