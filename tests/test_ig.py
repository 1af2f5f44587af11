"""Integrated-gradients latent influence (``method="ig"``): exact completeness, convergence, independent checks.

P(r) = <G(r), s_test> with G(r) the gradient of a training example's loss w.r.t. theta2 and r its SAE latents;
IG along r(a) = a r (SAE error and decoder bias held) gives latent scores whose sum plus P(0) is P(r) up to the
quadrature error. The independent references below run plain ``torch.autograd`` (double backward) on the whole
TransformerLens model with the SAE spliced in by ``run_with_hooks``: no SplitModel, no torch.func, no anchor.
Sign convention: POSITIVE = proponent.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist

from repinf_lens import Identity, InfluenceAttributor, InfluenceResult, MultipleChoiceTask, SplitModel
from repinf_lens._shards import ManifestMismatchError
from repinf_lens.errors import SettingsError
from repinf_lens.influence import (
    check_latent_method,
    ig_quadrature,
    latent_influence,
    latent_influence_ig,
    latent_influence_multi,
)
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def task(model):
    return MultipleChoiceTask(model.tokenizer, template="plain")


@pytest.fixture(scope="module")
def split(model, task):
    """float64 split with the full unembedding in theta2 (so s_test maps onto the model's own parameters)."""
    sae = random_sae(model, HOOK, d_sae=24, k=4, seed=1).to(torch.float64)
    return SplitModel(model, HOOK, sae, task=task, trim_unembed=False)


def _s(split: SplitModel, seed: int = 7, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * scale for k, v in split.downstream_params().items()}


def _rel_residual(li) -> torch.Tensor:
    """|P(r) - P(0) - latent sum| relative to max(|P(r)|, |P(r) - P(0)|), per example."""
    scale = torch.maximum(li.example_scores.abs(), (li.example_scores - li.baseline_scores).abs())
    return li.residual.abs() / scale


# ---------------------------------------------------------------------------------------------- (1) identity
@pytest.mark.parametrize(
    "hook,arch,err",
    [
        (HOOK, "topk", True),
        ("blocks.1.hook_mlp_out", "standard", True),
        ("blocks.1.attn.hook_z", "topk", True),
        (HOOK, "topk", False),  # the paper's setting: no error term (b_dec set, as in a trained SAE)
        ("blocks.1.hook_mlp_out", None, True),  # no SAE: the activation's dimensions are the "latents"
    ],
)
def test_ig_is_complete_latent_sum_plus_baseline_is_the_example_score(model, task, hook, arch, err):
    sae = None if arch is None else random_sae(model, hook, d_sae=24, k=4, seed=1, architecture=arch)
    if sae is not None:
        sae = sae.to(torch.float64)
        with torch.no_grad():
            sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=torch.Generator().manual_seed(0)))
    sp = SplitModel(model, hook, sae, task=task, use_error_term=err)
    inp = sp.prepare(task.collate(toy_mcqa_rows(3, seed=3)))
    ig = latent_influence_ig(sp, _s(sp), inp, steps=64)
    gxi = latent_influence(sp, _s(sp), inp, baseline=True)
    assert ig.method == "ig" and gxi.method == "grad_x_input"
    assert float(_rel_residual(ig).max()) < 1e-4  # the brief's bound; in float64 it is ~1e-13
    assert float(_rel_residual(ig).max()) < 1e-9
    # the same example score and P(0) as gradient x input; gradient x input is NOT complete on this model
    torch.testing.assert_close(ig.example_scores, gxi.example_scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ig.baseline_scores, gxi.baseline_scores, rtol=1e-12, atol=1e-12)
    # credit only where a latent is active, like gradient x input; error/bias terms are the full-point gxi ones
    assert not torch.any((ig.token_scores != 0) & (ig.latents == 0))
    assert torch.equal(ig.token_scores != 0, gxi.token_scores != 0)  # (both 0 after the answer position, too)
    torch.testing.assert_close(ig.error_term, gxi.error_term)
    torch.testing.assert_close(ig.bias_term, gxi.bias_term)


