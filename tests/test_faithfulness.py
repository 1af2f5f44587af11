"""Faithfulness over many questions: per-question candidates, ablations, verdicts, resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import repinf_lens.analysis.ablation as ablation
from repinf_lens import InfluenceResult, SplitModel
from repinf_lens.analysis.faithfulness import compare_rankings
from repinf_lens.influence.prefilter import SketchStore, prefilter
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows
from repinf_lens.workflows import AttributionConfig
from repinf_lens.workflows.faithfulness import run_faithfulness

HOOK = "blocks.0.hook_resid_post"


def _table(values: dict[str, list[float]], mode="necessity", metric="delta_logit"):
    rows = []
    for ranking, vals in values.items():
        for q, v in enumerate(vals):
            rows.append({"ranking": ranking, "k": 5, "mode": mode, "error_term": True, "query_id": f"q{q}",
                         metric: v})  # fmt: skip
    return pd.DataFrame(rows)


def test_compare_rankings_verdicts_follow_the_direction():
    df = _table({"influence": [-3.0, -2.5, -2.8, -3.1], "random": [-0.1, 0.0, -0.2, 0.1],
                 "activation": [-3.0, -2.5, -2.8, -3.1], "frequency": [0.0, 0.0, 0.0, 0.1]})  # fmt: skip
    comp = compare_rankings(df, better={"necessity": {"delta_logit": "lower"}}, n_boot=500)
    verdict = dict(zip(comp["baseline"], comp["verdict"]))
    assert verdict == {"random": "better", "activation": "tie", "frequency": "better"}
    row = comp[comp["baseline"] == "random"].iloc[0]
    assert row["difference"] == pytest.approx(-2.85 - (-0.05))  # mean of per-question differences
    assert row["reference_mean"] == pytest.approx(-2.85) and row["n"] == 4
    suff = compare_rankings(_table({"influence": [0.0, 0.1, 0.0, 0.1], "random": [1.0, 1.2, 0.9, 1.1]}, "sufficiency"),
                            better={"sufficiency": {"delta_logit": "higher"}}, n_boot=500)  # fmt: skip
    assert list(suff["verdict"]) == ["worse"]


def test_run_faithfulness_per_question_candidates_and_resume(tmp_path, monkeypatch):
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=3)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4, seed=2))
    queries, train = toy_mcqa_rows(4, seed=5, prefix="t"), toy_mcqa_rows(12, seed=6, prefix="tr")
    cfg = AttributionConfig(solver="cg", max_iter=2, hessian_examples=4, batch_size=4, prefilter_top_k=4,
                            sketch_dim=64)  # fmt: skip
    kw = dict(out_dir=tmp_path, config=cfg, ks=(2, 4, 99), n_boot=50, progress=False)
    summary = run_faithfulness(split, queries, train, **kw)
    assert summary["n_queries"] == 4 and summary["candidates_per_query"] == [4, 4, 4, 4]
    assert summary["ks"] == [2, 4]  # 99 > d_sae is dropped
    pf = prefilter(queries, SketchStore.load(tmp_path / "sketches"), split=split, top_k=4)
    for i in range(4):  # each question was scored over exactly its own top-4 candidates
        res = InfluenceResult.load(tmp_path / "results" / f"{i:05d}")
        assert res.query_ids == [queries[i]["id"]]
        assert res.train_ids == [train[j]["id"] for j in pf.indices[i].tolist()]
    per_query = pd.read_csv(tmp_path / "ablation_per_query.csv")
    assert len(per_query) == 5 * 2 * 2 * 2 * 4  # rankings (DEFAULT_RANKINGS) x ks x modes x error term x questions
    assert sorted(per_query["query"].unique()) == [0, 1, 2, 3]
    comp = pd.read_csv(tmp_path / "comparison.csv")
    assert set(comp["baseline"]) == {"influence", "activation", "frequency", "random"}  # vs influence_eq16
    assert set(comp["verdict"]) <= {"better", "worse", "tie"} and (tmp_path / "ablation.png").exists()
    assert json.loads((tmp_path / "faithfulness.json").read_text())["n_queries"] == 4
    # resume: only the question whose table is missing is ablated again
    (tmp_path / "per_query" / "00002.csv").unlink()
    calls = []
    real = ablation.necessity_sufficiency

    def counting(*a, **k):
        calls.append(a[2][0]["id"])
        return real(*a, **k)

    monkeypatch.setattr(ablation, "necessity_sufficiency", counting)
    again = run_faithfulness(split, queries, train, **kw)
    assert calls == [queries[2]["id"]]
    after = pd.read_csv(tmp_path / "ablation_per_query.csv")
    pd.testing.assert_frame_equal(after, per_query)
    assert again["verdicts"] == summary["verdicts"]
    with pytest.raises(ValueError, match="other settings"):  # never mixes tables of two different runs
        run_faithfulness(split, queries, train, **{**kw, "ks": (2,)})
    # a folder written before a knob existed (here: preconditioner) resumes when the knob is at its default ...
    stored = json.loads((tmp_path / "settings.json").read_text())
    del stored["config"]["preconditioner"]
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    assert run_faithfulness(split, queries, train, **kw)["verdicts"] == summary["verdicts"]
    # ... and is refused when it is not
    with pytest.raises(ValueError, match="other settings"):
        run_faithfulness(split, queries, train, **{**kw, "config": AttributionConfig(
            **{**vars(cfg), "preconditioner": "ekfac"})})  # fmt: skip


def test_run_faithfulness_shards_share_one_folder_and_equal_a_single_run(tmp_path):
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=3)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4, seed=2))
    queries, train = toy_mcqa_rows(5, seed=5, prefix="t"), toy_mcqa_rows(12, seed=6, prefix="tr")
    cfg = AttributionConfig(solver="cg", max_iter=2, hessian_examples=4, batch_size=4, prefilter_top_k=4,
                            sketch_dim=64)  # fmt: skip
    kw = dict(config=cfg, ks=(2, 4), n_boot=50, progress=False)
    single = run_faithfulness(split, queries, train, out_dir=tmp_path / "single", **kw)
    first = run_faithfulness(split, queries, train, out_dir=tmp_path / "shared", shard=(1, 2), **kw)
    assert first["pending"] == [0, 2, 4] and not (tmp_path / "shared" / "faithfulness.json").exists()
    assert sorted(p.name for p in (tmp_path / "shared" / "per_query").glob("*.csv")) == ["00001.csv", "00003.csv"]
    # the memory knob may differ between processes sharing the folder
    small_chunks = {**kw, "config": AttributionConfig(**{**vars(cfg), "query_chunk_size": 1})}
    last = run_faithfulness(split, queries, train, out_dir=tmp_path / "shared", shard=(0, 2), **small_chunks)
    assert "pending" not in last and last["verdicts"] == single["verdicts"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "shared" / "ablation_per_query.csv"),
        pd.read_csv(tmp_path / "single" / "ablation_per_query.csv"),
    )
    with pytest.raises(ValueError, match="shard must be"):
        run_faithfulness(split, queries, train, out_dir=tmp_path / "shared", shard=(2, 2), **kw)


def test_attribution_config_builds_the_solver_it_names():
    from repinf_lens.cli import build_parser
    from repinf_lens.workflows import solver_from_config as _solver

    cg = _solver(AttributionConfig(solver="cg", damping=1.0, gauss_newton=True, max_iter=7, batch_size=3))
    assert (type(cg).__name__, cg.damping, cg.gauss_newton, cg.max_iter, cg.batch_size) == ("CG", 1.0, True, 7, 3)
    assert _solver(AttributionConfig()).gauss_newton is False
    args = build_parser().parse_args(["faithfulness", "--sae", "x", "--gauss-newton", "--damping", "1"])
    assert args.gauss_newton and args.damping == 1.0
