"""Influence engine on tiny random models: splice, theta2, swap vs reference, solvers, retraining, results."""

from __future__ import annotations

import warnings

import pytest
import torch

from repinf_lens import CG, Identity, InfluenceAttributor, InfluenceResult, MultipleChoiceTask, SplitModel
from repinf_lens._tree import tdot, tflatten, tunflatten
from repinf_lens.curvature import Explicit, LiSSA, NegativeCurvatureWarning, dataset_hvp, gnhvp, hvp, loss_grad
from repinf_lens.influence import example_influence, latent_influence, latent_influence_reference
from repinf_lens.split import HookNameError, SAECompatibilityError
from repinf_lens.testing import random_sae, tiny_model

HOOKS = ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid"]


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice", "wind", "seed", "moon", "salt"]
    out = []
    for i in range(n):
        pick = torch.randint(0, len(words), (6,), generator=g).tolist()
        n_opt = 4
        out.append(
            {
                "id": f"ex{i}",
                "question": f"Which goes with {words[pick[0]]} and {words[pick[1]]}?",
                "choices": [words[p] for p in pick[2 : 2 + n_opt]],
                "answer": int(torch.randint(0, n_opt, (1,), generator=g)),
            }
        )
    return out


@pytest.fixture(scope="module")
def model3():
    return tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=1)


@pytest.mark.parametrize("hook", HOOKS + ["blocks.1.attn.hook_z"])
@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_splice_with_error_term_reproduces_logits(model3, hook, arch):
    sae = random_sae(model3, hook, d_sae=48, k=6, architecture=arch)
    split = SplitModel(model3, hook, sae)
    batch = split.task.collate(_examples(3))
    inp = split.prepare(batch)
    with torch.no_grad():
        spliced = split.logits(inp.latents, batch, split.downstream_params(), inp.error, inp.base)
        assert (spliced - split.original_logits(batch)).abs().max().item() <= 1e-5
        anchored = split.logits(inp.latents, batch, split.downstream_params(), inp.error, inp.base, inp.anchor)
        assert (anchored - split.original_logits(batch)).abs().max().item() <= 1e-6  # exact at the prepared point
        # the anchored form is the same function of (r, e): perturbing the latents changes both equally
        r2 = inp.latents * 0.5
        a = split.logits(r2, batch, None, inp.error, inp.base, inp.anchor)
        b = split.logits(r2, batch, None, inp.error, inp.base)
        assert (a - b).abs().max().item() <= 1e-4 and (a - anchored).abs().max().item() > 1e-4
        without = SplitModel(model3, hook, sae, use_error_term=False)
        inp2 = without.prepare(batch)
        assert inp2.error is None
        changed = without.logits(inp2.latents, batch, None, None, inp2.base)
        assert (changed - split.original_logits(batch)).abs().max().item() > 1e-4  # the paper's setting differs


def test_theta2_is_what_the_activation_feeds(model3):
    names = set(SplitModel(model3, "blocks.1.hook_mlp_out").param_names)
    assert not any(n.startswith("blocks.1.") for n in names)  # same-block attention only feeds resid_mid
    assert {"blocks.2.attn.W_Q", "unembed.W_U", "ln_final.w"} <= names
    mid = set(SplitModel(model3, "blocks.1.hook_resid_mid").param_names)
    assert {"blocks.1.mlp.W_in", "blocks.1.ln2.w"} <= mid and "blocks.1.attn.W_Q" not in mid
    z = set(SplitModel(model3, "blocks.1.attn.hook_z").param_names)
    assert "blocks.1.attn.W_O" in z and "blocks.1.attn.W_V" not in z
    pre = SplitModel(model3, "blocks.1.hook_resid_pre")
    assert pre.param_names == [
        n for n, _ in model3.named_parameters() if not n.startswith(("embed", "pos_embed", "blocks.0."))
    ]
    # user choices: regex, list, callable; upstream parameters are refused
    assert SplitModel(model3, "blocks.1.hook_resid_post", downstream=r"^unembed").param_names == [
        "unembed.W_U",
        "unembed.b_U",
    ]
    assert SplitModel(model3, "blocks.1.hook_resid_post", downstream=["ln_final.w"]).param_names == ["ln_final.w"]
    assert SplitModel(model3, "blocks.1.hook_resid_post", downstream=lambda n, p: p.ndim == 1 and "blocks.2" in n)
    with pytest.raises(ValueError, match="not downstream"):
        SplitModel(model3, "blocks.1.hook_resid_post", downstream=["blocks.0.attn.W_Q"])


