"""Case studies (paper Sec. 5.5 and App. A.3): why did finetuning fix this answer?

For test questions the base model got wrong and the finetuned model gets right (the paper's protocol), a case
study shows the top training examples with their influence, the top latents with the tokens that activate them
most among the candidates, the token heatmaps of the test input and of each top example, and the
reasoning-augmentation variant (paper Case Study D): a rationale is appended to the top proponent, its influence
recomputed with the same s_test, and the two heatmaps compared.

:func:`run_case_studies` writes ``case_studies.json`` and one self-contained ``case_studies.html``; the
attribution underneath is :func:`repinf_lens.workflows.run_attribution` (prefilter, CG, resumable shards).

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from repinf_lens._io import cached_json

__all__ = [
    "added_tokens_share",
    "cached_predictions",
    "default_rationale",
    "prediction_record",
    "select_queries",
    "top_activating_tokens",
    "with_rationale",
]


def select_queries(
    ids: Sequence[str], before: Sequence[bool], after: Sequence[bool], n: int
) -> tuple[list[int], list[str]]:
    """Pick ``n`` test questions, the paper's case-study protocol first (Sec. 5.5).

    Order: wrong before finetuning and right after, then right after, then the rest; each group in dataset
    order. Returns the indices and, per pick, the group it came from.
    """
    groups: tuple[tuple[str, Callable[[int], bool]], ...] = (
        ("wrong before, right after", lambda i: not before[i] and after[i]),
        ("right after", lambda i: bool(after[i])),
        ("other", lambda i: True),
    )
    picked: list[int] = []
    why: list[str] = []
    for name, keep in groups:
        for i in range(len(ids)):
            if len(picked) == n:
                return picked, why
            if i not in picked and keep(i):
                picked.append(i)
                why.append(name)
    return picked, why


def prediction_record(model: Any, task: Any, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 8,
                      progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """``{ids, predictions, correct, accuracy, seconds}`` of ``model`` on ``rows`` (option indices)."""
    from repinf_lens.task import predict

    t = time.perf_counter()
    preds, labels = predict(model, task, list(rows), batch_size=batch_size, progress=progress, desc="evaluate")
    correct = (preds == labels).tolist()
    return {
        "ids": [str(r["id"]) for r in rows],
        "predictions": preds.tolist(),
        "correct": correct,
        "accuracy": sum(correct) / len(correct),
        "seconds": round(time.perf_counter() - t, 2),
    }


def cached_predictions(
    path: str | os.PathLike, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Read ``path`` when it was written for the same ``key`` (model, template, question ids...), else compute
    the record with ``compute()`` and write it atomically.

    The prediction records' name for :func:`repinf_lens._io.cached_json` (the generic compute-or-read cache).
    """
    return cached_json(path, key, compute)


def default_rationale(row: Mapping[str, Any], letters: str = "ABCDEFGHIJ") -> str:
    """The row's own supporting fact when it has one (OpenBookQA's ``fact1``), else a one-line explanation that
    names the correct option."""
    fact = row.get("fact1") or row.get("rationale") or row.get("explanation")
    if fact:
        return str(fact).strip()
    k = int(row["answer"])
    return f"The correct option is {letters[k]}, {row['choices'][k]}."


def with_rationale(row: Mapping[str, Any], rationale: str) -> dict[str, Any]:
    """A copy of a training example with ``rationale`` appended to its question (paper Case Study D); the id
    gets a ``+rationale`` suffix."""
    out = dict(row)
    out["question"] = f"{row['question'].rstrip()} Reasoning: {rationale.strip()}"
    out["id"] = f"{row.get('id')}+rationale"
    return out


@torch.no_grad()
def top_activating_tokens(
    split: Any,
    rows: Sequence[Mapping[str, Any]],
    latents: Sequence[int],
    *,
    k: int = 5,
    context: int = 4,
    batch_size: int = 8,
) -> dict[int, list[dict[str, Any]]]:
    """For each latent, the ``k`` (example, token) pairs of ``rows`` where its SAE activation is largest.

    Returns ``{latent: [{"id", "position", "token", "context", "activation"}, ...]}`` (largest first); the
    context is the token with ``context`` tokens either side, the token itself in brackets. Padding is skipped.
    """
    from repinf_lens.analysis.rankings import latents_of_tokens

    task = split.task
    tok = getattr(task, "tokenizer", None)
    lat = torch.as_tensor(list(latents), dtype=torch.long)
    best: dict[int, list[tuple[float, str, int, list[int]]]] = {int(j): [] for j in lat.tolist()}
    for s in range(0, len(rows), batch_size):
        chunk = [dict(r) for r in rows[s : s + batch_size]]
        batch = task.collate(chunk)
        acts: Float[Tensor, "b pos n"] = latents_of_tokens(split, batch.tokens)[..., lat.to(batch.tokens.device)]
        acts = acts.float().cpu() * batch.attention_mask.cpu()[..., None]
        for b, row in enumerate(chunk):
            ids = batch.tokens[b].tolist()
            for c, j in enumerate(lat.tolist()):
                vals, pos = torch.topk(acts[b, :, c], min(k, acts.shape[1]))
                for v, p in zip(vals.tolist(), pos.tolist(), strict=True):
                    if v > 0:
                        best[j].append((v, str(row.get("id")), p, ids))
    out: dict[int, list[dict[str, Any]]] = {}
    for j, items in best.items():
        items.sort(key=lambda x: -x[0])
        recs = []
        for v, ex_id, p, ids in items[:k]:
            lo, hi = max(0, p - context), min(len(ids), p + context + 1)
            piece = [tok.decode([t]) if tok is not None else str(t) for t in ids[lo:hi]]
            piece[p - lo] = f"[{piece[p - lo]}]"
            recs.append(
                {"id": ex_id, "position": p, "token": piece[p - lo][1:-1], "context": "".join(piece), "activation": v}
            )
        out[j] = recs
    return out


def added_tokens_share(with_rationale: Any, without: Any) -> float:
    """Share of the augmented example's total |token influence| carried by the tokens the rationale added.

    Both are :class:`~repinf_lens.viz.tokens.TokenAttribution`; the added tokens start where the token ids
    first differ and are as many as the augmented sequence is longer."""
    a, b = with_rationale.token_ids, without.token_ids
    extra = len(a) - len(b)
    vals = with_rationale.values.abs().double()
    total = float(vals.sum())
    if extra <= 0 or total == 0:
        return 0.0
    start = next((p for p, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(b))
    return float(vals[start : start + extra].sum()) / total
