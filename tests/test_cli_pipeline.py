"""`repinf-lens attribute`, `ablate` and `report` end to end on a tiny local model and SAE."""

from __future__ import annotations

import json
import re

from repinf_lens.cli import main
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.testing import tiny_hf_llama, toy_mcqa_rows


def test_attribute_ablate_report(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny"
    tiny_hf_llama(folder, initializer_range=0.2)
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 24))
    model_args = ["--model", str(folder), "--template", "plain", "--no-progress"]
    sae = tmp_path / "sae"
    assert main(["train-sae", *model_args, "--hook", "blocks.1.hook_resid_post", "--d-sae", "16", "--k", "3",
                 "--train-limit", "24", "--epochs", "2", "--batch-size-tokens", "64",
                 "--out", str(sae)]) == 0  # fmt: skip
    common = [*model_args, "--sae", str(sae)]
    att = tmp_path / "att"
    assert main(["attribute", *common, "--train-limit", "12", "--query-limit", "2", "--solver", "cg",
                 "--max-iter", "3", "--hessian-examples", "8", "--prefilter-top-k", "5", "--sketch-dim", "64",
                 "--batch-size", "4", "--out", str(att)]) == 0  # fmt: skip
    result = InfluenceResult.load(att / "result")
    manifest = json.loads((att / "manifest.json").read_text())
    assert result.query_ids == ["q0", "q1"] and manifest["stage"] == "attribute"
    assert 5 <= result.n_train == manifest["n_candidates"] <= 10  # union of each query's top 5 of 12
    assert manifest["prefilter"] == {"per_query": 5, "union": result.n_train, "n_train": 12}
    abl = tmp_path / "abl"
    assert main(["ablate", *common, "--attribution", str(att), "--ks", "2", "4", "--n-boot", "50",
                 "--out", str(abl)]) == 0  # fmt: skip
    assert (abl / "ablation.png").exists() and (abl / "manifest.json").exists()
    rows = (abl / "ablation_per_query.csv").read_text().splitlines()
    assert len(rows) - 1 == 5 * 2 * 2 * 2 * 2  # rankings x ks x modes x error variants x queries
    table = tmp_path / "t.json"
    table.write_text(json.dumps([{"space": "sae_latents", "gram_abs": 0.1}]))
    html = tmp_path / "report.html"
    assert main(["report", *common, "--attribution", str(att), "--ablation", str(abl), "--table", "Orthogonality",
                 str(table), "--out", str(html)]) == 0  # fmt: skip
    text = html.read_text()
    for needle in ("Test question q0", "Test question q1", "Necessity and sufficiency", "Orthogonality", "gram_abs"):
        assert needle in text
    assert not re.search(r"""(src|href)=["']https?://""", text)  # self-contained: nothing fetched
    capsys.readouterr()


def test_case_studies_cli(tmp_path, monkeypatch, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    tiny_hf_llama(base, initializer_range=0.2, seed=0)
    tiny_hf_llama(tuned, initializer_range=0.2, seed=1)  # stands in for the finetuned model
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 24, prefix=split))
    sae = tmp_path / "sae"
    model_args = ["--model", str(tuned), "--template", "plain", "--no-progress"]
    sae_argv = ["train-sae", *model_args, "--hook", "blocks.1.hook_resid_post", "--d-sae", "16", "--k", "3",
                "--train-limit", "24", "--epochs", "2", "--batch-size-tokens", "64", "--out", str(sae)]  # fmt: skip
    assert main(sae_argv) == 0
    out = tmp_path / "cases"
    argv = ["case-studies", *model_args, "--sae", str(sae), "--base-model", str(base), "--eval-limit", "10",
            "--train-limit", "12", "--n-cases", "3", "--max-iter", "2", "--hessian-examples", "4",
            "--prefilter-top-k", "4", "--sketch-dim", "32", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "case_studies.json").read_text())
    before = json.loads((out / "eval_base.json").read_text())
    after = json.loads((out / "eval_finetuned.json").read_text())
    assert before["ids"] == after["ids"] == [f"test{i}" for i in range(10)]
    assert len(summary["cases"]) == 3 and (out / "case_studies.html").exists()
    first_fixed = [i for i, (b, a) in enumerate(zip(before["correct"], after["correct"])) if not b and a]
    assert [c["query"] for c in summary["cases"]][: len(first_fixed[:3])] == [f"test{i}" for i in first_fixed[:3]]
    printed = capsys.readouterr().out
    assert printed.count("case test") == 3 and "report:" in printed


def test_faithfulness_cli(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny"
    tiny_hf_llama(folder, initializer_range=0.2)
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 24, prefix=split))
    model_args = ["--model", str(folder), "--template", "plain", "--no-progress"]
    sae = tmp_path / "sae"
    sae_argv = ["train-sae", *model_args, "--hook", "blocks.1.hook_resid_post", "--d-sae", "16", "--k", "3",
                "--train-limit", "24", "--epochs", "2", "--batch-size-tokens", "64", "--out", str(sae)]  # fmt: skip
    assert main(sae_argv) == 0
    out = tmp_path / "faith"
    assert main(["faithfulness", *model_args, "--sae", str(sae), "--query-limit", "3", "--train-limit", "10",
                 "--prefilter-top-k", "3", "--sketch-dim", "32", "--max-iter", "2", "--hessian-examples", "4",
                 "--batch-size", "4", "--ks", "2", "4", "--n-boot", "50", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "faithfulness.json").read_text())
    assert summary["n_queries"] == 3 and summary["candidates_per_query"] == [3, 3, 3] and summary["ks"] == [2, 4]
    printed = capsys.readouterr().out
    # the default reference (influence_eq16) vs 4 others x 2 error variants x (3 necessity + 3 sufficiency metrics)
    assert printed.count("influence_eq16 vs ") == 4 * 2 * 6 and summary["reference"] == "influence_eq16"
