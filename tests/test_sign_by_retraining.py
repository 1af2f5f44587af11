"""benchmarks/sign_by_retraining.py end to end on a tiny model: removing top proponents raises the query loss."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    try:
        import sign_by_retraining
    finally:
        sys.path.remove(str(BENCH))
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("sign")
    try:
        # strong damping: theta2 moves little, so the first-order prediction is accurate
        argv = ["--tiny", "--n-train", "24", "--queries", "6", "--m", "3", "--damping", "1", "--max-iter", "50"]
        res = sign_by_retraining.main([*argv, "--n-boot", "500", "--quiet", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return res, out


def test_writes_json_and_markdown(result):
    res, out = result
    on_disk = json.loads((out / "sign_by_retraining.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key in ("summary", "per_query", "verdict", "spearman_pred_vs_actual", "pearson_pred_vs_actual", "scores",
                "seconds", "sign_convention", "n_train", "queries", "m", "damping", "complete"):  # fmt: skip
        assert key in res, key
    assert set(res["summary"]) >= {"proponents", "opponents", "random", "proponents - random", "opponents - random"}
    assert res["verdict"] in {"our sign is supported", "reversed", "undecided"} and res["complete"]
    md = (out / "sign_by_retraining.md").read_text()
    assert "Verdict" in md and res["verdict"] in md and len(re.findall(r"^\| q\d", md, re.M)) == res["queries"]


def test_groups_are_well_formed_and_finite(result):
    res, _ = result
    assert len(res["per_query"]) == res["queries"] == 6
    scores = torch.tensor(res["scores"])
    assert scores.shape == (6, 24)
    for q, row in enumerate(res["per_query"]):
        for g in ("proponents", "opponents", "random"):
            r = row[g]
            assert len(r["removed"]) == len(set(r["removed"])) == 3
            assert math.isfinite(r["delta"]) and math.isfinite(r["predicted"]) and r["theta2_shift_norm"] > 0
            assert r["predicted"] == pytest.approx(float(scores[q, r["removed"]].sum()) / 24, rel=1e-6)
        # the proponents are the largest scores, the opponents the smallest
        s = scores[q]
        assert min(s[row["proponents"]["removed"]]) >= s.sort(descending=True).values[2] - 1e-12
        assert max(s[row["opponents"]["removed"]]) <= s.sort().values[2] + 1e-12
    for g, r in res["summary"].items():
        assert math.isfinite(r["mean_delta"]) and r["ci95"][0] <= r["mean_delta"] <= r["ci95"][1], g


def test_predicted_and_actual_deltas_agree(result):
    res, _ = result
    # a wrong sign in the scores (or in the prediction) makes this strongly negative
    assert res["spearman_pred_vs_actual"] > 0.5, res["summary"]
    assert res["summary"]["proponents"]["mean_delta"] > res["summary"]["opponents"]["mean_delta"]
    assert res["verdict"] == "our sign is supported", res["summary"]
