"""benchmarks/bench_peers.py: repinf_lens next to Kronfluence and dattri on one setting (tiny smoke mode).

The peers are an optional extra (``pip install -e .[peers]``): the smoke test and the dattri check are skipped
without them; the HF-twin gradient check and the missing-peer message need neither.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny setting (random 2-layer HF Llama and its TL copy), theta2 = blocks.1.mlp.W_out."""
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        import bench_peers
    finally:
        sys.path.remove(str(BENCH))
    args = bench_peers.parse_args(["--tiny", "--n-train", "6", "--queries", "2"])
    args.workdir = str(tmp_path_factory.mktemp("peers"))
    torch.manual_seed(0)
    return bench_peers, bench_peers.build_setting(args)


def test_hf_twin_gradient_check_compares_and_catches_another_model(tiny):
    bp, s = tiny
    rows = s.train + s.queries
    ref = bp.repinf_example_grads(s, rows, 4)
    g_hf, losses = bp.hf_example_grads(s, rows, 4)
    res = bp.compare_grads(ref, g_hf, 1e-4, "HF twin")
    assert res["n_examples"] == len(rows) and res["max_scaled_residual"] < 1e-4 and res["min_cosine"] > 0.9999
    with torch.no_grad():
        tl_losses = torch.cat([s.split.inputs_loss(s.split.downstream_params(), s.split.prepare(s.task.collate([r])),
                                                   reduction="none") for r in rows])  # fmt: skip
    assert torch.allclose(losses, tl_losses, atol=1e-5)
    # an upstream weight of the twin changed: same theta2, another function -> the check refuses it
    up = s.hf.model.layers[0].mlp.up_proj.weight
    saved = up.detach().clone()
    try:
        with torch.no_grad():
            up.add_(0.05 * torch.randn_like(up))
        g_bad, _ = bp.hf_example_grads(s, rows, 4)
        with pytest.raises(bp.GradientMismatchError, match="differ from repinf_lens"):
            bp.compare_grads(ref, g_bad, 1e-4, "HF twin (perturbed)")
    finally:
        with torch.no_grad():
            up.copy_(saved)
    # and so does a gradient of the wrong shape
    with pytest.raises(bp.GradientMismatchError, match="shape"):
        bp.compare_grads(ref, ref[:, :-1], 1e-4, "truncated")


def test_missing_peer_is_skipped_with_the_install_hint(tiny, capsys):
    bp, _ = tiny
    assert bp.import_peer("repinf_lens_no_such_peer_xyz") is None
    out = capsys.readouterr().out
    assert "pip install -e .[peers]" in out and "repinf_lens_no_such_peer_xyz" in out


def test_dattri_gradient_check_compares(tiny):
    pytest.importorskip("dattri")
    bp, s = tiny
    rows = s.train + s.queries
    ref = bp.repinf_example_grads(s, rows, 4)
    dd = bp.dattri_data(s, 4)
    assert bp.compare_grads(ref, bp.dattri_grads(s, dd), 1e-4, "dattri")["max_scaled_residual"] < 1e-4
    # dattri's copy of theta2 is another point: the check sees it
    name = s.theta_names[0]
    w = s.theta[name].clone()
    try:
        s.split.load_downstream_params({name: w + 0.5 * torch.randn_like(w)})
        g_bad = bp.dattri_grads(s, dd)
    finally:
        s.split.load_downstream_params({name: w})
    with pytest.raises(bp.GradientMismatchError):
        bp.compare_grads(ref, g_bad, 1e-4, "dattri (other theta2)")


