"""Faithfulness verdicts (paper Sec. 5.4, Figs. 3-4): does a ranking's top-k beat another's, over questions?

:func:`compare_rankings` says, per k, mode and metric, whether one ranking beats each other one (paired
bootstrap over questions) on the per-question ablation table that
:func:`repinf_lens.workflows.faithfulness.run_faithfulness` writes.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BETTER", "compare_rankings"]

BETTER: dict[str, dict[str, str]] = {
    "necessity": {"delta_logit": "lower", "delta_nll": "higher", "flip": "higher"},
    "sufficiency": {"delta_logit": "higher", "delta_nll": "lower", "same_answer": "higher"},
}
"""Which direction is better for a ranking, per mode and metric: removing the most important latents should
hurt the answer most (necessity); keeping only them should preserve it best (sufficiency)."""


def compare_rankings(
    df: Any,
    *,
    reference: str = "influence",
    better: Mapping[str, Mapping[str, str]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Any:
    """``reference`` vs every other ranking at every (mode, error_term, k, metric), paired over questions.

    Args:
        df: the per-question table of :func:`~repinf_lens.analysis.ablation.necessity_sufficiency` (one row per
            ranking, k, mode, error_term, query_id).
        reference: the ranking compared with the others.
        better: ``{mode: {metric: "lower" | "higher"}}`` (default :data:`BETTER`).

    Returns:
        A DataFrame with ``mode, error_term, k, metric, baseline, reference_mean, baseline_mean, difference``
        (reference - baseline, per question, averaged), ``ci_low, ci_high`` (percentile bootstrap over
        questions), ``n`` and ``verdict``: ``"better"`` / ``"worse"`` when the interval excludes 0 in the good /
        bad direction, else ``"tie"``.
    """
    import pandas as pd

    better = better or BETTER
    rng = np.random.default_rng(seed)
    rows = []
    for (mode, err, k), g in df.groupby(["mode", "error_term", "k"], sort=True):
        if mode not in better:
            continue
        for metric, direction in better[mode].items():
            wide = g.pivot_table(index="query_id", columns="ranking", values=metric, aggfunc="first")
            if reference not in wide.columns:
                raise ValueError(f"No {reference!r} ranking in the table (rankings: {sorted(wide.columns)}).")
            for base in [c for c in wide.columns if c != reference]:
                pair = wide[[reference, base]].dropna()
                diff = (pair[reference] - pair[base]).to_numpy(dtype=float)
                if diff.size == 0:
                    continue
                boots = rng.integers(0, diff.size, size=(n_boot, diff.size))
                means = diff[boots].mean(1)
                lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
                good = (hi < 0) if direction == "lower" else (lo > 0)
                bad = (lo > 0) if direction == "lower" else (hi < 0)
                rows.append(
                    {
                        "mode": mode, "error_term": bool(err), "k": int(k), "metric": metric, "better_is": direction,
                        "baseline": base, "reference_mean": float(pair[reference].mean()),
                        "baseline_mean": float(pair[base].mean()), "difference": float(diff.mean()),
                        "ci_low": float(lo), "ci_high": float(hi), "n": int(diff.size),
                        "verdict": "better" if good else ("worse" if bad else "tie"),
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)
