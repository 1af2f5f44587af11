"""The ablation stage: necessity / sufficiency curves of every ranking, tables, JSON and the plot.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from repinf_lens._io import as_rows, write_manifest
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import SplitModel

__all__ = ["run_ablation"]


def run_ablation(
    split: SplitModel,
    queries: Any,
    result: InfluenceResult,
    *,
    out_dir: str | os.PathLike,
    rankings: Any = None,
    ks: Any = None,
    train: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, Any, dict[str, Path]]:
    """Necessity / sufficiency curves for every ranking; tidy tables, JSON and the plot in ``out_dir``."""
    from repinf_lens.analysis.ablation import PAPER_KS, aggregate, necessity_sufficiency, plot_ablation, save_ablation

    t0 = time.perf_counter()
    df = necessity_sufficiency(
        split, split.task, queries, rankings, ks=tuple(ks or PAPER_KS), result=result, train=train, n_boot=n_boot,
        seed=seed, progress=progress,
    )  # fmt: skip
    agg = aggregate(df)
    files = save_ablation(df, out_dir, agg)
    plot_ablation(agg, Path(out_dir) / "ablation.png")
    files["plot"] = Path(out_dir) / "ablation.png"
    write_manifest(
        out_dir,
        "ablate",
        {"rankings": rankings, "ks": list(ks or PAPER_KS), "n_boot": n_boot, "seed": seed},
        n_queries=len(as_rows(queries, "query set")),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return df, agg, files
