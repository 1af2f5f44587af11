"""`run_demo` (the main job) end to end on a tiny local model, and its reuse of finished stages."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess

import numpy as np
import pytest

from repinf_lens.analysis.case_studies import select_queries
from repinf_lens.errors import SettingsError
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.testing import tiny_hf_llama, toy_mcqa_rows
from repinf_lens.workflows.demo import DemoConfig, run_demo


def test_select_queries_prefers_the_paper_protocol():
    ids = ["a", "b", "c", "d", "e"]
    before = [True, False, False, True, False]
    after = [True, False, True, False, True]
    picked, why = select_queries(ids, before, after, 4)
    assert picked == [2, 4, 0, 1]
    assert why == ["wrong before, right after"] * 2 + ["right after", "other"]
    assert select_queries(ids, before, after, 9)[0] == [2, 4, 0, 1, 3]  # never more than there are


def test_demo_config_files(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("n_eval: 7\nks: [3, 5]\n")
    cfg = DemoConfig.from_file(path, quick=True)
    assert cfg.n_eval == 7 and cfg.ks == (3, 5) and cfg.n_queries == DemoConfig.quick().n_queries == 2
    (tmp_path / "bad.json").write_text(json.dumps({"n_evals": 3}))
    with pytest.raises(ValueError, match="n_evals"):
        DemoConfig.from_file(tmp_path / "bad.json")
    # ONE AttributionConfig: its fields given flat or nested replace the demo's, the rest of it is kept
    path.write_text("max_iter: 3\nattribution:\n  damping: 0.5\n")
    cfg = DemoConfig.from_file(path)
    assert (cfg.attribution.max_iter, cfg.attribution.damping) == (3, 0.5)
    assert cfg.attribution.sketches == DemoConfig().attribution.sketches == "smollm2-135m-openbookqa-L22"
    assert DemoConfig.quick().attribution.max_iter == 2 and DemoConfig.quick(max_iter=4).attribution.max_iter == 4
    (tmp_path / "old.json").write_text(json.dumps({"cg_iters": 3}))
    with pytest.raises(SettingsError, match="cg_iters -> max_iter"):
        DemoConfig.from_file(tmp_path / "old.json")
    with pytest.raises(SettingsError, match="max_iter"):  # checked by the AttributionConfig itself
        DemoConfig.build(max_iter=0)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    folder = tmp / "tiny"
    tiny_hf_llama(folder, initializer_range=0.2)
    rows = toy_mcqa_rows(40)
    cfg = DemoConfig.quick(retrain=True, n_eval=8, n_train=12, finetune_epochs=1.0, finetune_lr=4e-4,
                           finetune_batch_size=4, finetune_micro_batch_size=4, d_sae=16, k=3, n_sae_prompts=24,
                           sae_epochs=2.0, prefilter_top_k=5, sketch_dim=256, max_iter=2, hessian_examples=4,
                           ks=(2, 4, 64), n_boot=20, ortho_tokens=256)  # fmt: skip
    logs: list[str] = []
    kwargs = dict(model=folder, train=rows[:24], test=rows[24:], progress=False)
    res = run_demo(tmp / "demo", cfg, log=logs.append, **kwargs)
    return tmp / "demo", cfg, kwargs, res, logs


def test_run_demo_tiny_end_to_end(tiny_demo):
    out, _, _, res, logs = tiny_demo
    summary = json.loads((out / "demo.json").read_text())
    assert summary["hook_name"] == "blocks.1.hook_resid_post" and summary["n_eval"] == 8
    assert len(summary["queries"]) == 2
    assert 5 <= summary["n_candidates"] <= 10  # union of each query's top 5 of the 12 attributed examples
    assert summary["n_train"] == 12
    result = InfluenceResult.load(out / "attribution" / "result")
    assert result.query_ids == [q["query"] for q in summary["queries"]] and result.n_train == summary["n_candidates"]
    ablation = (out / "ablation" / "ablation_per_query.csv").read_text().splitlines()
    n_rankings = len(DemoConfig.quick().rankings)
    assert len(ablation) - 1 == n_rankings * 2 * 2 * 2 * 2  # rankings x ks (64 > d_sae dropped) x modes x error x q
    html = res.report.read_text()
    for needle in (
        "Test question",
        "Accuracy",
        "Layer sweep",
        "Orthogonality",
        "Necessity and sufficiency",
        "Completeness",
        "Ablation verdicts",
        "respond to",
        "peak memory per stage",
    ):
        assert needle in html
    # every stage has its time and its own peak RSS (a positive number of MB, at least the loaded model's size)
    stages = summary["stages"]
    assert {"zero_shot_eval", "finetuned_model", "sae", "attribution", "ablation", "report"} <= set(stages)
    assert all(s["peak_rss_mb"] > 50 and s["seconds"] >= 0 for s in stages.values())
    assert summary["peak_rss_mb"] == max(s["peak_rss_mb"] for s in stages.values())
    # completeness rows: P(0) was scored for every pair (the demo turns baseline on), and the completeness column
    # is the latent sum over what the latents have to explain, score - P(0)
    for row in summary["completeness"]:
        p0, score = row["P(0): all latents off"], row["example score"]
        assert math.isfinite(p0) and math.isfinite(row["latent sum"])
        want = row["latent sum"] / (score - p0)
        assert abs(row["latent sum / (score - P(0))"] - want) <= 1e-9 * max(1.0, abs(want))
    assert not re.search(r"""(src|href)=["']https?://""", html)  # self-contained: nothing fetched
    assert any("report:" in line for line in logs)


