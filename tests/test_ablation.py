"""Necessity / sufficiency ablations and latent rankings (paper Section 5.4) on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from repinf_lens import Identity, InfluenceAttributor, SplitModel
from repinf_lens.analysis.ablation import (
    aggregate,
    masked_logits,
    necessity_sufficiency,
    plot_ablation,
    save_ablation,
)
from repinf_lens.analysis.rankings import (
    RANKINGS,
    LatentRanking,
    RankingContext,
    get_ranking,
    rank_by_scores,
    register_ranking,
    with_error_term,
)
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

D_SAE = 48


_WORDS = ("red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice", "wind", "seed", "moon", "salt")


def _examples(n: int, seed: int = 0) -> list[dict]:
    return toy_mcqa_rows(n, seed, prefix=f"ex{seed}_", words=_WORDS, question="Which goes with {0} and {1}?")


@pytest.fixture(scope="module")
def model3():
    return tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=1)


def _split(model, hook, use_error_term=False):
    # use_error_term=False on purpose: the ablation must evaluate both variants whatever the split says
    return SplitModel(model, hook, random_sae(model, hook, d_sae=D_SAE, k=6), use_error_term=use_error_term)


def _answer_logits(model, batch, logits):
    return logits[torch.arange(len(batch)), batch.answer_pos]


def _hooked_logits(model, sae, hook, batch, zero=(), keep=None, error_term=True):
    """Independent reference: full forward with a hook that masks latents in the SAE reconstruction."""

    def fn(act, hook):
        r = sae.encode(act)
        err = act - sae.decode(sae.encode(act))
        r = r.clone()
        if keep is not None:
            m = torch.zeros(r.shape[-1], dtype=torch.bool)
            m[list(keep)] = True
            r[..., ~m] = 0
        r[..., list(zero)] = 0
        out = sae.decode(r)
        return out + err if error_term else out

    with torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(hook, fn)])
    return _answer_logits(model, batch, logits)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_unablated_masks_reproduce_model_and_reconstruction(model3, hook):
    split = _split(model3, hook)
    task = split.task
    esplit = with_error_term(split)
    assert esplit.use_error_term and not split.use_error_term
    for row in _examples(2):
        batch = task.collate([row])
        inp = esplit.prepare(batch)
        masks = torch.ones(3, D_SAE, dtype=torch.bool)  # remove 0 latents / keep all latents (3 copies batched)
        with_err, _ = masked_logits(esplit, inp, masks, error_term=True, batch_size=2)
        orig = split.original_logits(batch)
        assert (with_err - orig).abs().max().item() <= 1e-5
        without, _ = masked_logits(esplit, inp, masks, error_term=False)
        recon = _hooked_logits(model3, split.sae, hook, batch, error_term=False)
        assert (without - recon).abs().max().item() <= 1e-5
        assert (without - orig).abs().max().item() > 1e-4  # the reconstruction alone changes the model
    # the same through the DataFrame: k=0 removed and k >= d_sae kept change nothing
    df = necessity_sufficiency(
        split, None, _examples(2), {"random": "random"}, ks=(0, D_SAE, 200), n_boot=10, progress=False
    )
    same = df[((df["mode"] == "necessity") & (df["k"] == 0)) | ((df["mode"] == "sufficiency") & (df["k"] >= D_SAE))]
    assert len(same) == 2 * 2 * 3  # (nec k=0, suf k=48, suf k=200) x 2 error variants x 2 queries
    assert (same["delta_logit"].abs() <= 1e-5).all() and (same["delta_nll"].abs() <= 1e-5).all()
    assert (same["flip"] == 0).all()
    # the unablated NLL with the error term is the original model's
    with_err = df[df["error_term"]]
    for q, row in enumerate(_examples(2)):
        batch = task.collate([row])
        want = float(task.loss(split.original_logits(batch), batch))
        got = with_err[with_err["query"] == q]["base_nll"].iloc[0]
        assert abs(got - want) <= 1e-5


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_necessity_and_sufficiency_equal_independent_hooked_runs(model3, hook):
    split = _split(model3, hook)
    task = split.task
    rows = _examples(2, seed=3)
    k = 5
    df = necessity_sufficiency(
        split, task, rows, ["activation"], ks=(k,), n_boot=10, progress=False, batch_size=1
    ).set_index(["mode", "error_term", "query"])
    for q, row in enumerate(rows):
        batch = task.collate([row])
        ctx = RankingContext(split=split, task=task, query=row, query_index=q)
        top = get_ranking("activation").rank(ctx)[:k].tolist()
        label = int(batch.labels[0])
        for err in (True, False):
            base = _hooked_logits(model3, split.sae, hook, batch, error_term=err)
            removed = _hooked_logits(model3, split.sae, hook, batch, zero=top, error_term=err)
            kept = _hooked_logits(model3, split.sae, hook, batch, keep=top, error_term=err)
            for mode, logits in (("necessity", removed), ("sufficiency", kept)):
                r = df.loc[(mode, err, q)]
                opt_b, opt = task.option_logits(base, batch)[0], task.option_logits(logits, batch)[0]
                assert abs(r["delta_logit"] - float(opt[label] - opt_b[label])) <= 1e-4
                want_nll = float(task.loss(logits, batch) - task.loss(base, batch))
                assert abs(r["delta_nll"] - want_nll) <= 1e-4
                assert r["flip"] == float(opt.argmax() != opt_b.argmax())
                assert abs(r["correct_logit"] - float(opt[label])) <= 1e-4
                assert r["n_masked"] == (k if mode == "necessity" else D_SAE - k)


def test_random_ranking_is_a_seeded_permutation(model3):
    split = _split(model3, "blocks.1.hook_resid_post")
    rows = _examples(2)

    def perm(ctx_seed, q, **kw):
        ctx = RankingContext(split=split, task=split.task, query=rows[q], query_index=q, seed=ctx_seed)
        return get_ranking("random", **kw).rank(ctx)

    p = perm(0, 0)
    assert sorted(p.tolist()) == list(range(D_SAE))
    assert torch.equal(p, perm(0, 0))
    assert not torch.equal(p, perm(1, 0))  # another seed
    assert not torch.equal(p, perm(0, 1))  # another query
    assert torch.equal(perm(5, 1, seed=7), perm(0, 1, seed=7))  # the ranking's own seed wins
    df1 = necessity_sufficiency(split, None, rows, ["random"], ks=(3,), seed=4, n_boot=10, progress=False)
    df2 = necessity_sufficiency(split, None, rows, ["random"], ks=(3,), seed=4, n_boot=10, progress=False)
    pd.testing.assert_frame_equal(df1, df2)


def test_influence_ranking_follows_signed_mean_ifr(model3):
    split = SplitModel(
        model3, "blocks.1.hook_resid_post", random_sae(model3, "blocks.1.hook_resid_post", d_sae=D_SAE, k=6)
    )
    queries, train = _examples(2, seed=1), _examples(5, seed=2)
    result = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False).attribute(queries, train)
    for q in range(2):
        ctx = RankingContext(split=split, task=split.task, query=queries[q], query_index=q, result=result)
        got = get_ranking("influence").rank(ctx)
        s = result.latent_scores[q].double().mean(0)
        assert torch.equal(got, torch.argsort(s, descending=True, stable=True))
        assert s[got[0]] == s.max() and s[got[0]] > 0  # the strongest proponent latent first (signed, not |s|)
        absolute = get_ranking("influence", absolute=True).rank(ctx)
        assert torch.equal(absolute, torch.argsort(s.abs(), descending=True, stable=True))
        assert torch.equal(get_ranking("influence_abs").rank(ctx), absolute)  # the magnitude, by its own name
        eq16 = get_ranking("influence_eq16").rank(ctx)  # the sign of the paper's Eq. (16): most negative first
        assert torch.equal(eq16, torch.argsort(-s, descending=True, stable=True))
        assert s[eq16[0]] == s.min() and s[eq16[0]] < 0
    # queries matched to the result by id, in any order
    df = necessity_sufficiency(
        split, None, queries[::-1], ["influence"], ks=(2,), result=result, n_boot=10, progress=False
    )
    assert list(df[df["mode"] == "necessity"].drop_duplicates("query")["query_id"]) == [q["id"] for q in queries[::-1]]
    with pytest.raises(ValueError, match="needs an InfluenceResult"):
        necessity_sufficiency(split, None, queries, ["influence"], ks=(2,), progress=False)


def test_frequency_activation_and_grad_x_act_rankings(model3):
    hook = "blocks.1.hook_resid_post"
    split = _split(model3, hook)
    task = split.task
    row, train = _examples(1, seed=4)[0], _examples(4, seed=5)
    ctx = RankingContext(split=split, task=task, query=row, train=train)
    # frequency: share of training tokens on which the latent fires
    fires, n_tok = torch.zeros(D_SAE), 0
    for ex in train:
        r = split.prepare(task.collate([ex])).latents[0]
        fires += (r != 0).sum(0)
        n_tok += r.shape[0]
    assert torch.equal(get_ranking("frequency").rank(ctx), rank_by_scores(fires / n_tok))
    r_q = split.prepare(task.collate([row])).latents[0]
    assert torch.equal(get_ranking("frequency", source="query").rank(ctx), rank_by_scores((r_q != 0).double().mean(0)))
    assert torch.equal(get_ranking("activation").rank(ctx), rank_by_scores(r_q.abs().sum(0)))
    assert torch.equal(get_ranking("activation", reduce="max").rank(ctx), rank_by_scores(r_q.abs().max(0).values))
    # grad x act: -r * dL/dr summed over positions, from an independent hooked forward with latents as a leaf
    batch = task.collate([row])
    sae = split.sae
    with torch.no_grad():
        _, cache = model3.run_with_cache(batch.tokens, names_filter=hook)
    x = cache[hook]
    r = sae.encode(x).detach().requires_grad_(True)
    err = (x - sae.decode(sae.encode(x))).detach()
    logits = model3.run_with_hooks(batch.tokens, fwd_hooks=[(hook, lambda a, hook: sae.decode(r) + err)])
    (g,) = torch.autograd.grad(task.loss(_answer_logits(model3, batch, logits), batch), r)
    want = -(r * g).detach()[0].sum(0)
    got = get_ranking("grad_x_act").scores(ctx)
    assert torch.allclose(got.float(), want, atol=1e-5)
    assert torch.equal(get_ranking("grad_x_act").rank(ctx), rank_by_scores(got))


def test_registry_custom_rankings_and_precomputed_permutations(model3):
    split = _split(model3, "blocks.1.hook_resid_post")
    rows = _examples(2)
    assert {"influence", "activation", "frequency", "random", "grad_x_act"} <= set(RANKINGS)
    with pytest.raises(KeyError, match="Did you mean"):
        get_ranking("activaton")

    @register_ranking("test_decoder_norm")
    def decoder_norm(ctx):
        return ctx.split.sae.W_dec.norm(dim=-1)

    class Reverse(LatentRanking):
        def rank(self, ctx):
            return torch.arange(ctx.d_sae - 1, -1, -1)

    register_ranking("test_reverse", Reverse)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_ranking("test_reverse", Reverse)
        assert torch.equal(
            get_ranking("test_decoder_norm").rank(RankingContext(split=split, task=split.task, query=rows[0])),
            rank_by_scores(split.sae.W_dec.norm(dim=-1)),
        )
        perms = torch.stack([torch.arange(D_SAE - 1, -1, -1)] * 2)
        df = necessity_sufficiency(
            split,
            None,
            rows,
            {"reverse": "test_reverse", "given": perms, "given_prefix": [p[:4].tolist() for p in perms]},
            ks=(2, 4),
            n_boot=10,
            progress=False,
        )
        cols = ["delta_logit", "delta_nll", "flip"]
        a = df[df["ranking"] == "reverse"][cols].to_numpy()
        assert np.array_equal(a, df[df["ranking"] == "given"][cols].to_numpy())
        assert np.array_equal(a, df[df["ranking"] == "given_prefix"][cols].to_numpy())
        with pytest.raises(ValueError, match="repeats latent ids"):
            necessity_sufficiency(split, None, rows, {"bad": [[0, 0, 1]] * 2}, ks=(2,), progress=False)
        with pytest.raises(ValueError, match="largest k needs"):
            necessity_sufficiency(split, None, rows, {"short": [[0]] * 2}, ks=(2,), progress=False)
    finally:
        RANKINGS.pop("test_decoder_norm", None)
        RANKINGS.pop("test_reverse", None)


def test_bootstrap_cis_contain_the_mean_and_shrink():
    rng = np.random.default_rng(0)

    def frame(n):
        return pd.DataFrame(
            {
                "ranking": "r",
                "k": 10,
                "mode": "necessity",
                "error_term": True,
                "query": np.arange(n),
                "delta_logit": rng.normal(-1.0, 2.0, n),
                "flip": (rng.random(n) < 0.3).astype(float),
            }
        )

    small = aggregate(frame(10), n_boot=500, seed=0).set_index("metric")
    large = aggregate(frame(400), n_boot=500, seed=0).set_index("metric")
    for agg in (small, large):
        assert (agg["ci_low"] <= agg["mean"]).all() and (agg["mean"] <= agg["ci_high"]).all()
    width = lambda a: a["ci_high"] - a["ci_low"]  # noqa: E731
    assert (width(large) < width(small) / 2).all()
    assert small.loc["delta_logit", "n"] == 10 and abs(large.loc["delta_logit", "mean"] + 1.0) < 0.4


def test_full_run_shape_save_and_plot(model3, tmp_path):
    split = _split(model3, "blocks.1.hook_resid_post")
    queries, train = _examples(3, seed=6), _examples(4, seed=7)
    result = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False).attribute(queries, train)
    names = ["influence", "activation", "frequency", "random", "grad_x_act"]
    ks = (1, 5, 10)
    df = necessity_sufficiency(
        split, split.task, queries, {n: n for n in names}, ks=ks, result=result, n_boot=50, seed=1, progress=False
    )
    assert len(df) == len(names) * len(ks) * 2 * 2 * len(queries)
    assert df.groupby(["ranking", "k", "mode", "error_term"]).size().eq(len(queries)).all()
    assert set(df["mode"]) == {"necessity", "sufficiency"} and set(df["error_term"]) == {True, False}
    assert (df["same_answer"] == 1 - df["flip"]).all()
    assert df.attrs["n_boot"] == 50
    agg = aggregate(df)
    assert len(agg) == len(names) * len(ks) * 2 * 2 * len(
        [m for m in ("delta_logit", "delta_nll", "flip", "same_answer", "correct_logit", "retained_logit", "correct")]
    )
    ok = agg.dropna(subset=["mean"])
    assert ((ok["ci_low"] <= ok["mean"] + 1e-12) & (ok["mean"] <= ok["ci_high"] + 1e-12)).all()
    paths = save_ablation(df, tmp_path / "out", agg)
    assert pd.read_csv(paths["per_query"]).shape[0] == len(df)
    payload = json.loads(paths["json"].read_text())
    assert payload["meta"]["n_boot"] == 50 and len(payload["summary"]) == len(agg)
    fig = plot_ablation(agg, tmp_path / "out" / "ablation.png", title="tiny")
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 1000
    assert len(fig.axes) == 4 * 3  # (2 error settings x 2 modes) rows x 3 metric columns
    # one error setting and one mode only
    df1 = necessity_sufficiency(
        split, None, queries[:1], ["random"], ks=(2,), use_error_term=False, modes=("necessity",), progress=False
    )
    assert len(df1) == 1 and not df1["error_term"].iloc[0]
