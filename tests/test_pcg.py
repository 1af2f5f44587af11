"""Preconditioned CG: CG(preconditioner=EKFAC/KFAC) solves the same damped system as plain CG, in fewer iterations.

The linear-algebra checks use a dense SPD system with a known answer (``torch.linalg.solve``); the integration
checks use a tiny TransformerLens model, its Gauss-Newton HVPs and fitted EK-FAC factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from repinf_lens import InfluenceAttributor, SplitModel
from repinf_lens.curvature import CG, EKFAC
from repinf_lens.curvature.solvers import FittedSolver
from repinf_lens.errors import SettingsError
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows
from repinf_lens.workflows.config import AttributionConfig, solver_from_config

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))


@dataclass
class DensePreconditioner(FittedSolver):
    """A test preconditioner with 'fitted factors': ``M^-1 = inv`` (a dense SPD matrix on the flat vector)."""

    name: ClassVar[str] = "dense_test"
    inv: Any = None
    calls: int = 0

    def solve(self, hvp_fn, g):
        raise AssertionError("PCG must precondition all residuals in one batched solve_many call")

    def solve_many(self, hvp_fn, gs, *, chunk_size=None):
        self.calls += 1
        return [{"w": (self.inv @ g["w"].reshape(-1)).reshape(g["w"].shape)} for g in gs], [None] * len(gs)


def spd_system(n: int = 12, cond: float = 1e3, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ q.T
    gs = [{"w": torch.randn(3, n // 3, generator=gen, dtype=torch.float64)} for _ in range(3)]
    return h, gs


def hvp_of(h: torch.Tensor):
    return lambda v: {"w": (h @ v["w"].reshape(-1)).reshape(v["w"].shape)}


def test_exact_preconditioner_converges_in_one_iteration_to_the_dense_answer():
    h, gs = spd_system()
    lam = 1e-2
    exact = torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
    pre = DensePreconditioner(inv=exact)
    x, info = CG(damping=lam, max_iter=10, tol=1e-10, preconditioner=pre).solve(hvp_of(h), gs[0])
    want = torch.linalg.solve(h + lam * torch.eye(h.shape[0], dtype=h.dtype), gs[0]["w"].reshape(-1))
    assert info.iterations == 1 and info.converged
    torch.testing.assert_close(x["w"].reshape(-1), want, rtol=1e-9, atol=1e-12)


def test_pcg_and_cg_solve_the_same_system_and_pcg_needs_fewer_iterations():
    h, gs = spd_system(cond=1e4)
    lam = 1e-3
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    want = torch.linalg.solve(h + lam * eye, gs[1]["w"].reshape(-1))
    # an imperfect SPD preconditioner: the inverse of the diagonal-perturbed matrix
    approx = h + lam * eye + torch.diag(0.3 * torch.diag(h))
    pre = DensePreconditioner(inv=torch.linalg.inv(approx))
    x_pcg, i_pcg = CG(damping=lam, max_iter=100, tol=1e-10, preconditioner=pre).solve(hvp_of(h), gs[1])
    x_cg, i_cg = CG(damping=lam, max_iter=100, tol=1e-10).solve(hvp_of(h), gs[1])
    torch.testing.assert_close(x_pcg["w"].reshape(-1), want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(x_cg["w"].reshape(-1), want, rtol=1e-6, atol=1e-8)
    assert i_pcg.converged and i_cg.converged and i_pcg.iterations < i_cg.iterations


def test_solve_many_lockstep_equals_solve_per_query_with_one_batched_preconditioning_per_iteration():
    h, gs = spd_system()
    lam = 1e-2
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    pre = DensePreconditioner(inv=torch.linalg.inv(h + lam * eye + 0.5 * eye))
    solver = CG(damping=lam, max_iter=6, tol=0.0, preconditioner=pre)
    many, infos = solver.solve_many(hvp_of(h), gs)
    assert pre.calls == 1 + 5  # the initial z, then one batched call per iteration but the last
    for g, x, info in zip(gs, many, infos, strict=True):
        one, one_info = solver.solve(hvp_of(h), g)
        torch.testing.assert_close(x["w"], one["w"], rtol=1e-10, atol=1e-12)
        assert info.residuals == pytest.approx(one_info.residuals, rel=1e-8)


def test_plain_cg_is_unchanged_by_the_preconditioner_code_path():
    h, gs = spd_system()
    x, info = CG(damping=1e-2, max_iter=4, tol=0.0).solve(hvp_of(h), gs[0])
    # textbook CG, written out independently
    a = h + 1e-2 * torch.eye(h.shape[0], dtype=h.dtype)
    b = gs[0]["w"].reshape(-1)
    xx, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    for _ in range(4):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        xx, r_new = xx + alpha * p, r - alpha * ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    torch.testing.assert_close(x["w"].reshape(-1), xx, rtol=1e-10, atol=1e-12)
    assert info.iterations == 4


def test_bad_preconditioners_and_settings_are_refused():
    with pytest.raises(SettingsError, match="fitted factors"):
        CG(preconditioner=CG())
    with pytest.raises(SettingsError, match="solver='cg'"):
        AttributionConfig(solver="lissa", preconditioner="ekfac")
    with pytest.raises(SettingsError, match="solver='cg'"):
        AttributionConfig(solver="cg", preconditioner="identity")
    solver = solver_from_config(AttributionConfig(solver="cg", preconditioner="ekfac", damping=0.1, max_iter=3))
    assert isinstance(solver, CG) and isinstance(solver.preconditioner, EKFAC)
    assert solver.preconditioner.damping == 0.1 and solver.to_dict()["preconditioner"]["solver"] == "ekfac"


def test_ekfac_preconditioned_cg_on_a_tiny_model_matches_cg_in_fewer_hvps():
    """theta2 = the trimmed unembedding, where the Kronecker factorisation is close (on the whole tiny theta2
    EK-FAC is a poor preconditioner: block-diagonality alone loses much of the curvature there, and PCG is then
    slower than CG; the real model's numbers are in docs/results.md)."""
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), downstream=r"^unembed\.")
    rows, queries = toy_mcqa_rows(24, seed=0), toy_mcqa_rows(2, seed=9, prefix="q")
    lam = 1e-2
    out = {}
    for name, solver in {
        "cg": CG(damping=lam, max_iter=200, tol=1e-7, gauss_newton=True),
        "pcg": CG(
            damping=lam,
            max_iter=200,
            tol=1e-7,
            gauss_newton=True,
            preconditioner=EKFAC(damping=lam, factor_dtype="float64"),
        ),
    }.items():
        att = InfluenceAttributor(split, hessian=solver, progress=False).fit(rows)
        out[name] = (att.s_test(queries), [i.iterations for i in att.solve_infos])
    for s_cg, s_pcg in zip(out["cg"][0], out["pcg"][0], strict=True):
        a = torch.cat([v.reshape(-1) for v in s_cg.values()])
        b = torch.cat([s_pcg[k].reshape(-1) for k in s_cg])
        assert float((a - b).norm() / a.norm()) < 1e-4  # the same system, solved to the same tolerance
    assert sum(out["pcg"][1]) < sum(out["cg"][1])  # EK-FAC as M^-1 saves iterations (HVPs)


