"""Rankings of SAE latents for one test question: which latents matter most (paper Section 5.4).

The necessity / sufficiency tests of the paper (arXiv 2605.12809, Section 5.4, Figures 3-4, Table A.1) mask the
top-k latents of an ORDERING over the latent dimensions: "for each method we induce an ordering over latent
dimensions". This module holds those orderings as a small registry (name -> class, in the spirit of SAELens'
``SAE_CLASS_REGISTRY``):

* ``influence`` (the paper's method): "We aggregate over training examples (mean over i) to obtain a test
  conditioned importance vector s in R^H with s_k = 1/N sum_i IFR[i, k], and take the top-k features under s as
  the most influential for that test sample." The paper ranks by the SIGNED mean, descending ("top-k features
  under s", not under |s|): with this package's sign convention (POSITIVE = proponent) the first latents are the
  ones carrying the most proponent influence, i.e. those through which the kept training examples most lower the
  test loss. ``InfluenceRanking(absolute=True)`` ranks by ``|s|`` instead (not the paper).
* ``activation``: "(i) ranking by activation magnitude". The paper does not say how positions are combined; here
  the magnitude ``|r_{t,k}|`` of the latent on the TEST input is summed over its (non-padding) tokens by default
  (``reduce="max"`` / ``"mean"`` / ``"last"`` are available). The test input is what is masked, so this is the
  natural "most active" baseline.
* ``frequency``: "(ii) ranking by feature frequency". Not specified further; here the share of TOKENS of the kept
  training examples (the N examples the influence is computed on) on which the latent fires (``|r| > 0``), so it
  is a data-conditioned, correlational counterpart of the influence ranking over the same data
  (``source="query"``: over the test input's tokens; ``unit="example"``: share of examples in which it fires).
* ``random``: "(iii) a random set": a seeded permutation, different for every query, reproducible by seed.
* ``grad_x_act`` (not in the paper, an attribution-patching baseline): the first-order change of the test loss
  when the latent is zeroed, ``-sum_t r_{t,k} dL/dr_{t,k}`` (gradient x activation on the test input, the SAE
  error held fixed). Ranked descending: the first latents are those whose removal raises the loss most.

Ties (latents with equal scores, typically latents with score 0 that are inactive everywhere) are broken by latent
index (``tie_break="index"``, default, deterministic) or by a seeded random order (``tie_break="random"``).

Register your own ranking with :func:`register_ranking`, either a :class:`LatentRanking` subclass (implement
:meth:`LatentRanking.scores`, or :meth:`LatentRanking.rank` for an ordering that is not a sort) or a function
``ctx -> scores [d_sae]`` (higher = more important)::

    @register_ranking("decoder_norm")
    def decoder_norm(ctx):
        return ctx.split.sae.W_dec.norm(dim=-1)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "RANKINGS",
    "ActivationRanking",
    "FrequencyRanking",
    "FunctionRanking",
    "GradXActRanking",
    "InfluenceAbsRanking",
    "InfluenceEq16Ranking",
    "InfluenceRanking",
    "LatentRanking",
    "RandomRanking",
    "RankingContext",
    "get_ranking",
    "latents_of_tokens",
    "rank_by_scores",
    "register_ranking",
    "with_error_term",
]


# ---------------------------------------------------------------------------------------------------------------
# context
class _FiringStats(TypedDict):
    token_counts: Tensor
    n_tokens: int
    example_counts: Tensor
    n_examples: int


@dataclass
class RankingContext:
    """Everything a ranking may look at for ONE test question.

    Attributes:
        split: the :class:`~repinf_lens.split.SplitModel` (hook and SAE). Rankings that need the SAE error use
            the error held at the query (``inputs.error``).
        task: the task (collate, loss, option logits).
        query: the test example (a dict with ``question``, ``choices``, ``answer``).
        query_index: position of the query in the evaluated list (seeds the random ranking).
        inputs: the query's prepared :class:`~repinf_lens.split.SplitInputs` (computed lazily when ``None``, with
            the SAE error held whatever ``split.use_error_term`` says).
        result: an :class:`~repinf_lens.influence.result.InfluenceResult` (needed by ``influence``).
        result_index: index of this query in ``result`` (default: ``query_index``).
        train: the (kept) training examples, as rows (used by ``frequency`` when ``train_latents`` is not given).
        train_latents: per training example, its latents on its real tokens ``[T_i, d_sae]`` (padding removed).
        seed: base seed for random rankings and random tie-breaking.
        cache: a dict shared between the contexts of one evaluation (training-set statistics are computed once).
        batch_size: examples per forward pass when latents of training examples have to be computed.
    """

    split: Any
    task: Any
    query: Mapping[str, Any] | None = None
    query_index: int = 0
    inputs: Any | None = None
    result: Any | None = None
    result_index: int | None = None
    train: Sequence[Mapping[str, Any]] | None = None
    train_latents: Sequence[Tensor] | Tensor | None = None
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8

    @property
    def d_sae(self) -> int:
        return int(self.split.d_sae)

    def query_inputs(self) -> Any:
        """The query's prepared inputs (latents ``[1, T, d_sae]``, held error, base, batch)."""
        if self.inputs is None:
            if self.query is None:
                raise ValueError("The ranking context has neither `inputs` nor `query`. Fix: pass one of them.")
            self.inputs = with_error_term(self.split).prepare(self.task.collate([self.query]))
        return self.inputs

    def query_latents(self) -> Float[Tensor, "pos d_sae"]:
        """Latents of the query on its real (non-padding) tokens, ``[T, d_sae]``."""
        inp = self.query_inputs()
        r = inp.latents[0]
        mask = getattr(inp.batch, "attention_mask", None)
        if mask is not None:
            r = r[mask[0].to(r.device).bool()]
        return r

    def query_result_index(self) -> int:
        return self.query_index if self.result_index is None else int(self.result_index)

    def training_firing(self, threshold: float = 0.0) -> _FiringStats:
        """Firing statistics of every latent over the training examples' tokens (computed once, cached).

        Source, in order: ``train_latents``; latents computed from ``train`` rows; latents computed from
        ``result.train_tokens`` (the prompts the influence was computed on).

        Returns:
            ``{"token_counts": [d_sae], "n_tokens": int, "example_counts": [d_sae], "n_examples": int}``: how many
            tokens (examples) the latent fires on (``|r| > threshold``), and the totals.
        """
        key = f"training_firing@{threshold!r}"
        if key not in self.cache:
            tok = torch.zeros(self.d_sae, dtype=torch.long)
            ex = torch.zeros(self.d_sae, dtype=torch.long)
            n_tok = n_ex = 0
            for r in self._iter_training_latents():
                fires = r.abs() > threshold
                tok += fires.sum(0).cpu()
                ex += fires.any(0).cpu().long()
                n_tok += int(r.shape[0])
                n_ex += 1
            if n_ex == 0:
                raise ValueError("The training set for the frequency ranking is empty.")
            self.cache[key] = {"token_counts": tok, "n_tokens": n_tok, "example_counts": ex, "n_examples": n_ex}
        return self.cache[key]

    def _iter_training_latents(self) -> Any:
        if self.train_latents is not None:
            for r in self.train_latents:
                yield r.reshape(-1, r.shape[-1])
            return
        if self.train is not None:
            rows = list(self.train)
            for s in range(0, len(rows), self.batch_size):
                batch = self.task.collate(rows[s : s + self.batch_size])
                lengths = batch.attention_mask.sum(1).tolist()
                yield from _split_rows(latents_of_tokens(self.split, batch.tokens), lengths)
            return
        tokens = getattr(self.result, "train_tokens", None) if self.result is not None else None
        if tokens:
            for s in range(0, len(tokens), self.batch_size):
                chunk = tokens[s : s + self.batch_size]
                lengths = [int(t.numel()) for t in chunk]
                padded = torch.zeros(len(chunk), max(lengths), dtype=torch.long)
                for i, t in enumerate(chunk):
                    padded[i, : t.numel()] = t
                yield from _split_rows(latents_of_tokens(self.split, padded), lengths)
            return
        raise ValueError(
            "This ranking needs the training examples' latents, but the context has no `train_latents`, no `train` "
            "rows and no InfluenceResult with `train_tokens`. Fix: pass train=... (the kept training examples) or "
            "result=..., or use FrequencyRanking(source='query')."
        )


