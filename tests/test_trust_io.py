"""Run folders and caches can be trusted: no pickle, complete fingerprints, refused mismatches, checksums, races."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

import repinf_lens.workflows.finetuning as ft
from repinf_lens import Identity, InfluenceAttributor, MultipleChoiceTask, SplitModel
from repinf_lens._shards import ManifestMismatchError
from repinf_lens.testing import random_sae, tiny_hf_llama, tiny_model, toy_mcqa_rows

HOOK = "blocks.1.hook_resid_post"  # blocks.0 (and the embeddings) are upstream of it


# ---------------------------------------------------------------------------------------------- helpers
def _rows(n: int) -> list[dict]:
    colours = ["red", "blue", "green", "black"]
    return [{"id": f"r{i}", "question": f"Pick colour number {i}", "choices": colours, "answer": 0} for i in range(n)]


FT_KW = dict(device="cpu", n_ctx=256, progress=False, epochs=2, lr=1e-2, batch_size=4, micro_batch_size=2, lora_r=2,
             checkpoint_every=1)  # fmt: skip


@pytest.fixture()
def base(tmp_path):
    folder = tmp_path / "base-model"
    tok = tiny_hf_llama(folder, initializer_range=0.2)
    return folder, MultipleChoiceTask(tok, template="plain", max_length=256)


@pytest.fixture(scope="module")
def models():
    """Two tiny models that differ only in one UPSTREAM weight (blocks.0.attn.W_Q), and one SAE at HOOK."""
    a = tiny_model(seed=0)
    b = tiny_model(seed=0)
    with torch.no_grad():
        b.blocks[0].attn.W_Q[0, 0, 0] += 0.25
    sae = random_sae(a, HOOK, d_sae=24, k=4)
    return a, b, sae


def _att(split, **kw):
    return InfluenceAttributor(split, hessian=Identity(), progress=False, batch_size=2, **kw)


class _Evil:
    """Unpickling this runs code (here: writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# ---------------------------------------------------------------------------------------------- a. no pickle
def test_planted_pickle_in_a_checkpoint_is_never_unpickled(base, tmp_path):
    folder, task = base
    rows = _rows(8)
    out = tmp_path / "run"
    ft.finetune(folder, task, rows, out_dir=out, **FT_KW)  # 4 steps, checkpoints step-3 and step-4 kept
    # make the run resume from its newest checkpoint, then plant a state.pt whose unpickling would run code
    for name in ("finetune.json", "merged", "adapter"):
        p = out / name
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = ckpts[-1] / "state.pt"
    marker = tmp_path / "marker.txt"
    torch.save({"optimizer": _Evil(marker), "scheduler": {}, "step": 0, "losses": [], "torch_rng": None}, state)
    with pytest.raises(Exception) as info:
        ft.finetune(folder, task, rows, out_dir=out, **FT_KW)
    assert not marker.exists(), "unpickling the planted state.pt ran code"
    assert str(state) in str(info.value) and "Fix:" in str(info.value)


# ---------------------------------------------------------------------------------------------- b. run manifest
def test_finetune_refuses_a_folder_that_holds_another_finished_run(base, tmp_path):
    folder, task = base
    rows = _rows(8)
    out = tmp_path / "run"
    first = ft.finetune(folder, task, rows, out_dir=out, **FT_KW)
    with pytest.raises(ValueError, match=r"another finetune run.*config\.lr.*Fix: pass a new out_dir"):
        ft.finetune(folder, task, rows, out_dir=out, **{**FT_KW, "lr": 5e-2})
    assert json.loads((out / "run.json").read_text())["fingerprint"]["config"]["lr"] == 1e-2
    with pytest.raises(ValueError, match=r"config\.lora_r"):
        ft.finetune(folder, task, rows, out_dir=out, **{**FT_KW, "lora_r": 4})
    with pytest.raises(ValueError, match=r"data\.hash"):
        ft.finetune(folder, task, rows[:6], out_dir=out, **FT_KW)
    other = tmp_path / "other-base"
    tiny_hf_llama(other, initializer_range=0.2, seed=1)
    with pytest.raises(ValueError, match=r"base_model\.weights"):
        ft.finetune(other, task, rows, out_dir=out, **FT_KW)
    # a pure-logistics change (checkpoint_every) and the identical run reuse the finished run
    again = ft.finetune(folder, task, rows, out_dir=out, **{**FT_KW, "checkpoint_every": 50})
    assert again.metadata["adapter_sha256"] == first.metadata["adapter_sha256"]
    # the base folder moved: same weights, same run
    moved = tmp_path / "moved-base"
    folder.rename(moved)
    assert (
        ft.finetune(moved, task, rows, out_dir=out, **FT_KW).metadata["adapter_sha256"]
        == (first.metadata["adapter_sha256"])
    )


def test_finetune_refuses_to_resume_a_mid_run_checkpoint_of_another_run(base, tmp_path, monkeypatch):
    folder, task = base
    rows = _rows(8)
    out = tmp_path / "crash"
    calls = {"n": 0}
    real = ft._answer_logits

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # step 3 of 4 (2 micro-batches per step), after the step-2 checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real(model, batch)

    monkeypatch.setattr(ft, "_answer_logits", crashing)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(folder, task, rows, out_dir=out, **FT_KW)
    monkeypatch.setattr(ft, "_answer_logits", real)
    assert (out / "checkpoints" / "step-2" / "state.pt").exists() and not (out / "finetune.json").exists()
    with pytest.raises(ValueError, match=r"config\.lr.*Fix: pass a new out_dir, or delete"):
        ft.finetune(folder, task, rows, out_dir=out, **{**FT_KW, "lr": 3e-2})
    assert not (out / "finetune.json").exists()


def test_finetune_refuses_outputs_without_a_run_manifest(base, tmp_path):
    folder, task = base
    out = tmp_path / "legacy"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "state.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no run\.json.*Fix"):
        ft.finetune(folder, task, _rows(4), out_dir=out, **FT_KW)