def test_bench_peers_tiny_smoke(tmp_path):
    pytest.importorskip("kronfluence")
    pytest.importorskip("dattri")
    import bench_peers

    only = ["repinf identity", "repinf cg10", "repinf pcg5 ekfac", "repinf ekfac (emp)", "repinf woodbury (true)",
            "kronfluence ekfac (emp)", "dattri"]  # fmt: skip
    res = bench_peers.main(["--tiny", "--subsets", "3", "--max-iter", "20", "--n-boot", "200", "--no-progress",
                            "--out", str(tmp_path), "--only", *only])  # fmt: skip
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["best"] == res["best"] and (tmp_path / "results.md").read_text().startswith("# repinf_lens vs")
    names = {r["method"] for r in res["methods"]}
    assert names == {"repinf identity", "repinf cg10 (fixed)", "repinf cg10 (fixed, recomputed HVPs)",
                     "repinf pcg5 ekfac (emp)", "repinf pcg5 ekfac (emp, bf16 rotations)",
                     "repinf pcg5 ekfac (expected)", "repinf ekfac (emp)",
                     "repinf woodbury (true)",
                     "kronfluence ekfac (emp)",
                     "dattri cg10", "dattri arnoldi", "dattri datainf", "dattri trak"}, res["skipped"]  # fmt: skip
    assert not res["skipped"] and res["versions"]["kronfluence"] and res["versions"]["dattri"]
    assert [c["max_scaled_residual"] < 1e-4 for c in res["gradient_checks"]] == [True, True]
    by = {r["method"]: r for r in res["methods"]}
    for r in res["methods"]:
        assert r["sign_factor"] == 1.0 and r["sign_check_pearson_vs_gradient_dot"] > 0, r["method"]
        assert len(r["lds_per_query"]) == 3 and -1 <= r["lds_spearman"] <= 1 and r["total_s"] >= r["fit_s"] >= 0
        assert len(r["scores"]) == 3 and len(r["scores"][0]) == 10
        b = r["bootstrap_vs_best"]
        assert math.isnan(b["diff"]) or b["ci95"][0] <= b["diff"] + 1e-9 <= b["ci95"][1] + 2e-9
    assert by[res["best"]]["bootstrap_vs_best"]["diff"] == 0.0
    # Kronfluence's EK-FAC with the empirical Fisher and the answer-position token mask is repinf_lens' EK-FAC
    kf = torch.tensor(by["kronfluence ekfac (emp)"]["scores"])
    rl = torch.tensor(by["repinf ekfac (emp)"]["scores"])
    assert float((kf - rl).norm() / rl.norm()) < 1e-3
    # prepared and recomputed HVPs give the same CG scores, up to the rounding that fixed-iteration CG (tol 0, run
    # past convergence at theta2*) amplifies; tests/test_hvp_prepared.py checks the products themselves to 1e-6
    a, b = (torch.tensor(by[f"repinf cg10 (fixed{x})"]["scores"]).flatten() for x in ("", ", recomputed HVPs"))
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.99
    # every method is scored against the same retrained losses
    assert len(res["ground_truth"]["lds"]["actual"]) == 3 and len(res["ground_truth"]["lds"]["actual"][0]) == 3


def test_memory_cap_stops_a_method_and_the_run_goes_on(tmp_path):
    import bench_peers

    res = bench_peers.main(["--tiny", "--subsets", "2", "--loo", "0", "--max-iter", "5", "--precheck", "0",
                            "--no-progress", "--out", str(tmp_path), "--only", "repinf identity",
                            "--max-rss-gb", "0.01"])  # fmt: skip
    assert res["methods"] == [] and res["best"] is None and res["complete"]
    assert "MemoryCapExceeded" in res["skipped"]["repinf identity"]


def test_the_memory_cap_raises_one_clear_error_however_short_the_block_and_keeps_ctrl_c():
    """The cap's simulated SIGINT must never escape as a stray KeyboardInterrupt (it killed a CI run once, when a
    sample tripped just as a block ended), a block shorter than one sample is judged at exit, and a real Ctrl-C
    inside a capped block is still a KeyboardInterrupt."""
    import signal
    import time

    from _memory import MemoryCapExceeded, PeakRSS, rss_bytes

    before = signal.getsignal(signal.SIGINT)
    for _ in range(20):  # a block shorter than one sampling interval, over the cap from the start
        with pytest.raises(MemoryCapExceeded, match="above the cap"):
            with PeakRSS(interval=10.0, cap_bytes=1):
                pass
    for _ in range(20):  # trips in the body, at exit or inside the join: always one MemoryCapExceeded
        with pytest.raises(MemoryCapExceeded):
            with PeakRSS(interval=1e-4, cap_bytes=1):
                time.sleep(0.001 * (_ % 3))
    time.sleep(0.05)  # (a stray simulated SIGINT would surface here)
    t0 = time.time()
    with pytest.raises(MemoryCapExceeded):  # a long body is stopped, not run to the end
        with PeakRSS(interval=1e-3, cap_bytes=1):
            while time.time() - t0 < 5:
                pass
    assert time.time() - t0 < 1
    with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C under a cap it does not exceed
        with PeakRSS(interval=1e-3, cap_bytes=2**50):
            signal.raise_signal(signal.SIGINT)
    with PeakRSS() as mem:  # no cap: only the peak
        x = torch.ones(2**25)  # 128 MB (above glibc's largest mmap threshold: fresh pages, whatever was freed)
    assert mem.peak_mb is not None and mem.peak_mb >= 100 and x.numel()
    assert signal.getsignal(signal.SIGINT) == before and (rss_bytes() or 0) > 0