def test_the_fisher_knob_reaches_the_fitted_curvature_and_is_refused_where_there_is_none():
    assert solver_from_config(AttributionConfig(solver="ekfac", fisher="expected")).fisher == "expected"
    cg = solver_from_config(AttributionConfig(solver="cg", preconditioner="kfac", fisher="empirical"))
    assert cg.preconditioner.fisher == "empirical" and "fisher" not in cg.to_dict()
    assert solver_from_config(AttributionConfig(solver="ekfac")).fisher == EKFAC().fisher  # unset: the default
    with pytest.raises(SettingsError, match="fisher='expected' with solver='cg'.*Fix: solver='ekfac'"):
        AttributionConfig(solver="cg", fisher="expected")
    with pytest.raises(SettingsError, match="Woodbury fisher"):  # (Woodbury's true Fisher is already exact)
        AttributionConfig(solver="woodbury", fisher="expected")
    with pytest.raises(SettingsError, match="fisher is one of"):
        AttributionConfig(solver="ekfac", fisher="sampled")
    from repinf_lens.cli import build_parser

    args = build_parser().parse_args(["attribute", "--sae", "x", "--solver", "ekfac", "--fisher", "expected"])
    assert args.fisher == "expected"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["attribute", "--sae", "x", "--fisher", "sampled"])