# ---------------------------------------------------------------------------------------------- c. complete keys
def test_an_upstream_weight_changes_the_fingerprint_cache_key_and_shards(models, tmp_path):
    a, b, sae = models
    split_a, split_b = SplitModel(a, HOOK, sae), SplitModel(b, HOOK, sae)
    assert "blocks.0.attn.W_Q" not in split_a.param_names  # the changed weight is upstream (theta1)
    fa, fb = split_a.fingerprint(), split_b.fingerprint()
    assert fa != fb
    assert fa["model_weights"] != fb["model_weights"]
    assert split_a.fingerprint() == fa  # deterministic (and cached) for an unchanged model
    queries, train = toy_mcqa_rows(1, seed=1, prefix="q"), toy_mcqa_rows(4, seed=2, prefix="t")
    cache = tmp_path / "s_test"
    _att(split_a, cache_dir=cache).s_test(queries)
    _att(split_b, cache_dir=cache).s_test(queries)
    assert len(list(cache.glob("*.safetensors"))) == 2  # no shared s_test entry
    out = tmp_path / "run"
    _att(split_a, use_cache=False).attribute_streaming(queries, train, out_dir=out, shard_size=2)
    with pytest.raises(ManifestMismatchError, match=r"differs in \['split'\].*split\.model_weights"):
        _att(split_b, use_cache=False).attribute_streaming(queries, train, out_dir=out, shard_size=2)


def test_in_place_weight_changes_invalidate_the_cached_digest(models):
    a, _, sae = models
    model = copy.deepcopy(a)
    split = SplitModel(model, HOOK, sae)
    before = split.fingerprint()
    w = model.blocks[0].mlp.W_in
    old = float(w[1, 2].detach())
    with torch.no_grad():
        w[1, 2] += 1.0  # in place, upstream: bumps the version counter
    assert split.fingerprint() != before
    with torch.no_grad():
        w[1, 2] = old
    assert split.fingerprint() == before


@pytest.mark.parametrize("name", ["b_enc", "W_enc", "b_dec"])
def test_every_sae_tensor_is_part_of_the_fingerprint(models, name):
    a, _, sae = models
    other = copy.deepcopy(sae)
    with torch.no_grad():
        getattr(other, name).view(-1)[0] += 0.5
    fa, fb = SplitModel(a, HOOK, sae).fingerprint(), SplitModel(a, HOOK, other).fingerprint()
    assert fa["sae"] != fb["sae"] and fa != fb


