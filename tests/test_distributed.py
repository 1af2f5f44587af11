"""Distributed attribution: torchrun with 2 gloo processes gives the single-process result (1e-6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from repinf_lens import InfluenceResult
from repinf_lens.distributed import DistInfo, init_from_env, run_selftest, shard_ranges

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)


def test_shard_ranges_tile_the_batches():
    n, bs = 11, 2  # 6 batches, the last one partial
    for world in (1, 2, 3, 4, 7):
        for mode in ("contiguous", "strided"):
            got = sorted(r for rank in range(world) for r in shard_ranges(n, bs, rank, world, mode))
            if mode == "strided":
                assert got == [(lo, min(n, lo + bs)) for lo in range(0, n, bs)]
            else:
                assert len(got) == min(world, 6)  # one block per rank that has work
            covered = [i for lo, hi in got for i in range(lo, hi)]
            assert covered == list(range(n)), (world, mode)
            for lo, hi in got:
                assert lo % bs == 0 and (hi % bs == 0 or hi == n)  # whole single-process batches
    assert shard_ranges(11, 2, 0, 2) == [(0, 6)] and shard_ranges(11, 2, 1, 2) == [(6, 11)]
    assert shard_ranges(11, 2, 1, 2, "strided") == [(2, 4), (6, 8), (10, 11)]
    assert shard_ranges(3, 2, 3, 4) == []  # more ranks than batches: nothing to do
    with pytest.raises(ValueError, match="shard mode"):
        shard_ranges(4, 2, 0, 1, "random")


def test_init_from_env_is_a_noop_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = init_from_env()
    assert info == DistInfo() and info.is_main and not info.enabled
    assert not dist.is_initialized()


def _assert_same(a: InfluenceResult, b: InfluenceResult) -> None:
    def close(x: torch.Tensor, y: torch.Tensor) -> None:
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True)  # P(0) is NaN unless scored

    close(a.example_scores, b.example_scores)
    close(a.latent_scores, b.latent_scores)
    assert a.diagnostics.keys() == b.diagnostics.keys()
    for k in a.diagnostics:
        close(a.diagnostics[k], b.diagnostics[k])
    assert a.query_ids == b.query_ids and a.train_ids == b.train_ids
    assert len(a.train_tokens) == len(b.train_tokens) and all(map(torch.equal, a.train_tokens, b.train_tokens))
    assert len(a.token_indices) == len(b.token_indices) == a.n_queries
    for x, y in zip(a.token_indices, b.token_indices):
        assert torch.equal(x, y)
    for x, y in zip(a.token_values, b.token_values):
        close(x, y)
    # same CG path; residual histories agree up to float reduction order (thread counts differ across runs)
    for x, y in zip(a.meta["solve_infos"], b.meta["solve_infos"], strict=True):
        assert {k: v for k, v in x.items() if k != "residuals"} == {k: v for k, v in y.items() if k != "residuals"}
        torch.testing.assert_close(torch.tensor(x["residuals"]), torch.tensor(y["residuals"]), rtol=1e-5, atol=1e-7)


@needs_gloo
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found next to the Python executable")
def test_torchrun_two_processes_equal_single_process(tmp_path):
    single = run_selftest(tmp_path / "single")  # no process group here: plain attribute()
    assert set(single) == {"contiguous", "strided"} and "distributed" not in single["contiguous"].meta
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "repinf_lens.distributed",
        "--selftest",
        str(tmp_path / "dist"),
        "--backend",
        "gloo",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world_size=2 backend=gloo" in proc.stdout
    for mode in ("contiguous", "strided"):
        got = InfluenceResult.load(tmp_path / "dist" / mode)
        assert got.meta["distributed"]["world_size"] == 2 and got.meta["distributed"]["shard"] == mode
        _assert_same(single[mode], got)
        _assert_same(InfluenceResult.load(tmp_path / "single" / mode), got)
    shutil.rmtree(tmp_path, ignore_errors=True)
