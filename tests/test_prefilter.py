"""Gradient-similarity prefilter on tiny random models: exact per-example gradients, JL sketches, store, resume."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

import repinf_lens.influence.prefilter.store as pf
from repinf_lens import SplitModel
from repinf_lens._shards import ManifestMismatchError
from repinf_lens.influence.prefilter import (
    GradientSketcher,
    SketchStore,
    build_sketches,
    prefilter,
    sketch_overlap,
    top_count,
)
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

_WORDS = ("red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice", "wind", "seed", "moon", "salt")


def _examples(n: int, seed: int = 0) -> list[dict]:
    return toy_mcqa_rows(n, seed, prefix=f"s{seed}-", words=_WORDS, question="Which goes with {0} and {1}?")


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)


@pytest.fixture(scope="module")
def split(model):
    hook = "blocks.0.hook_resid_post"
    return SplitModel(model, hook, random_sae(model, hook, d_sae=48, k=6))


@pytest.fixture(scope="module")
def exact_grads(split):
    """Per-example gradients ``{name: [n, *shape]}`` of 120 training examples and 4 queries (computed once)."""
    sk = GradientSketcher(split, exact=True)
    train, queries = _examples(120, seed=3), _examples(4, seed=11)

    def grads(rows: list[dict], bs: int) -> dict[str, torch.Tensor]:
        parts = [
            sk.per_example_grads(split.prepare(split.task.collate(rows[i : i + bs]))) for i in range(0, len(rows), bs)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    return train, queries, grads(queries, 8), grads(train, 20)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def _autograd_flat_grad(split: SplitModel, example: dict) -> torch.Tensor:
    """Independent reference: one example alone (no padding), torch.autograd.grad of its loss, flattened."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in split.downstream_params().items()}
    batch = split.task.collate([example])
    r, e = split.latents(batch)
    loss = split.loss(r, batch, params, e)
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


@pytest.mark.parametrize(
    ("hook", "use_error_term"), [("blocks.0.hook_resid_post", True), ("blocks.1.attn.hook_z", False)]
)
def test_exact_path_equals_per_example_autograd(model, tmp_path, hook, use_error_term):
    split = SplitModel(model, hook, random_sae(model, hook, d_sae=48, k=6), use_error_term=use_error_term)
    train, queries = _examples(6, seed=1), _examples(2, seed=2)
    store = build_sketches(split, None, train, out_dir=tmp_path / "exact", exact=True, batch_size=4, progress=False)
    assert store.dim == split.num_downstream_params() and store.ids == [ex["id"] for ex in train]
    ref_t = torch.stack([_autograd_flat_grad(split, ex) for ex in train])
    ref_q = torch.stack([_autograd_flat_grad(split, ex) for ex in queries])
    got = store.sketches.double()
    assert torch.allclose(got, ref_t, rtol=1e-4, atol=1e-6)
    assert torch.allclose(store.grad_norms.double(), ref_t.norm(dim=1), rtol=1e-5)
    res = prefilter(queries, store, split=split, top_k=3)
    assert (res.all_scores.double() - _cos(ref_q, ref_t)).abs().max() <= 1e-5
    # the per-example loop gives the same gradients as vmap
    loop = GradientSketcher(split, exact=True, method="loop").sketch(train, batch_size=4)
    assert torch.allclose(loop, store.sketches, rtol=1e-5, atol=1e-6)  # float32 rounding of two summation orders