# ---------------------------------------------------------------------------------------------- (2) convergence
def test_ig_converges_at_the_stated_order(split, task):
    """midpoint: error O(m^-2) (ratio 4 per doubling); Gauss-Legendre: exponential (here >= 60x per doubling from
    m = 4 until float64 rounding)."""
    inp = split.prepare(task.collate(toy_mcqa_rows(3, seed=3)))
    s = _s(split)
    err = {
        rule: {m: _rel_residual(latent_influence_ig(split, s, inp, steps=m, rule=rule)) for m in (4, 8, 16, 32, 64)}
        for rule in ("midpoint", "gauss", "graded")
    }
    mid = err["midpoint"]
    for m in (16, 32):  # asymptotic from m = 16 on (8 -> 16: 2.0-2.25)
        order = torch.log2(mid[m] / mid[2 * m])
        assert torch.all((order > 1.9) & (order < 2.1)), (m, order)
    g = err["gauss"]
    assert torch.all(g[4] / g[8] > 60) and torch.all((g[8] / g[16] > 60) | (g[16] < 1e-12))
    assert float(g[32].max()) < 1e-12
    assert torch.all(g[16] < mid[32])  # 16 Gauss nodes beat 32 midpoint nodes by far
    gr = err["graded"]  # exponential too (per panel): faster than m^-4 per doubling, 64 nodes reach float64 rounding
    for m in (8, 16):
        assert torch.all((gr[m] / gr[2 * m] > 16) | (gr[2 * m] < 1e-12)), (m, gr[m], gr[2 * m])
    assert float(gr[64].max()) < 1e-12


def test_quadrature_rules():
    for rule in ("gauss", "graded", "midpoint"):
        for m in (1, 2, 5, 32):
            a, w = ig_quadrature(m, rule)
            assert a.dtype == torch.float64 and a.shape == w.shape == (m,)
            assert torch.all((a > 0) & (a < 1)) and abs(float(w.sum()) - 1) < 1e-14
    a, w = ig_quadrature(5, "gauss")  # exact for degree 2m - 1 = 9
    assert abs(float((w * a**9).sum()) - 0.1) < 1e-15
    assert torch.equal(ig_quadrature(1, "gauss")[0], torch.tensor([0.5], dtype=torch.float64))
    # graded: 4 panels [0, 1/8, 1/4, 1/2, 1], 2 nodes each for m = 8: exact for cubics, half the nodes below 1/4
    a, w = ig_quadrature(8, "graded")
    assert abs(float((w * a**3).sum()) - 0.25) < 1e-15 and int((a < 0.25).sum()) == 4
    assert abs(float((w * a**4).sum()) - 0.2) > 1e-8  # (not exact beyond degree 3)
    a, w = ig_quadrature(10, "graded")  # remainder to the panels nearest 0: 3, 3, 2, 2
    assert int((a < 0.125).sum()) == 3 and int((a > 0.5).sum()) == 2


# ---------------------------------------------------------------------------------------------- (3), (4) independent
def _autograd_p_grad(model, split, row, s, a: float, task):
    """(P(a r), dP/dr at a r) for ONE example by plain torch.autograd on the TransformerLens model.

    The SAE is spliced at the hook by run_with_hooks: activation x -> decode(a r) + e with r = encode(x) and
    e = x - decode(r) computed here, held constant. P = <grad_theta2 loss, s> with create_graph, then its
    gradient w.r.t. the spliced latents (double backward).
    """
    batch = task.collate([row])
    sae = split.sae
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=split.hook_name)
        x = cache[split.hook_name]
        r = sae.encode(x)
        e = x - sae.decode(r)
    ra = (a * r).detach().clone().requires_grad_(True)

    def splice(act, hook):
        return sae.decode(ra) + e

    named = dict(model.named_parameters())
    theta = [named[n] for n in split.param_names]
    for p in theta:
        p.requires_grad_(True)
    logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(split.hook_name, splice)])
    ans = logits[torch.arange(len(batch)), batch.answer_pos]
    loss = task.loss(ans, batch, reduction="sum")
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    p_val = sum((g * s[n]).sum() for g, n in zip(grads, split.param_names))
    (d_r,) = torch.autograd.grad(p_val, ra)
    return float(p_val.detach()), d_r.detach()[0], r[0]


