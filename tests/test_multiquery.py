"""Many queries per pass: the multi-query swap and batched CG equal their one-query-at-a-time versions."""

from __future__ import annotations

import warnings

import pytest
import torch

from repinf_lens import CG, Identity, InfluenceAttributor, MultipleChoiceTask, SplitModel
from repinf_lens._tree import tflatten
from repinf_lens.curvature import Explicit, NegativeCurvatureWarning
from repinf_lens.curvature.solvers import batched_hvp
from repinf_lens.influence import math as imath
from repinf_lens.influence.math import latent_influence, latent_influence_multi, stack_queries
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

RTOL = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal to ``rtol`` relative to the largest magnitude of ``want`` (elementwise relative is meaningless at 0)."""
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= rtol * scale, f"max abs diff {err:.3e} > {rtol:g} x {scale:.3e}"


@pytest.fixture(scope="module")
def model3():
    return tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=1)


def _queries_s(split: SplitModel, nq: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    params = split.downstream_params()
    return [{k: (torch.randn(v.shape, generator=g) * 0.1).to(v.dtype) for k, v in params.items()} for _ in range(nq)]


@pytest.mark.parametrize(
    "hook,sae,err",
    [
        ("blocks.1.hook_resid_post", True, True),
        ("blocks.1.hook_mlp_out", True, True),
        ("blocks.1.attn.hook_z", True, True),
        ("blocks.1.hook_resid_post", True, False),
        ("blocks.2.hook_resid_pre", False, True),
    ],
)
def test_multi_swap_equals_per_query_swap(model3, hook, sae, err):
    split = SplitModel(model3, hook, random_sae(model3, hook, d_sae=48, k=6) if sae else None, use_error_term=err)
    params = split.downstream_params()
    inp = split.prepare(split.task.collate(toy_mcqa_rows(5, seed=3)))
    s_list = _queries_s(split, 4)
    want = [latent_influence(split, s, inp, params) for s in s_list]
    variants = {
        "list": latent_influence_multi(split, s_list, inp, params),
        "stacked": latent_influence_multi(split, stack_queries(s_list, params), inp, params),
        "chunks": latent_influence_multi(split, s_list, inp, params, chunk_size=2, query_chunk_size=3),
        "one_at_a_time": latent_influence_multi(split, stack_queries(s_list, params), inp, params, query_chunk_size=1),
    }
    for name, got in variants.items():
        assert len(got) == 4, name
        for g, w in zip(got, want):
            _close(g.token_scores, w.token_scores)
            _close(g.example_scores, w.example_scores)
            _close(g.latent_scores, w.latent_scores)
            _close(g.error_term, w.error_term)
            _close(g.bias_term, w.bias_term)
            assert torch.equal(g.token_scores != 0, w.token_scores != 0), name
            assert torch.equal(g.latents, w.latents)
    # one query: exactly the single-query swap
    one = latent_influence_multi(split, s_list[:1], inp, params)[0]
    assert torch.equal(one.token_scores, want[0].token_scores)
    assert latent_influence_multi(split, [], inp, params) == []


def test_multi_swap_and_batched_hvp_vmap_on_a_llama_architecture(tmp_path):
    """Rotary, RMSNorm, gated SiLU MLP, grouped-query attention (the default model's kind): vmap needs no fallback."""
    from repinf_lens import load_model
    from repinf_lens.testing import tiny_hf_llama

    tiny_hf_llama(tmp_path / "llama")
    model = load_model(tmp_path / "llama", device="cpu", n_ctx=256)
    hook = "blocks.0.hook_resid_post"
    split = SplitModel(model, hook, random_sae(model, hook, d_sae=48, k=6))
    params = split.downstream_params()
    inp = split.prepare(split.task.collate(toy_mcqa_rows(3, seed=8)))
    s_list = _queries_s(split, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fallback warns: fail instead
        got = latent_influence_multi(split, s_list, inp, params)
    for g, s in zip(got, s_list):
        w = latent_influence(split, s, inp, params)
        _close(g.token_scores, w.token_scores)
        _close(g.example_scores, w.example_scores)
    att = _att(split, CG(gauss_newton=True), use_cache=False).fit(toy_mcqa_rows(2, seed=9))
    stacked = torch.func.vmap(att.hvp)(stack_queries(s_list, params))
    _close(tflatten({k: t[1] for k, t in stacked.items()}), tflatten(att.hvp(s_list[1])))


def test_multi_swap_falls_back_without_vmap(model3, monkeypatch):
    hook = "blocks.1.hook_resid_post"
    split = SplitModel(model3, hook, random_sae(model3, hook, d_sae=48, k=6))
    params = split.downstream_params()
    inp = split.prepare(split.task.collate(toy_mcqa_rows(3, seed=4)))
    s_list = _queries_s(split, 2)

    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("Batching rule not implemented for aten::something")

        return fail

    monkeypatch.setattr(imath, "vmap", broken)
    monkeypatch.setattr(imath, "_VMAP_FALLBACK_WARNED", False)
    with pytest.warns(RuntimeWarning, match="falling back to one JVP per query"):
        got = latent_influence_multi(split, s_list, inp, params)
    for g, s in zip(got, s_list):
        w = latent_influence(split, s, inp, params)
        assert torch.equal(g.token_scores, w.token_scores) and torch.equal(g.example_scores, w.example_scores)


def _per_query_attribute(att: InfluenceAttributor, queries, train, bs: int) -> dict[str, torch.Tensor]:
    """The pre-multi-query loop: one latent_influence call per (batch, query)."""
    s_list = att.s_test(queries)
    params = att.split.downstream_params()
    nq, n = len(queries), len(train)
    ex, lat = torch.zeros(nq, n), torch.zeros(nq, n, att.split.d_sae)
    err = torch.zeros(nq, n)
    for lo in range(0, n, bs):
        inp = att.split.prepare(att.task.collate(train[lo : lo + bs]))
        for q, s in enumerate(s_list):
            li = latent_influence(att.split, s, inp, params)
            ex[q, lo : lo + bs] = li.example_scores
            lat[q, lo : lo + bs] = li.latent_scores
            err[q, lo : lo + bs] = li.error_term
    return {"example": ex, "latent": lat, "error_term": err}


@pytest.mark.parametrize("query_chunk_size", [None, 1, 2])
def test_attributor_scores_all_queries_per_batch(model3, query_chunk_size):
    hook = "blocks.1.hook_resid_post"
    split = SplitModel(model3, hook, random_sae(model3, hook, d_sae=48, k=6))
    queries, train = toy_mcqa_rows(3, seed=5, prefix="q"), toy_mcqa_rows(7, seed=6, prefix="t")
    att = InfluenceAttributor(
        split, hessian=Identity(), use_cache=False, progress=False, batch_size=3, query_chunk_size=query_chunk_size
    )
    res = att.attribute(queries, train)
    want = _per_query_attribute(att, queries, train, 3)
    _close(res.example_scores, want["example"])
    _close(res.latent_scores, want["latent"])
    _close(res.diagnostics["error_term"], want["error_term"])
    assert res.meta["query_chunk_size"] == query_chunk_size
    for q in range(3):  # token-level scores sum to the latent scores, per query
        for i in range(7):
            sparse, _, _ = res.token_latent_scores(q, i)
            _close(sparse.to_dense().sum(0), res.latent_scores[q, i])
    with pytest.raises(ValueError, match="query_chunk_size"):
        InfluenceAttributor(split, hessian=Identity(), query_chunk_size=0)


@pytest.fixture(scope="module")
def small():
    """theta2 = the last block + unembedding of a small float64 model; Hessian data of 6 examples.

    float64: CG amplifies rounding differences (a 1e-15 relative perturbation of the HVPs moves its last
    residuals by several per cent), so batched-vs-single comparisons of whole CG runs need float64 HVPs to be
    compared at 1e-5 (in float32 the batched HVP differs from the single one by ~1e-7 and the solutions by ~1e-5).
    """
    model = tiny_model(n_layers=2, d_model=8, n_heads=2, d_mlp=16, seed=3, dtype=torch.float64)
    task = MultipleChoiceTask(model.tokenizer, template="plain")
    split = SplitModel(model, "blocks.0.hook_resid_post", task=task)
    exs = toy_mcqa_rows(6, seed=2)
    return split, exs


def _att(split, solver, **kw) -> InfluenceAttributor:
    return InfluenceAttributor(split, hessian=solver, progress=False, **kw)


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_batched_hvp_uses_vmap_and_equals_single_hvps(small, gauss_newton):
    split, exs = small
    att = _att(split, CG(gauss_newton=gauss_newton), use_cache=False).fit(exs, batch_size=4)
    vs = _queries_s(split, 3)
    stacked = torch.func.vmap(att.hvp)(stack_queries(vs, split.downstream_params()))  # no fallback needed
    for q, v in enumerate(vs):
        want = att.hvp(v)
        _close(tflatten({k: t[q] for k, t in stacked.items()}), tflatten(want))
    for chunk in (None, 2):
        for got, v in zip(batched_hvp(att.hvp, vs, chunk_size=chunk), vs):
            _close(tflatten(got), tflatten(att.hvp(v)))


def test_cg_solve_many_equals_per_query_cg_with_convergence_masks(small):
    split, exs = small
    solver = CG(damping=0.1, max_iter=40, tol=1e-4, gauss_newton=True)  # PSD: CG converges
    att = _att(split, solver, use_cache=False).fit(exs, batch_size=4)
    gs = [att.query_gradient(e) for e in exs[:3]]
    gs.append({k: torch.zeros_like(v) for k, v in gs[0].items()})  # converged before any iteration
    single = [solver.solve(att.hvp, g) for g in gs]
    many, infos = solver.solve_many(att.hvp, gs)
    iters = [i.iterations for _, i in single]
    assert iters[3] == 0 and len(set(iters[:3])) > 1  # the queries stop at different iterations
    assert all(i.converged for _, i in single) and max(iters) < solver.max_iter
    for (s, info), m, minfo in zip(single, many, infos):
        # batched and single HVPs round differently, and the late residuals drift apart ("rounding chaos"
        # below): a query may cross the tolerance one iteration apart, never more
        assert abs(minfo.iterations - info.iterations) <= 1 and minfo.converged == info.converged
        assert minfo.n_hvp == minfo.iterations and info.n_hvp == info.iterations
        assert (minfo.iterations == 0) == (info.iterations == 0)
        assert minfo.residuals[:6] == pytest.approx(info.residuals[:6], rel=1e-5)  # later ones: rounding chaos
        # one iteration more or less moves the solution by about the tolerance (1e-4 relative)
        _close(tflatten(m), tflatten(s), rtol=RTOL if minfo.iterations == info.iterations else solver.tol)
    chunked, _ = solver.solve_many(att.hvp, gs, chunk_size=2)
    for s, m in zip(chunked, many):
        _close(tflatten(s), tflatten(m))


def test_cg_solve_many_negative_curvature_per_query(small):
    split, exs = small
    att = _att(split, CG(), use_cache=False).fit(exs, batch_size=4)
    gs = [att.query_gradient(e) for e in exs[:3]]
    solver = CG(damping=1e-3, max_iter=200)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        single = [solver.solve(att.hvp, g) for g in gs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        many, infos = solver.solve_many(att.hvp, gs)
    assert any(info.negative_curvature for _, info in single)
    assert sum(issubclass(w.category, NegativeCurvatureWarning) for w in caught) == sum(
        info.negative_curvature for _, info in single
    )
    for (s, info), m, minfo in zip(single, many, infos):
        assert (minfo.iterations, minfo.negative_curvature) == (info.iterations, info.negative_curvature)
        _close(tflatten(m), tflatten(s), rtol=1e-4)
    with pytest.raises(FloatingPointError, match="query"):
        CG(damping=1e-3, max_iter=200, on_negative_curvature="raise").solve_many(att.hvp, gs)


def test_explicit_and_identity_solve_many(small):
    split, exs = small
    sub = SplitModel(split.model, split.hook_name, downstream=["ln_final.w", "unembed.b_U"], task=split.task)
    att = _att(sub, Explicit(damping=0.05), use_cache=False).fit(exs, batch_size=4)
    gs = [att.query_gradient(e) for e in exs[:3]]
    many, infos = att.solver.solve_many(att.hvp, gs)
    for g, m in zip(gs, many):
        _close(tflatten(m), tflatten(att.solver.solve(att.hvp, g)[0]))
    assert infos[0].n_hvp > 0 and infos[1].n_hvp == 0
    ident, _ = Identity().solve_many(att.hvp, gs)
    assert all(torch.equal(tflatten(a), tflatten(b)) for a, b in zip(ident, gs))


def test_s_test_solves_missing_queries_together_and_caches(small, tmp_path, monkeypatch):
    split, exs = small
    solver = CG(damping=0.1, max_iter=8, tol=1e-5, gauss_newton=True)
    att = _att(split, solver, cache_dir=tmp_path / "cache").fit(exs, batch_size=4)
    calls = []
    real = CG.solve_many

    def spy(self, hvp_fn, gs, *, chunk_size=None):
        calls.append(len(gs))
        return real(self, hvp_fn, gs, chunk_size=chunk_size)

    monkeypatch.setattr(CG, "solve_many", spy)
    want = [solver.solve(att.hvp, att.query_gradient(e))[0] for e in exs[:4]]
    first = att.s_test(exs[1:3])
    assert calls == [2]
    both = att.s_test(exs[:4])  # 2 cached, 2 solved together; order preserved
    assert calls == [2, 2]
    assert [i.iterations == 0 for i in att.solve_infos] == [False, True, True, False]
    for got, w in zip(both, want):
        _close(tflatten(got), tflatten(w))
    for got, w in zip(first, want[1:3]):
        _close(tflatten(got), tflatten(w))
    chunked = _att(split, solver, use_cache=False, query_chunk_size=3).fit(exs, batch_size=4)
    got = chunked.s_test(exs[:4])
    assert calls[2:] == [3, 1] and len(chunked.solve_infos) == 4
    for g, w in zip(got, want):
        _close(tflatten(g), tflatten(w))
    dup = chunked.s_test([exs[0], exs[1], exs[0]])  # a repeated query is solved once
    assert calls[4:] == [2] and [i.iterations == 0 for i in chunked.solve_infos] == [False, False, True]
    assert torch.equal(tflatten(dup[0]), tflatten(dup[2]))
    # keep=False fills the cache chunk by chunk and returns nothing; later reads equal a kept solve
    filler = _att(split, solver, cache_dir=tmp_path / "fill", query_chunk_size=2).fit(exs, batch_size=4)
    assert filler.s_test(exs[:4], keep=False) == [] and calls[5:] == [2, 2]
    assert len(list((tmp_path / "fill").glob("*.safetensors"))) == 4
    assert filler.s_test(exs[:4], keep=False) == [] and calls[5:] == [2, 2]  # all cached: nothing solved
    for g, w in zip(filler.s_test(exs[:4]), want):
        _close(tflatten(g), tflatten(w))
    with pytest.raises(ValueError, match="keep=False"):
        chunked.s_test(exs[:1], keep=False)


@pytest.mark.parametrize("max_tokens", [None, 40])
def test_query_gradients_share_the_upstream_and_equal_one_query_at_a_time(model3, max_tokens):
    """Queries of different lengths in one padded batch (and under a token budget): each g_test equals the gradient
    of that query alone, prepared and differentiated on its own (no padding)."""
    hook = "blocks.1.hook_resid_post"
    split = SplitModel(model3, hook, random_sae(model3, hook, d_sae=48, k=6))
    rows = toy_mcqa_rows(5, seed=12)
    lengths = {int(split.task.collate([r]).attention_mask.sum()) for r in rows}
    assert len(lengths) > 1  # padding happens
    att = _att(split, Identity(), batch_size=4, max_batch_tokens=max_tokens)
    got = att.query_gradients(rows)
    params = split.downstream_params()
    for row, g in zip(rows, got, strict=True):
        want = torch.func.grad(lambda p, row=row: split.inputs_loss(p, split.prepare(split.task.collate([row]))))(
            params
        )
        _close(tflatten(g), tflatten(want))
    _close(tflatten(att.query_gradient(rows[2])), tflatten(got[2]))
