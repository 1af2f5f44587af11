"""Streaming attribution: shards on disk, resume after SIGKILL, the same result as ``attribute``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repinf_lens import CG, InfluenceAttributor, InfluenceResult
from repinf_lens._shards import ManifestMismatchError

# The same code builds the model, SAE, split, attributor and data in this process and in the subprocess
# that is killed, so both compute the same fingerprint (and the rerun resumes the killed run).
SETUP = """
import torch
from repinf_lens import Identity, InfluenceAttributor, SplitModel
from repinf_lens.testing import random_sae, tiny_model

def examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice", "wind", "seed", "moon", "salt"]
    out = []
    for i in range(n):
        pick = torch.randint(0, len(words), (6,), generator=g).tolist()
        out.append({"id": f"e{seed}-{i}", "question": f"Which goes with {words[pick[0]]} and {words[pick[1]]}?",
                    "choices": [words[p] for p in pick[2:6]], "answer": int(torch.randint(0, 4, (1,), generator=g))})
    return out

model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
hook = "blocks.0.hook_resid_post"
split = SplitModel(model, hook, random_sae(model, hook, d_sae=48, k=6))
train, queries = examples(12, seed=1), examples(2, seed=2)
att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=2)
"""

SLOW_RUN = """
import sys, time
import repinf_lens.influence.attributor as mod
torch.set_num_threads({threads})
real = mod.latent_influence_multi  # the per-batch call of the attributor's scoring loop (all queries at once)
def slow(*args, **kwargs):
    time.sleep(0.8)
    return real(*args, **kwargs)
