"""The repinf-lens command line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from repinf_lens.cli import build_parser, main
from repinf_lens.testing import tiny_hf_llama, toy_mcqa_rows


def test_parser_lists_subcommands_and_common_flags():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--device", "cpu", "--dtype", "bf16", "--seed", "3"])
    assert args.command == "evaluate" and args.dtype == "bf16" and args.seed == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])


@pytest.mark.integration
def test_evaluate_writes_a_record(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--limit", "4", "--offline", "--no-progress", "--n-ctx", "512", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["n_questions"] == 4 and 0.0 <= rec["accuracy"] <= 1.0 and rec["template"] == "chat"
    assert '"accuracy"' in capsys.readouterr().out


def test_finetune_cli_tiny(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny"
    tiny_hf_llama(folder, initializer_range=0.2)
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 24))
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(folder), "--template", "plain", "--no-progress", "--train-limit", "8",
                 "--eval-limit", "4", "--epochs", "1", "--lr", "1e-2", "--effective-batch-size", "4",
                 "--batch-size", "2", "--lora-r", "2", "--out", str(out)]) == 0  # fmt: skip
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["n_train"] == 8 and meta["steps"] == 2 and meta["n_eval"] == 4
    assert meta["config"]["micro_batch_size"] == 2 and meta["config"]["lora_r"] == 2
    assert (out / "merged" / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n") :])["adapter_sha256"] == meta["adapter_sha256"]
    # the adapter merges again through `merge-adapter` (as after training on another machine)
    assert main(["merge-adapter", "--model", str(folder), "--adapter", str(out / "adapter"), "--out",
                 str(tmp_path / "m")]) == 0  # fmt: skip
    merged = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert merged["adapter_sha256"] == meta["adapter_sha256"]
    from safetensors.torch import load_file

    a, b = load_file(out / "merged" / "model.safetensors"), load_file(tmp_path / "m" / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TINY_DEMO = dict(retrain=True, n_eval=4, n_train=8, finetune_epochs=1.0, finetune_batch_size=4,
                 finetune_micro_batch_size=4, d_sae=16, k=3, n_sae_prompts=16, sae_epochs=2.0, n_queries=1,
                 prefilter_top_k=4, sketch_dim=128, max_iter=2, hessian_examples=4, ks=[2, 4], n_boot=20,
                 ortho_tokens=128)  # fmt: skip


def test_demo_cli_tiny_with_a_config_file(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny"
    tiny_hf_llama(folder, initializer_range=0.2)
    monkeypatch.setattr("repinf_lens.data.load_mcqa", lambda name, split, **kw: toy_mcqa_rows(24, prefix=split))
    config = tmp_path / "demo.json"
    config.write_text(json.dumps(TINY_DEMO))
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(folder), "--config", str(config), "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["config"]["n_eval"] == 4 and summary["config"]["ks"] == [2, 4] and len(summary["queries"]) == 1
    assert (out / "report.html").exists() and json.loads((out / "manifest.json").read_text())["stage"] == "demo"
    assert f"Report: {out / 'report.html'}" in capsys.readouterr().out


@pytest.mark.integration
def test_demo_on_the_real_default_model_and_data(tmp_path, capsys):
    """The main job on the embedded SmolLM2 and real OpenBookQA, at tiny sizes (the full demo is `make demo`)."""
    from repinf_lens.workflows.demo import DEFAULT_INDEX, DEFAULT_SAE_ID, DEFAULT_SAE_RELEASE

    config = tmp_path / "demo.json"
    small = dict(n_eval=12, n_queries=1, prefilter_top_k=4, max_iter=1, hessian_examples=2, ks=[10, 50], n_boot=20,
                 ortho_tokens=128, rankings=["influence", "random"])  # fmt: skip
    config.write_text(json.dumps(small))
    out = tmp_path / "demo"
    assert main(["demo", "--offline", "--config", str(config), "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["hook_name"] == DEFAULT_SAE_ID and summary["n_eval"] == 12
    # the shipped finetune, SAE and index of all 4957 training questions, no training here
    assert summary["sae"] == f"{DEFAULT_SAE_RELEASE}/{DEFAULT_SAE_ID}" and summary["prefilter_index"] == DEFAULT_INDEX
    assert summary["n_train"] == 4957 and summary["n_candidates"] == 4
    assert summary["queries"][0]["why chosen"] == "wrong before, right after"
    assert summary["accuracy_finetuned"] > summary["accuracy_zero_shot"]
    html = (out / "report.html").read_text()
    assert f"Test question {summary['queries'][0]['query']}" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)
    capsys.readouterr()


@pytest.mark.integration
def test_cli_task_of_the_shipped_default_matches_the_shipped_index():
    """The CLI builds the task of the default model and of a shipped finetune as the demo and the shipped sketch
    index do, so `--sketches smollm2-135m-openbookqa-L22` is accepted (its fingerprint holds the task config)."""
    import argparse

    from repinf_lens.cli import _task
    from repinf_lens.influence.prefilter import SketchStore, shipped_index_dir
    from repinf_lens.task import task_config
    from repinf_lens.workflows.demo import DEFAULT_INDEX

    store = SketchStore.load(shipped_index_dir(DEFAULT_INDEX))
    for name in (None, "smollm2-135m-openbookqa"):
        task = _task(argparse.Namespace(model=name, template="plain", n_ctx=1024), None)
        assert json.loads(json.dumps(task_config(task), default=str)) == store.fingerprint["split"]["task_config"]


def test_finetune_lora_layers_flag_parses_ranges_and_lists_and_refuses_garbage(capsys):
    p = build_parser()
    assert p.parse_args(["finetune", "--lora-layers", "24-29"]).lora_layers == (24, 25, 26, 27, 28, 29)
    assert p.parse_args(["finetune", "--lora-layers", "22,20,21-22"]).lora_layers == (20, 21, 22)
    assert p.parse_args(["finetune"]).lora_layers is None and p.parse_args(["finetune"]).autocast is None
    with pytest.raises(SystemExit):
        p.parse_args(["finetune", "--lora-layers", "top"])
    assert "expected blocks like 24-29" in capsys.readouterr().err
