"""Token-level projection of representation-level influence (paper Section 5.5 and Appendix A.3).

Pure functions, no rendering. Two projections, both "activation x gradient" summed over SAE latents:

* A training example ``i`` for a test query ``q`` (:func:`example_token_attribution`): per token ``t``

      value[t] = sum_j r[t, j] * d/dr[t, j] < G(r), s_test >

  where ``r`` are the example's SAE latents, ``G(r)`` the gradient of its loss w.r.t. theta2 and
  ``s_test = (H + lambda I)^-1 g_test``. The summands are exactly the result's token-level latent scores
  (:meth:`InfluenceResult.token_latent_scores`, computed in ``influence/math.py`` as ``r * grad_r P``), so the sum
  over tokens of ``value`` equals the sum over latents of ``latent_scores[q, i]`` (the example's IFR row summed):
  the projection redistributes the latent influence over tokens without adding or losing any. POSITIVE =
  proponent (the token's latents carry influence that lowers the test loss).
* The test input itself (:func:`query_token_attribution`): per token ``t``

      value[t] = - sum_j r[t, j] * d loss_test / d r[t, j]

  the first-order estimate of ``loss(r with token t's latents zeroed) - loss(r)``. The minus sign keeps the
  package-wide convention: POSITIVE = the token's latents support the correct answer (lower the query's loss).

Per token the *dominant latent* is ``argmax_j |score[t, j]|`` (ties: the smallest latent id); its signed score
is kept next to it (``-1`` / ``0`` where no latent is active). Intensities are normalised per sentence:
``normalized = value / max_t |value[t]|`` lies in ``[-1, 1]`` and keeps the sign; an all-zero example stays zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from repinf_lens.influence.result import InfluenceResult
    from repinf_lens.split import SplitModel

__all__ = [
    "TokenAttribution",
    "dominant_latents",
    "example_token_attribution",
    "normalize_per_sentence",
    "query_token_attribution",
    "token_strings",
]

_SHOW = {"\n": "\u21b5\n", "\r": "\u240d", "\t": "\u21e5"}


def token_strings(
    token_ids: Sequence[int] | Tensor, tokenizer: Any = None, *, show_whitespace: bool = True
) -> list[str]:
    """One display string per token id.

    Each id is decoded on its own (``tokenizer.decode([id])``), so a leading space stays visible as a space.
    Ids that do not decode to text on their own (a partial UTF-8 byte gives ``"\\ufffd"``, some special tokens
    give ``""``) fall back to ``tokenizer.convert_ids_to_tokens``. With ``show_whitespace`` a newline becomes
    ``"↵\\n"`` (a visible mark, then the line break), a tab ``"⇥"`` and a carriage return ``"␍"``.
    Without a tokenizer the ids themselves are returned as strings.

    Args:
        token_ids: the ids of one sequence.
        tokenizer: a Hugging Face tokenizer, or ``None``.
        show_whitespace: make newlines, tabs and carriage returns visible.

    Returns:
        A list with one string per id.
    """
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, Tensor) else token_ids)]
    if tokenizer is None:
        return [str(t) for t in ids]
    out = []
    for t in ids:
        s = tokenizer.decode([t])
        if s == "" or "\ufffd" in s:
            raw = tokenizer.convert_ids_to_tokens(t)
            s = raw if isinstance(raw, str) and raw else s
        if show_whitespace:
            s = "".join(_SHOW.get(ch, ch) for ch in s)
        out.append(s)
    return out


def normalize_per_sentence(
    values: Float[Tensor, " pos"], mask: Bool[Tensor, " pos"] | None = None
) -> tuple[Float[Tensor, " pos"], float]:
    """Scale one sequence's values to ``[-1, 1]`` by their largest magnitude (signs kept).

    Args:
        values: per-token values of one sequence.
        mask: positions whose magnitude sets the scale (default: all). Values outside the mask that exceed the
            scale are clipped to ``[-1, 1]``; use it to keep e.g. a BOS or chat-template token from setting
            the scale.

    Returns:
        ``(normalized, scale)`` with ``normalized = values / scale`` and ``scale = max |values[mask]|``;
        ``scale`` is 0 and ``normalized`` all zeros when the values (under the mask) are all zero.
    """
    v = values.detach().float()
    ref = v if mask is None else v[mask.to(torch.bool)]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if scale == 0.0 or not torch.isfinite(torch.tensor(scale)):
        return torch.zeros_like(v), 0.0
    return (v / scale).clamp(-1.0, 1.0), scale


def dominant_latents(scores: Tensor) -> tuple[Int[Tensor, " pos"], Float[Tensor, " pos"]]:
    """Per token, the latent with the largest ``|score|`` and its signed score.

    Args:
        scores: ``[pos, d_sae]`` token-level latent scores, dense or sparse COO.

    Returns:
        ``(latent_ids, latent_scores)``, both ``[pos]``: ``argmax_j |scores[t, j]|`` (ties: the smallest id)
        and ``scores[t, argmax]``; ``-1`` and ``0.0`` for a token without any non-zero score.
    """
    n_pos = int(scores.shape[0])
    ids = torch.full((n_pos,), -1, dtype=torch.long)
    vals = torch.zeros(n_pos, dtype=torch.float32)
    if scores.is_sparse:
        sp = scores.coalesce()
        idx, val = sp.indices().cpu(), sp.values().detach().float().cpu()
        keep = val != 0
        idx, val = idx[:, keep], val[keep]
        if val.numel() == 0:
            return ids, vals
        # coalesced entries are ordered by (row, latent); stable sorts keep the smallest latent first among ties
        order = torch.sort(val.abs(), descending=True, stable=True).indices
        order = order[torch.sort(idx[0, order], stable=True).indices]
        rows, lat, v = idx[0, order], idx[1, order], val[order]
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        ids[rows[first]] = lat[first]
        vals[rows[first]] = v[first]
        return ids, vals
    dense = scores.detach().float().cpu()
    if dense.numel() == 0:
        return ids, vals
    arg = dense.abs().argmax(dim=1)
    best = dense.gather(1, arg[:, None])[:, 0]
    active = best != 0
    ids[active] = arg[active]
    vals[active] = best[active]
    return ids, vals


@dataclass
class TokenAttribution:
    """Token-level influence of one sequence (a training example for a query, or the query itself).

    Attributes:
        tokens: display strings, one per token (see :func:`token_strings`).
        token_ids: the token ids.
        values: ``[pos]`` activation x influence summed over latents (POSITIVE = proponent / supports the
            answer; see the module docstring for the exact formulas).
        normalized: ``[pos]`` ``values / scale`` in ``[-1, 1]`` (per-sentence normalisation).
        scale: ``max |values|`` of this sequence (0 when all values are zero).
        dominant_latent: ``[pos]`` ``argmax_j |score[t, j]|`` (``-1`` where no latent is active).
        dominant_value: ``[pos]`` the signed score of the dominant latent.
        scores: ``[pos, d_sae]`` sparse COO token-level latent scores whose row sums are ``values``.
        kind: ``"train"`` or ``"query"``.
        label: the example's id.
        total: the sequence's total: the example's influence score (``"train"``) or the query's loss
            (``"query"``).
        meta: anything else (query index, prediction, label, ...).
    """

    tokens: list[str]
    token_ids: list[int]
    values: Float[Tensor, " pos"]
    normalized: Float[Tensor, " pos"]
    scale: float
    dominant_latent: Int[Tensor, " pos"]
    dominant_value: Float[Tensor, " pos"]
    scores: Tensor
    kind: str = "train"
    label: str = ""
    total: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def d_sae(self) -> int:
        return int(self.scores.shape[1])

    def latent_totals(self) -> Float[Tensor, " d_sae"]:
        """Sum over tokens of the token-level latent scores (for a training example: its IFR row)."""
        return torch.sparse.sum(self.scores, dim=0).to_dense() if self.scores._nnz() else torch.zeros(self.d_sae)

    def top_latents(self, k: int = 8, *, by: str = "abs") -> list[int]:
        """The ``k`` latents with the largest total over tokens (``by="abs"``: magnitude, ``"pos"``: value).

        Only latents with a non-zero total are returned.
        """
        tot = self.latent_totals()
        key = tot.abs() if by == "abs" else tot
        k = min(k, int((tot != 0).sum()))
        return torch.topk(key, k).indices.tolist() if k > 0 else []

    def latent_values(self, latents: Sequence[int], *, normalize: bool = False) -> Float[Tensor, "pos k"]:
        """Dense ``[pos, k]`` token scores of the given latents (columns in the given order).

        With ``normalize`` each column is divided by this sequence's ``scale`` (the per-sentence maximum of the
        summed values), so the columns share one colour scale with :attr:`normalized`.
        """
        cols = torch.tensor(list(latents), dtype=torch.long)
        sp = self.scores.coalesce()
        idx, val = sp.indices(), sp.values().float()
        out = torch.zeros(len(self.tokens), len(cols))
        if len(cols) and val.numel():
            lookup = torch.full((self.d_sae,), -1, dtype=torch.long)
            lookup[cols] = torch.arange(len(cols))
            pos = lookup[idx[1]]
            keep = pos >= 0
            out[idx[0, keep], pos[keep]] = val[keep]
        if normalize:
            out = out / self.scale if self.scale > 0 else torch.zeros_like(out)
        return out

    def renormalized(self, mask: Bool[Tensor, " pos"] | None) -> TokenAttribution:
        """A copy whose :attr:`normalized` / :attr:`scale` use only the positions in ``mask`` (see
        :func:`normalize_per_sentence`)."""
        norm, scale = normalize_per_sentence(self.values, mask)
        return TokenAttribution(**{**self.__dict__, "normalized": norm, "scale": scale})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no sparse scores)."""
        return {
            "kind": self.kind,
            "label": self.label,
            "total": self.total,
            "scale": self.scale,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "values": self.values.tolist(),
            "normalized": self.normalized.tolist(),
            "dominant_latent": self.dominant_latent.tolist(),
            "dominant_value": self.dominant_value.tolist(),
            "meta": self.meta,
        }


