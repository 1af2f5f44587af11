"""The upstream part of each Hessian batch runs once: ``InfluenceAttributor.fit`` keeps the prepared inputs
(``input_cache_mb``) and EK-FAC's second pass, the HVP batches and the scoring of the same rows reuse them, with the
scores of a run that recomputes everything."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.func import grad

from repinf_lens import CG, EKFAC, KFAC, InfluenceAttributor, SplitModel
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

HOOK = "blocks.1.hook_resid_post"
BS = 4


@pytest.fixture(scope="module")
def split():
    model = tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=5)
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=40, k=5))


def _counted(att: InfluenceAttributor, monkeypatch: Any) -> list[int]:
    """Count the upstream passes (``split.prepare`` calls, one per batch) of ``att``."""
    calls = [0]
    real = att.split.prepare

    def prepare(batch: Any) -> Any:
        calls[0] += 1
        return real(batch)

    monkeypatch.setattr(att.split, "prepare", prepare)
    return calls


def _attributor(split: SplitModel, solver: Any, tmp_path: Any, **kw: Any) -> InfluenceAttributor:
    return InfluenceAttributor(
        split, hessian=solver, batch_size=BS, use_cache=False, progress=False, latent_method="none", **kw
    )


def _ekfac(tmp_path: Any, name: str) -> EKFAC:
    return EKFAC(damping=1e-2, batch_size=BS, fisher="empirical", factor_dir=str(tmp_path / name), progress=False)


def test_ekfac_fit_and_scoring_share_one_upstream_pass(split, tmp_path, monkeypatch):
    rows, queries = toy_mcqa_rows(12, seed=1), toy_mcqa_rows(2, seed=7)
    n_batches = 3
    kept = _attributor(split, _ekfac(tmp_path, "a"), tmp_path)
    calls = _counted(kept, monkeypatch)
    res = kept.fit(rows).attribute(queries, rows)
    # covariance pass prepares the 3 batches, the correction pass and the scoring reuse them; + 1 query batch
    assert calls[0] == n_batches + 1
    assert res.meta["reused_upstream_batches"] == n_batches

    fresh = _attributor(split, _ekfac(tmp_path, "b"), tmp_path, input_cache_mb=0)
    calls_fresh = _counted(fresh, monkeypatch)
    ref = fresh.fit(rows).attribute(queries, rows)
    assert calls_fresh[0] == 3 * n_batches + 1  # covariance, correction and scoring passes each run upstream
    assert ref.meta["reused_upstream_batches"] == 0
    assert torch.equal(res.example_scores, ref.example_scores)
    assert float(res.example_scores.abs().max()) > 0

    # independent of the attributor: reverse-mode gradient of each example's loss (inputs prepared afresh)
    params = split.downstream_params()
    s_tests = kept.s_test(queries)
    inp = split.prepare(split.task.collate(rows))
    for q, s in enumerate(s_tests):
        want = torch.stack(
            [
                sum(
                    (g * s[k]).sum()
                    for k, g in grad(lambda p, i=i: split.inputs_loss(p, inp.slice(i, i + 1)))(params).items()
                )
                for i in range(len(rows))
            ]
        )
        want = want.detach().double()
        assert torch.allclose(res.example_scores[q].double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_cg_scores_its_hessian_batches_from_the_kept_inputs(split, tmp_path, monkeypatch):
    rows, queries = toy_mcqa_rows(8, seed=2), toy_mcqa_rows(2, seed=8)
    att = _attributor(split, CG(damping=1e-2, max_iter=5, batch_size=BS, gauss_newton=True), tmp_path, input_cache_mb=0)
    calls = _counted(att, monkeypatch)
    res = att.fit(rows).attribute(queries, rows)
    assert calls[0] == 2 + 1  # the HVP batches are kept whatever the cap (CG needs them): scoring reuses them
    assert res.meta["reused_upstream_batches"] == 2
    # other training rows (or the same rows batched otherwise) are prepared afresh, with the same scores
    again = att.attribute(queries, rows, batch_size=BS * 2)
    assert again.meta["reused_upstream_batches"] == 0
    assert torch.allclose(again.example_scores, res.example_scores, rtol=1e-5, atol=1e-7)
    other = att.attribute(queries, toy_mcqa_rows(4, seed=3))
    assert other.meta["reused_upstream_batches"] == 0


def test_the_cap_bounds_what_fit_keeps(split, tmp_path, monkeypatch):
    rows, queries = toy_mcqa_rows(8, seed=4), toy_mcqa_rows(1, seed=9)
    att = _attributor(split, KFAC(damping=1e-2, batch_size=BS, factor_dir=str(tmp_path / "k"), progress=False),
                      tmp_path, input_cache_mb=1e-6)  # fmt: skip
    calls = _counted(att, monkeypatch)
    res = att.fit(rows).attribute(queries, rows)
    assert calls[0] == 2 + 2 + 1  # nothing fits under the cap: the fit and the scoring each run upstream
    assert res.meta["reused_upstream_batches"] == 0
    with pytest.raises(ValueError, match="input_cache_mb"):
        _attributor(split, None, tmp_path, input_cache_mb=-1)


def test_a_solver_without_the_prepare_keyword_still_fits(split, tmp_path):
    class Legacy(KFAC):
        def fit_factors(self, split, task, rows, *, batch_size=None, progress=True):  # type: ignore[override]
            super().fit_factors(split, task, rows, batch_size=batch_size, progress=progress)

    rows = toy_mcqa_rows(4, seed=6)
    att = _attributor(split, Legacy(damping=1e-2, batch_size=BS, factor_dir=str(tmp_path / "l"), progress=False),
                      tmp_path)  # fmt: skip
    res = att.fit(rows).attribute(toy_mcqa_rows(1, seed=2), rows)
    assert res.meta["reused_upstream_batches"] == 0 and torch.isfinite(res.example_scores).all()