mod.latent_influence_multi = slow
att.attribute_streaming(queries, train, out_dir=sys.argv[1], shard_size=2)
print("FINISHED")
"""


@pytest.fixture(scope="module")
def setup() -> dict:
    ns: dict = {}
    exec(SETUP, ns)
    return ns


def _same(a: InfluenceResult, b: InfluenceResult, exact: bool = True) -> None:
    def eq(x: torch.Tensor, y: torch.Tensor) -> None:
        if exact:  # NaN where a diagnostic was not computed (P(0) without baseline=True) in both
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True)

    eq(a.example_scores, b.example_scores)
    eq(a.latent_scores, b.latent_scores)
    assert a.diagnostics.keys() == b.diagnostics.keys()
    for k in a.diagnostics:
        eq(a.diagnostics[k], b.diagnostics[k])
    assert len(a.token_indices) == len(b.token_indices) and len(a.token_values) == len(b.token_values)
    for x, y in zip(a.token_indices, b.token_indices):
        assert torch.equal(x, y)
    for x, y in zip(a.token_values, b.token_values):
        eq(x, y)
    assert len(a.train_tokens) == len(b.train_tokens) and all(map(torch.equal, a.train_tokens, b.train_tokens))
    assert all(map(torch.equal, a.query_tokens, b.query_tokens))
    assert a.train_ids == b.train_ids and a.query_ids == b.query_ids


def _stamp(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_streaming_equals_attribute_and_resumes(setup, tmp_path):
    att, queries, train = setup["att"], setup["queries"], setup["train"]
    want = att.attribute(queries, train)
    out = tmp_path / "run"
    got = att.attribute_streaming(queries, train, out_dir=out, shard_size=3)  # rounded up to 4 (batch size 2)
    _same(want, got)
    _same(want, InfluenceResult.load(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["finished"] == [0, 1, 2]
    assert manifest["fingerprint"]["shard_size"] == 4 and len(list((out / "shards").iterdir())) == 3
    assert got.meta["streaming"]["shards_computed"] == [0, 1, 2]
    assert got.meta["hook_name"] == want.meta["hook_name"] and got.meta["solver"] == want.meta["solver"]
    stamps = {p.name: _stamp(p) for p in (out / "shards").iterdir()}
    again = att.attribute_streaming(queries, train, out_dir=out, shard_size=3)
    assert again.meta["streaming"]["shards_computed"] == [] and again.meta["streaming"]["shards_resumed"] == [0, 1, 2]
    assert {p.name: _stamp(p) for p in (out / "shards").iterdir()} == stamps
    _same(want, again)
    # without token scores, one shard per batch
    att.store_token_scores = False
    try:
        plain = att.attribute_streaming(queries, train[:4], out_dir=tmp_path / "plain", shard_size=2)
    finally:
        att.store_token_scores = True
    assert plain.token_indices == [] and torch.equal(plain.latent_scores, want.latent_scores[:, :4])
    assert InfluenceResult.load(tmp_path / "plain").token_indices == []


def test_streaming_with_a_fitted_hessian(setup, tmp_path):
    """The fingerprint covers the Hessian data: resuming needs the same fit()."""
    split, queries, train = setup["split"], setup["queries"][:1], setup["train"][:4]

    def make():
        return InfluenceAttributor(
            split, hessian=CG(max_iter=2, on_negative_curvature="ignore"), use_cache=False, progress=False, batch_size=2
        )

    att = make().fit(train[:3])
    got = att.attribute_streaming(queries, train, out_dir=tmp_path / "cg", shard_size=2)
    _same(att.attribute(queries, train), got)
    assert got.meta["solve_infos"][0]["iterations"] == 2
    with pytest.raises(RuntimeError, match="needs Hessian data.*fit"):
        make().attribute_streaming(queries, train, out_dir=tmp_path / "cg", shard_size=2)
    with pytest.raises(ManifestMismatchError, match=r"differs in \['hessian'\]"):
        make().fit(train[:2]).attribute_streaming(queries, train, out_dir=tmp_path / "cg", shard_size=2)
    again = make().fit(train[:3]).attribute_streaming(queries, train, out_dir=tmp_path / "cg", shard_size=2)
    assert again.meta["streaming"]["shards_computed"] == [] and torch.equal(again.example_scores, got.example_scores)


def test_streaming_errors_name_the_fix(setup, tmp_path):
    att, queries, train = setup["att"], setup["queries"], setup["train"]
    with pytest.raises(ValueError, match="training set is empty.*Fix"):
        att.attribute_streaming(queries, [], out_dir=tmp_path / "empty")
    out = tmp_path / "run"
    att.attribute_streaming(queries, train[:4], out_dir=out, shard_size=2)
    with pytest.raises(ManifestMismatchError, match=r"differs in \['queries'\].*Fix: pass a new out_dir"):
        att.attribute_streaming(queries[:1] + train[:1], train[:4], out_dir=out, shard_size=2)
    with pytest.raises(ManifestMismatchError, match=r"differs in \['batch_size', 'shard_size'\]"):
        att.attribute_streaming(queries, train[:4], out_dir=out, shard_size=3, batch_size=3)
    res = att.attribute_streaming(queries[:1], train[:4], out_dir=out, shard_size=2, overwrite=True)
    assert res.n_queries == 1 and InfluenceResult.load(out).n_queries == 1
    res.save(tmp_path / "plain_result")  # a folder with a result but no manifest is not silently reused
    with pytest.raises(ManifestMismatchError, match="no manifest.json.*overwrite=True"):
        att.attribute_streaming(queries, train[:4], out_dir=tmp_path / "plain_result")


def test_sigkill_mid_run_then_resume(setup, tmp_path):
    """Kill a subprocess (SIGKILL) after its first finished shard; the rerun keeps finished shards untouched."""
    att, queries, train = setup["att"], setup["queries"], setup["train"]
    out = tmp_path / "killed"
    script = SETUP + SLOW_RUN.format(threads=torch.get_num_threads())
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    manifest_path = out / "manifest.json"
    deadline = time.monotonic() + 240
    finished: list[int] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest_path.exists():
                try:
                    finished = json.loads(manifest_path.read_text())["finished"]
                except (json.JSONDecodeError, KeyError):  # cannot happen with atomic writes, but never hang
                    finished = []
                if finished:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the subprocess ended before it was killed:\n{proc.communicate()[0]}"
        assert finished, "no shard finished in time"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL and "FINISHED" not in output
    manifest = json.loads(manifest_path.read_text())
    done = manifest["finished"]
    assert 1 <= len(done) < 6 and not manifest["complete"]  # 12 examples, shards of 2: killed mid-run
    shard_files = {i: out / "shards" / f"shard_{i:05d}.safetensors" for i in done}
    stamps = {i: _stamp(p) for i, p in shard_files.items()}
    assert not (out / "result.json").exists()

    resumed = att.attribute_streaming(queries, train, out_dir=out, shard_size=2)
    info = resumed.meta["streaming"]
    assert set(done) <= set(info["shards_resumed"])
    assert sorted(info["shards_resumed"] + info["shards_computed"]) == list(range(6))
    assert set(info["shards_computed"]).isdisjoint(done) and info["shards_computed"]
    assert {i: _stamp(p) for i, p in shard_files.items()} == stamps  # finished shards never rewritten
    want = att.attribute(queries, train)
    _same(want, resumed, exact=False)  # shards from another process: equal up to float rounding (1e-6)
    _same(want, InfluenceResult.load(out), exact=False)
    assert json.loads(manifest_path.read_text())["complete"]
