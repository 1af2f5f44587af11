"""The main job's stages as functions: attribution (with the gradient prefilter), ablations and the HTML report.

Thin orchestration over the public API, shared by the ``repinf-lens`` subcommands and ``demo``. Each stage
writes into its own folder with a ``manifest.json`` saying what produced it (arguments, inputs, timings), and
reuses finished work: sketches and attribution shards resume after a crash, a finished ablation is reread.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from repinf_lens._io import write_json_atomic
from repinf_lens.curvature.solvers import InverseHessianSolver, build_solver, get_solver_class
from repinf_lens.errors import SettingsError, check_float, check_int
from repinf_lens.influence.attributor import InfluenceAttributor, as_rows
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import SplitModel

__all__ = [
    "AttributionConfig",
    "build_attributor",
    "make_report",
    "prefilter_candidates",
    "run_ablation",
    "run_attribution",
    "write_manifest",
]


def write_manifest(folder: str | os.PathLike, stage: str, args: dict[str, Any], **extra: Any) -> Path:
    """Write ``folder/manifest.json``: which stage, with which arguments, produced the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from repinf_lens._version import __version__

    rec = {"stage": stage, "repinf_lens": __version__, "args": args, **extra}
    write_json_atomic(folder / "manifest.json", rec)
    return folder / "manifest.json"


@dataclass
class AttributionConfig:
    """Knobs of :func:`run_attribution` (saved in the manifest).

    ``solver`` names a solver of :mod:`repinf_lens.curvature` (``cg``, ``lissa``, ``explicit``, ``identity``);
    ``gauss_newton`` uses the PSD Gauss-Newton curvature (with few Hessian examples the exact Hessian of the real
    model is indefinite and CG meets negative curvature within a few iterations; then use it with damping ~1);
    ``hessian_examples`` training examples define H. With ``prefilter_fraction`` / ``prefilter_top_k`` the
    candidates are the union over queries of each query's most gradient-similar training examples.
    ``sketches``: a prebuilt sketch store (a folder, or the name of an index shipped in the package, e.g.
    ``"smollm2-135m-openbookqa-L22"``) used read-only instead of sketching the training set (checked against
    the split and the training rows before use).

    Impossible values (``max_iter=0``, a negative ``damping``, ``batch_size=0``, a ``prefilter_fraction``
    outside (0, 1], both prefilter knobs at once, ...) raise :class:`~repinf_lens.errors.SettingsError` here,
    before any model or data is touched.
    """

    solver: str = "cg"
    damping: float = 1e-3
    gauss_newton: bool = False
    max_iter: int = 20
    hessian_examples: int = 64
    prefilter_fraction: float | None = None
    prefilter_top_k: int | None = None
    sketch_dim: int = 4096
    sketches: str | None = None
    batch_size: int = 8
    shard_size: int = 256
    query_chunk_size: int | None = 8

    def __post_init__(self) -> None:
        get_solver_class(self.solver, setting="AttributionConfig solver")  # any solver registered by now
        check_float(
            "AttributionConfig damping", self.damping, minimum=0.0,
            fix="pass damping >= 0 (the paper: 1e-3; about 1 with gauss_newton=True).",
        )  # fmt: skip
        check_int(
            "AttributionConfig max_iter", self.max_iter, minimum=1,
            why="CG iterations / LiSSA depth; none leaves s_test = 0 and every score 0",
            fix="pass max_iter=20 (the paper) or another count >= 1; solver='identity' skips the curvature.",
        )  # fmt: skip
        check_int("AttributionConfig hessian_examples", self.hessian_examples, minimum=1,
                  why="the training examples whose mean loss defines H")  # fmt: skip
        check_float(
            "AttributionConfig prefilter_fraction", self.prefilter_fraction, minimum=0.0, inclusive=False,
            maximum=1.0, allow_none=True,
            fix="pass a share in (0, 1], e.g. 0.05 keeps each query's top 5 % (the paper: 0.01-0.1), or None.",
        )  # fmt: skip
        check_int("AttributionConfig prefilter_top_k", self.prefilter_top_k, minimum=1, allow_none=True)
        if self.prefilter_fraction is not None and self.prefilter_top_k is not None:
            raise SettingsError(
                f"AttributionConfig got both prefilter_fraction={self.prefilter_fraction} and prefilter_top_k="
                f"{self.prefilter_top_k}. Fix: pass only one of them (or neither, for no prefilter)."
            )
        check_int("AttributionConfig sketch_dim", self.sketch_dim, minimum=1)
        check_int("AttributionConfig batch_size", self.batch_size, minimum=1)
        check_int("AttributionConfig shard_size", self.shard_size, minimum=1)
        check_int("AttributionConfig query_chunk_size", self.query_chunk_size, minimum=1, allow_none=True,
                  fix="pass query_chunk_size >= 1, or None for all queries at once.")  # fmt: skip