def test_ig_equals_an_independent_autograd_path_integral(model, split, task):
    """IG token scores = r * (composite Simpson, 64 intervals, of the autograd gradient along a r), per latent."""
    rows = toy_mcqa_rows(2, seed=11)
    s = _s(split, seed=3)
    ig = latent_influence_ig(split, s, split.prepare(task.collate(rows)), steps=32)
    n_int = 64
    simpson = [1.0 if k in (0, n_int) else (4.0 if k % 2 else 2.0) for k in range(n_int + 1)]
    for i, row in enumerate(rows):
        total, r = 0.0, None
        for k, c in enumerate(simpson):
            p_val, d_r, r = _autograd_p_grad(model, split, row, s, k / n_int, task)
            total = total + c / (3 * n_int) * d_r
            if k == n_int:
                want_p = torch.tensor(p_val, dtype=torch.float64)
                torch.testing.assert_close(want_p, ig.example_scores[i], rtol=1e-9, atol=1e-10)
        assert r is not None
        want = r * total  # [T, d_sae]
        n_tok = want.shape[0]
        got = ig.token_scores[i, :n_tok]
        active = torch.nonzero((r != 0).any(0)).flatten().tolist()
        assert len(active) >= 4
        scale = float(want.abs().max())
        for j in active[:6]:  # a few latents, every position
            err = float((got[:, j] - want[:, j]).abs().max())
            assert err <= 1e-7 * scale, (j, err, scale)
        assert float((got - want).abs().max()) <= 1e-7 * scale  # and all of them


def test_baseline_equals_the_score_with_all_latents_zeroed(model, split, task):
    """P(0) = <grad_theta2 loss, s> with the hook's activation replaced by decode(0) + e (autograd, independent)."""
    rows = toy_mcqa_rows(3, seed=5)
    s = _s(split, seed=9)
    inp = split.prepare(task.collate(rows))
    ig = latent_influence_ig(split, s, inp, steps=4)
    gxi = latent_influence(split, s, inp, baseline=True)
    plain = latent_influence(split, s, inp)
    assert plain.baseline_scores is None and plain.residual is None
    for i, row in enumerate(rows):
        p0, _, _ = _autograd_p_grad(model, split, row, s, 0.0, task)
        want = torch.tensor(p0, dtype=torch.float64)
        torch.testing.assert_close(ig.baseline_scores[i], want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gxi.baseline_scores[i], want, rtol=1e-9, atol=1e-10)
    assert float((ig.baseline_scores - ig.example_scores).abs().min()) > 1e-3  # not trivially P(r)


# ---------------------------------------------------------------------------------------------- batching
def test_ig_multi_query_chunks_and_one_step(split, task):
    inp = split.prepare(task.collate(toy_mcqa_rows(5, seed=2)))
    s_list = [_s(split, seed=k) for k in range(3)]
    want = [latent_influence_ig(split, s, inp, steps=6) for s in s_list]
    for kw in ({}, {"chunk_size": 4, "query_chunk_size": 2}, {"chunk_size": 1, "query_chunk_size": 1}):
        got = latent_influence_multi(split, s_list, inp, method="ig", steps=6, **kw)
        for g, w in zip(got, want, strict=True):
            for f in ("token_scores", "example_scores", "baseline_scores", "error_term", "bias_term"):
                torch.testing.assert_close(getattr(g, f), getattr(w, f), rtol=1e-10, atol=1e-12)
            assert g.method == "ig"
    # one node (a = 1/2): IG = r * grad P(r / 2) = 2 x the gradient x input score at r / 2
    half = inp.slice(0, len(inp))
    half.latents = inp.latents * 0.5
    one = latent_influence_ig(split, s_list[0], inp, steps=1)
    torch.testing.assert_close(one.token_scores, 2 * latent_influence(split, s_list[0], half).token_scores)