@pytest.mark.parametrize("projection", ["sjlt", "rademacher"])
def test_sketches_preserve_inner_products_and_top_ranking(split, exact_grads, projection):
    """JL at dim=2048 on |theta2| = 17k: every error within 6 standard deviations, top-10 % kept.

    For a projection with E[S^T S] = I the inner-product error has standard deviation
    sqrt((|g|^2 |h|^2 + <g, h>^2) / dim) (the sparse JL transform's is never larger), the squared-norm ratio
    sqrt(2 / dim), and the cosine (a sample correlation) about (1 - cos^2) / sqrt(dim). 6 sigma bounds fail with
    probability ~1e-9 per pair for Gaussian tails (observed maxima here: 2.3-3.0 sigma). Top-10 % overlap
    >= 0.9 (12 candidates of 120, at most one swapped): the cosine errors (<= 0.05) are far below the gaps
    between most exact candidates and the cut-off; observed 1.0 (top-5 %: 0.96-1.0).
    """
    train, queries, grads_q, grads_t = exact_grads
    flat = GradientSketcher(split, exact=True)
    gq, gt = flat.project(grads_q).double(), flat.project(grads_t).double()
    dim = 2048
    sk = GradientSketcher(split, dim=dim, projection=projection, seed=0)
    sq, st = sk.project(grads_q).double(), sk.project(grads_t).double()
    ip, ip_sk = gq @ gt.T, sq @ st.T
    nq, nt = gq.norm(dim=1), gt.norm(dim=1)
    sigma_ip = ((nq[:, None] * nt[None]) ** 2 + ip**2).sqrt() / math.sqrt(dim)
    assert ((ip_sk - ip).abs() / sigma_ip).max() <= 6
    assert ((st.norm(dim=1) ** 2 / nt**2 - 1).abs()).max() <= 6 * math.sqrt(2 / dim)
    exact_cos, sketch_cos = _cos(gq, gt), _cos(sq, st)
    assert ((sketch_cos - exact_cos).abs() / ((1 - exact_cos**2) / math.sqrt(dim) + 1e-6)).max() <= 6
    assert sketch_overlap(exact_cos, sketch_cos, frac=0.1) >= 0.9
    assert sketch_overlap(exact_cos, sketch_cos, frac=0.05) >= 0.8  # 6 candidates: at most one swapped
    # deterministic: a fresh sketcher with the same seed (sketching the queries end to end, no cached blocks)
    # gives the same projection; another seed does not
    again = GradientSketcher(split, dim=dim, projection=projection, seed=0, cache_bytes=0).sketch(queries)
    assert torch.equal(again, sq.float())
    other = GradientSketcher(split, dim=dim, projection=projection, seed=1).project(grads_q)
    assert not torch.allclose(other, again)


