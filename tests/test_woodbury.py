"""Woodbury: the exact damped Gauss-Newton / empirical Fisher of the Hessian rows, inverted in sample space.

Every check is against an independent computation: the dense Gauss-Newton ``sum_n J_n^T H_n J_n / N`` built from
``torch.func.jacrev`` of each example's logits over the FLAT theta2 and ``torch.func.hessian`` of its loss, the dense
empirical Fisher from one ``torch.func.grad`` per example, ``torch.linalg.solve``, and CG on the same system.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_kfac import HOOK, llama_split, ln_split  # the GPT-2-like and Llama-like tiny splits K-FAC is tested on

import repinf_lens as rl
from repinf_lens import InfluenceAttributor, SplitModel
from repinf_lens._shards import ManifestMismatchError
from repinf_lens._tree import tflatten, tunflatten
from repinf_lens.curvature import CG, EKFAC, Woodbury, WoodburyCheckError, build_solver, gauss_newton_rows
from repinf_lens.curvature import woodbury as wood_mod
from repinf_lens.errors import SettingsError
from repinf_lens.task import CompletionTask, mcqa_to_completion
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows
from repinf_lens.workflows.config import AttributionConfig, solver_from_config


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))


def llama_softcap_split():
    return llama_split(softcap=5.0)


def dense_gauss_newton(split, rows):
    """(1/N) sum_n J_n^T H_n J_n on the flat theta2, from jacrev of each example's read logits."""
    params = split.downstream_params()
    flat0 = tflatten(params).detach()
    inp = split.prepare(split.task.collate(rows))
    cols = split.loss_columns()
    cols = torch.arange(len(split.model.tokenizer)) if cols is None else cols
    total = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64)
    for i in range(len(rows)):
        one = inp.slice(i, i + 1)

        def logits(f, one=one):
            p = tunflatten(f, params)
            return split.logits(one.latents, one.batch, p, one.error, one.base, one.anchor, loss_only=True)[0]

        jac = torch.func.jacrev(lambda f: logits(f).index_select(-1, cols))(flat0)
        jac = jac.reshape(-1, flat0.numel())
        z = logits(flat0).detach()

        def loss(r, z=z, one=one):
            return split.task.loss(torch.nan_to_num(z).index_copy(-1, cols, r)[None], one.batch)

        read = z.index_select(-1, cols)
        h = torch.func.hessian(loss)(read).reshape(read.numel(), read.numel())
        total += (jac.T @ h @ jac).detach() / len(rows)
    return total, params


def dense_empirical_fisher(split, rows):
    params = split.downstream_params()
    flat0 = tflatten(params).detach()
    inp = split.prepare(split.task.collate(rows))
    total = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64)
    for i in range(len(rows)):
        one = inp.slice(i, i + 1)
        g = torch.func.grad(lambda f, one=one: split.inputs_loss(tunflatten(f, params), one))(flat0)
        total += torch.outer(g, g) / len(rows)
    return total, params


def random_trees(params, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in params.items()} for _ in range(k)]