# ---------------------------------------------------------------------------------------------- d. across processes
FP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from repinf_lens import SplitModel, load_model
    from repinf_lens._shards import fingerprint_hash
    model = load_model(sys.argv[1], device="cpu", n_ctx=64)
    fp = SplitModel(model, "blocks.0.hook_resid_post").fingerprint()
    print("FP", fingerprint_hash(fp), json.dumps(fp))
    """
)


def test_a_linked_model_folder_fingerprints_the_same_in_every_process(tmp_path):
    """A folder named "my-llama" is loaded through a symlink (TransformerLens guesses architectures from names; the
    test's own name avoids those words, since its tmp_path is part of the link's path)."""
    folder = tmp_path / "my-llama"
    tiny_hf_llama(folder)
    cache = tmp_path / "cache"
    results = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "REPINF_LENS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", FP_SCRIPT, str(folder)], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("FP "))
        results.append(line.split(" ", 2)[1:])
    assert results[0][0] == results[1][0], "the fingerprint differs between processes"
    assert len(list((cache / "links").iterdir())) == 1  # one link per folder, not one per process
    assert str(cache) not in results[0][1] and str(tmp_path) not in results[0][1]  # no process-dependent paths


# ---------------------------------------------------------------------------------------------- e. provenance
def _cli_setup(models, tmp_path, monkeypatch):
    a, b, sae = models
    split_a = SplitModel(a, HOOK, sae)
    queries, train = toy_mcqa_rows(1, seed=1, prefix="q"), toy_mcqa_rows(4, seed=2, prefix="t")
    att_dir = tmp_path / "att"
    _att(split_a, use_cache=False).attribute_streaming(queries, train, out_dir=att_dir / "result", shard_size=2)
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: queries)
    return split_a, SplitModel(b, HOOK, sae), att_dir


@pytest.mark.parametrize("command", ["ablate", "report"])
def test_ablate_and_report_refuse_an_attribution_of_another_model(models, tmp_path, monkeypatch, capsys, command):
    from repinf_lens.cli import main

    split_a, split_b, att_dir = _cli_setup(models, tmp_path, monkeypatch)
    monkeypatch.setattr("repinf_lens.cli._split_model", lambda args: split_b)
    out = tmp_path / ("abl" if command == "ablate" else "report.html")
    extra = ["--ks", "2", "--n-boot", "10", "--rankings", "random"] if command == "ablate" else []
    rc = main([command, "--sae", "unused", "--no-progress", "--attribution", str(att_dir), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "model_weights" in err and "Fix:" in err
    assert not out.exists() or (command == "ablate" and not (out / "ablation.json").exists())
    from repinf_lens.influence.result import InfluenceResult, check_split_matches

    check_split_matches(InfluenceResult.load(att_dir / "result"), split_a)  # the same split passes


def test_check_split_matches_names_a_different_hook(models):
    from repinf_lens.influence.result import SplitMismatchError, check_split_matches

    a, _, _ = models
    hook0 = "blocks.0.hook_resid_post"
    split0 = SplitModel(a, hook0, random_sae(a, hook0, d_sae=24, k=4))
    res = _att(split0, use_cache=False).attribute(toy_mcqa_rows(1, prefix="q"), toy_mcqa_rows(2, prefix="t"))
    split1 = SplitModel(a, HOOK, random_sae(a, HOOK, d_sae=24, k=4))
    with pytest.raises(SplitMismatchError, match=r"hook.*'blocks\.0\.hook_resid_post' then.*Fix"):
        check_split_matches(res, split1)


def test_attribute_hook_must_not_silently_override_the_sae_hook(tmp_path, monkeypatch, capsys):
    from repinf_lens.cli import main
    from repinf_lens.models import load_model

    folder = tmp_path / "tiny"
    tiny_hf_llama(folder)
    sae_dir = tmp_path / "sae"
    random_sae(load_model(folder, device="cpu", n_ctx=64), "blocks.0.hook_resid_post", d_sae=16, k=2).save_model(
        str(sae_dir)
    )
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 4))
    seen = {}

    def fake_run_attribution(split, queries, train, **kw):
        seen["hook"] = split.hook_name
        return types.SimpleNamespace(query_ids=[]), []

    monkeypatch.setattr("repinf_lens.workflows.run_attribution", fake_run_attribution)
    argv = ["attribute", "--model", str(folder), "--sae", str(sae_dir), "--no-progress", "--n-ctx", "64",
            "--solver", "identity", "--out", str(tmp_path / "att")]  # fmt: skip
    rc = main([*argv, "--hook", "blocks.1.hook_resid_post"])
    err = capsys.readouterr().err
    assert rc == 2 and "hook" not in seen, err
    assert "blocks.1.hook_resid_post" in err and "blocks.0.hook_resid_post" in err and "--force-hook" in err
    assert main([*argv, "--hook", "blocks.0.hook_resid_post"]) == 0 and seen.pop("hook") == "blocks.0.hook_resid_post"
    assert main([*argv, "--hook", "blocks.1.hook_resid_post", "--force-hook"]) == 0
    assert seen["hook"] == "blocks.1.hook_resid_post"


# ---------------------------------------------------------------------------------------------- f. checksums, races
def _flip_tail(path: Path, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(1, n + 1):
        data[-i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_corrupted_shard_is_detected_named_and_recomputed(models, tmp_path):
    a, _, sae = models
    att = _att(SplitModel(a, HOOK, sae), use_cache=False)
    queries, train = toy_mcqa_rows(1, seed=1, prefix="q"), toy_mcqa_rows(6, seed=2, prefix="t")
    out = tmp_path / "run"
    clean = att.attribute_streaming(queries, train, out_dir=out, shard_size=2)
    shard = out / "shards" / "shard_00001.safetensors"
    _flip_tail(shard)
    with pytest.warns(UserWarning, match=r"shard_00001\.safetensors is corrupted"):
        again = att.attribute_streaming(queries, train, out_dir=out, shard_size=2)
    assert again.meta["streaming"]["shards_computed"] == [1]
    assert torch.equal(again.example_scores, clean.example_scores)
    assert torch.equal(again.latent_scores, clean.latent_scores)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["checksums"]) == 3 and all(len(v) == 64 for v in manifest["checksums"].values())
    # and a truncated shard heals the same way
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"shard_00001\.safetensors is corrupted"):
        third = att.attribute_streaming(queries, train, out_dir=out, shard_size=2)
    assert third.meta["streaming"]["shards_computed"] == [1] and torch.equal(third.example_scores, clean.example_scores)


def test_a_truncated_or_flipped_s_test_cache_file_heals(models, tmp_path):
    from safetensors.torch import load_file

    a, _, sae = models
    split = SplitModel(a, HOOK, sae)
    cache = tmp_path / "s_test"
    queries = toy_mcqa_rows(1, seed=1, prefix="q")
    want = _att(split, cache_dir=cache).s_test(queries)[0]
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with pytest.warns(UserWarning, match=rf"{entry.name} is corrupted"):
        got = _att(split, cache_dir=cache).s_test(queries)[0]
    assert all(torch.equal(got[k], want[k]) for k in want)
    healed = load_file(str(entry))  # the entry was recomputed and replaced
    assert all(torch.equal(healed[k], want[k]) for k in want)
    _flip_tail(entry)
    with pytest.warns(UserWarning, match=rf"{entry.name} is corrupted"):
        got = _att(split, cache_dir=cache).s_test(queries)[0]
    assert all(torch.equal(got[k], want[k]) for k in want)
    att = _att(split, cache_dir=cache)
    att.s_test(queries)
    assert att.solve_infos[0].iterations == 0  # healthy again: a cache hit


RACE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("_cache_only", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # only the stdlib: no torch import, so both processes start at once
    target, tag, start = sys.argv[2], sys.argv[3], float(sys.argv[4])
    while time.time() < start:
        time.sleep(0.001)
    for i in range(150):
        with mod.atomic_dir(target) as tmp:
            for j in range(20):
                (tmp / f"f{j}.txt").write_text(f"{tag}-{i}")
    print("OK")
    """
)


def test_two_processes_finishing_one_atomic_dir_both_succeed(tmp_path):
    import repinf_lens._cache as cache_mod

    target = tmp_path / "out" / "folder"
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, cache_mod.__file__, str(target), tag, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0 and "OK" in so, se[-3000:]
    texts = {(target / f"f{j}.txt").read_text() for j in range(20)}
    assert len(texts) == 1  # one writer's complete folder, never a mix
    assert sorted(p.name for p in target.parent.iterdir()) == ["folder"]  # no staging folders left behind