def test_the_whole_block_setting_matches_the_hf_twin_map_by_map(tmp_path):
    """--theta2 block: the 7 linear maps of the last block (grouped-query K/V included), each equal to its HF
    module in the HF layout, and per-example gradients equal to the HF twin's autograd (an independent model)."""
    import bench_peers as bp

    args = bp.parse_args(["--tiny", "--theta2", "block", "--n-train", "4", "--queries", "1"])
    args.workdir = str(tmp_path)
    s = bp.build_setting(args)
    short = [m.tl.rsplit(".", 1)[-1] for m in s.maps]
    assert short[0] == "W_Q" and short[3:] == ["W_O", "W_gate", "W_in", "W_out"] and len(short) == 7
    assert sorted(s.split.downstream_params()) == sorted(s.theta_names)
    assert s.n_theta2 == sum(s.hf.get_submodule(m.hf).weight.numel() for m in s.maps)
    for m in s.maps:  # the layouts round-trip
        w = s.theta[m.tl]
        assert torch.equal(m.to_tl(m.to_hf(w)), w)
    rows = s.train + s.queries
    ref = bp.repinf_example_grads(s, rows, 4)
    g_hf, _ = bp.hf_example_grads(s, rows, 4)
    assert bp.compare_grads(ref, g_hf, 1e-4, "HF twin, whole block")["max_scaled_residual"] < 1e-4
    # a map loaded into the TL model only: the twin now computes another function, and the check sees it
    name = s.maps[0].tl
    w = s.theta[name].clone()
    try:
        s.split.load_downstream_params({name: w + 0.3 * torch.randn_like(w)})
        with pytest.raises(bp.GradientMismatchError):
            bp.compare_grads(bp.repinf_example_grads(s, rows, 4), g_hf, 1e-4, "HF twin (other W_Q)")
    finally:
        s.split.load_downstream_params({name: w})


def test_the_retraining_resumes_from_its_checkpoint(tmp_path, capsys):
    import bench_peers as bp

    argv = ["--tiny", "--theta2", "block", "--n-train", "6", "--queries", "2", "--subsets", "3", "--loo", "0",
            "--max-iter", "5", "--precheck", "0", "--no-progress", "--out", str(tmp_path),
            "--only", "repinf identity"]  # fmt: skip
    first = bp.main(argv)
    ckpt = tmp_path / "ground_truth.partial.safetensors"
    assert ckpt.exists() and "resumed_from_checkpoint" not in first["ground_truth"]
    again = bp.main(argv)  # every refit is read back, none rerun
    assert again["ground_truth"]["resumed_from_checkpoint"] == {"actual/lds": 3, "full": 1}
    assert again["ground_truth"]["lds"]["actual"] == first["ground_truth"]["lds"]["actual"]
    assert first["ground_truth"]["threads"] == again["ground_truth"]["threads"] == [1]  # the refits' thread counts
    assert again["methods"][0]["scores"] == first["methods"][0]["scores"]
    # a corrupt checkpoint is ignored (named), and the retraining starts over with the same result
    ckpt.write_bytes(ckpt.read_bytes()[:-16])
    capsys.readouterr()
    fresh = bp.main(argv)
    assert "ignoring" in capsys.readouterr().out and "resumed_from_checkpoint" not in fresh["ground_truth"]
    assert torch.allclose(torch.tensor(fresh["ground_truth"]["lds"]["actual"]),
                          torch.tensor(first["ground_truth"]["lds"]["actual"]), atol=1e-9)  # fmt: skip


