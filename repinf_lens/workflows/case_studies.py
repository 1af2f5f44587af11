"""Case studies (the paper's Sec. 5.5): test questions the finetune fixed, their top training examples, latents
and tokens, and a rationale-augmented variant of the top proponent.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from repinf_lens._io import write_json_atomic, write_manifest
from repinf_lens.analysis.case_studies import (
    added_tokens_share,
    default_rationale,
    select_queries,
    top_activating_tokens,
    with_rationale,
)
from repinf_lens.errors import check_int

__all__ = ["run_case_studies"]


def run_case_studies(
    split: Any,
    test: Any,
    train: Any,
    *,
    out_dir: str | os.PathLike,
    predictions_before: Mapping[str, Any],
    predictions_after: Mapping[str, Any],
    n_cases: int = 3,
    config: Any = None,
    top_examples: int = 5,
    top_latents: int = 5,
    rationale: Callable[[Mapping[str, Any]], str] | None = None,
    progress: bool = True,
    title: str = "repinf_lens case studies",
) -> dict[str, Any]:
    """Case studies for ``n_cases`` test questions chosen by :func:`select_queries`.

    Args:
        split: the finetuned :class:`~repinf_lens.split.SplitModel` (with its task).
        test: the evaluated test rows (the ids of the prediction records).
        train: the training examples attributed (e.g. the finetuning set).
        out_dir: output folder (``attribution/``, ``case_studies.json``, ``case_studies.html``).
        predictions_before / predictions_after: records of :func:`prediction_record` (base / finetuned model).
        config: :class:`repinf_lens.workflows.AttributionConfig` (prefilter, solver...).
        rationale: ``row -> text`` appended to the top proponent (default :func:`default_rationale`).

    Returns:
        The summary written to ``case_studies.json``.
    """
    from repinf_lens.influence.attributor import as_rows
    from repinf_lens.viz.report import (
        attribution_section,
        build_report,
        question_section,
        table_section,
        top_examples_section,
        top_latents_section,
    )
    from repinf_lens.viz.tokens import example_token_attribution, query_token_attribution
    from repinf_lens.workflows.attribution import build_attributor, run_attribution
    from repinf_lens.workflows.config import AttributionConfig

    out = Path(out_dir)
    cfg = config or AttributionConfig()
    cfg.require_latents("run_case_studies")
    for name, value in (("n_cases", n_cases), ("top_examples", top_examples), ("top_latents", top_latents)):
        check_int(f"run_case_studies {name}", value, minimum=1)
    t0 = time.perf_counter()
    test_rows = {str(r["id"]): r for r in as_rows(test, "test set")}
    t_rows = as_rows(train, "training set")
    ids = [str(i) for i in predictions_after["ids"]]
    if [str(i) for i in predictions_before["ids"]] != ids:
        raise ValueError("predictions_before and predictions_after cover different questions. Fix: evaluate both "
                         "models on the same test rows.")  # fmt: skip
    missing = [i for i in ids if i not in test_rows]
    if missing:
        raise ValueError(f"Prediction records name test ids {missing[:5]} that are not in `test`.")
    picked, why = select_queries(ids, predictions_before["correct"], predictions_after["correct"], n_cases)
    queries = [test_rows[ids[i]] for i in picked]
    att = build_attributor(split, cfg, t_rows, progress=progress)
    result, candidates = run_attribution(
        split, queries, t_rows, out_dir=out / "attribution", config=cfg, progress=progress, attributor=att
    )
    task = split.task
    tok = getattr(task, "tokenizer", None)
    make_rationale = rationale or default_rationale
    sections = []
    cases = []
    for q, (i, reason) in enumerate(zip(picked, why, strict=True)):
        row = queries[q]
        qid = str(row["id"])
        p_before, p_after = predictions_before["predictions"][i], predictions_after["predictions"][i]
        sections.append(question_section(row, title=f"Case {q + 1}: test question {qid} ({reason})",
                                         prediction_before=p_before, prediction_after=p_after))  # fmt: skip
        sections.append(attribution_section(f"Test input tokens ({qid})", query_token_attribution(split, task, row)))
        sections.append(top_examples_section(result, q, k=top_examples, train_rows=candidates, tokenizer=tok))
        sections.append(top_latents_section(result, q, k=top_latents))
        lat_df = result.top_latents(q, top_latents)
        acts = top_activating_tokens(split, candidates, [int(j) for j in lat_df["latent"]], k=3)
        lat_rows = [
            {"latent": j, "mean IFR": float(s), "top-activating tokens among the candidates":
             " | ".join(f"{a['context']} ({a['activation']:.2f}, {a['id']})" for a in acts[int(j)]) or "(never fires)"}
            for j, s in zip(lat_df["latent"], lat_df["score"], strict=True)
        ]  # fmt: skip
        sections.append(table_section(f"What the top latents of {qid} respond to", lat_rows))
        top = result.top_examples(q, top_examples)
        best = int(top["index"][0])
        orig = candidates[best]
        text = make_rationale(orig)
        aug = with_rationale(orig, text)
        pair = att.attribute([row], [orig, aug])  # same s_test: cached in the attributor, no new solve
        before_attr = example_token_attribution(pair, 0, 0, tok)
        after_attr = example_token_attribution(pair, 0, 1, tok)
        aug_rec = {
            "example": str(orig.get("id")),
            "rationale": text,
            "score": float(pair.example_scores[0, 0]),
            "score_with_rationale": float(pair.example_scores[0, 1]),
            "rationale_tokens_share": added_tokens_share(after_attr, before_attr),
        }
        sections.append(table_section(f"Reasoning augmentation for {qid} (paper Case Study D)", [aug_rec]))
        sections.append(attribution_section(f"{orig.get('id')} as trained", before_attr, switcher=False))
        sections.append(attribution_section(f"{orig.get('id')} with the rationale appended", after_attr,
                                            switcher=False))  # fmt: skip
        cases.append(
            {
                "query": qid,
                "why": reason,
                "prediction_before": predictions_before["predictions"][i],
                "prediction_after": predictions_after["predictions"][i],
                "answer": int(row["answer"]),
                "top_examples": [{"id": e, "score": float(s)} for e, s in zip(top["id"], top["score"], strict=True)],
                "top_latents": [
                    {"latent": int(j), "mean_ifr": float(s), "top_tokens": acts[int(j)]}
                    for j, s in zip(lat_df["latent"], lat_df["score"], strict=True)
                ],
                "augmentation": aug_rec,
            }
        )
    report = build_report(out / "case_studies.html", title=title, sections=sections)
    summary = {
        "hook_name": split.hook_name,
        "n_candidates": len(candidates),
        "cases": cases,
        "report": str(report),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "case_studies.json", summary)
    write_manifest(out, "case-studies", {"n_cases": n_cases, **vars(cfg)}, seconds=summary["seconds"])
    return summary
