"""The repinf-lens command line."""

from __future__ import annotations

import json

import pytest

from repinf_lens.cli import build_parser, main


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


@pytest.mark.integration
def test_demo_quick_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("repinf_lens.cli._DEMO_QUICK_QUESTIONS", 4)
    assert main(["demo", "--quick", "--offline", "--no-progress", "--out", str(tmp_path / "demo")]) == 0
    assert "zero-shot OpenBookQA test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "demo" / "zero_shot.json").read_text())["n_questions"] == 4
