"""The scale and prefilter benchmark scripts run end to end (tiny model) and write consistent results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_scale_tiny_multi_and_cg(tmp_path):
    import bench_scale

    out = tmp_path / "scale.json"
    res = bench_scale.main(["--tiny", "--sections", "multi,cg", "--threads", "1", "--out", str(out), "--work",
                            str(tmp_path / "w"), "--e2e-query-chunks", "1,8"])  # fmt: skip
    assert json.loads(out.read_text()) == res
    assert res["queries"] == 8 and res["n_train"] == 8 and res["sections_run"] == ["multi", "cg"]
    # batched and sequential scores agree, and so do lockstep and per-query CG
    assert res["batched_vs_sequential_max_rel_diff"] < 1e-4
    assert res["cg_batched_vs_sequential_max_rel_diff"] < 1e-4
    assert [r["query_chunk"] for r in res["attribute_all_queries"]] == [1, 8]
    assert res["batched_speedup"] == pytest.approx(res["sequential_s"] / res["batched_s"], rel=0.02)


def test_bench_prefilter_tiny(tmp_path):
    import bench_prefilter

    out = tmp_path / "prefilter.json"
    res = bench_prefilter.main(["--tiny", "--n-train", "120", "--check-queries", "4", "--dim", "1024", "--threads",
                                "1", "--store", str(tmp_path / "store"), "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == res
    assert res["n_train"] == 120 and res["check"]["n"] == 120 and res["check"]["queries"] == 4
    assert res["top_5pct_kept"] == 6
    assert 0.5 <= res["check"]["top_overlap"]["0.05"] <= 1.0 and res["check"]["spearman"] > 0.9
    assert res["prefilter_per_query_s"] == pytest.approx(res["query_sketch_s"] + res["match_cold_s"], abs=2e-3)
    # a rerun reuses the store: no example is sketched again
    again = bench_prefilter.main(["--tiny", "--n-train", "120", "--check-queries", "4", "--dim", "1024",
                                  "--threads", "1", "--store", str(tmp_path / "store"), "--out", str(out)])  # fmt: skip
    assert again["check"] == res["check"] and again["sketch_pass_runs"][-1]["computed"] == []


def test_run_all_rejects_unknown_benchmarks():
    import run_all

    with pytest.raises(SystemExit, match="Unknown benchmarks"):
        run_all.main(["--only", "engine,nope"])
    assert sys.modules["run_all"] is run_all