def _build(
    scores: Tensor, token_ids: list[int], tokenizer: Any, kind: str, label: str, total: float | None, meta: dict
) -> TokenAttribution:
    scores = scores.coalesce()
    n = len(token_ids)
    if scores._nnz():
        values = torch.sparse.sum(scores.double(), dim=1).to_dense().float()
    else:
        values = torch.zeros(n)
    norm, scale = normalize_per_sentence(values)
    dom, dom_val = dominant_latents(scores)
    return TokenAttribution(
        tokens=token_strings(token_ids, tokenizer),
        token_ids=token_ids,
        values=values,
        normalized=norm,
        scale=scale,
        dominant_latent=dom,
        dominant_value=dom_val,
        scores=scores,
        kind=kind,
        label=label,
        total=total,
        meta=meta,
    )


def example_token_attribution(result: InfluenceResult, q: int, i: int, tokenizer: Any = None) -> TokenAttribution:
    """Token-level influence of training example ``i`` on query ``q`` of an :class:`InfluenceResult`.

    ``values[t] = sum_j r[t, j] * d/dr[t, j] <G(r), s_test>`` (the row sums of the result's token-level latent
    scores), so ``values.sum() == latent_scores[q, i].sum()`` up to float rounding. POSITIVE = proponent.

    Args:
        result: an :class:`InfluenceResult` computed with ``store_token_scores=True``.
        q: query index.
        i: training example index.
        tokenizer: decodes the tokens (default: ``result.tokenizer``; ids as strings when neither is set).

    Returns:
        A :class:`TokenAttribution` with ``kind="train"`` and ``total`` = the example score.
    """
    if not 0 <= q < result.n_queries or not 0 <= i < result.n_train:
        raise IndexError(
            f"(q={q}, i={i}) is outside the result's {result.n_queries} queries x {result.n_train} training examples."
        )
    sparse, ids, _ = result.token_latent_scores(q, i)
    meta = {"query": q, "query_id": result.query_ids[q], "index": i}
    return _build(
        sparse.cpu(),
        [int(t) for t in ids],
        tokenizer if tokenizer is not None else result.tokenizer,
        "train",
        result.train_ids[i],
        float(result.example_scores[q, i]),
        meta,
    )