# ---------------------------------------------------------------------------------------------- (5) attributor
def test_attributor_ig_equals_the_pure_function_streaming_and_caches_do_not_mix(split, task, tmp_path):
    train, queries = toy_mcqa_rows(6, seed=1, prefix="t"), toy_mcqa_rows(2, seed=2, prefix="q")

    def make(**kw):
        return InfluenceAttributor(split, hessian=Identity(), cache_dir=tmp_path / "s_test", progress=False,
                                   batch_size=2, **kw)  # fmt: skip

    gxi_att = make(baseline=True)  # P(0) for gradient x input too (off by default: one more JVP per batch)
    gxi = gxi_att.attribute(queries, train)
    assert make().attribute(queries, train).baseline_scores.isnan().all()  # off: NaN, never a made-up number
    att = make(latent_method="ig", ig_steps=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converged: no warning
        res = att.attribute(queries, train)
    assert all(i.iterations == 0 for i in att.solve_infos)  # s_test is shared across methods (it does not depend on it)
    assert res.meta["latent_method"] == {"method": "ig", "steps": 32, "rule": "graded"} == res.latent_method
    assert gxi.latent_method == {"method": "grad_x_input"} == gxi.meta["latent_method"]
    s_list = att.s_test(queries)
    inp = split.prepare(task.collate(train))
    for q, s in enumerate(s_list):
        li = latent_influence_ig(split, s, inp, steps=32)
        torch.testing.assert_close(res.example_scores[q], li.example_scores.float())
        torch.testing.assert_close(res.latent_scores[q], li.latent_scores.float())
        torch.testing.assert_close(res.baseline_scores[q], li.baseline_scores.float())
        torch.testing.assert_close(res.diagnostics["latent_sum"][q], li.latent_sum.float())
        torch.testing.assert_close(res.diagnostics["error_term"][q], li.error_term.float())
    # the same example scores and P(0) as gradient x input, other latent scores; IG is complete, gxi is not
    torch.testing.assert_close(res.example_scores, gxi.example_scores)
    torch.testing.assert_close(res.baseline_scores, gxi.baseline_scores)
    assert not torch.allclose(res.latent_scores, gxi.latent_scores, rtol=1e-3, atol=1e-6)
    comp, comp_gxi = res.completeness(), gxi.completeness()
    assert set(comp) >= {"latent_sum", "example_score", "baseline", "completeness", "baseline_share", "residual"}
    torch.testing.assert_close(comp["completeness"], torch.ones_like(comp["completeness"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(comp["baseline_share"], res.baseline_scores / res.example_scores)
    assert float((comp_gxi["completeness"] - 1).abs().max()) > 1e-2
    # token scores sum to the latent scores
    for q in range(2):
        sp, _, _ = res.token_latent_scores(q, 1)
        torch.testing.assert_close(torch.sparse.sum(sp, 0).to_dense(), res.latent_scores[q, 1], rtol=1e-5, atol=1e-6)
    # swap_chunk_size (IG: evaluations per swap) changes nothing
    chunked = make(latent_method="ig", ig_steps=32, swap_chunk_size=3).attribute(queries, train)
    torch.testing.assert_close(chunked.latent_scores, res.latent_scores, rtol=1e-5, atol=1e-7)

    # streaming gives the same as attribute; a folder of one method is never resumed for the other
    out = tmp_path / "stream"
    streamed = att.attribute_streaming(queries, train, out_dir=out, shard_size=2)
    assert torch.equal(streamed.example_scores, res.example_scores)
    assert torch.equal(streamed.latent_scores, res.latent_scores)
    for k in res.diagnostics:
        torch.testing.assert_close(streamed.diagnostics[k], res.diagnostics[k], rtol=0, atol=0, equal_nan=True)
    assert InfluenceResult.load(out).latent_method == res.latent_method
    again = make(latent_method="ig", ig_steps=32).attribute_streaming(queries, train, out_dir=out, shard_size=2)
    assert torch.equal(again.latent_scores, res.latent_scores)  # resumed (every shard done)
    with pytest.raises(ManifestMismatchError, match="latent_method"):
        make().attribute_streaming(queries, train, out_dir=out, shard_size=2)
    with pytest.raises(ManifestMismatchError, match="latent_method"):
        make(latent_method="ig", ig_steps=8).attribute_streaming(queries, train, out_dir=out, shard_size=2)
    over = make().attribute_streaming(queries, train, out_dir=out, shard_size=2, overwrite=True)
    assert torch.equal(over.latent_scores, gxi.latent_scores) and over.latent_method["method"] == "grad_x_input"


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no torch.distributed gloo")
def test_attribute_distributed_honours_ig(split, task, tmp_path, monkeypatch):
    """The distributed code path (broadcast s_test, shard, gather) on a one-process gloo group equals attribute."""
    import repinf_lens.influence.attributor as mod

    train, queries = toy_mcqa_rows(5, seed=1, prefix="t"), toy_mcqa_rows(2, seed=2, prefix="q")
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=2,
                              latent_method="ig", ig_steps=16)  # fmt: skip
    want = att.attribute(queries, train)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(mod, "is_distributed", lambda: True)
        got = att.attribute_distributed(queries, train, shard="strided")
    finally:
        dist.destroy_process_group()
    assert got is not None and got.meta["distributed"]["world_size"] == 1
    assert got.meta["latent_method"] == {"method": "ig", "steps": 16, "rule": "graded"}
    assert torch.equal(got.latent_scores, want.latent_scores) and torch.equal(got.example_scores, want.example_scores)
    for k in want.diagnostics:
        torch.testing.assert_close(got.diagnostics[k], want.diagnostics[k], rtol=0, atol=0, equal_nan=True)


def test_result_baseline_saves_loads_and_old_files_still_load(split, task, tmp_path):
    train, queries = toy_mcqa_rows(4, seed=1, prefix="t"), toy_mcqa_rows(1, seed=2, prefix="q")
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=2,
                              latent_method="ig", ig_steps=32, ig_rule="midpoint")  # fmt: skip
    res = att.attribute(queries, train)
    loaded = InfluenceResult.load(res.save(tmp_path / "new"))
    assert torch.equal(loaded.baseline_scores, res.baseline_scores)
    assert loaded.latent_method == {"method": "ig", "steps": 32, "rule": "midpoint"}
    # a result written before P(0) and the method were recorded
    res.diagnostics.pop("baseline")
    res.meta.pop("latent_method")
    old = InfluenceResult.load(res.save(tmp_path / "old"))
    assert old.baseline_scores is None and old.latent_method == {"method": "grad_x_input"}
    comp = old.completeness()
    assert torch.isnan(comp["baseline"]).all() and torch.isnan(comp["completeness"]).all()
    assert torch.isfinite(comp["ratio"]).all() and torch.isfinite(comp["latent_sum"]).all()
    # gradient x input with baseline=False records NaN, not a fake P(0)
    nob = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=2,
                              baseline=False).attribute(queries, train)  # fmt: skip
    assert torch.isnan(nob.baseline_scores).all()


def test_attributor_warns_when_ig_has_not_converged(model, task):
    """No SAE at a residual-stream hook: r = 0 zeroes the next LayerNorm's input, a near-singular path start."""
    sp = SplitModel(model, "blocks.1.hook_resid_pre", None, task=task)
    att = InfluenceAttributor(sp, hessian=Identity(), use_cache=False, progress=False, batch_size=2,
                              latent_method="ig", ig_steps=4)  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"did not converge for \d+ .*Fix: raise ig_steps"):
        res = att.attribute(toy_mcqa_rows(1, prefix="q"), toy_mcqa_rows(2, seed=1, prefix="t"))
    assert float((res.completeness()["completeness"] - 1).abs().max()) > 1e-2  # and completeness() shows it


