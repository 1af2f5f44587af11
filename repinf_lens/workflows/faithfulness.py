"""Faithfulness over many test questions (paper Sec. 5.4, Figs. 3-4): are influence-ranked latents causal?

:func:`run_faithfulness` attributes each test question over ITS OWN prefiltered training examples (the paper
ranks latents by the mean IFR over the examples kept for that question), with every s_test solved once in
lockstep (``CG.solve_many``, cached), then runs the necessity / sufficiency ablations of every ranking for that
question. Each question's attribution and ablation table are written as soon as they are done, so a crashed run
resumes where it stopped. :func:`~repinf_lens.analysis.faithfulness.compare_rankings` then says, per k, whether
influence beats each baseline (paired bootstrap over questions).

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repinf_lens._io import write_json_atomic, write_manifest, write_text_atomic
from repinf_lens.analysis.faithfulness import compare_rankings
from repinf_lens.errors import check_int

__all__ = ["run_faithfulness"]

_MEMORY_KNOBS = ("query_chunk_size",)
"""Config fields that bound memory only: processes sharing one folder (``shard``) may set them differently."""


def _with_new_knobs_at_default(settings: dict[str, Any], stored: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``settings`` without the config knobs that a folder written by an older version lacks, when they are at
    their defaults (a knob added later, such as ``preconditioner``, at its default leaves the run unchanged)."""
    import dataclasses

    old = stored.get("config", {})
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else {}
    config = {k: v for k, v in settings["config"].items()
              if k in old or k not in defaults or v != defaults[k]}  # fmt: skip
    return {**settings, "config": config}