def with_error_term(split: Any) -> Any:
    """``split`` itself when it holds the SAE error, else a shallow copy with ``use_error_term=True``."""
    if split.use_error_term:
        return split
    new = object.__new__(type(split))
    new.__dict__.update(split.__dict__)
    new.use_error_term = True
    return new


def _split_rows(latents: Tensor, lengths: Sequence[int]) -> list[Tensor]:
    return [latents[i, : int(n)] for i, n in enumerate(lengths)]


@torch.no_grad()
def latents_of_tokens(split: Any, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_sae"]:
    """SAE latents (the activation itself without an SAE) of right-padded token ids at the split's hook."""
    return split.encode_tokens(tokens)


# ---------------------------------------------------------------------------------------------------------------
# rankings
def rank_by_scores(
    scores: Float[Tensor, " d_sae"], *, tie_break: str = "index", generator: torch.Generator | None = None
) -> Int[Tensor, " d_sae"]:
    """Latent ids sorted by ``scores``, largest first (NaN last).

    Args:
        scores: one score per latent, higher = more important.
        tie_break: ``"index"`` (equal scores keep latent-index order, deterministic) or ``"random"`` (equal
            scores in a random order drawn from ``generator``).
        generator: the random generator for ``tie_break="random"``.
    """
    s = scores.detach().double().cpu().flatten()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    if tie_break == "index":
        return torch.sort(-s, stable=True).indices
    if tie_break == "random":
        perm = torch.randperm(s.numel(), generator=generator)
        return perm[torch.sort(-s[perm], stable=True).indices]
    raise ValueError(f"tie_break must be 'index' or 'random', got {tie_break!r}.")


def _generator(seed: int, query_index: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(query_index) * 7919 + salt) % (2**63 - 1))


