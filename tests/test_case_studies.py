"""Case studies (paper Sec. 5.5, Case Study D) on a tiny random model: selection, scores, tokens, rationale."""

from __future__ import annotations

import json
import re

import pytest
import torch

from repinf_lens import CG, InfluenceAttributor, SplitModel
from repinf_lens.analysis.case_studies import (
    added_tokens_share,
    cached_predictions,
    default_rationale,
    top_activating_tokens,
    with_rationale,
)
from repinf_lens.analysis.rankings import latents_of_tokens
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows
from repinf_lens.workflows import AttributionConfig, run_case_studies

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def split():
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=2)
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=24, k=4, seed=0))


def test_rationale_helpers():
    row = {"id": "t1", "question": "What melts ice? ", "choices": ["heat", "cold"], "answer": 0}
    assert default_rationale(row) == "The correct option is A, heat."
    assert default_rationale({**row, "fact1": "heat melts ice"}) == "heat melts ice"
    aug = with_rationale(row, "heat melts ice")
    assert aug["question"] == "What melts ice? Reasoning: heat melts ice" and aug["id"] == "t1+rationale"
    assert row["question"] == "What melts ice? "  # the original is untouched


def test_cached_predictions_recompute_only_for_another_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"accuracy": 0.5}

    path = tmp_path / "p.json"
    assert cached_predictions(path, {"m": 1}, compute)["accuracy"] == 0.5
    cached_predictions(path, {"m": 1}, compute)
    assert len(calls) == 1
    cached_predictions(path, {"m": 2}, compute)
    assert len(calls) == 2 and json.loads(path.read_text())["key"] == {"m": 2}


def test_top_activating_tokens_equal_an_independent_computation(split):
    rows = toy_mcqa_rows(6, seed=1)
    got = top_activating_tokens(split, rows, [0, 5, 11], k=3, batch_size=4)
    batch = split.task.collate(rows)
    acts = latents_of_tokens(split, batch.tokens) * batch.attention_mask[..., None]
    for j in (0, 5, 11):
        want = torch.sort(acts[..., j].flatten(), descending=True).values
        want = want[want > 0][:3]
        assert [round(a["activation"], 5) for a in got[j]] == [round(float(v), 5) for v in want]
        for a in got[j]:
            b = [str(r["id"]) for r in rows].index(a["id"])
            assert acts[b, a["position"], j].item() == pytest.approx(a["activation"], rel=1e-5)
            assert f"[{a['token']}]" in a["context"]


def test_run_case_studies_end_to_end(split, tmp_path):
    test = toy_mcqa_rows(6, seed=3, prefix="t")
    train = toy_mcqa_rows(10, seed=4, prefix="tr")
    ids = [r["id"] for r in test]
    before = {"ids": ids, "predictions": [0, 1, 2, 3, 0, 1], "correct": [True, False, False, True, False, False]}
    after = {"ids": ids, "predictions": [0, 1, 2, 3, 0, 1], "correct": [True, True, False, False, True, False]}
    cfg = AttributionConfig(solver="cg", max_iter=4, hessian_examples=6, batch_size=4, prefilter_top_k=None)
    summary = run_case_studies(split, test, train, out_dir=tmp_path, predictions_before=before,
                               predictions_after=after, n_cases=3, config=cfg, top_examples=3, top_latents=4,
                               progress=False)  # fmt: skip
    cases = summary["cases"]
    # the paper's protocol first: wrong before and right after (t1, t4), then right after (t0)
    assert [c["query"] for c in cases] == [ids[1], ids[4], ids[0]]
    assert [c["why"] for c in cases] == ["wrong before, right after"] * 2 + ["right after"]
    # the top examples and the rationale score against an independent attributor with the same solver
    ref = InfluenceAttributor(split, split.task, hessian=CG(damping=cfg.damping, max_iter=4, batch_size=4),
                              batch_size=4, progress=False).fit(train[:6])  # fmt: skip
    queries = [test[1], test[4], test[0]]
    res = ref.attribute(queries, train)
    for q, case in enumerate(cases):
        order = torch.argsort(res.example_scores[q], descending=True)[:3].tolist()
        assert [e["id"] for e in case["top_examples"]] == [train[i]["id"] for i in order]
        torch.testing.assert_close(torch.tensor([e["score"] for e in case["top_examples"]]),
                                   res.example_scores[q, order], rtol=1e-4, atol=1e-6)  # fmt: skip
        best = train[order[0]]
        aug = with_rationale(best, default_rationale(best))
        pair = ref.attribute([queries[q]], [best, aug])
        assert case["augmentation"]["example"] == best["id"]
        assert case["augmentation"]["score"] == pytest.approx(float(pair.example_scores[0, 0]), rel=1e-4, abs=1e-6)
        assert case["augmentation"]["score_with_rationale"] == pytest.approx(
            float(pair.example_scores[0, 1]), rel=1e-4, abs=1e-6
        )
        assert 0.0 < case["augmentation"]["rationale_tokens_share"] < 1.0
        top_lat = (-res.latent_scores[q].mean(0)).topk(4).indices.tolist()  # most negative mean IFR first
        assert [t["latent"] for t in case["top_latents"]] == top_lat
    html = (tmp_path / "case_studies.html").read_text()
    assert html.count("Case ") >= 3 and "Reasoning augmentation" in html and "with the rationale appended" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)
    with pytest.raises(ValueError, match="different questions"):
        run_case_studies(split, test, train, out_dir=tmp_path / "x", predictions_before={**before, "ids": ids[::-1]},
                         predictions_after=after, config=cfg, progress=False)  # fmt: skip


def test_added_tokens_share_counts_the_inserted_tokens():
    from types import SimpleNamespace

    without = SimpleNamespace(token_ids=[1, 2, 3, 9], values=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    with_r = SimpleNamespace(token_ids=[1, 2, 3, 7, 8, 9], values=torch.tensor([1.0, 1.0, 1.0, 3.0, -2.0, 2.0]))
    assert added_tokens_share(with_r, without) == pytest.approx(5.0 / 10.0)
    assert added_tokens_share(without, without) == 0.0
