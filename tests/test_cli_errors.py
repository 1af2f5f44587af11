"""The CLI speaks to people: one-line errors (exit 2) before any loading, --debug tracebacks, named bad files."""

from __future__ import annotations

import json

import pytest
import torch

from repinf_lens.cli import build_parser, main
from repinf_lens.testing import random_sae, tiny_hf_llama, toy_mcqa_rows


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model / SAE / data loading fails the test: bad settings must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model, SAE or dataset was loaded before the settings were checked")

    monkeypatch.setattr("repinf_lens.models.load_model", refuse)
    monkeypatch.setattr("repinf_lens.saes.load_sae", refuse)
    monkeypatch.setattr("repinf_lens.data.load_mcqa", refuse)
    monkeypatch.setattr("repinf_lens.workflows.finetuning.finetune", refuse)


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("repinf-lens: error: ") and "Traceback" not in err
    return lines[0]


ATTR = ["attribute", "--sae", "some/sae"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([*ATTR, "--max-iter", "0"], "--max-iter: must be >= 1, got 0"),
        ([*ATTR, "--damping", "-1"], "--damping: must be >= 0"),
        ([*ATTR, "--damping", "nan"], "--damping: must be a finite number"),
        ([*ATTR, "--prefilter-fraction", "0"], "--prefilter-fraction: must be in (0, 1]"),
        ([*ATTR, "--prefilter-fraction", "1.5"], "--prefilter-fraction: must be in (0, 1]"),
        ([*ATTR, "--prefilter-fraction", "0.1", "--prefilter-top-k", "5"], "not allowed with"),
        ([*ATTR, "--prefilter-top-k", "0"], "--prefilter-top-k: must be >= 1"),
        ([*ATTR, "--batch-size", "0"], "--batch-size: must be >= 1"),
        ([*ATTR, "--hessian-examples", "0"], "--hessian-examples"),
        ([*ATTR, "--sketch-dim", "0"], "--sketch-dim"),
        ([*ATTR, "--shard-size", "0"], "--shard-size"),
        ([*ATTR, "--query-chunk-size", "0"], "--query-chunk-size"),
        ([*ATTR, "--query-limit", "0"], "--query-limit"),
        ([*ATTR, "--solver", "lissa", "--max-iter", "0"], "--max-iter"),
        (["evaluate", "--batch-size", "0"], "--batch-size"),
        (["evaluate", "--n-ctx", "0"], "--n-ctx"),
        (["evaluate", "--limit", "x"], "--limit: expected a whole number"),
        (["finetune", "--lr", "0"], "--lr: must be > 0"),
        (["finetune", "--epochs", "-1"], "--epochs"),
        (["finetune", "--lora-r", "0"], "--lora-r"),
        (["train-sae", "--hook", "h", "--lr", "inf"], "--lr: must be a finite number"),
        (["train-sae", "--hook", "h", "--k", "0"], "--k"),
        (["sweep", "--sizes", "2048x0"], "--sizes: d_sae and k must be >= 1"),
        (["sweep", "--sizes", "big"], "--sizes: expected d_sae x k pairs"),
        (["faithfulness", "--sae", "s", "--shard", "2/2"], "--shard: 2/2: need 0 <= I < N"),
        (["faithfulness", "--sae", "s", "--ks", "-1"], "--ks: must be >= 0"),
        (["ablate", "--sae", "s", "--attribution", "a", "--n-boot", "-1"], "--n-boot"),
        (["report", "--sae", "s", "--attribution", "a", "--top-examples", "0"], "--top-examples"),
        (["case-studies", "--sae", "s", "--n-cases", "0"], "--n-cases"),
        (["evaluate", "--device", "gpu"], "--device: unknown device 'gpu'. Fix: pass cpu, cuda, cuda:N"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_impossible_settings_fail_in_one_line_before_any_loading(argv, needle, capsys, no_loading):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert needle in _one_error_line(err)


def test_device_cuda_without_cuda_suggests_cpu(capsys, monkeypatch, no_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(["evaluate", "--device", "cuda"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "CUDA is not available" in line and "Fix: pass --device cpu" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = _run(["evaluate", "--device", "cuda:3"], capsys)
    assert code == 2 and "has 1 CUDA device(s)" in _one_error_line(err)


def test_parser_accepts_valid_values():
    args = build_parser().parse_args([*ATTR, "--device", "CUDA:1", "--prefilter-fraction", "1", "--damping", "0"])
    assert args.device == "cuda:1" and args.prefilter_fraction == 1.0 and args.damping == 0.0 and not args.debug
    args = build_parser().parse_args(["faithfulness", "--sae", "s", "--shard", "1/2", "--debug"])
    assert args.shard == (1, 2) and args.debug
    assert build_parser().parse_args(["sweep", "--sizes", "64x4"]).sizes == [(64, 4)]


def _failing_loader(monkeypatch, exc: BaseException):
    def load(*args, **kwargs):
        raise exc

    monkeypatch.setattr("repinf_lens.models.load_model", load)


@pytest.mark.parametrize(
    "exc, needle",
    [
        (ValueError("The thing is wrong. Fix: do this."), "The thing is wrong. Fix: do this."),
        (FileNotFoundError(2, "No such file or directory", "x/y"), "No such file or directory: 'x/y'. Fix: check"),
        (PermissionError(13, "Permission denied", "/root/out"), "Permission denied"),
        (ConnectionError("connection refused"), "connection refused. Fix: check the network connection"),
        (KeyError("sae_id 'L9' not in release"), "sae_id 'L9' not in release"),
        (RuntimeError("Store incomplete\nover two lines. Fix: rerun."), "Store incomplete over two lines. Fix: rerun."),
    ],
)
def test_user_errors_are_one_line_and_debug_shows_the_traceback(exc, needle, capsys, monkeypatch):
    _failing_loader(monkeypatch, exc)
    code, _, err = _run(["evaluate", "--model", "m"], capsys)
    assert code == 2 and needle in _one_error_line(err)
    for argv in (["--debug", "evaluate", "--model", "m"], ["evaluate", "--model", "m", "--debug"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith("repinf-lens: error: ")


def test_a_bug_asks_for_debug_and_a_report(capsys, monkeypatch):
    _failing_loader(monkeypatch, TypeError("unsupported operand"))
    code, _, err = _run(["evaluate", "--model", "m"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("repinf-lens: internal error: TypeError: unsupported operand")
    assert "rerun with --debug" in lines[0] and "report" in lines[0]
    code, _, err = _run(["evaluate", "--model", "m", "--debug"], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and "TypeError" in err


def test_system_exit_messages_and_interrupts(capsys, monkeypatch):
    _failing_loader(monkeypatch, SystemExit("error: query ids ['x'] are missing. Fix: pass --query-split."))
    code, _, err = _run(["evaluate", "--model", "m"], capsys)
    assert code == 2 and _one_error_line(err) == (
        "repinf-lens: error: query ids ['x'] are missing. Fix: pass --query-split."
    )
    _failing_loader(monkeypatch, KeyboardInterrupt())
    code, _, err = _run(["evaluate", "--model", "m"], capsys)
    assert code == 130 and err.strip() == "repinf-lens: interrupted"
    assert main(["--help"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- corrupt files
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny HF Llama folder and a random SAE folder (SAELens layout) for it."""
    from repinf_lens.models import load_model

    root = tmp_path_factory.mktemp("assets")
    tiny_hf_llama(root / "tiny", initializer_range=0.2)
    model = load_model(root / "tiny", device="cpu")
    random_sae(model, "blocks.1.hook_resid_post", d_sae=16, k=3).save_model(str(root / "sae"))
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(path, n=100):
    path.write_bytes(path.read_bytes()[:n])


@pytest.mark.parametrize("broken", ["model.safetensors", "config.json"])
def test_a_corrupt_model_file_is_named(broken, assets, tmp_path, capsys):
    folder = _copy(assets / "tiny", tmp_path / "tiny")
    if broken.endswith(".json"):
        (folder / broken).write_text('{"hidden_size": 32,')
    else:
        _truncate(folder / broken)
    code, _, err = _run(["evaluate", "--model", str(folder), "--no-progress"], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(folder / broken) in line and "corrupt or truncated" in line and "Fix:" in line


@pytest.mark.parametrize("broken", ["cfg.json", "sae_weights.safetensors"])
def test_a_corrupt_sae_file_is_named(broken, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 4))
    sae = _copy(assets / "sae", tmp_path / "sae")
    if broken.endswith(".json"):
        (sae / broken).write_text("{")
    else:
        _truncate(sae / broken)
    argv = ["orthogonality", "--model", str(assets / "tiny"), "--sae", str(sae), "--limit", "2", "--no-progress"]
    code, _, err = _run(argv, capsys)
    line = _one_error_line(err)
    assert code == 2 and broken in line and str(sae) in line and "Fix:" in line


def test_a_corrupt_attribution_result_is_named(assets, tmp_path, capsys, monkeypatch):
    from repinf_lens.influence.result import InfluenceResult

    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(4))
    att = tmp_path / "att"
    InfluenceResult(example_scores=torch.zeros(1, 2), latent_scores=torch.zeros(1, 2, 16), query_ids=["q0"],
                    train_ids=["a", "b"]).save(att / "result")  # fmt: skip
    _truncate(att / "result" / "scores.safetensors", 20)
    argv = ["ablate", "--model", str(assets / "tiny"), "--sae", str(assets / "sae"), "--attribution", str(att),
            "--no-progress", "--out", str(tmp_path / "abl")]  # fmt: skip
    code, _, err = _run(argv, capsys)
    line = _one_error_line(err)
    assert code == 2 and str(att / "result" / "scores.safetensors") in line and "corrupt or truncated" in line
    (att / "result" / "result.json").write_text("{not json")
    code, _, err = _run(argv, capsys)
    assert code == 2 and str(att / "result" / "result.json") in _one_error_line(err)


def test_a_corrupt_demo_config_is_named(tmp_path, capsys, no_loading):
    config = tmp_path / "demo.json"
    config.write_text(json.dumps({"n_eval": 4})[:-3])
    code, _, err = _run(["demo", "--config", str(config)], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(config) in line and "JSONDecodeError" in line
