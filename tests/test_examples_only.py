"""``latent_method="none"``: example scores from one forward-mode JVP per batch, equal to the swap's and to
reverse-mode per-example gradients dotted with s_test; the latent views refuse such a result."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from repinf_lens import CG, Identity, InfluenceAttributor, SplitModel
from repinf_lens.errors import SettingsError
from repinf_lens.influence.math import latent_influence_multi
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows
from repinf_lens.workflows.config import AttributionConfig

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def split():
    model = tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=2)
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=40, k=5))


def _s_tests(split: SplitModel, nq: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in split.downstream_params().items()} for _ in range(nq)
    ]


def test_none_equals_reverse_mode_and_swap(split):
    params = split.downstream_params()
    inp = split.prepare(split.task.collate(toy_mcqa_rows(6, seed=4)))
    s_list = _s_tests(split, 3)
    fast = latent_influence_multi(split, s_list, inp, params, method="none")
    swap = latent_influence_multi(split, s_list, inp, params)
    for q, s in enumerate(s_list):
        # independent: reverse-mode gradient of each example's loss alone, dotted with s_test
        want = torch.stack(
            [
                sum(
                    (g * s[k]).sum()
                    for k, g in grad(lambda p, i=i: split.inputs_loss(p, inp.slice(i, i + 1)))(params).items()
                )
                for i in range(len(inp))
            ]
        )
        scale = float(want.abs().max())
        assert scale > 0
        assert float((fast[q].example_scores - want).abs().max()) <= 1e-5 * scale
        assert float((swap[q].example_scores - want).abs().max()) <= 1e-5 * scale
        assert fast[q].method == "none"
        assert fast[q].latent_scores.shape == (len(inp), 0)
        assert torch.isnan(fast[q].latent_sum).all() and torch.isnan(fast[q].error_term).all()
    # the baseline P(0) is the swap's too
    b_fast = latent_influence_multi(split, s_list, inp, params, method="none", baseline=True)
    b_swap = latent_influence_multi(split, s_list, inp, params, baseline=True)
    for a, b in zip(b_fast, b_swap):
        assert torch.allclose(a.baseline_scores, b.baseline_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("solver", [Identity(damping=0.0), CG(damping=0.1, max_iter=3, batch_size=4)])
def test_attributor_none_matches_swap_and_refuses_latent_views(split, solver, tmp_path):
    train = toy_mcqa_rows(7, seed=5)
    queries = toy_mcqa_rows(3, seed=6)
    kw = dict(hessian=solver, batch_size=3, use_cache=False, progress=False)
    full = InfluenceAttributor(split, **kw)
    fast = InfluenceAttributor(split, latent_method="none", **kw)
    if solver.needs_hessian:
        full.fit(train)
        fast.fit(train)
    want = full.attribute(queries, train)
    got = fast.attribute(queries, train)
    scale = float(want.example_scores.abs().max())
    assert float((got.example_scores - want.example_scores).abs().max()) <= 1e-5 * scale
    assert got.latent_scores.shape == (3, 7, 0)
    assert got.meta["latent_method"] == {"method": "none"} and not got.has_latent_scores
    assert want.has_latent_scores
    top = got.top_examples(0, k=3)
    assert list(top["id"]) == list(want.top_examples(0, k=3)["id"])
    for view in (lambda r: r.top_latents(0), lambda r: r.latent_ranking(0), lambda r: r.completeness(),
                 lambda r: r.token_latent_scores(0, 0)):  # fmt: skip
        with pytest.raises(SettingsError, match="latent_method='none'"):
            view(got)
    back = InfluenceResult.load(got.save(tmp_path / "res"))
    assert not back.has_latent_scores
    assert torch.equal(back.example_scores, got.example_scores)


def test_streaming_none_resumes_only_its_own_method(split, tmp_path):
    train = toy_mcqa_rows(6, seed=8)
    queries = toy_mcqa_rows(2, seed=9)
    kw = dict(hessian=Identity(damping=0.0), batch_size=2, use_cache=False, progress=False)
    got = InfluenceAttributor(split, latent_method="none", **kw).attribute_streaming(
        queries, train, out_dir=tmp_path / "s", shard_size=3
    )
    want = InfluenceAttributor(split, **kw).attribute(queries, train)
    assert torch.allclose(got.example_scores, want.example_scores, rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="latent_method|manifest|fingerprint"):
        InfluenceAttributor(split, **kw).attribute_streaming(queries, train, out_dir=tmp_path / "s", shard_size=3)


def test_workflows_that_rank_latents_refuse_none():
    cfg = AttributionConfig(latent_method="none")
    with pytest.raises(SettingsError, match="example scores only"):
        cfg.require_latents("run_demo")
    AttributionConfig().require_latents("run_demo")  # the default passes