@pytest.mark.parametrize("make", [ln_split, llama_softcap_split], ids=["layernorm-gpt2", "rmsnorm-gqa-gated-softcap"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_woodbury_is_the_exact_inverse_of_the_damped_dense_curvature(make, fisher):
    split = make()
    rows = toy_mcqa_rows(7, seed=1)  # 7 rows in batches of 3: an uneven last batch
    dense, params = (dense_gauss_newton if fisher == "true" else dense_empirical_fisher)(split, rows)
    lam = 1e-2
    solver = Woodbury(damping=lam, batch_size=3, fisher=fisher, progress=False, solve_dtype="float64")
    solver.fit_factors(split, split.task, rows)
    # rank: one row per example for the empirical Fisher; for 4 option letters the softmax Hessian has rank 3
    assert solver.rank == (7 if fisher == "empirical" else 7 * 3)
    gs = random_trees(params, 3)
    got, infos = solver.solve_many(None, gs)
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    for g, s in zip(gs, got, strict=True):
        want = torch.linalg.solve(dense + lam * eye, tflatten(g))
        assert float((tflatten(s) - want).norm() / want.norm()) < 1e-10, float((tflatten(s) - want).norm())
    assert all(i.iterations == 1 and i.converged for i in infos)
    if fisher == "true":  # the public row builder on one batch of every row: U^T U / N is the dense matrix
        u, idx = gauss_newton_rows(split, params, split.prepare(split.task.collate(rows)))
        flat_u = torch.cat([u[k].reshape(len(idx), -1) for k in params], 1)
        assert sorted(set(idx.tolist())) == list(range(7))
        assert float((flat_u.T @ flat_u / 7 - dense).norm() / dense.norm()) < 1e-10
    one, _ = solver.solve(None, gs[0])
    assert float((tflatten(one) - tflatten(got[0])).norm() / tflatten(got[0]).norm()) < 1e-12


def test_woodbury_in_float32_keeps_the_small_component_against_cancellation():
    """For a gradient in the rows' span (query and training gradients share their directions), s = (g - U^T c) /
    lambda cancels nearly all of g: computed in float64 from the float32 rows and gradient it equals the dense
    float64 solve of the same inputs, where the same combination in float32 does not."""
    split = ln_split(dtype=torch.float32)
    rows = toy_mcqa_rows(6, seed=2)
    lam = 1e-4
    solver = Woodbury(damping=lam, batch_size=6, progress=False, solve_dtype="float64")
    solver.fit_factors(split, split.task, rows)
    u32 = torch.cat([solver.rows[k].reshape(solver.rank, -1) for k in solver.rows], 1)
    u = u32.double()
    w = torch.randn(solver.rank, generator=torch.Generator().manual_seed(3))
    g_flat = w @ u32  # float32, in the span of the rows
    g = tunflatten(g_flat, split.downstream_params())
    got = tflatten(solver.solve(None, g)[0]).double()
    want = torch.linalg.solve(u.T @ u + lam * torch.eye(u.shape[1], dtype=torch.float64), g_flat.double())
    coef = torch.cholesky_solve((u @ g_flat.double())[:, None], solver.chol)[:, 0]
    naive = (g_flat - coef.float() @ u32) / lam
    err_got = float((got - want).norm() / want.norm())
    err_naive = float((naive.double() - want).norm() / want.norm())
    assert err_got < 1e-5 and err_naive > 10 * err_got, (err_got, err_naive)
    # the default float32 products: within float32 rounding of the same answer
    fast = Woodbury(damping=lam, batch_size=6, progress=False)
    fast.fit_factors(split, split.task, rows)
    err_fast = float((tflatten(fast.solve(None, g)[0]).double() - want).norm() / want.norm())
    assert err_fast < 1e-2 and fast.cache_identity() != solver.cache_identity()


def test_woodbury_equals_gauss_newton_cg_through_the_attributor_and_preconditions_the_exact_hessian():
    split = ln_split(downstream=r"^blocks\.1\.mlp\.W_out$|^ln_final\.w$")  # 400 entries: a dense Hessian
    rows, queries = toy_mcqa_rows(6, seed=4), toy_mcqa_rows(2, seed=9)
    lam = 1e-2
    kw = dict(batch_size=3, use_cache=False, progress=False)
    wood = InfluenceAttributor(split, hessian=Woodbury(damping=lam, batch_size=3, progress=False), **kw).fit(rows)
    cg_gn = InfluenceAttributor(
        split, hessian=CG(damping=lam, gauss_newton=True, max_iter=200, tol=1e-11, batch_size=3), **kw
    ).fit(rows)
    a, b = wood.s_test(queries), cg_gn.s_test(queries)
    for x, y in zip(a, b, strict=True):
        assert float((tflatten(x) - tflatten(y)).norm() / tflatten(y).norm()) < 1e-7
    res_w, res_c = wood.attribute(queries, rows), cg_gn.attribute(queries, rows)
    torch.testing.assert_close(res_w.example_scores, res_c.example_scores, rtol=1e-6, atol=1e-9)
    # as CG's preconditioner on the Gauss-Newton system: M^-1 is its exact inverse, so one iteration
    pre_gn = CG(damping=lam, gauss_newton=True, max_iter=5, tol=1e-10, batch_size=3,
                preconditioner=Woodbury(damping=lam, batch_size=3, progress=False))  # fmt: skip
    att = InfluenceAttributor(split, hessian=pre_gn, **kw).fit(rows)
    for x, y in zip(att.s_test(queries), b, strict=True):
        assert float((tflatten(x) - tflatten(y)).norm() / tflatten(y).norm()) < 1e-7
    _, infos = pre_gn.solve_many(att.hvp, att.query_gradients(queries))
    assert [i.iterations for i in infos] == [1, 1] and all(i.converged for i in infos)
    # on the EXACT damped Hessian (dense, torch.func.hessian of the mean loss): the same answer as plain CG, in
    # fewer iterations
    lam = 0.5  # (the exact Hessian of this theta2 is indefinite; the premise of CG is a PD damped system)
    params = split.downstream_params()
    flat0 = tflatten(params).detach()
    inp = split.prepare(split.task.collate(rows))
    hess = torch.func.hessian(lambda f: split.inputs_loss(tunflatten(f, params), inp))(flat0).detach()
    eye = torch.eye(flat0.numel(), dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(hess + lam * eye)[0]) > 0
    exact = InfluenceAttributor(split, hessian=CG(damping=lam, batch_size=6), **kw).fit(rows)
    g = exact.query_gradients(queries)[:1]
    pre = Woodbury(damping=lam, batch_size=3, progress=False)
    pre.fit_factors(split, split.task, rows)
    (x_p,), (info_p,) = CG(damping=lam, max_iter=200, tol=1e-9, preconditioner=pre).solve_many(exact.hvp, g)
    (x_c,), (info_c,) = CG(damping=lam, max_iter=200, tol=1e-9).solve_many(exact.hvp, g)
    want = torch.linalg.solve(hess + lam * eye, tflatten(g[0]))
    for x in (x_p, x_c):
        assert float((tflatten(x) - want).norm() / want.norm()) < 1e-7
    assert info_p.converged and info_c.converged and info_p.iterations < info_c.iterations


def test_a_fit_killed_mid_way_resumes_from_its_batches_bitwise(tmp_path, monkeypatch):
    split = ln_split(dtype=torch.float32)
    rows = toy_mcqa_rows(8, seed=5)
    kw = dict(damping=0.1, batch_size=2, progress=False)
    real = wood_mod.per_example_logit_vjps
    calls = {"n": 0}

    def crash_at_batch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(wood_mod, "per_example_logit_vjps", crash_at_batch_2)
    with pytest.raises(KeyboardInterrupt):
        Woodbury(factor_dir=str(tmp_path / "f"), **kw).fit_factors(split, split.task, rows)
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["batches_done"] == 2
    monkeypatch.setattr(wood_mod, "per_example_logit_vjps", real)
    resumed = Woodbury(factor_dir=str(tmp_path / "f"), **kw)
    resumed.fit_factors(split, split.task, rows)
    assert resumed.fit_info["batches_loaded"] == [0, 1] and resumed.fit_info["batches_computed"] == [2, 3]
    fresh = Woodbury(**kw)
    fresh.fit_factors(split, split.task, rows)
    assert resumed.rows.keys() == fresh.rows.keys()
    assert all(torch.equal(resumed.rows[k], fresh.rows[k]) for k in fresh.rows)
    assert torch.equal(resumed.chol, fresh.chol)
    assert resumed.cache_identity() == fresh.cache_identity()  # the folder is not part of the s_test key
    again = Woodbury(factor_dir=str(tmp_path / "f"), **kw)
    again.fit_factors(split, split.task, rows)
    assert again.fit_info["batches_computed"] == [] and torch.equal(again.chol, fresh.chol)
    # a damaged batch file is named, discarded and recomputed
    victim = tmp_path / "f" / "rows" / "rows-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="rows-00001"):
        fixed = Woodbury(factor_dir=str(tmp_path / "f"), **kw)
        fixed.fit_factors(split, split.task, rows)
    assert fixed.fit_info["batches_computed"] == [1] and torch.equal(fixed.chol, fresh.chol)
    # a folder of other inputs is refused, with the fix
    with pytest.raises(ManifestMismatchError, match=r"Fix:"):
        Woodbury(factor_dir=str(tmp_path / "f"), **kw).fit_factors(split, split.task, toy_mcqa_rows(8, seed=6))


def test_impossible_settings_are_refused_before_any_work(monkeypatch):
    with pytest.raises(SettingsError, match="damping=0"):
        Woodbury(damping=0.0)
    with pytest.raises(SettingsError, match="Fix"):
        Woodbury(gauss_newton=False)
    with pytest.raises(SettingsError, match="fisher"):
        Woodbury(fisher="sampled")
    split = ln_split(dtype=torch.float32)

    def never(*a, **k):
        raise AssertionError("no rows may be computed once the memory check fails")

    monkeypatch.setattr(wood_mod, "per_example_logit_vjps", never)
    with pytest.raises(SettingsError, match=r"max_memory_gb.*Fix"):
        Woodbury(max_memory_gb=1e-6, progress=False).fit_factors(split, split.task, toy_mcqa_rows(4, seed=0))
    with pytest.raises(RuntimeError, match=r"no rows.*Fix"):
        Woodbury().solve(None, split.downstream_params())


def test_a_loss_over_the_full_vocabulary_is_refused_for_the_gauss_newton_and_works_empirically():
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64, chat=False)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), task=CompletionTask(model.tokenizer))
    rows = mcqa_to_completion(toy_mcqa_rows(4, seed=0), target="letter_text")
    with pytest.raises(SettingsError, match=r"reads \d+ per example.*Fix: Woodbury\(fisher='empirical'\)"):
        Woodbury(progress=False).fit_factors(split, split.task, rows)
    solver = Woodbury(fisher="empirical", damping=1e-2, batch_size=3, progress=False)
    solver.fit_factors(split, split.task, rows)
    dense, params = dense_empirical_fisher(split, rows)
    g = random_trees(params, 1)[0]
    want = torch.linalg.solve(dense + 1e-2 * torch.eye(dense.shape[0], dtype=torch.float64), tflatten(g))
    torch.testing.assert_close(tflatten(solver.solve(None, g)[0]), want, rtol=1e-9, atol=1e-12)