def test_parts_over_one_checkpoint_merge_into_the_single_run_table(tmp_path):
    """Methods split between two processes over one retraining checkpoint merge into the table one process gives:
    the same per-method LDS, the same best, the same bootstrap; parts of another ground truth are refused."""
    import shutil

    import bench_peers as bp

    base = ["--tiny", "--theta2", "block", "--n-train", "6", "--queries", "2", "--subsets", "3", "--loo", "0",
            "--max-iter", "5", "--precheck", "0", "--no-progress", "--n-boot", "300"]  # fmt: skip
    one = bp.main([*base, "--out", str(tmp_path / "one"), "--only", "repinf identity", "repinf cg10"])
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        shutil.copy(tmp_path / "one" / "ground_truth.partial.safetensors", tmp_path / part)
    bp.main([*base, "--out", str(tmp_path / "a"), "--only", "repinf identity"])
    b = bp.main([*base, "--out", str(tmp_path / "b"), "--only", "repinf cg10"])
    assert b["ground_truth"]["resumed_from_checkpoint"] == {"actual/lds": 3, "full": 1}
    merged = bp.main(["--merge", str(tmp_path / "a/results.json"), str(tmp_path / "b/results.json"),
                      "--out", str(tmp_path / "m"), "--n-boot", "300"])  # fmt: skip
    assert merged["best"] == one["best"] and len(merged["merged_from"]) == 2
    by_one = {r["method"]: r for r in one["methods"]}
    for r in merged["methods"]:
        assert r["lds_spearman"] == by_one[r["method"]]["lds_spearman"]
        assert r["bootstrap_vs_best"] == by_one[r["method"]]["bootstrap_vs_best"]
    assert (tmp_path / "m/results.md").read_text().startswith("# repinf_lens vs")
    # another ground truth (a different subset draw) is refused, naming the fix
    c = json.loads((tmp_path / "b/results.json").read_text())
    c["ground_truth"]["lds"]["actual"][0][0] += 1.0
    (tmp_path / "c.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="ground truth differs"):
        bp.merge_results([tmp_path / "a/results.json", tmp_path / "c.json"], tmp_path / "x", n_boot=10, seed=0)
    with pytest.raises(ValueError, match="ran in two parts"):
        bp.merge_results([tmp_path / "a/results.json", tmp_path / "a/results.json"], tmp_path / "x", n_boot=10, seed=0)


def test_pcg_by_iteration_reads_the_peer_ground_truth_and_refuses_another(tmp_path):
    """bench_pcg_iterations.py on the tiny setting: it reads bench_peers' retraining checkpoint (read only), plain
    CG100 and every PCG row converge to its converged PCG reference, and a missing ground truth stops it before any
    work, naming the fix."""
    import bench_pcg_iterations as bpi
    import bench_peers

    peer = "--tiny --n-train 6 --queries 2 --subsets 3 --loo 0 --max-iter 20 --precheck 0"
    bench_peers.main([*peer.split(), "--n-boot", "50", "--no-progress", "--out", str(tmp_path / "peers"),
                      "--only", "repinf identity"])  # fmt: skip
    truth = tmp_path / "peers" / "ground_truth.partial.safetensors"
    before = truth.read_bytes()
    out = tmp_path / "pcg.json"
    res = bpi.main(["--peer-args", peer, "--truth", str(truth), "--iters", "3,40", "--reps", "1", "--ref-iters", "80",
                    "--pre-dampings", "0.1", "--sweep-iters", "8", "--out", str(out)])  # fmt: skip
    assert truth.read_bytes() == before
    assert json.loads(out.read_text())["summary"] == res["summary"]
    side = res["side_by_side"]
    assert set(side) == {"cg100", "pcg3", "pcg40"} and res["summary"]["cg100"]["ratio_vs_cg100"] == 1.0
    assert side["cg100"]["score_rel_err_vs_reference"][0] < 1e-3  # plain CG and PCG solve the same system
    assert side["pcg40"]["score_rel_err_vs_reference"][0] < 1e-3 < side["pcg3"]["score_rel_err_vs_reference"][0]
    assert set(res["preconditioner_damping"]) == {"pre_damping=0.1 pcg8"}
    with pytest.raises(SystemExit, match="Fix: run `make reproduce RUN=bench-peers`"):
        bpi.main(["--peer-args", peer, "--truth", str(tmp_path / "none.safetensors"), "--out", str(out)])