class LatentRanking:
    """Base class: an ordering of the latents for one test question, most important first.

    Subclasses implement :meth:`scores` (higher = more important; sorted by :func:`rank_by_scores`) or override
    :meth:`rank` directly.

    Args:
        tie_break: ``"index"`` (default) or ``"random"`` (seeded by ``seed`` or the context's seed and the query).
        seed: seed for random tie-breaking (default: the context's seed).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, *, tie_break: str = "index", seed: int | None = None) -> None:
        if tie_break not in ("index", "random"):
            raise ValueError(f"tie_break must be 'index' or 'random', got {tie_break!r}.")
        self.tie_break = tie_break
        self.seed = seed

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        """One score per latent (higher = more important)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores(ctx) or rank(ctx).")

    def rank(self, ctx: RankingContext) -> Int[Tensor, " d_sae"]:
        """A permutation of ``range(d_sae)``, most important latent first."""
        s = self.scores(ctx)
        if s.numel() != ctx.d_sae:
            raise ValueError(f"{self.label} returned {s.numel()} scores for an SAE with d_sae={ctx.d_sae}.")
        seed = ctx.seed if self.seed is None else self.seed
        return rank_by_scores(s, tie_break=self.tie_break, generator=_generator(seed, ctx.query_index, 1))

    def __call__(self, ctx: RankingContext) -> Int[Tensor, " d_sae"]:
        return self.rank(ctx)

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def config(self) -> dict[str, Any]:
        """The ranking's settings (recorded next to ablation results)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, (str, int, float, bool, type(None)))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class InfluenceRanking(LatentRanking):
    """The paper's ranking: ``s_k = mean_i IFR[i, k]`` over the kept training examples, largest first.

    ``IFR = result.latent_scores[q]`` (``[N, d_sae]``, POSITIVE = proponent). Paper, Section 5.4: "s_k =
    1/N sum_i IFR[i, k], and take the top-k features under s as the most influential for that test sample" (signed
    value, descending). ``absolute=True`` ranks by ``|s_k|`` instead (not the paper).
    """

    name = "influence"
    description = "mean IFR over the kept training examples (signed, descending; the paper)"

    def __init__(self, *, absolute: bool = False, tie_break: str = "index", seed: int | None = None) -> None:
        super().__init__(tie_break=tie_break, seed=seed)
        self.absolute = absolute

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        if ctx.result is None:
            raise ValueError(
                "The 'influence' ranking needs an InfluenceResult. Fix: pass result=attributor.attribute(queries, "
                "train) (its queries in the same order, or with matching ids)."
            )
        q = ctx.query_result_index()
        if not 0 <= q < ctx.result.n_queries:
            raise IndexError(f"Query index {q} is outside the InfluenceResult's {ctx.result.n_queries} queries.")
        if ctx.result.d_sae != ctx.d_sae:
            raise ValueError(
                f"The InfluenceResult has {ctx.result.d_sae} latents but the split's SAE has {ctx.d_sae}. Fix: "
                "use the result computed with this SAE."
            )
        s = ctx.result.latent_scores[q].double().mean(0)
        return s.abs() if self.absolute else s


class InfluenceEq16Ranking(InfluenceRanking):
    """The paper's ranking with the sign of its Eq. (16): ``I_j = - g_test^T H^-1 dG_j``, i.e. ``-s_k`` here.

    The paper's text says its "sign convention ensures that positive influence corresponds to improved
    train-test gradient alignment", but Eq. (16) (and Eq. (3), Koh & Liang) carries a minus sign, under which
    positive means the training example RAISES the test loss. Taking the "top-k under s" with that formula
    ranks this package's MOST NEGATIVE mean IFR first. On the finetuned default model this end is the
    necessary one (``benchmarks/faithfulness_sign_check.py``; README, faithfulness), so both readings are
    offered: ``influence`` (the text's sign) and ``influence_eq16`` (the formula's sign).
    """

    name = "influence_eq16"
    description = "minus the mean IFR (the sign of the paper's Eq. 16), descending"

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        s = super().scores(ctx)
        return s if self.absolute else -s


class InfluenceAbsRanking(InfluenceRanking):
    """The magnitude of the paper's score, ``|s_k| = |mean_i IFR[i, k]|``, largest first (sign-agnostic).

    Both signed ends (:class:`InfluenceRanking`, :class:`InfluenceEq16Ranking`) pick high-activation latents, so
    the magnitude is the natural third candidate when the sign is in doubt. Same as
    ``InfluenceRanking(absolute=True)``, registered under its own name so that it can be compared by name.
    """

    name = "influence_abs"
    description = "|mean IFR| over the kept training examples (magnitude, descending)"

    def __init__(self, *, tie_break: str = "index", seed: int | None = None) -> None:
        super().__init__(absolute=True, tie_break=tie_break, seed=seed)


class ActivationRanking(LatentRanking):
    """Activation magnitude of the latent on the test input: ``|r_{t,k}|`` reduced over the input's tokens.

    Args:
        reduce: ``"sum"`` (default), ``"max"``, ``"mean"`` over the real tokens, or ``"last"`` (the answer
            position only; for a task with several loss positions, such as a completion, the first of them:
            the last prompt token).
    """

    name = "activation"
    description = "activation magnitude |r| on the test input, reduced over its tokens"

    def __init__(self, *, reduce: str = "sum", tie_break: str = "index", seed: int | None = None) -> None:
        super().__init__(tie_break=tie_break, seed=seed)
        if reduce not in ("sum", "max", "mean", "last"):
            raise ValueError(f"reduce must be 'sum', 'max', 'mean' or 'last', got {reduce!r}.")
        self.reduce = reduce

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        if self.reduce == "last":
            inp = ctx.query_inputs()
            pos = int(inp.batch.answer_pos[0].reshape(-1)[0])  # the first position the loss reads
            return inp.latents[0, pos].abs().double().cpu()
        a = ctx.query_latents().abs().double()
        out = {"sum": a.sum(0), "max": a.max(0).values, "mean": a.mean(0)}[self.reduce]
        return out.cpu()


class FrequencyRanking(LatentRanking):
    """How often the latent fires (``|r| > threshold``), most frequent first.

    Args:
        source: ``"train"`` (default: over the kept training examples, see
            :meth:`RankingContext.training_firing`) or ``"query"`` (over the test input's tokens).
        unit: ``"token"`` (share of tokens, default) or ``"example"`` (share of training examples in which it
            fires at least once; only with ``source="train"``).
        threshold: firing threshold on ``|r|``.
    """

    name = "frequency"
    description = "firing frequency over the kept training examples' tokens"

    def __init__(
        self,
        *,
        source: str = "train",
        unit: str = "token",
        threshold: float = 0.0,
        tie_break: str = "index",
        seed: int | None = None,
    ) -> None:
        super().__init__(tie_break=tie_break, seed=seed)
        if source not in ("train", "query"):
            raise ValueError(f"source must be 'train' or 'query', got {source!r}.")
        if unit not in ("token", "example"):
            raise ValueError(f"unit must be 'token' or 'example', got {unit!r}.")
        if unit == "example" and source == "query":
            raise ValueError("unit='example' needs source='train' (the query is a single example).")
        self.source = source
        self.unit = unit
        self.threshold = threshold

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        if self.source == "query":
            return (ctx.query_latents().abs() > self.threshold).double().mean(0).cpu()
        st = ctx.training_firing(self.threshold)
        if self.unit == "token":
            return st["token_counts"].double() / max(int(st["n_tokens"]), 1)
        return st["example_counts"].double() / max(int(st["n_examples"]), 1)


class RandomRanking(LatentRanking):
    """A random permutation, drawn from ``seed`` (default: the context's seed) and the query's index."""

    name = "random"
    description = "random permutation (seeded, one per query)"

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)

    def rank(self, ctx: RankingContext) -> Int[Tensor, " d_sae"]:
        seed = ctx.seed if self.seed is None else self.seed
        return torch.randperm(ctx.d_sae, generator=_generator(seed, ctx.query_index))


class GradXActRanking(LatentRanking):
    """Attribution patching: ``-sum_t r_{t,k} * dL/dr_{t,k}`` on the test input (L = task loss, error held).

    First-order estimate of the loss increase when latent k is zeroed at every position. Ranked descending (the
    latents whose removal most raises the loss first); ``absolute=True`` ranks by the magnitude.
    """

    name = "grad_x_act"
    description = "gradient x activation on the test input (first-order loss increase when zeroed)"

    def __init__(self, *, absolute: bool = False, tie_break: str = "index", seed: int | None = None) -> None:
        super().__init__(tie_break=tie_break, seed=seed)
        self.absolute = absolute

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        inp = ctx.query_inputs()
        with torch.enable_grad():
            r = inp.latents.detach().clone().requires_grad_(True)
            loss = ctx.split.loss(r, inp.batch, None, inp.error, inp.base, reduction="sum", anchor=inp.anchor)
            (g,) = torch.autograd.grad(loss, r)
        contrib = -(r.detach() * g)[0]
        mask = getattr(inp.batch, "attention_mask", None)
        if mask is not None:
            contrib = contrib[mask[0].to(contrib.device).bool()]
        s = contrib.sum(0).double().cpu()
        return s.abs() if self.absolute else s


class FunctionRanking(LatentRanking):
    """A ranking from a function ``ctx -> Tensor``: scores (higher = more important) or a permutation."""

    def __init__(
        self,
        fn: Callable[[RankingContext], Tensor],
        *,
        name: str = "",
        returns: str = "scores",
        tie_break: str = "index",
        seed: int | None = None,
    ) -> None:
        super().__init__(tie_break=tie_break, seed=seed)
        if returns not in ("scores", "permutation"):
            raise ValueError(f"returns must be 'scores' or 'permutation', got {returns!r}.")
        self.fn = fn
        self.fn_name = name or getattr(fn, "__name__", "function")
        self.returns = returns

    @property
    def label(self) -> str:
        return self.fn_name

    def scores(self, ctx: RankingContext) -> Float[Tensor, " d_sae"]:
        return torch.as_tensor(self.fn(ctx)).detach().double().cpu().flatten()

    def rank(self, ctx: RankingContext) -> Int[Tensor, " d_sae"]:
        if self.returns == "permutation":
            return torch.as_tensor(self.fn(ctx)).detach().long().cpu().flatten()
        return super().rank(ctx)


# ---------------------------------------------------------------------------------------------------------------
# registry
RANKINGS: dict[str, Callable[..., LatentRanking]] = {
    "influence": InfluenceRanking,
    "influence_abs": InfluenceAbsRanking,
    "influence_eq16": InfluenceEq16Ranking,
    "activation": ActivationRanking,
    "frequency": FrequencyRanking,
    "random": RandomRanking,
    "grad_x_act": GradXActRanking,
}
"""Registered rankings: name -> factory (a :class:`LatentRanking` subclass or a wrapped function)."""


def register_ranking(name: str, ranking: Any = None, *, returns: str = "scores", overwrite: bool = False) -> Any:
    """Register a ranking under ``name``; usable as a decorator.

    Args:
        name: the registry key (``get_ranking(name)``, or a value in ``necessity_sufficiency(rankings=...)``).
        ranking: a :class:`LatentRanking` subclass, or a function ``ctx -> Tensor`` returning scores (higher =
            more important) or, with ``returns="permutation"``, latent ids most important first.
        returns: what a function returns, ``"scores"`` or ``"permutation"``.
        overwrite: replace an existing entry (built-ins included) instead of raising.

    Returns:
        ``ranking`` itself (so the decorator leaves the class/function unchanged).
    """

    def deco(obj: Any) -> Any:
        if name in RANKINGS and not overwrite:
            raise ValueError(f"A ranking named {name!r} is already registered. Fix: pass overwrite=True.")
        if isinstance(obj, type) and issubclass(obj, LatentRanking):
            RANKINGS[name] = obj
        elif callable(obj):

            def factory(**kwargs: Any) -> LatentRanking:
                return FunctionRanking(obj, name=name, returns=returns, **kwargs)

            RANKINGS[name] = factory
        else:
            raise TypeError(f"Cannot register {obj!r}: pass a LatentRanking subclass or a function ctx -> Tensor.")
        return obj

    return deco if ranking is None else deco(ranking)


def get_ranking(name: str | LatentRanking, **kwargs: Any) -> LatentRanking:
    """The registered ranking ``name``, built with ``kwargs`` (a :class:`LatentRanking` is returned as is)."""
    if isinstance(name, LatentRanking):
        return name
    if name not in RANKINGS:
        close = difflib.get_close_matches(str(name), list(RANKINGS), n=3)
        raise KeyError(
            f"Unknown latent ranking {name!r}. "
            + (f"Did you mean {close}? " if close else "")
            + f"Registered: {sorted(RANKINGS)}. Fix: use one of these or register_ranking(name, fn)."
        )
    obj = RANKINGS[name](**kwargs)
    if isinstance(obj, FunctionRanking):
        obj.fn_name = name
    return obj