def run_faithfulness(
    split: Any,
    queries: Any,
    train: Any,
    *,
    out_dir: str | os.PathLike,
    config: Any = None,
    rankings: Sequence[str] | None = None,
    ks: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Per-question attribution over its own prefiltered candidates, then ablations; tables, plot, verdicts.

    Args:
        split: the (finetuned) :class:`~repinf_lens.split.SplitModel` with its SAE and task.
        queries: the test questions (at least a few dozen for meaningful intervals; the paper's claim is per k).
        train: the training set the candidates are prefiltered from.
        out_dir: output folder: ``sketches/`` (shared), ``results/<i>/`` (one :class:`InfluenceResult` per
            question), ``per_query/<i>.csv`` (its ablation rows), ``ablation_*.csv/json``, ``ablation.png``,
            ``comparison.csv``, ``faithfulness.json``, ``manifest.json``.
        config: :class:`repinf_lens.workflows.AttributionConfig`; ``prefilter_top_k`` / ``prefilter_fraction``
            set each question's candidates (all of ``train`` when neither is set).
        rankings, ks: as :func:`~repinf_lens.analysis.ablation.necessity_sufficiency` (default the paper's four
            rankings and k grid).
        shard: ``(i, n)``: this process handles questions ``i, i + n, i + 2n, ...`` only, so ``n`` processes
            (one per core or GPU) share one ``out_dir``: the sketches are stored once (start one process first
            and the others reuse its finished shards; processes started together may both build a shard), each
            question is skipped when its table already exists, and whichever
            process finds every table written aggregates. A process that finishes before the others returns
            ``{"pending": [...]}`` and writes no aggregate; a later run without ``shard`` aggregates.

    Returns:
        The summary written to ``faithfulness.json`` (counts, timings, and the verdict counts per baseline).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from repinf_lens._cache import fingerprint_rows
    from repinf_lens.analysis.ablation import (
        DEFAULT_RANKINGS,
        PAPER_KS,
        aggregate,
        necessity_sufficiency,
        plot_ablation,
        save_ablation,
    )
    from repinf_lens.influence.attributor import as_rows
    from repinf_lens.workflows.attribution import build_attributor, prefilter_candidates
    from repinf_lens.workflows.config import AttributionConfig

    cfg = config or AttributionConfig()
    cfg.require_latents("run_faithfulness")
    check_int("run_faithfulness n_boot", n_boot, minimum=0, why="bootstrap resamples; 0 = no intervals")
    for k in ks or ():
        check_int("run_faithfulness ks entry", k, minimum=0, why="latents removed / kept")
    out = Path(out_dir)
    (out / "per_query").mkdir(parents=True, exist_ok=True)
    q_rows, t_rows = as_rows(queries, "query set"), as_rows(train, "training set")
    if shard is not None and not (len(shard) == 2 and 0 <= int(shard[0]) < int(shard[1])):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}. Fix: e.g. (0, 2).")
    ranking_names = list(rankings or DEFAULT_RANKINGS)
    ks = [int(k) for k in (ks or PAPER_KS) if int(k) <= split.d_sae] or [int(split.d_sae)]
    settings = json.loads(json.dumps({
        "config": {k: v for k, v in vars(cfg).items() if k not in _MEMORY_KNOBS},
        "rankings": ranking_names, "ks": ks, "n_boot": n_boot, "seed": seed,
        "hook": split.hook_name, "split": split.fingerprint(), "queries": [str(r.get("id")) for r in q_rows],
        "train": fingerprint_rows(t_rows),
    }, default=str))  # fmt: skip
    settings_path = out / "settings.json"
    if settings_path.exists():
        settings = _with_new_knobs_at_default(settings, json.loads(settings_path.read_text()), cfg)
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"{out} holds a faithfulness run with other settings (model, SAE, questions, training set "
                         "or config). Fix: pass a fresh out_dir, or delete the folder to start over.")  # fmt: skip
    write_json_atomic(settings_path, settings)  # several --shard processes may start at once
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pf = prefilter_candidates(split, q_rows, t_rows, cfg, sketch_dir=out / "sketches", timings=timings,
                              progress=progress)  # fmt: skip
    if pf is not None:
        cand_idx = [pf.indices[i].tolist() for i in range(len(q_rows))]
    else:
        cand_idx = [list(range(len(t_rows)))] * len(q_rows)
    att = build_attributor(split, cfg, t_rows, progress=progress)

    def table_of(i: int) -> Path:
        return out / "per_query" / f"{i:05d}.csv"

    mine = range(len(q_rows)) if shard is None else range(int(shard[0]), len(q_rows), int(shard[1]))
    todo = [i for i in mine if not table_of(i).exists()]
    t = time.perf_counter()
    if todo:
        # every remaining s_test in lockstep, cached on disk for the loop below (not held: 0.4 GB each at L8)
        att.s_test([q_rows[i] for i in todo], keep=att.cache is None)
    timings["s_test_s"] = round(time.perf_counter() - t, 1)
    t_att = t_abl = 0.0
    for i in tqdm(todo, desc="questions", disable=not progress):
        if table_of(i).exists():  # written meanwhile by another process sharing out_dir
            continue
        cands = [t_rows[j] for j in cand_idx[i]]
        t = time.perf_counter()
        res = att.attribute_streaming(
            [q_rows[i]], cands, out_dir=out / "results" / f"{i:05d}", shard_size=cfg.shard_size
        )
        t_att += time.perf_counter() - t
        t = time.perf_counter()
        df = necessity_sufficiency(split, split.task, [q_rows[i]], ranking_names, ks=ks, result=res, train=cands,
                                   n_boot=n_boot, seed=seed + i, progress=False)  # fmt: skip
        df["query"] = i
        t_abl += time.perf_counter() - t
        write_text_atomic(table_of(i), df.to_csv(index=False))
    timings["attribution_s"] = round(t_att, 1)
    timings["ablation_s"] = round(t_abl, 1)
    pending = [i for i in range(len(q_rows)) if not table_of(i).exists()]
    if pending:  # other shards are still working; the last one to finish aggregates
        return {"n_queries": len(q_rows), "pending": pending, "timings": timings, "verdicts": []}
    frames = [pd.read_csv(table_of(i)) for i in range(len(q_rows))]
    df = pd.concat(frames, ignore_index=True)
    df["query_id"] = df["query_id"].astype(str)
    df.attrs.update({"n_boot": int(n_boot), "seed": int(seed), "ks": ks, "n_queries": len(q_rows),
                     "d_sae": int(split.d_sae), "hook": split.hook_name, "rankings": ranking_names})  # fmt: skip
    agg = aggregate(df)
    files = save_ablation(df, out, agg)
    plot_ablation(agg, out / "ablation.png", title=f"{len(q_rows)} questions, {split.hook_name}")
    comp = compare_rankings(df, reference=ranking_names[0], n_boot=n_boot, seed=seed)
    comp.to_csv(out / "comparison.csv", index=False)
    verdicts = (
        comp.groupby(["mode", "error_term", "metric", "baseline"])["verdict"].value_counts().unstack(fill_value=0)
    )
    summary = {
        "n_queries": len(q_rows),
        "n_train": len(t_rows),
        "candidates_per_query": [len(c) for c in cand_idx],
        "hook_name": split.hook_name,
        "ks": ks,
        "rankings": ranking_names,
        "reference": ranking_names[0],
        "timings": {**timings, "total_s": round(time.perf_counter() - t0, 1)},
        "verdicts": [
            {
                **dict(zip(["mode", "error_term", "metric", "baseline"], key, strict=True)),
                **{str(c): int(v) for c, v in row.items()},
            }
            for key, row in verdicts.iterrows()
        ],
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json_atomic(out / "faithfulness.json", summary)
    write_manifest(out, "faithfulness", {**vars(cfg), "rankings": ranking_names, "ks": ks, "n_boot": n_boot},
                   n_queries=len(q_rows), timings=summary["timings"])  # fmt: skip
    return summary