def test_store_resume_after_crash_computes_only_missing_shards(split, tmp_path, monkeypatch):
    train = _examples(9, seed=4)
    kw = dict(dim=256, batch_size=3, shard_size=3, seed=7, progress=False)
    full = build_sketches(split, None, train, out_dir=tmp_path / "full", **kw)
    calls: list[str] = []
    real = pf._sketch_shard

    def crashing(sketcher, rows, batch_size, bar, check=None, max_tokens=None):
        calls.append(rows[0]["id"])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(sketcher, rows, batch_size, bar, check, max_tokens)

    monkeypatch.setattr(pf, "_sketch_shard", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_sketches(split, None, train, out_dir=tmp_path / "run", **kw)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["finished"] == [0] and not manifest["complete"]
    with pytest.raises(RuntimeError, match="incomplete.*rerun build_sketches"):
        SketchStore.load(tmp_path / "run")
    first = tmp_path / "run" / "shards" / "shard_00000.safetensors"
    stamp = (first.stat().st_mtime_ns, hashlib.sha256(first.read_bytes()).hexdigest())

    calls.clear()
    monkeypatch.setattr(pf, "_sketch_shard", lambda *a: (calls.append(a[1][0]["id"]), real(*a))[1])
    store = build_sketches(split, None, train, out_dir=tmp_path / "run", **kw)
    assert calls == [train[3]["id"], train[6]["id"]]  # shards 1 and 2 only
    assert (first.stat().st_mtime_ns, hashlib.sha256(first.read_bytes()).hexdigest()) == stamp
    assert torch.equal(store.sketches, full.sketches) and torch.equal(store.grad_norms, full.grad_norms)
    assert store.ids == full.ids == [ex["id"] for ex in train]
    calls.clear()
    build_sketches(split, None, train, out_dir=tmp_path / "run", **kw)  # complete: nothing recomputed
    assert calls == []
    eager = SketchStore.load(tmp_path / "run", mmap=False)
    assert torch.equal(eager.sketches, store.sketches)
    assert [s for s, _ in store.iter_shards()] == [0, 3, 6]


def test_check_queries_store_exact_cosines_and_report(split, exact_grads, tmp_path):
    """build_sketches(check_queries=...) stores the EXACT cosines of the queries with every training gradient
    (equal to cosines of independently computed per-example gradients), and check_report compares them with
    the sketched cosines prefilter uses; with exact "sketches" the two rankings coincide."""
    train, queries, grads_q, grads_t = exact_grads
    flat = GradientSketcher(split, exact=True)
    want = _cos(flat.project(grads_q).double(), flat.project(grads_t).double()).float()
    kw = dict(batch_size=16, shard_size=50, progress=False, check_queries=queries)
    store = build_sketches(split, None, train, out_dir=tmp_path / "sk", dim=512, seed=3, **kw)
    assert store.has_check and store.manifest["check_ids"] == [q["id"] for q in queries]
    exact, sketched = store.check_cosines()
    assert exact.shape == sketched.shape == (4, 120)
    torch.testing.assert_close(exact, want, atol=2e-5, rtol=0)
    q_sk = GradientSketcher.from_store(split, store).sketch(queries)
    torch.testing.assert_close(sketched, prefilter(q_sk, store, top_k=1).all_scores)
    rep = store.check_report(fracs=(0.05, 0.25))
    assert rep["top_overlap"]["0.05"] == sketch_overlap(exact, sketched, 0.05)
    assert rep["top_overlap"]["0.25"] == sketch_overlap(exact, sketched, 0.25)
    assert rep["n"] == 120 and rep["queries"] == 4 and rep["dim"] == 512
    assert rep["max_abs_error"] == pytest.approx(float((exact - sketched).abs().max()))
    assert 0.5 < rep["spearman"] <= 1 and 0 < rep["max_abs_error"] < 0.5  # a real, imperfect projection
    full = build_sketches(split, None, train, out_dir=tmp_path / "ex", exact=True, **kw).check_report()
    assert full["top_overlap"] == {"0.01": 1.0, "0.05": 1.0, "0.1": 1.0}
    assert full["spearman"] > 0.9999 and full["max_abs_error"] < 1e-4
    # a crash after the first shard: the rerun recomputes the queries' gradients and only the missing shards
    real, calls, crash = pf._sketch_shard, [], [True]

    def crashing(sketcher, rows, batch_size, bar, check=None, max_tokens=None):
        calls.append(rows[0]["id"])
        if len(calls) == 2 and crash.pop():
            raise RuntimeError("simulated crash")
        return real(sketcher, rows, batch_size, bar, check, max_tokens)

    import unittest.mock as um

    with um.patch.object(pf, "_sketch_shard", crashing), pytest.raises(RuntimeError, match="simulated crash"):
        build_sketches(split, None, train, out_dir=tmp_path / "crash", dim=512, seed=3, **kw)
    calls.clear()
    crash.append(False)
    with um.patch.object(pf, "_sketch_shard", crashing):
        again = build_sketches(split, None, train, out_dir=tmp_path / "crash", dim=512, seed=3, **kw)
    assert calls == [train[50]["id"], train[100]["id"]]
    for a, b in zip(again.check_cosines(), (exact, sketched)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no check queries.*check_queries="):
        build_sketches(split, None, train[:8], out_dir=tmp_path / "none", dim=64, progress=False).check_report()


def test_prefilter_counts_order_and_selection(split, tmp_path):
    train, queries = _examples(40, seed=5), _examples(3, seed=6)
    store = build_sketches(split, None, train, out_dir=tmp_path / "s", dim=512, batch_size=8, progress=False)
    q = GradientSketcher.from_store(split, store).sketch(queries)
    by_rows = prefilter(queries, store, split=split, top_k=5)
    by_sketch = prefilter(q, tmp_path / "s", top_k=5)
    assert torch.equal(by_rows.indices, by_sketch.indices) and torch.allclose(by_rows.scores, by_sketch.scores)
    assert by_rows.indices.shape == (3, 5) and by_rows.k == 5
    assert torch.equal(by_rows.scores, by_rows.all_scores.gather(1, by_rows.indices))
    assert (by_rows.scores[:, :-1] >= by_rows.scores[:, 1:]).all()  # best first
    assert by_rows.scores.min() >= by_rows.all_scores.topk(5, dim=1).values.min(1).values.min()
    assert by_rows.ids[1] == [train[i]["id"] for i in by_rows.indices[1].tolist()]
    assert [r["id"] for r in by_rows.select(train, 2)] == by_rows.ids[2]
    assert torch.equal(by_rows.union(), torch.unique(by_rows.indices))
    for frac, k in [(0.05, 2), (0.1, 4), (0.01, 1), (0.26, 11), (1.0, 40)]:
        assert prefilter(q, store, top_fraction=frac).indices.shape == (3, k)
    assert prefilter(q[0], store, top_k=100).indices.shape == (1, 40)
    assert top_count(100, top_fraction=0.07) == 7 and top_count(1000, top_fraction=0.01) == 10  # no float overshoot
    assert top_count(3, top_fraction=0.01) == 1
    absolute = prefilter(q, store, top_k=4, absolute=True)
    assert torch.equal(absolute.scores.abs(), by_rows.all_scores.abs().topk(4, dim=1).values)
    with pytest.raises(ValueError, match="exactly one of top_k and top_fraction"):
        prefilter(q, store)
    with pytest.raises(ValueError, match="exactly one of top_k and top_fraction"):
        prefilter(q, store, top_k=3, top_fraction=0.1)
    with pytest.raises(ValueError, match="top_fraction must be in"):
        prefilter(q, store, top_fraction=1.5)
    with pytest.raises(ValueError, match="dim=512"):
        prefilter(torch.randn(2, 64), store, top_k=3)
    with pytest.raises(ValueError, match="need the split"):
        prefilter(queries, store, top_k=3)
    with pytest.raises(ValueError, match="over='theta2'"):
        prefilter(q, store, top_k=3, over="theta")


def test_sketch_overlap_definition():
    exact = torch.arange(20.0)
    assert sketch_overlap(exact, exact, frac=0.1) == 1.0
    assert sketch_overlap(exact, -exact, frac=0.1) == 0.0
    swapped = exact.clone()
    swapped[19], swapped[0] = swapped[0], swapped[19]  # top-2 = {19, 18} vs sketch {0, 18}
    assert sketch_overlap(exact, swapped, frac=0.1) == 0.5
    assert sketch_overlap(torch.stack([exact, exact]), torch.stack([exact, swapped]), frac=0.1) == 0.75


def test_errors_name_the_fix(split, model, tmp_path):
    with pytest.raises(ValueError, match="training set is empty.*Fix"):
        build_sketches(split, None, [], out_dir=tmp_path / "empty", progress=False)
    train = _examples(4, seed=8)
    build_sketches(split, None, train, out_dir=tmp_path / "s", dim=64, progress=False)
    with pytest.raises(ManifestMismatchError, match=r"differs in \['sketch'\].*Fix: pass a new out_dir"):
        build_sketches(split, None, train, out_dir=tmp_path / "s", dim=128, progress=False)
    with pytest.raises(ManifestMismatchError, match=r"differs in \['n', 'train'\]"):
        build_sketches(split, None, train[:3], out_dir=tmp_path / "s", dim=64, progress=False)
    store = build_sketches(split, None, train, out_dir=tmp_path / "s", dim=128, overwrite=True, progress=False)
    assert store.dim == 128 and len(list((tmp_path / "s" / "shards").iterdir())) == 1
    other = SplitModel(model, "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="built for another split.*Fix"):
        prefilter(train[:1], store, split=other, top_k=2)
    with pytest.raises(FileNotFoundError, match="no manifest.json.*Fix"):
        SketchStore.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="projection must be"):
        GradientSketcher(split, projection="gaussian")


@pytest.mark.parametrize("projection", ["sjlt", "rademacher"])
def test_projection_skips_untouched_coordinates_exactly(split, projection):
    """Gradients that touch few coordinates (the unembedding columns the loss reads) take the sparse path; the
    sketch equals the explicit projection matrix applied to the full gradient."""
    sk = GradientSketcher(split, dim=32, projection=projection, seed=3)
    name = next(iter(sk.shapes))
    shape = sk.shapes[name]
    g = torch.zeros(3, *shape)
    flat = g.view(3, -1)
    flat[:, [1, 7]] = torch.randn(3, 2)  # 2 live coordinates: sparse path
    dense_g = torch.randn(3, flat.shape[1])  # every coordinate live: dense path
    n = flat.shape[1]
    block = sk._block(name, 0, n, torch.device("cpu"))
    if projection == "sjlt":
        S = torch.zeros(n, 32)
        S[torch.arange(n), block[0]] = block[1]
    else:
        S = block[0]
    zeros = {k: torch.zeros(3, *s) for k, s in sk.shapes.items() if k != name}
    for grads in (flat, dense_g):
        got = sk.project({name: grads.view(3, *shape), **zeros})
        torch.testing.assert_close(got, grads @ S, rtol=1e-5, atol=1e-5)
    assert not sk.project({name: torch.zeros(3, *shape), **zeros}).any()


def test_float16_storage_halves_the_store_and_keeps_the_ranking(split, tmp_path):
    """storage_dtype='float16': the same sketches rounded once (fp32 matching), half the bytes, its own fingerprint."""
    train, queries = _examples(40, seed=5), _examples(3, seed=6)
    full = build_sketches(split, None, train, out_dir=tmp_path / "f32", dim=512, batch_size=8, progress=False)
    half = build_sketches(split, None, train, out_dir=tmp_path / "f16", dim=512, batch_size=8, progress=False,
                          storage_dtype="float16")  # fmt: skip
    assert half.sketches.dtype == torch.float16 and torch.equal(half.sketches, full.sketches.half())
    size = {k: sum(p.stat().st_size for p in (tmp_path / k / "shards").iterdir()) for k in ("f32", "f16")}
    assert size["f16"] < 0.6 * size["f32"]
    a, b = prefilter(queries, full, split=split, top_k=40), prefilter(queries, half, split=split, top_k=40)
    assert (a.all_scores - b.all_scores).abs().max() < 2e-3
    assert half.fingerprint["storage_dtype"] == "float16" and "storage_dtype" not in full.fingerprint
    with pytest.raises(ManifestMismatchError):  # a float32 folder is not silently reused for float16
        build_sketches(split, None, train, out_dir=tmp_path / "f32", dim=512, batch_size=8, progress=False,
                       storage_dtype="float16")  # fmt: skip
    with pytest.raises(ValueError, match="storage_dtype"):
        build_sketches(split, None, train, out_dir=tmp_path / "x", storage_dtype="int8", progress=False)