def test_the_first_batch_check_catches_rows_that_are_not_the_curvature(monkeypatch):
    split = ln_split(dtype=torch.float32)
    real = wood_mod.per_example_grads

    def doubled(*a, **k):
        return {n: 2.0 * v for n, v in real(*a, **k).items()}

    monkeypatch.setattr(wood_mod, "per_example_grads", doubled)
    with pytest.raises(WoodburyCheckError, match=r"relative error.*Fix"):
        Woodbury(fisher="empirical", progress=False).fit_factors(split, split.task, toy_mcqa_rows(4, seed=0))


def test_registry_config_and_s_test_cache_keys(tmp_path):
    assert isinstance(build_solver("woodbury", damping=1e-2, batch_size=4), Woodbury)
    assert rl.Woodbury is Woodbury
    assert isinstance(solver_from_config(AttributionConfig(solver="woodbury", damping=1e-2)), Woodbury)
    cg = solver_from_config(AttributionConfig(solver="cg", preconditioner="woodbury", damping=1e-2))
    assert isinstance(cg.preconditioner, Woodbury)
    split = ln_split(dtype=torch.float32)
    rows, queries = toy_mcqa_rows(6, seed=4), toy_mcqa_rows(2, seed=9)
    keys = {}
    for name, solver in {
        "true": Woodbury(damping=1e-2, batch_size=3, progress=False),
        "empirical": Woodbury(damping=1e-2, batch_size=3, fisher="empirical", progress=False),
        "ekfac": EKFAC(damping=1e-2, batch_size=3, progress=False),
    }.items():
        att = InfluenceAttributor(split, hessian=solver, batch_size=3, progress=False, cache_dir=str(tmp_path / "c"))
        att.fit(rows)
        keys[name] = json.dumps(solver.cache_identity(), sort_keys=True, default=str)
        first = att.s_test(queries)
        again = att.s_test(queries)  # read back from the cache
        for x, y in zip(first, again, strict=True):
            assert torch.equal(tflatten(x), tflatten(y))
    assert len(set(keys.values())) == 3
    other = Woodbury(damping=1e-2, batch_size=3, progress=False)
    other.fit_factors(split, split.task, toy_mcqa_rows(6, seed=5))  # other Hessian rows: another identity
    assert other.cache_identity() != Woodbury(damping=1e-2, batch_size=3, progress=False).cache_identity()
