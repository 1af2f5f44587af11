"""The attribution stage: prefilter (optional), solve s_test, score every candidate (streamed, resumable).

Each stage writes into its own folder with a ``manifest.json`` saying what produced it (arguments, inputs,
timings), and reuses finished work: sketches and attribution shards resume after a crash.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from repinf_lens._io import as_rows, write_manifest
from repinf_lens.influence.attributor import InfluenceAttributor
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import SplitModel
from repinf_lens.workflows.config import AttributionConfig, solver_from_config

__all__ = ["build_attributor", "prefilter_candidates", "run_attribution"]


def build_attributor(
    split: SplitModel, config: AttributionConfig | None = None, train: Any = None, *, progress: bool = True
) -> InfluenceAttributor:
    """The :class:`InfluenceAttributor` of ``config``, fitted on the first ``hessian_examples`` of ``train``
    when its solver needs Hessian data. Its s_test vectors are cached: scoring more training examples (e.g. a
    rationale-augmented copy) for the same queries later costs no new solve."""
    cfg = config or AttributionConfig()
    att = InfluenceAttributor(
        split,
        split.task,
        hessian=solver_from_config(cfg),
        batch_size=cfg.batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        query_chunk_size=cfg.query_chunk_size,
        progress=progress,
        latent_method=cfg.latent_method,
        ig_steps=cfg.ig_steps,
        ig_rule=cfg.ig_rule,
        baseline=cfg.baseline,
    )
    if att.solver.needs_hessian:
        if train is None:
            raise ValueError(f"The {cfg.solver} solver needs Hessian data. Fix: pass the training examples.")
        att.fit(as_rows(train, "training set")[: cfg.hessian_examples])
    return att


def prefilter_candidates(
    split: SplitModel,
    queries: Any,
    train: Any,
    config: AttributionConfig,
    *,
    sketch_dir: str | os.PathLike,
    timings: dict[str, float] | None = None,
    progress: bool = True,
    sketches: Any = None,
) -> Any:
    """Each query's most gradient-similar training examples per ``config`` (``prefilter_top_k`` /
    ``prefilter_fraction``), from sketches of ``train`` built once in ``sketch_dir``; ``None`` when the config
    asks for no prefilter. Adds ``sketches_s`` / ``prefilter_s`` to ``timings`` when given.

    ``sketches``: a prebuilt :class:`~repinf_lens.influence.prefilter.SketchStore` (or its folder, e.g. a shipped index)
    used read-only instead of building one in ``sketch_dir``. It must have been built for this split and exactly
    these training rows; otherwise a ``ValueError`` says what differs, before any gradient is taken.
    """
    if config.prefilter_fraction is None and config.prefilter_top_k is None:
        return None
    from repinf_lens.influence.prefilter import build_sketches, open_store, prefilter

    t = time.perf_counter()
    rows = as_rows(train, "training set")
    sketches = config.sketches if sketches is None else sketches
    if sketches is not None:
        store = open_store(sketches)
        store.check_rows(rows)
    else:
        store = build_sketches(split, split.task, rows, out_dir=sketch_dir, dim=config.sketch_dim,
                               batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens,
                               progress=progress)  # fmt: skip
    t1 = time.perf_counter()
    pf = prefilter(queries, store, split=split, top_fraction=config.prefilter_fraction, top_k=config.prefilter_top_k,
                   batch_size=config.batch_size)  # fmt: skip
    if timings is not None:
        timings["sketches_s"] = round(t1 - t, 2)
        timings["prefilter_s"] = round(time.perf_counter() - t1, 2)
    return pf


def run_attribution(
    split: SplitModel,
    queries: Any,
    train: Any,
    *,
    out_dir: str | os.PathLike,
    config: AttributionConfig | None = None,
    progress: bool = True,
    attributor: InfluenceAttributor | None = None,
    sketches: Any = None,
) -> tuple[InfluenceResult, list[dict[str, Any]]]:
    """Prefilter (optional), solve s_test, score every candidate (streamed, resumable) and save the result.

    Layout: ``out_dir/sketches`` (gradient sketches of the whole training set, computed once),
    ``out_dir/result`` (the :class:`InfluenceResult`, loadable with ``InfluenceResult.load``),
    ``out_dir/manifest.json``. Returns the result and the candidate training rows (in result order).
    ``attributor``: one from :func:`build_attributor` (to reuse its s_test afterwards); default: built here.
    ``sketches``: a prebuilt sketch store of ``train`` (see :func:`prefilter_candidates`), used read-only.
    """
    cfg = config or AttributionConfig()
    out = Path(out_dir)
    q_rows, t_rows = as_rows(queries, "query set"), as_rows(train, "training set")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    candidates = t_rows
    prefilter_info: dict[str, Any] | None = None
    pf = prefilter_candidates(split, q_rows, t_rows, cfg, sketch_dir=out / "sketches", timings=timings,
                              progress=progress, sketches=sketches)  # fmt: skip
    if pf is not None:
        keep = sorted({int(i) for i in pf.indices.flatten()})
        candidates = [t_rows[i] for i in keep]
        prefilter_info = {"per_query": pf.k, "union": len(keep), "n_train": len(t_rows)}
    t = time.perf_counter()
    att = attributor if attributor is not None else build_attributor(split, cfg, t_rows, progress=progress)
    timings["fit_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    result = att.attribute_streaming(q_rows, candidates, out_dir=out / "result", shard_size=cfg.shard_size)
    timings["attribute_s"] = round(time.perf_counter() - t, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    write_manifest(
        out,
        "attribute",
        asdict(cfg),
        hook_name=split.hook_name,
        n_queries=len(q_rows),
        n_candidates=len(candidates),
        prefilter=prefilter_info,
        timings=timings,
        query_ids=[str(r.get("id")) for r in q_rows],
    )
    return result, candidates