def query_token_attribution(
    split: SplitModel, task: Any, query_row: Mapping[str, Any], *, tokenizer: Any = None
) -> TokenAttribution:
    """Token-level attribution of the test input's own tokens to its loss (activation x gradient).

    Runs theta1 once, then differentiates the query's loss w.r.t. its SAE latents r (``torch.func.grad``,
    theta2 held at the model's weights) and returns, per position ``t``,
    ``values[t] = - sum_j r[t, j] * d loss / d r[t, j]`` (POSITIVE = the token's latents lower the loss, i.e.
    support the correct answer; first-order estimate of the loss increase when they are zeroed).

    Args:
        split: the :class:`~repinf_lens.split.SplitModel` (hook and SAE).
        task: the task whose loss is attributed (``None``: the split's task).
        query_row: one example of the task (``{question, choices, answer, ...}``, ``{prompt, target, ...}``).
        tokenizer: decodes the tokens (default: the task's tokenizer).

    Returns:
        A :class:`TokenAttribution` with ``kind="query"``, ``total`` = the query's loss and ``meta`` holding the
        predicted and correct option indices (tasks with the ``predictions`` capability and ``labels``) and
        whether the model answers correctly (tasks with ``correct``).
    """
    from torch.func import grad

    from repinf_lens.task import supports

    sp = split if task is None or task is split.task else split.with_task(task)
    batch = sp.task.collate([dict(query_row)])
    inp = sp.prepare(batch)
    params = sp.downstream_params()

    def loss_of(r: Tensor) -> Tensor:
        return sp.loss(r, inp.batch, params, inp.error, inp.base, reduction="sum", anchor=inp.anchor)

    r = inp.latents
    g = grad(loss_of)(r).detach()
    scores = -(r * g)[0].float().cpu()  # [T, d_sae], zero where a latent is inactive
    with torch.no_grad():
        logits = sp.logits(r, inp.batch, params, inp.error, inp.base, inp.anchor)
        loss = float(sp.task.loss(logits, inp.batch, reduction="sum"))
        pred = sp.task.predictions(logits, inp.batch) if supports(sp.task, "predictions") else None
        right = sp.task.correct(logits, inp.batch) if supports(sp.task, "correct") else None
    n_tok = int(batch.attention_mask[0].sum()) if hasattr(batch, "attention_mask") else int(batch.tokens.shape[1])
    ids = batch.tokens[0, :n_tok].tolist()
    scores = scores[:n_tok]
    nz = torch.nonzero(scores).T
    sparse = torch.sparse_coo_tensor(nz, scores[nz[0], nz[1]], size=tuple(scores.shape))
    meta: dict[str, Any] = {"loss": loss, "sign": "positive = lowers the query loss (supports the answer)"}
    if pred is not None:
        meta["prediction"] = int(pred[0])
    if hasattr(batch, "labels"):
        meta["answer"] = int(batch.labels[0])
    if right is not None:
        meta["correct"] = bool(right[0])
    tok = tokenizer if tokenizer is not None else getattr(sp.task, "tokenizer", None)
    return _build(sparse, ids, tok, "query", str(query_row.get("id", "query")), loss, meta)
