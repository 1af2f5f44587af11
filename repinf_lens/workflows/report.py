"""The report stage: one self-contained HTML page per attribution (heatmaps, top examples and latents, plots).

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from repinf_lens._io import as_rows
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import SplitModel

__all__ = ["make_report"]


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
