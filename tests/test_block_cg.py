"""Block CG (``CG(block=True)``): the queries of one ``solve_many`` share one search space.

Checked against independent computations: the dense answer ``torch.linalg.solve``, the A-norm error of plain CG
per query (block CG minimises each query's error over a space containing its own Krylov space, so it is never
larger), and a textbook dense block CG written out here. The integration check uses a tiny TransformerLens model
with its own EK-FAC factors as the preconditioner.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from repinf_lens import InfluenceAttributor, SplitModel
from repinf_lens.curvature import CG, EKFAC, NegativeCurvatureWarning
from repinf_lens.errors import SettingsError
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))


def system(n: int = 30, n_rhs: int = 4, cond: float = 1e4, seed: int = 0, shared: int = 3):
    """A dense SPD H and right-hand sides that share ``shared`` directions (as the queries' gradients do)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ q.T
    common = torch.randn(shared, n, generator=gen, dtype=torch.float64)
    gs = []
    for _ in range(n_rhs):
        v = torch.randn(shared, generator=gen, dtype=torch.float64) @ common
        v = v + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
        gs.append({"w": v.reshape(5, n // 5).clone()})
    return h, gs


def hvp_of(h):
    def f(v):
        return {"w": (h @ v["w"].reshape(-1)).reshape(v["w"].shape)}

    return f


def flat(t):
    return t["w"].reshape(-1)


def test_block_cg_converges_to_the_dense_answer_for_every_query_with_zero_and_duplicate_queries():
    h, gs = system()
    gs = [gs[0], {k: v.clone() for k, v in gs[0].items()}, {k: v * 0 for k, v in gs[1].items()}, *gs[1:]]
    lam = 1e-2
    a = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    xs, infos = CG(damping=lam, max_iter=200, tol=1e-10, block=True).solve_many(hvp_of(h), gs)
    for g, x, info in zip(gs, xs, infos, strict=True):
        torch.testing.assert_close(flat(x), torch.linalg.solve(a, flat(g)), rtol=1e-7, atol=1e-10)
        assert info.converged
    assert infos[2].iterations == 0 and float(flat(xs[2]).abs().max()) == 0.0  # the zero query: s = 0
    # one search space: fewer iterations than the number of unknowns needs, and fewer than plain CG
    plain = CG(damping=lam, max_iter=200, tol=1e-10).solve_many(hvp_of(h), gs)[1]
    assert max(i.iterations for i in infos) < max(i.iterations for i in plain)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_each_query_error_is_never_above_plain_cg_at_the_same_iteration(preconditioned):
    h, gs = system(cond=1e5)
    lam = 1e-3
    n = h.shape[0]
    a = h + lam * torch.eye(n, dtype=h.dtype)
    pre = None
    if preconditioned:
        from test_pcg import DensePreconditioner  # (tests/ is on sys.path: pytest's prepend import mode)

        pre = DensePreconditioner(inv=torch.linalg.inv(a + torch.diag(0.5 * torch.diag(h))))
    for k in (1, 2, 3, 5, 8):
        blk = CG(damping=lam, max_iter=k, tol=0.0, block=True, preconditioner=pre).solve_many(hvp_of(h), gs)[0]
        one = CG(damping=lam, max_iter=k, tol=0.0, preconditioner=pre).solve_many(hvp_of(h), gs)[0]
        for g, xb, xp in zip(gs, blk, one, strict=True):
            want = torch.linalg.solve(a, flat(g))
            eb, ep = flat(xb) - want, flat(xp) - want
            err_b, err_p = float(eb @ a @ eb), float(ep @ a @ ep)
            assert err_b <= err_p * (1 + 1e-8) + 1e-20, (k, err_b, err_p)
    # and strictly better somewhere (the shared directions)
    assert err_b < 0.5 * err_p


def test_block_cg_equals_a_textbook_dense_block_cg():
    h, gs = system(n=20, n_rhs=3, shared=1)
    lam = 1e-2
    a = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    b = torch.stack([flat(g) for g in gs], 1)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(4):  # O'Leary's block CG (full-rank blocks, no preconditioner)
        q = a @ p
        alpha = torch.linalg.solve(p.T @ q, p.T @ r)
        x, r = x + p @ alpha, r - q @ alpha
        p = r + p @ (-torch.linalg.solve(p.T @ q, q.T @ r))
    xs = CG(damping=lam, max_iter=4, tol=0.0, block=True).solve_many(hvp_of(h), gs)[0]
    torch.testing.assert_close(torch.stack([flat(v) for v in xs], 1), x, rtol=1e-8, atol=1e-10)


def test_negative_curvature_stops_warns_or_raises():
    h, gs = system(n=10, n_rhs=2, shared=1)
    h = h - 50.0 * torch.eye(10, dtype=h.dtype)  # indefinite
    with pytest.warns(NegativeCurvatureWarning, match="block CG"):
        _, infos = CG(damping=0.0, max_iter=10, block=True).solve_many(hvp_of(h), gs)
    assert all(i.negative_curvature for i in infos)
    with pytest.raises(FloatingPointError, match="not positive definite"):
        CG(damping=0.0, max_iter=10, block=True, on_negative_curvature="raise").solve_many(hvp_of(h), gs)


def test_block_is_in_the_cache_key_only_when_true_and_is_validated():
    assert "block" not in CG().to_dict() and CG(block=True).to_dict()["block"] is True
    assert CG().cache_identity() != CG(block=True).cache_identity()
    with pytest.raises(SettingsError, match="block"):
        CG(block=1)  # type: ignore[arg-type]
    with warnings.catch_warnings():  # one query: plain CG, no block code path
        warnings.simplefilter("error")
        h, gs = system()
        a, _ = CG(max_iter=3, tol=0.0, block=True).solve_many(hvp_of(h), gs[:1])
        b, _ = CG(max_iter=3, tol=0.0).solve_many(hvp_of(h), gs[:1])
        torch.testing.assert_close(a[0]["w"], b[0]["w"], rtol=0, atol=0)


def test_ekfac_preconditioned_block_cg_on_a_tiny_model_reaches_the_converged_solution_in_fewer_iterations():
    """The attributor path: EK-FAC's stacked preconditioning (``solve_stacked``) equals its per-query one, and
    block PCG's s_test is closer to the converged CG answer than plain PCG's at the same iteration count."""
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), downstream=r"^unembed\.")
    rows, queries = toy_mcqa_rows(24, seed=0), toy_mcqa_rows(4, seed=9, prefix="q")
    lam = 1e-2

    def run(solver):
        att = InfluenceAttributor(split, hessian=solver, progress=False, use_cache=False).fit(rows)
        return [torch.cat([v.reshape(-1) for v in s.values()]) for s in att.s_test(queries)], att

    ref, _ = run(CG(damping=lam, max_iter=300, tol=1e-10, gauss_newton=True))
    pre = EKFAC(damping=lam, factor_dtype="float64")
    errs = {}
    for block in (False, True):
        got, att = run(CG(damping=lam, max_iter=3, tol=0.0, gauss_newton=True, preconditioner=pre, block=block))
        errs[block] = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref, strict=True))
    assert errs[True] < errs[False]
    gs = att.query_gradients(queries)
    stacked = pre.solve_stacked({k: torch.stack([g[k] for g in gs]) for k in gs[0]})
    for i, one in enumerate(pre.solve_many(None, gs)[0]):
        for k in one:
            torch.testing.assert_close(stacked[k][i], one[k], rtol=1e-12, atol=1e-14)