def test_run_demo_rerun_reuses_every_stage(tiny_demo):
    out, cfg, kwargs, _, _ = tiny_demo
    summary = json.loads((out / "demo.json").read_text())
    shards = sorted((out / "attribution" / "result" / "shards").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in [*shards, out / "finetune" / "finetune.json"]}
    run_demo(out, cfg, log=lambda _: None, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in [*shards, out / "finetune" / "finetune.json"]} == stamps
    again = json.loads((out / "demo.json").read_text())
    assert again["queries"] == summary["queries"] and again["accuracy_finetuned"] == summary["accuracy_finetuned"]
    assert again["timings"]["finetuned_model_s"] < summary["timings"]["finetuned_model_s"]


def test_run_demo_with_an_adapter_trained_elsewhere_merges_it_instead_of_finetuning(tiny_demo, tmp_path):
    out, cfg, kwargs, _, _ = tiny_demo
    adapter = out / "finetune" / "adapter"  # stands for an adapter trained on another machine
    res = run_demo(tmp_path / "d", dataclasses.replace(cfg, adapter=str(adapter)), log=lambda _: None, **kwargs)
    assert not (tmp_path / "d" / "finetune").exists()  # no CPU finetune ran
    merged = json.loads((tmp_path / "d" / "adapter_merge" / "merge.json").read_text())
    assert merged["adapter_sha256"] == json.loads((out / "finetune" / "finetune.json").read_text())["adapter_sha256"]
    first = json.loads((out / "demo.json").read_text())
    # the same adapter gives the same finetuned model, so the same predictions and accuracy
    assert res.summary["accuracy_finetuned"] == first["accuracy_finetuned"]
    assert res.summary["config"]["adapter"] == str(adapter) and res.report.exists()


def test_demo_report_screenshot_in_headless_chromium_offline(tiny_demo, tmp_path, dump_dom):
    """Open the demo's report with networking off, take a screenshot, check the rendered page and its pixels."""
    from conftest import CHROMIUM, CHROMIUM_FLAGS

    _, _, _, res, _ = tiny_demo
    dom = dump_dom(res.report)
    assert dom.count('class="colored-tokens"') >= 2  # circuitsvis rendered the heatmaps, offline
    assert "Test question" in dom and "Necessity and sufficiency" in dom
    base = [CHROMIUM, *CHROMIUM_FLAGS, "--hide-scrollbars"]
    url = res.report.resolve().as_uri()
    png = tmp_path / "report.png"
    shot = subprocess.run([*base, f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1280,2400",
                           f"--screenshot={png}", url], capture_output=True, text=True, timeout=180)  # fmt: skip
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 1280)
    saturation = img.max(-1) - img.min(-1)
    assert (saturation > 60).sum() > 500  # coloured heatmap cells and plots, not a blank or grey page
    assert img.std() > 10


def test_run_demo_refuses_settings_the_shipped_assets_cannot_serve_before_any_work(tmp_path):
    from repinf_lens.errors import SettingsError

    with pytest.raises(SettingsError, match="--retrain"):
        run_demo(tmp_path / "d", DemoConfig.quick(), model=tmp_path / "some-other-model", log=lambda _: None)
    with pytest.raises(SettingsError, match="template"):
        run_demo(tmp_path / "d", DemoConfig.quick(template="chat"), log=lambda _: None)
    assert not (tmp_path / "d").exists()
