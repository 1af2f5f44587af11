"""Execute the tutorial notebooks in their fast mode (tiny random models, toy data) and check what they produced.

Each notebook ends with a cell printing ``SUMMARY {json}``; the checks below read it and the files the notebook
wrote into its working directory (``tmp_path``), and fail when a notebook errors, writes into the repository,
or produces results that are not what it claims (e.g. a published SAE that does not reload bit for bit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = [
    "01_attach_sae_and_attribute.ipynb",
    "02_paper_pipeline_openbookqa.ipynb",
    "03_medqa_audit.ipynb",
    "04_publish_saes.ipynb",
]
EXTERNAL = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
FAST_LINE = 'FAST = os.environ.get("REPINF_TUTORIAL_FAST", "0") == "1"'


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[dict]]:
    """Execute one notebook in ``tmp_path`` in fast mode; return its summary and all its outputs."""
    monkeypatch.setenv("REPINF_TUTORIAL_FAST", "1")
    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))  # s_test and tokenizer caches: fresh
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    before = _snapshot(TUTORIALS)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    assert _snapshot(TUTORIALS) == before, "the notebook wrote into tutorials/"
    assert not (TUTORIALS / "tutorial_runs").exists()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.name == "stdout")
    lines = [line for line in text.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, "the last cell must print exactly one SUMMARY line"
    summary = json.loads(lines[0][len("SUMMARY ") :])
    assert summary["fast"] is True
    return summary, outputs


def _inside(path: str, tmp_path: Path) -> Path:
    p = Path(path)
    assert p.is_file(), path
    assert p.resolve().is_relative_to(tmp_path.resolve()), f"{path} was written outside the working directory"
    return p


def _offline_html(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    assert not EXTERNAL.search(text), EXTERNAL.search(text).group(0)
    assert "unpkg.com" not in text and "cdn.jsdelivr" not in text
    return text


def _html_displays(outputs: list[dict]) -> list[str]:
    return [
        o["data"]["text/html"]
        for o in outputs
        if o.get("output_type") == "display_data" and "text/html" in o.get("data", {})
    ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_saved_clean_and_reads_fast_first(name):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert FAST_LINE in code[0].source
    assert all(c.outputs == [] and c.execution_count is None for c in code), "save notebooks without outputs"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5
    if not name.startswith("04"):  # the attribution tutorials state the sign convention
        assert (
            "positive influence = proponent" in "".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
        )


def test_01_attach_sae_and_attribute(tmp_path, monkeypatch):
    from repinf_lens import InfluenceResult

    s, outputs = _run(NOTEBOOKS[0], tmp_path, monkeypatch)
    assert s["n_train_scored"] == 12 and s["d_sae"] == 64
    assert s["cg_residual"] < 1e-2  # the damping / iterations the notebook recommends make CG converge
    assert s["splice_max_abs_diff"] <= 1e-5  # the spliced SAE (error term held) reproduces the logits
    assert s["token_sum_minus_latent_sum"] <= 1e-4 * max(1.0, abs(s["top_proponent_score"]))
    assert s["top_proponent_score"] > 0 > s["top_opponent_score"]
    work = tmp_path / "tutorial_runs" / "01_attach_sae"
    result = InfluenceResult.load(work / "result")
    assert result.n_train == s["n_train_scored"]
    assert result.train_ids[int(result.example_scores[0].argmax())] == s["top_proponent"]
    assert float(result.example_scores[0].max()) == pytest.approx(s["top_proponent_score"])
    for html in (_inside(s["html"], tmp_path), work / "example_browser.html"):
        assert "CircuitsVis.render" in _offline_html(html)
    displays = _html_displays(outputs)
    assert sum("CircuitsVis.render" in h for h in displays) >= 4  # heatmaps, switcher, query heatmap, browser
    assert any("rl-dominant" in h for h in displays)  # the dominant-latent heatmap


def test_02_paper_pipeline(tmp_path, monkeypatch):
    from repinf_lens import InfluenceResult

    s, outputs = _run(NOTEBOOKS[1], tmp_path, monkeypatch)
    work = tmp_path / "tutorial_runs" / "02_pipeline"
    pf = s["prefilter"]
    assert s["n_train"] == 12 and pf["n_train"] == 12 and pf["per_query"] == 5
    assert 5 <= s["n_candidates"] == pf["union"] <= 10  # union of each query's top 5
    assert s["n_queries"] == 2
    assert s["gauss_newton"] is True and max(s["cg_residuals"]) < 1e-2  # run_attribution used the notebook's solver
    assert s["ablation_rows"] == 5 * 2 * 2 * 2 * 2  # rankings (DEFAULT_RANKINGS) x ks x modes x error term x queries
    assert set(s["ortho_gram_abs"]) == {"token_embeddings", "pre_sae_activations", "sae_latents"}
    result = InfluenceResult.load(work / "attribution" / "result")
    assert result.n_train == s["n_candidates"] and result.n_queries == 2
    for stage in ("attribution", "ablation", "attribution/result"):
        assert (work / stage / "manifest.json").is_file(), stage
    assert (work / "finetune" / "merged" / "config.json").is_file()
    assert json.loads((work / "sweep" / "sweep.json").read_text())
    report = _offline_html(_inside(s["report"], tmp_path))
    for needle in ("Necessity and sufficiency", "Orthogonality", result.query_ids[0]):
        assert needle in report
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the ablation plot is shown


def test_03_medqa_audit(tmp_path, monkeypatch):
    from repinf_lens import InfluenceResult

    s, outputs = _run(NOTEBOOKS[2], tmp_path, monkeypatch)
    assert s["query"].startswith("medqa-toy-") and s["n_pool"] == 40 and s["n_candidates"] == 8
    assert s["top_proponent_score"] > 0 > s["top_opponent_score"] and s["cg_residual"] < 1e-2
    assert 0 <= s["same_letter_proponents"] <= 5
    result = InfluenceResult.load(tmp_path / "tutorial_runs" / "03_medqa" / "result")
    scores = result.example_scores[0]
    assert result.train_ids[int(scores.argmax())] == s["top_proponent"]
    assert result.train_ids[int(scores.argmin())] == s["top_opponent"]
    # absolute=True prefilter: the candidates are the pool's largest |cosine| examples, opponents included
    assert (scores < 0).any() and (scores > 0).any()
    html = _offline_html(_inside(s["html"], tmp_path))
    assert s["query"] in html and s["top_proponent"] in html and s["top_opponent"] in html
    assert sum("CircuitsVis.render" in h for h in _html_displays(outputs)) >= 3


def test_04_publish_saes(tmp_path, monkeypatch):
    from sae_lens import SAE

    s, _ = _run(NOTEBOOKS[3], tmp_path, monkeypatch)
    out = Path(s["out_dir"])
    assert out.resolve().is_relative_to(tmp_path.resolve()) and s["uploaded"] is False
    ids = s["sae_ids"]
    assert ids == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    registry = yaml.safe_load((out / "pretrained_saes.yaml").read_text())
    block = registry[s["release"]]
    assert block["repo_id"].endswith("/smollm2-135m-openbookqa-saes")
    assert [e["id"] for e in block["saes"]] == ids and [e["path"] for e in block["saes"]] == ids
    assert "library_name: saelens" in (out / "README.md").read_text()
    for sae_id in ids:
        assert s["checks"][sae_id]["identical_weights"] is True and s["checks"][sae_id]["splice_diff"] <= 1e-5
        # independently of the notebook: the published SAE equals the one train_sae saved
        published = SAE.load_from_disk(str(out / sae_id))
        trained = SAE.load_from_disk(str(tmp_path / "tutorial_runs" / "04_publish" / "saes" / sae_id))
        a, b = published.state_dict(), trained.state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert published.cfg.metadata.hook_name == sae_id