def test_bad_hook_and_incompatible_saes_are_refused(model3):
    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_post.*Valid hook points"):
        SplitModel(model3, "blocks.1.hook_resid_psot")
    with pytest.raises(HookNameError, match="outside the transformer blocks"):
        SplitModel(model3, "hook_embed")
    sae = random_sae(model3, "blocks.1.hook_resid_post")
    with pytest.raises(SAECompatibilityError, match="trained at 'blocks.1.hook_resid_post'"):
        SplitModel(model3, "blocks.2.hook_resid_post", sae)
    z_sae = random_sae(model3, "blocks.1.mlp.hook_post")  # d_in = d_mlp = 64 != d_model
    z_sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    with pytest.raises(SAECompatibilityError, match="d_in=64"):
        SplitModel(model3, "blocks.1.hook_resid_post", z_sae)
    ln_sae = random_sae(model3, "blocks.1.hook_resid_post", normalize_activations="layer_norm")
    with pytest.raises(SAECompatibilityError, match="layer_norm"):
        SplitModel(model3, "blocks.1.hook_resid_post", ln_sae)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"])
def test_swap_equals_per_latent_jvp_reference(model3, hook):
    sae = random_sae(model3, hook, d_sae=48, k=6)
    split = SplitModel(model3, hook, sae)
    batch = split.task.collate(_examples(3))
    params = split.downstream_params()
    s = loss_grad(split, params, split.prepare(split.task.collate(_examples(2, seed=5))))
    li = latent_influence(split, s, batch)
    for i in range(3):
        ref = latent_influence_reference(split, s, batch, example=i)
        active = torch.nonzero((li.latents[i] != 0).any(0)).flatten().tolist()
        assert sorted(ref) == active
        got = li.latent_scores[i, active]
        want = torch.tensor([ref[j] for j in active])
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        assert (li.latent_scores[i][[j for j in range(48) if j not in active]] == 0).all()


def test_example_scores_equal_independent_per_example_gradients(model3):
    split = SplitModel(model3, "blocks.1.hook_resid_post", random_sae(model3, "blocks.1.hook_resid_post"))
    exs = _examples(4)
    params = split.downstream_params()
    s = {k: torch.randn_like(v) for k, v in params.items()}
    got = example_influence(split, s, split.task.collate(exs))
    swap = latent_influence(split, s, split.task.collate(exs)).example_scores
    for i, ex in enumerate(exs):
        full = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        b = split.task.collate([ex])
        r, e = split.latents(b)
        loss = split.loss(r, b, full, e)
        grads = torch.autograd.grad(loss, list(full.values()))
        want = sum((g * s[k]).sum() for g, k in zip(grads, full))
        assert got[i].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
        assert swap[i].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_scores_do_not_depend_on_batch_size(model3):
    split = SplitModel(model3, "blocks.1.hook_mlp_out", random_sae(model3, "blocks.1.hook_mlp_out"))
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False)
    exs = _examples(5)
    a = att.attribute(exs[:2], exs, batch_size=1)
    b = att.attribute(exs[:2], exs, batch_size=4)
    assert torch.allclose(a.example_scores, b.example_scores, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a.latent_scores, b.latent_scores, rtol=1e-4, atol=1e-5)
    chunked = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, swap_chunk_size=2)
    c = chunked.attribute(exs[:2], exs, batch_size=5)
    assert torch.allclose(a.latent_scores, c.latent_scores, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a.diagnostics["error_term"], c.diagnostics["error_term"], rtol=1e-4, atol=1e-5)
    for i in range(5):
        sa, _, _ = a.token_latent_scores(1, i)
        sb, _, _ = b.token_latent_scores(1, i)
        assert torch.allclose(sa.to_dense(), sb.to_dense(), rtol=1e-4, atol=1e-5)


