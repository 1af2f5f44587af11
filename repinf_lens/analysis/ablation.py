"""Necessity and sufficiency ablations of SAE latents (paper Section 5.4, Figures 3-4, Table A.1).

For each test question and each latent ranking (see :mod:`repinf_lens.analysis.rankings`), a binary mask is applied
to the SAE latents at the hook, at every position of the question:

* **necessity** ("Remove Top-k: A mask that zeroes out the top-k features, leaving other features intact"),
* **sufficiency** ("Keep Top-k: A mask that preserves only the top-k ranked features, zeroing all others"),

and the downstream part of the model is run from ``decode(r * mask) + e``. ``e`` is the SAE error of the unablated
input held fixed (``error_term=True``, so an all-ones mask reproduces the original model exactly) or dropped
(``error_term=False``: the reconstruction alone, the paper's setting, whose unablated run is the model with the
SAE inserted). Each masked run is compared with the UNABLATED run of the same setting (the paper: "we record the
baseline prediction and correct-token statistics, then apply a binary mask").

Metrics (one row per ranking, k, mode, error term and query; all are computed for both modes):

* ``delta_logit``: correct option letter's logit (full vocabulary, answer position) minus the unablated one,
* ``delta_nll``: task loss (NLL of the correct option) minus the unablated one,
* ``flip``: 1 when the predicted option differs from the unablated prediction (``same_answer = 1 - flip``),
* ``correct_logit``: the correct option's logit under the mask (the paper's "retained mean correct logit"),
* ``retained_logit``: ``correct_logit / base_correct_logit`` (NaN when the unablated logit is 0),
* ``correct``: 1 when the prediction under the mask is the correct option.

The paper's figures report, for necessity, mean delta_logit, delta_nll and flip rate; for sufficiency the
same-answer rate and the retained correct logit. :func:`aggregate` gives means and percentile-bootstrap CIs over
queries, :func:`save_ablation` writes CSV + JSON, :func:`plot_ablation` draws the paper's layout.

Efficiency: the upstream part (theta1) runs once per query (:meth:`SplitModel.prepare`); every (ranking, k, mode)
variant is a row of one batched downstream run (``batch_size`` variants at a time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._io import write_text_atomic
from repinf_lens.analysis.rankings import LatentRanking, RankingContext, get_ranking, with_error_term

__all__ = [
    "DEFAULT_RANKINGS",
    "METRICS",
    "MODES",
    "PAPER_KS",
    "aggregate",
    "masked_logits",
    "necessity_sufficiency",
    "plot_ablation",
    "save_ablation",
]

PAPER_KS: tuple[int, ...] = (10, 25, 50, 75, 100, 125, 150, 175, 200)
"""k values: the paper's Section 5.4 grid {25, 50, 100, 125, 150, 175, 200} plus Table A.1's 10 and 75."""

DEFAULT_RANKINGS: tuple[str, ...] = ("influence_eq16", "influence", "activation", "frequency", "random")
"""The paper's comparison: RepInf against activation magnitude, feature frequency and a random set. The first
is the reference of the verdicts: ``influence_eq16`` (most negative mean IFR first, the sign of the paper's
Eq. 16), the end the necessity/sufficiency evidence supports on the shipped model (docs/method.md, the sign);
``influence`` (the text's sign) stays in the comparison."""

MODES: tuple[str, str] = ("necessity", "sufficiency")

METRICS: tuple[str, ...] = (
    "delta_logit",
    "delta_nll",
    "flip",
    "same_answer",
    "correct_logit",
    "retained_logit",
    "correct",
)
"""Per-query metric columns aggregated by :func:`aggregate`."""

_PLOT_METRICS: dict[str, tuple[str, ...]] = {
    "necessity": ("delta_logit", "delta_nll", "flip"),
    "sufficiency": ("same_answer", "correct_logit", "retained_logit"),
}
_LABELS = {
    "delta_logit": "Δ correct logit",
    "delta_nll": "Δ NLL",
    "flip": "flip rate",
    "same_answer": "same-answer rate",
    "correct_logit": "retained correct logit",
    "retained_logit": "retained logit ratio",
    "correct": "correct rate",
}


# ---------------------------------------------------------------------------------------------------------------
# helpers
def _repeat_batch(batch: Any, n: int, task: Any, row: Mapping[str, Any] | None) -> Any:
    """``batch`` (of one example) repeated ``n`` times along the batch dimension."""
    if n == 1:
        return batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == 1:
                kw[f.name] = v.expand(n, *v.shape[1:])
            elif isinstance(v, list) and len(v) == 1:
                kw[f.name] = v * n
        return dataclasses.replace(batch, **kw)
    if row is None:
        raise TypeError(f"Cannot repeat a batch of type {type(batch).__name__} without its example.")
    return task.collate([row] * n).to(batch.tokens.device)


def _expand(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.expand(n, *t.shape[1:])


@torch.no_grad()
def masked_logits(
    split: Any,
    inputs: Any,
    masks: Bool[Tensor, "variants d_sae"],
    *,
    error_term: bool = True,
    batch_size: int = 32,
    task: Any = None,
    row: Mapping[str, Any] | None = None,
) -> tuple[Float[Tensor, "variants d_vocab"], Any]:
    """Answer-position logits of one prepared query under each latent mask (downstream part only).

    Args:
        split: the :class:`~repinf_lens.split.SplitModel`.
        inputs: the query's :class:`~repinf_lens.split.SplitInputs` (a batch of ONE example), prepared with the
            error term held (``inputs.error``/``inputs.anchor`` set) when ``error_term`` is used.
        masks: ``[V, d_sae]``; True keeps a latent, False zeroes it at every position.
        error_term: add the held SAE error (exact model at an all-ones mask) or not (reconstruction only).
        batch_size: masks per downstream forward pass.
        task, row: used only to re-collate batches that are not dataclasses.

    Returns:
        ``(logits [V, d_vocab], batch)``, ``batch`` being the query's batch repeated ``min(V, batch_size)``
        times (the last chunk's batch).
    """
    if len(inputs) != 1:
        raise ValueError(f"masked_logits takes the inputs of ONE query, got a batch of {len(inputs)}.")
    r = inputs.latents
    out = []
    rep = inputs.batch
    for s in range(0, masks.shape[0], batch_size):
        m = masks[s : s + batch_size].to(device=r.device, dtype=r.dtype)
        n = m.shape[0]
        rm = r * m[:, None, :]
        rep = _repeat_batch(inputs.batch, n, task, row)
        err = _expand(inputs.error, n) if error_term else None
        anchor = tuple(_expand(a, n) for a in inputs.anchor) if (error_term and inputs.anchor is not None) else None
        base = _expand(inputs.base, n)
        out.append(split.logits(rm, rep, None, err, base, anchor))
    return torch.cat(out), rep


def _as_variants(use_error_term: bool | Iterable[bool]) -> list[bool]:
    vals = [bool(use_error_term)] if isinstance(use_error_term, bool) else [bool(v) for v in use_error_term]
    if not vals:
        raise ValueError("use_error_term is empty. Fix: pass True, False or (True, False).")
    return list(dict.fromkeys(vals))


def _result_indices(result: Any, rows: Sequence[Mapping[str, Any]]) -> list[int] | None:
    if result is None:
        return None
    ids = [r.get("id") for r in rows]
    pos = {str(q): i for i, q in enumerate(result.query_ids)}
    if all(i is not None and str(i) in pos for i in ids) and len(pos) == len(result.query_ids):
        return [pos[str(i)] for i in ids]
    if result.n_queries == len(rows):
        return list(range(len(rows)))
    raise ValueError(
        f"The InfluenceResult has {result.n_queries} queries ({result.query_ids[:3]}...) which do not match the "
        f"{len(rows)} queries given (ids {ids[:3]}...). Fix: pass the queries the result was computed for."
    )


def _resolve_rankings(rankings: Any) -> dict[str, Any]:
    if rankings is None:
        rankings = DEFAULT_RANKINGS
    if isinstance(rankings, str):
        rankings = [rankings]
    if not isinstance(rankings, Mapping):
        rankings = {(r if isinstance(r, str) else r.label): r for r in rankings}
    if not rankings:
        raise ValueError("No rankings given. Fix: pass e.g. {'influence': 'influence', 'random': 'random'}.")
    out: dict[str, Any] = {}
    for name, spec in rankings.items():
        if isinstance(spec, str):
            out[str(name)] = get_ranking(spec)
        elif isinstance(spec, LatentRanking):
            out[str(name)] = spec
        elif callable(spec) and not isinstance(spec, Tensor):
            from repinf_lens.analysis.rankings import FunctionRanking

            out[str(name)] = FunctionRanking(spec, name=str(name), returns="permutation")
        else:
            out[str(name)] = spec  # per-query permutations, checked per query
    return out


def _check_perm(perm: Any, name: str, d_sae: int, need: int) -> Tensor:
    p = torch.as_tensor(perm).detach().long().cpu().flatten()
    if p.numel() < need:
        raise ValueError(
            f"Ranking {name!r} orders {p.numel()} latents but the largest k needs {need}. Fix: pass at least "
            f"min(max(ks), d_sae) = {need} latent ids per query."
        )
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= d_sae):
        raise ValueError(f"Ranking {name!r} has latent ids outside 0..{d_sae - 1}.")
    if torch.unique(p).numel() != p.numel():
        raise ValueError(f"Ranking {name!r} repeats latent ids (a ranking must be a permutation).")
    return p


def _query_perm(spec: Any, name: str, ctx: RankingContext, q: int, n_queries: int, need: int) -> Tensor:
    if isinstance(spec, LatentRanking):
        return _check_perm(spec.rank(ctx), name, ctx.d_sae, need)
    if isinstance(spec, Tensor) and spec.ndim == 1:
        raise ValueError(
            f"Ranking {name!r} is a single 1-D tensor; pass one permutation per query ([Q, >= k] or a list of Q)."
        )
    if len(spec) != n_queries:
        raise ValueError(f"Ranking {name!r} has {len(spec)} permutations for {n_queries} queries.")
    return _check_perm(spec[q], name, ctx.d_sae, need)


# ---------------------------------------------------------------------------------------------------------------
# main entry point
def necessity_sufficiency(
    split: Any,
    task: Any,
    queries: Any,
    rankings: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    ks: Sequence[int] = PAPER_KS,
    use_error_term: bool | Iterable[bool] = (True, False),
    n_boot: int = 1000,
    seed: int = 0,
    result: Any = None,
    train: Any = None,
    train_latents: Sequence[Tensor] | Tensor | None = None,
    modes: Sequence[str] = MODES,
    batch_size: int = 32,
    progress: bool = True,
) -> Any:
    """Remove / keep the top-k latents of each ranking for every query and measure the answer's change.

    Args:
        split: the :class:`~repinf_lens.split.SplitModel` with the SAE at the hook (its own ``use_error_term``
            does not matter: both variants are evaluated as asked by ``use_error_term``).
        task: the task (``None``: the split's task); must provide ``option_logits`` (multiple choice).
        queries: the test examples (list of dicts, ``datasets.Dataset``, dict of columns or one example).
        rankings: ``{name: spec}`` where ``spec`` is a registered ranking name (``"influence"``, ``"activation"``,
            ``"frequency"``, ``"random"``, ``"grad_x_act"``, ...), a :class:`LatentRanking`, a function
            ``ctx -> permutation``, or precomputed per-query permutations (``[Q, >= max k]`` tensor or a list of
            Q sequences of latent ids, most important first). A list of names is accepted too. Default: the
            paper's ``("influence", "activation", "frequency", "random")``.
        ks: numbers of latents removed / kept (clipped at ``d_sae``; the row keeps the requested k).
        use_error_term: ``True`` (SAE error held fixed), ``False`` (reconstruction only) or both.
        n_boot, seed: bootstrap settings stored in ``df.attrs`` for :func:`aggregate`; ``seed`` also seeds the
            random ranking and random tie-breaking.
        result: the :class:`~repinf_lens.influence.result.InfluenceResult` for these queries (matched by id, or
            by position when the ids do not match and the counts do); needed by ``influence``.
        train: the kept training examples (rows), for ``frequency`` (default: ``result.train_tokens``).
        train_latents: precomputed per-example training latents ``[T_i, d_sae]`` (padding removed).
        modes: ``("necessity", "sufficiency")`` or one of them.
        batch_size: masked variants per downstream forward pass.
        progress: show a tqdm bar over queries.

    Returns:
        A ``pandas.DataFrame`` with one row per (ranking, k, mode, error_term, query): columns ``ranking, k,
        mode, error_term, query, query_id, n_masked, n_active_masked, n_active, label, base_pred, pred,
        base_correct_logit, correct_logit, base_nll, nll, delta_logit, delta_nll, flip, same_answer,
        retained_logit, correct, base_correct``. ``df.attrs`` holds the settings (``n_boot``, ``seed``, hook,
        rankings' configs, ...). ``n_masked`` is the number of latents zeroed; ``n_active_masked`` how many of
        them are active (non-zero at some position) on the query; ``n_active`` the query's active latents.
    """
    import pandas as pd

    from repinf_lens.influence.attributor import as_rows
    from repinf_lens.task import require

    base_split = split if task is None or task is split.task else split.with_task(task)
    task = base_split.task
    # the metrics (correct-option logit, prediction flips) need a multiple-choice task; MissingCapabilityError
    # is a TypeError
    require(task, "option_logits", needed_by="necessity_sufficiency (correct-option logit, prediction flips)")
    esplit = with_error_term(base_split)
    rows = as_rows(queries, "query set")
    variants = _as_variants(use_error_term)
    modes = [str(m) for m in modes]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a subset of {MODES}, got {modes}.")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 0:
        raise ValueError(f"ks must be non-negative integers, got {ks}.")
    specs = _resolve_rankings(rankings)
    d = int(esplit.d_sae)
    need = min(max(ks), d)
    ridx = _result_indices(result, rows)
    train_rows = as_rows(train, "training set") if train is not None else None
    shared: dict[str, Any] = {}
    names = list(specs)
    records: list[dict[str, Any]] = []

    for qi, row in enumerate(tqdm(rows, desc="ablation", disable=not progress)):
        batch = task.collate([row])
        inp = esplit.prepare(batch)
        ctx = RankingContext(
            split=esplit,
            task=task,
            query=row,
            query_index=qi,
            inputs=inp,
            result=result,
            result_index=None if ridx is None else ridx[qi],
            train=train_rows,
            train_latents=train_latents,
            seed=seed,
            cache=shared,
        )
        perms = {n: _query_perm(specs[n], n, ctx, qi, len(rows), need) for n in names}
        active = (inp.latents[0] != 0).any(0).cpu()
        # variant 0 is the unablated run; then (ranking, k, mode) in order
        masks = [torch.ones(d, dtype=torch.bool)]
        keys: list[tuple[str, int, str, int, int]] = []
        for n in names:
            for k in ks:
                top = perms[n][: min(k, d)]
                n_act = int(active[top].sum())
                for mode in modes:
                    m = torch.ones(d, dtype=torch.bool) if mode == "necessity" else torch.zeros(d, dtype=torch.bool)
                    m[top] = mode == "sufficiency"
                    masks.append(m)
                    n_masked = top.numel() if mode == "necessity" else d - top.numel()
                    n_act_masked = n_act if mode == "necessity" else int(active.sum()) - n_act
                    keys.append((n, k, mode, n_masked, n_act_masked))
        mask_t = torch.stack(masks)
        label = int(batch.labels[0])
        for err in variants:
            logits, _ = masked_logits(esplit, inp, mask_t, error_term=err, batch_size=batch_size, task=task, row=row)
            rep = _repeat_batch(inp.batch, logits.shape[0], task, row)
            opt = task.option_logits(logits, rep).double()
            correct_logit = opt[:, label]
            nll = task.loss(logits, rep, reduction="none").double()
            pred = opt.argmax(-1)
            b_logit, b_nll, b_pred = float(correct_logit[0]), float(nll[0]), int(pred[0])
            for j, (n, k, mode, n_masked, n_act_masked) in enumerate(keys, start=1):
                cl, nl, pr = float(correct_logit[j]), float(nll[j]), int(pred[j])
                records.append(
                    {
                        "ranking": n,
                        "k": k,
                        "mode": mode,
                        "error_term": err,
                        "query": qi,
                        "query_id": str(row.get("id", qi)),
                        "n_masked": n_masked,
                        "n_active_masked": n_act_masked,
                        "n_active": int(active.sum()),
                        "label": label,
                        "base_pred": b_pred,
                        "pred": pr,
                        "base_correct_logit": b_logit,
                        "correct_logit": cl,
                        "base_nll": b_nll,
                        "nll": nl,
                        "delta_logit": cl - b_logit,
                        "delta_nll": nl - b_nll,
                        "flip": float(pr != b_pred),
                        "same_answer": float(pr == b_pred),
                        "retained_logit": cl / b_logit if b_logit != 0 else math.nan,
                        "correct": float(pr == label),
                        "base_correct": float(b_pred == label),
                    }
                )
    df = pd.DataFrame.from_records(records)
    df.attrs.update(
        {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "ks": ks,
            "modes": modes,
            "use_error_term": variants,
            "n_queries": len(rows),
            "d_sae": d,
            "hook": getattr(esplit, "hook_name", None),
            "rankings": {
                n: (repr(s) if isinstance(s, LatentRanking) else "precomputed permutations") for n, s in specs.items()
            },
        }
    )
    return df


# ---------------------------------------------------------------------------------------------------------------
# aggregation, saving, plotting
def _bootstrap_ci(
    values: np.ndarray, n_boot: int, rng: np.random.Generator, level: float
) -> tuple[float, float, float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    if v.size == 1 or n_boot <= 0:
        return mean, mean, mean, std
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    boots = v[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi), std


def aggregate(
    df: Any,
    *,
    n_boot: int | None = None,
    seed: int | None = None,
    level: float = 0.95,
    metrics: Sequence[str] = METRICS,
    by: Sequence[str] = ("ranking", "k", "mode", "error_term"),
) -> Any:
    """Means and percentile-bootstrap CIs over queries of every metric, per (ranking, k, mode, error_term).

    Queries are resampled with replacement ``n_boot`` times (default ``df.attrs["n_boot"]`` or 1000); every
    group draws the same resampling indices from ``seed`` (default ``df.attrs["seed"]`` or 0), so CIs of
    different rankings on the same queries are paired. Non-finite values (e.g. ``retained_logit`` with an
    unablated logit of 0) are left out of their group.

    Returns:
        A tidy ``pandas.DataFrame``: ``by`` columns, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``std``,
        ``n`` (finite values), ``level``.
    """
    import pandas as pd

    n_boot = int(df.attrs.get("n_boot", 1000) if n_boot is None else n_boot)
    seed = int(df.attrs.get("seed", 0) if seed is None else seed)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    metrics = [m for m in metrics if m in df.columns]
    out = []
    sort_col = "query" if "query" in df.columns else None
    for key, g in df.groupby(list(by), sort=True):
        if sort_col is not None:
            g = g.sort_values(sort_col)
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            vals = g[metric].to_numpy(dtype=float)
            mean, lo, hi, std = _bootstrap_ci(vals, n_boot, np.random.default_rng(seed), level)
            rec = dict(zip(by, key))
            rec.update(
                {
                    "metric": metric,
                    "mean": mean,
                    "ci_low": lo,
                    "ci_high": hi,
                    "std": std,
                    "n": int(np.isfinite(vals).sum()),
                    "level": level,
                }
            )
            out.append(rec)
    agg = pd.DataFrame.from_records(out)
    agg.attrs.update(dict(df.attrs))
    agg.attrs.update({"n_boot": n_boot, "seed": seed, "level": level})
    return agg


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def save_ablation(df: Any, out_dir: str | os.PathLike, agg: Any = None, *, prefix: str = "ablation") -> dict[str, Path]:
    """Write the per-query table and its aggregate as tidy CSV and one JSON file.

    Files: ``{prefix}_per_query.csv``, ``{prefix}_summary.csv`` and ``{prefix}.json`` (``meta`` = the settings in
    ``df.attrs``, ``summary`` and ``per_query`` records; NaN written as ``null``). ``agg`` defaults to
    :func:`aggregate` of ``df``.

    Returns:
        ``{"per_query": path, "summary": path, "json": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(df) if agg is None else agg
    paths = {
        "per_query": out / f"{prefix}_per_query.csv",
        "summary": out / f"{prefix}_summary.csv",
        "json": out / f"{prefix}.json",
    }
    write_text_atomic(paths["per_query"], df.to_csv(index=False))
    write_text_atomic(paths["summary"], agg.to_csv(index=False))
    payload = {
        "meta": _jsonable(dict(df.attrs)),
        "summary": _jsonable(agg.to_dict(orient="records")),
        "per_query": _jsonable(df.to_dict(orient="records")),
    }
    write_text_atomic(paths["json"], json.dumps(payload, indent=1, default=str))
    return paths


def plot_ablation(
    agg: Any,
    path: str | os.PathLike | None = None,
    *,
    metrics: Mapping[str, Sequence[str]] | None = None,
    title: str | None = None,
) -> Any:
    """The paper's Figure 3/4 layout: one panel per (mode, metric), x = k, one curve per ranking with CI bands.

    Rows: necessity then sufficiency, for each error-term setting present in ``agg``; columns: the metrics
    (default necessity: Δ logit, Δ NLL, flip rate; sufficiency: same-answer rate, retained correct logit,
    retained logit ratio). Uses matplotlib's Agg canvas (no display, no global backend change).

    Args:
        agg: the output of :func:`aggregate`.
        path: where to save the figure (``.png``, ``.pdf``, ...); ``None`` only returns it.
        metrics: ``{mode: metrics}`` to draw instead of the default.
        title: figure title.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = dict(_PLOT_METRICS if metrics is None else metrics)
    modes = [m for m in MODES if m in set(agg["mode"]) and m in metrics]
    errs = sorted(set(agg["error_term"]), reverse=True) if "error_term" in agg.columns else [None]
    rows = [(e, m) for e in errs for m in modes]
    n_cols = max(len(metrics[m]) for m in modes) if modes else 1
    fig = Figure(figsize=(4.2 * n_cols, 3.2 * max(len(rows), 1)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(rows), 1), n_cols, squeeze=False)
    rankings = list(dict.fromkeys(agg["ranking"]))
    colors = {r: f"C{i % 10}" for i, r in enumerate(rankings)}
    for i, (err, mode) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(metrics[mode]):
                ax.set_axis_off()
                continue
            metric = metrics[mode][j]
            sub = agg[(agg["mode"] == mode) & (agg["metric"] == metric)]
            if err is not None:
                sub = sub[sub["error_term"] == err]
            for r in rankings:
                s = sub[sub["ranking"] == r].sort_values("k")
                if s.empty:
                    continue
                ax.plot(s["k"], s["mean"], marker="o", ms=3, color=colors[r], label=r)
                ax.fill_between(s["k"], s["ci_low"], s["ci_high"], color=colors[r], alpha=0.2, linewidth=0)
            head = "Necessity (remove top-k)" if mode == "necessity" else "Sufficiency (keep top-k)"
            err_s = "" if err is None else (", error term held" if err else ", no error term")
            ax.set_title(f"{head}{err_s}", fontsize=9)
            ax.set_xlabel("k")
            ax.set_ylabel(_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    return fig