# ---------------------------------------------------------------------------------------------- (6) bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"latent_method": "integrated_gradients"},
            r"latent_method must be one of \['grad_x_input', 'ig', 'none'\].*Fix: ",
        ),
        ({"latent_method": "ig", "ig_steps": 0}, r"ig_steps must be an integer >= 1, got 0.*Fix: pass ig_steps=64"),
        ({"latent_method": "ig", "ig_steps": 2.5}, r"ig_steps must be an integer >= 1"),
        ({"latent_method": "ig", "ig_steps": True}, r"ig_steps must be an integer >= 1"),
        ({"latent_method": "ig", "ig_rule": "simpson"}, r"ig_rule must be one of \['gauss', 'graded', 'midpoint'\]"),
    ],
)
def test_attributor_refuses_bad_latent_settings(split, kw, match):
    with pytest.raises(SettingsError, match=match) as info:
        InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, **kw)
    assert "Fix:" in str(info.value)


def test_pure_functions_refuse_bad_settings(split, task):
    inp = split.prepare(task.collate(toy_mcqa_rows(1)))
    s = _s(split)
    with pytest.raises(SettingsError, match=r"steps must be an integer >= 1, got 0.*Fix: pass steps=64"):
        latent_influence_ig(split, s, inp, steps=0)
    with pytest.raises(SettingsError, match=r"method must be one of.*Fix: pass method='grad_x_input'"):
        latent_influence_multi(split, [s], inp, method="IG")
    with pytest.raises(SettingsError, match=r"rule must be one of"):
        latent_influence_ig(split, s, inp, rule="trapezoid")
    with pytest.raises(SettingsError, match=r"chunk_size must be an integer >= 1"):
        latent_influence_ig(split, s, inp, chunk_size=0)
    with pytest.raises(SettingsError, match=r"ig_quadrature steps"):
        ig_quadrature(-1)
    assert check_latent_method("ig", 3, "midpoint") == ("ig", 3, "midpoint")
    assert math.isclose(float(ig_quadrature(3)[1].sum()), 1.0)