def test_dataset_hvp_is_the_mean_over_examples_whatever_the_batching(model3):
    split = SplitModel(model3, "blocks.2.hook_resid_post")
    params = split.downstream_params()
    exs = _examples(5)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    one = dataset_hvp(split, params, [split.prepare(split.task.collate(exs))], v)
    parts = dataset_hvp(
        split, params, [split.prepare(split.task.collate(exs[:2])), split.prepare(split.task.collate(exs[2:]))], v
    )
    for k in one:
        assert torch.allclose(one[k], parts[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def small_setup():
    """theta2 = last block + unembedding of a small model, Hessian data of 6 examples."""
    model = tiny_model(n_layers=2, d_model=8, n_heads=2, d_mlp=16, seed=3)
    task = MultipleChoiceTask(model.tokenizer, template="plain")  # short prompts keep the dense Hessian cheap
    split = SplitModel(model, "blocks.0.hook_resid_post", task=task)
    exs = _examples(6, seed=2)
    att = InfluenceAttributor(split, hessian=Explicit(), use_cache=False, progress=False).fit(exs, batch_size=4)
    h = Explicit().matrix(att.hvp, split.downstream_params())
    return split, att, exs, h


def test_explicit_equals_dense_solve_of_the_autograd_hessian(small_setup):
    split, att, exs, h = small_setup
    params = split.downstream_params()
    keys = ["ln_final.w", "unembed.b_U"]
    sub = {k: params[k] for k in keys}
    inputs = att._hessian_inputs

    def mean_loss(flat):
        p = {**params, **tunflatten(flat, sub)}
        total = sum(split.inputs_loss(p, inp) * len(inp) for inp in inputs)
        return total / sum(len(inp) for inp in inputs)

    dense = torch.autograd.functional.hessian(mean_loss, tflatten(sub).detach()).double()
    sub_split = SplitModel(split.model, split.hook_name, downstream=keys, task=split.task)
    sub_att = InfluenceAttributor(sub_split, hessian=Explicit(damping=0.05), use_cache=False, progress=False)
    sub_att.fit(exs, batch_size=4)
    hm = Explicit().matrix(sub_att.hvp, sub_split.downstream_params())
    assert torch.allclose(hm, 0.5 * (dense + dense.T), atol=1e-5)
    g = sub_att.query_gradient(exs[0])
    s, _ = sub_att.solver.solve(sub_att.hvp, g)
    want = torch.linalg.solve(dense + 0.05 * torch.eye(dense.shape[0], dtype=dense.dtype), tflatten(g).double())
    assert torch.allclose(tflatten(s).double(), want, rtol=1e-4, atol=1e-6)


def test_cg_and_lissa_match_the_explicit_solve(small_setup):
    split, att, exs, h = small_setup
    eig = torch.linalg.eigvalsh(h)
    damping = float(max(0.0, -eig.min())) + 0.2 * float(eig.max())  # make H + damping I well conditioned
    g = att.query_gradient(exs[0])
    exact, _ = Explicit(damping=damping).solve(att.hvp, g)
    cg, info = CG(damping=damping, max_iter=200, tol=1e-7).solve(att.hvp, g)
    rel = (tflatten(cg) - tflatten(exact)).norm() / tflatten(exact).norm()
    assert rel <= 1e-3 and info.converged and info.residuals[0] == 1.0
    lissa, _ = LiSSA(damping=damping, scale=1.2 * float(eig.max() + damping), depth=500, tol=1e-7).solve(att.hvp, g)
    rel_l = (tflatten(lissa) - tflatten(exact)).norm() / tflatten(exact).norm()
    assert rel_l <= 1e-2


def test_negative_curvature_is_detected_and_gauss_newton_is_psd(small_setup):
    split, att, exs, h = small_setup
    assert torch.linalg.eigvalsh(h).min() < 0  # this random model's Hessian is indefinite
    g = att.query_gradient(exs[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = CG(damping=1e-3, max_iter=200).solve(att.hvp, g)
    assert info.negative_curvature and any(issubclass(w.category, NegativeCurvatureWarning) for w in caught)
    assert "gauss_newton=True" in str([str(w.message) for w in caught])
    params = split.downstream_params()
    inp = att._hessian_inputs[0]
    for seed in range(5):
        torch.manual_seed(seed)
        v = {k: torch.randn_like(t) for k, t in params.items()}
        assert float(tdot(v, gnhvp(split, params, inp, v))) >= -1e-6
    # Gauss-Newton vector product equals J^T H_z J v computed with dense Jacobians
    sub = {"unembed.b_U": params["unembed.b_U"]}
    v = {"unembed.b_U": torch.randn_like(params["unembed.b_U"])}

    def logits_of(flat):
        return split.logits(inp.latents, inp.batch, {**params, "unembed.b_U": flat}, inp.error, inp.base)

    jac = torch.autograd.functional.jacobian(logits_of, sub["unembed.b_U"])  # [B, V, P]
    z = logits_of(sub["unembed.b_U"]).detach()
    hz = torch.autograd.functional.hessian(lambda zz: split.task.loss(zz, inp.batch), z)  # [B, V, B, V]
    jv = torch.einsum("bvp,p->bv", jac, v["unembed.b_U"])
    want = torch.einsum("bvp,bv->p", jac, torch.einsum("bvcw,cw->bv", hz, jv))
    got = gnhvp(split, {**params}, inp, {**{k: torch.zeros_like(t) for k, t in params.items()}, **v})
    assert torch.allclose(got["unembed.b_U"], want, atol=1e-5)
    # and the exact HVP agrees with a dense Hessian on the same coordinates
    exact = hvp(split, params, inp, {**{k: torch.zeros_like(t) for k, t in params.items()}, **v})
    dense = torch.autograd.functional.hessian(
        lambda b: split.inputs_loss({**params, "unembed.b_U": b}, inp), sub["unembed.b_U"]
    )
    assert torch.allclose(exact["unembed.b_U"], dense @ v["unembed.b_U"], atol=1e-5)


def test_leave_one_out_retraining_agrees_with_influence():
    """theta2 = unembedding only (convex with damping): predicted vs actual test-loss change on removal.

    Retrain (float64, L-BFGS to a gradient norm ~1e-9) on 40 examples without each of the first 20. Removing
    example i is up-weighting it by -1/n, so the predicted change of the test loss is +score_i / n.
    """
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=4, dtype=torch.float64)
    hook = "blocks.1.hook_resid_post"
    keys = ["unembed.W_U", "unembed.b_U"]
    n = 40
    train = _examples(n, seed=7)
    test = _examples(1, seed=99)[0]
    lam = 0.1
    split = SplitModel(model, hook, downstream=keys, task=MultipleChoiceTask(model.tokenizer, template="plain"))
    all_inp = split.prepare(split.task.collate(train))  # one batch; per-example losses are independent
    test_inp = split.prepare(split.task.collate([test]))
    base = {k: v.clone() for k, v in split.downstream_params().items()}  # a copy: the model is updated below

    def fit(keep: list[int]) -> dict:
        mask = torch.zeros(n, dtype=torch.float64)
        mask[keep] = 1.0
        p = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        opt = torch.optim.LBFGS(
            list(p.values()),
            lr=1,
            max_iter=500,
            tolerance_grad=1e-12,
            tolerance_change=1e-16,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = (split.inputs_loss(p, all_inp, reduction="none") * mask).sum() / len(keep)
            loss = loss + 0.5 * lam * sum(((p[k] - base[k]) ** 2).sum() for k in keys)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        return {k: v.detach() for k, v in p.items()}

    full = fit(list(range(n)))
    split.load_downstream_params(full)  # the model now sits at the full-data optimum
    with torch.no_grad():
        loss_full = float(split.inputs_loss(full, test_inp))
    att = InfluenceAttributor(split, hessian=Explicit(damping=lam), use_cache=False, progress=False).fit(train)
    res = att.attribute([test], train[:20])
    predicted = res.example_scores[0].double() / n  # removing = up-weighting by -1/n: dL = +score/n
    actual = []
    for i in range(20):
        p = fit([j for j in range(n) if j != i])
        with torch.no_grad():
            actual.append(float(split.inputs_loss(p, test_inp)) - loss_full)
    actual = torch.tensor(actual, dtype=torch.float64)
    pearson = torch.corrcoef(torch.stack([predicted, actual]))[0, 1].item()
    assert pearson >= 0.9, (pearson, predicted, actual)
    assert (torch.sign(predicted) == torch.sign(actual)).all(), (predicted, actual)
    # CG with the same damping gives the same predictions (theta2 is convex + damped here)
    cg = (
        InfluenceAttributor(split, hessian=CG(damping=lam, max_iter=100, tol=1e-8), use_cache=False, progress=False)
        .fit(train)
        .attribute([test], train[:20])
    )
    assert torch.allclose(cg.example_scores, res.example_scores, rtol=1e-3, atol=1e-6)


def test_result_roundtrip_and_rankings(model3, tmp_path):
    sae = random_sae(model3, "blocks.1.hook_resid_post", d_sae=48, k=6)
    split = SplitModel(model3, "blocks.1.hook_resid_post", sae)
    exs = _examples(6)
    att = InfluenceAttributor(
        split, hessian=CG(max_iter=3, on_negative_curvature="ignore"), cache_dir=tmp_path / "cache", progress=False
    ).fit(exs)
    res = att.attribute(exs[:2], exs, batch_size=4)
    assert res.example_scores.shape == (2, 6) and res.latent_scores.shape == (2, 6, 48)
    top = res.top_examples(0, 3)
    assert top["score"].tolist() == sorted(res.example_scores[0].tolist(), reverse=True)[:3]
    assert top["id"].tolist() == [exs[i]["id"] for i in top["index"]]
    opp = res.top_examples(0, 2, opponents=True)
    assert opp["score"].tolist() == sorted(res.example_scores[0].tolist())[:2]
    mean_ifr = res.latent_scores[1].mean(0)
    lat = res.top_latents(1, 5)  # default: most negative mean IFR first (the sign of Eq. 16)
    assert lat["latent"].tolist() == torch.topk(-mean_ifr, 5).indices.tolist()
    assert lat["score"].tolist() == pytest.approx(mean_ifr[lat["latent"].tolist()].tolist())
    text = res.top_latents(1, 5, by="influence")
    assert text["latent"].tolist() == torch.topk(mean_ifr, 5).indices.tolist()
    mag = res.top_latents(1, 5, by="influence_abs")
    assert mag["latent"].tolist() == torch.topk(mean_ifr.abs(), 5).indices.tolist()
    with pytest.raises(ValueError, match="is not an order"):
        res.top_latents(1, 5, by="largest")
    sparse, tokens, strs = res.token_latent_scores(0, 2)
    assert sparse.shape == (len(tokens), 48) and len(strs) == len(tokens)
    assert torch.allclose(sparse.to_dense().sum(0), res.latent_scores[0, 2], atol=1e-5)
    assert sparse._nnz() <= 6 * len(tokens)  # only active latents (k = 6 per token) are stored
    res.save(tmp_path / "res")
    back = InfluenceResult.load(tmp_path / "res")
    assert torch.equal(back.example_scores, res.example_scores)
    assert torch.equal(back.latent_scores, res.latent_scores)
    assert back.train_ids == res.train_ids and back.meta["hook_name"] == "blocks.1.hook_resid_post"
    assert torch.equal(back.token_latent_scores(0, 2)[0].to_dense(), sparse.to_dense())
    # s_test cache: the second attribution reads the cached solves and gives the same scores
    again = att.attribute(exs[:2], exs, batch_size=4)
    assert all(info["iterations"] == 0 for info in again.meta["solve_infos"])
    assert torch.allclose(again.example_scores, res.example_scores)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_identity_solver_is_the_gradient_dot_product(model3):
    split = SplitModel(model3, "blocks.2.hook_resid_post")
    exs = _examples(3)
    res = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False).attribute(exs[0], exs)
    params = split.downstream_params()
    g0 = loss_grad(split, params, split.prepare(split.task.collate([exs[0]])))
    for i, ex in enumerate(exs):
        gi = loss_grad(split, params, split.prepare(split.task.collate([ex])))
        assert res.example_scores[0, i].item() == pytest.approx(float(tdot(g0, gi)), rel=1e-4)
    assert res.example_scores[0, 0] > 0  # an example is its own proponent under the gradient dot product


def test_empty_inputs_and_missing_fit(model3):
    split = SplitModel(model3, "blocks.2.hook_resid_post")
    att = InfluenceAttributor(split, use_cache=False, progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        att.attribute(_examples(1), _examples(2))
    with pytest.raises(ValueError, match="training set is empty"):
        InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False).attribute(_examples(1), [])


def test_cache_fingerprint_tracks_task_and_weights(model3):
    a = SplitModel(model3, "blocks.2.hook_resid_post").fingerprint()
    plain = MultipleChoiceTask(model3.tokenizer, template="plain")
    assert SplitModel(model3, "blocks.2.hook_resid_post", task=plain).fingerprint() != a
    assert SplitModel(model3, "blocks.1.hook_resid_post").fingerprint() != a
    assert SplitModel(model3, "blocks.2.hook_resid_post").fingerprint() == a


def test_trimmed_unembedding_gives_the_same_influence_as_the_full_matrix():
    """theta2's unembedding restricted to the option letters (the default) vs the full W_U / b_U: the same
    logits, the same example and latent scores, and s_test of the full version is zero outside the letters
    and equal to the trimmed one on them (exactly what trimming claims)."""
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=5, dtype=torch.float64)
    task = MultipleChoiceTask(model.tokenizer, template="plain")
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(model, hook, d_sae=24, k=4, seed=1)
    trimmed = SplitModel(model, hook, sae, task=task)
    full = SplitModel(model, hook, sae, task=task, trim_unembed=False)
    cols = trimmed.unembed_columns()
    assert cols is not None and cols.tolist() == sorted(set(task.letter_ids)) and full.unembed_columns() is None
    pt, pf = trimmed.downstream_params(), full.downstream_params()
    assert pt["unembed.W_U"].shape == (16, len(cols)) and pf["unembed.W_U"].shape == (16, model.cfg.d_vocab)
    saved = pf["unembed.W_U"].clone()
    assert full.num_downstream_params() - trimmed.num_downstream_params() == 17 * (model.cfg.d_vocab - len(cols))
    train, queries = _examples(6, seed=8), _examples(2, seed=9)
    inp = trimmed.prepare(task.collate(train[:3]))
    torch.testing.assert_close(trimmed.logits(inp.latents, inp.batch, pt, inp.error, inp.base),
                               full.logits(inp.latents, inp.batch, pf, inp.error, inp.base))  # fmt: skip
    res, s = {}, {}
    for name, split in (("trimmed", trimmed), ("full", full)):
        att = InfluenceAttributor(split, hessian=CG(damping=0.05, max_iter=30, tol=1e-10, gauss_newton=True),
                                  use_cache=False, progress=False).fit(train)  # fmt: skip
        s[name] = att.s_test(queries)
        res[name] = att.attribute(queries, train)
    torch.testing.assert_close(res["trimmed"].example_scores, res["full"].example_scores, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res["trimmed"].latent_scores, res["full"].latent_scores, rtol=1e-6, atol=1e-9)
    assert res["full"].example_scores.abs().max() > 1e-3  # not trivially zero
    for st, sf in zip(s["trimmed"], s["full"]):
        w = sf["unembed.W_U"]
        torch.testing.assert_close(w.index_select(1, cols), st["unembed.W_U"], rtol=1e-6, atol=1e-10)
        rest = torch.ones(w.shape[1], dtype=torch.bool)
        rest[cols] = False
        assert w[:, rest].abs().max() == 0 and sf["unembed.b_U"][rest].abs().max() == 0
    # writing theta2 back goes to the kept columns of the model's matrix only
    trimmed.load_downstream_params({"unembed.W_U": pt["unembed.W_U"] + 1.0})
    w_now = dict(model.named_parameters())["unembed.W_U"].detach()
    torch.testing.assert_close(w_now.index_select(1, cols), saved.index_select(1, cols) + 1.0)
    rest = torch.ones(w_now.shape[1], dtype=torch.bool)
    rest[cols] = False
    assert torch.equal(w_now[:, rest], saved[:, rest])
    trimmed.load_downstream_params({"unembed.W_U": pt["unembed.W_U"]})
    assert torch.equal(dict(model.named_parameters())["unembed.W_U"].detach(), saved)