def _solver(cfg: AttributionConfig) -> InverseHessianSolver:
    """The registered solver ``cfg.solver`` built from the config's generic knobs (each solver takes its own:
    ``config_knobs``, e.g. LiSSA reads ``max_iter`` as its depth, Identity reads none)."""
    return build_solver(
        cfg.solver, damping=cfg.damping, gauss_newton=cfg.gauss_newton, max_iter=cfg.max_iter,
        batch_size=cfg.batch_size,
    )  # fmt: skip


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
        hessian=_solver(cfg),
        batch_size=cfg.batch_size,
        query_chunk_size=cfg.query_chunk_size,
        progress=progress,
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
                               batch_size=config.batch_size, progress=progress)  # fmt: skip
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


def make_report(
    path: str | os.PathLike,
    *,
    split: SplitModel,
    queries: Any,
    result: InfluenceResult,
    train: Any = None,
    predictions_before: dict[str, Any] | None = None,
    ablation_plot: str | os.PathLike | None = None,
    sweep_plot: str | os.PathLike | None = None,
    tables: dict[str, Any] | None = None,
    top_examples: int = 5,
    top_latents: int = 10,
    max_queries: int = 3,
    title: str = "repinf_lens report",
) -> Path:
    """One self-contained HTML page: per query the question, predictions, the test input's token heatmap, the
    top training examples with heatmaps and the top latents; then plots (ablation, sweep) and tables."""
    from repinf_lens.task import supports
    from repinf_lens.viz.report import (
        attribution_section,
        build_report,
        image_section,
        question_section,
        table_section,
        top_examples_section,
        top_latents_section,
    )
    from repinf_lens.viz.tokens import query_token_attribution

    task = split.task
    q_rows = as_rows(queries, "query set")
    by_id = {str(r.get("id")): r for r in q_rows}
    train_rows = as_rows(train, "training set") if train is not None else None
    sections = []
    for q, qid in enumerate(result.query_ids[:max_queries]):
        row = by_id.get(qid, q_rows[q] if q < len(q_rows) else None)
        if row is None:
            continue
        batch = task.collate([row]).to(split.device)
        with torch.no_grad():
            logits = task.model_logits(split.model, batch)
        after: Any = None
        if supports(task, "predictions"):
            after = int(task.predictions(logits, batch)[0])
        elif supports(task, "correct"):
            after = "correct" if bool(task.correct(logits, batch)[0]) else "wrong"
        before = (predictions_before or {}).get(qid)
        sections.append(question_section(row, title=f"Test question {qid}", prediction_before=before,
                                         prediction_after=after, prompt_field=getattr(task, "prompt_field", "prompt"),
                                         target_field=getattr(task, "target_field", "target")))  # fmt: skip
        sections.append(attribution_section(f"Test input tokens ({qid})", query_token_attribution(split, task, row)))
        sections.append(top_examples_section(result, q, k=top_examples, train_rows=train_rows,
                                             tokenizer=getattr(task, "tokenizer", None)))  # fmt: skip
        sections.append(top_latents_section(result, q, k=top_latents))
    if ablation_plot is not None and Path(ablation_plot).exists():
        sections.append(image_section("Necessity and sufficiency ablations", Path(ablation_plot)))
    if sweep_plot is not None and Path(sweep_plot).exists():
        sections.append(image_section("Layer sweep: accuracy change when the SAE is inserted", Path(sweep_plot)))
    for name, rows in (tables or {}).items():
        sections.append(table_section(name, rows))
    return build_report(path, title=title, sections=sections)
