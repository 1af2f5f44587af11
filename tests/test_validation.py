"""Impossible settings fail at construction, before any work; NaN/inf fail loudly, naming where they are."""

from __future__ import annotations

import math

import pytest
import torch

from repinf_lens.curvature import CG, Explicit, Identity, LiSSA, solver_from_dict
from repinf_lens.errors import NonFiniteError, RepinfLensError, SettingsError, check_finite
from repinf_lens.influence.attributor import InfluenceAttributor
from repinf_lens.influence.prefilter import build_sketches, prefilter, top_count
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import SplitModel
from repinf_lens.testing import random_sae, toy_mcqa_rows
from repinf_lens.workflows import AttributionConfig

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def split(tiny):
    return SplitModel(tiny, HOOK, random_sae(tiny, HOOK, d_sae=16, k=4))


def _settings_error(match: str):
    return pytest.raises(SettingsError, match=rf"{match}.*Fix: ")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CG(max_iter=0), "CG max_iter must be an integer >= 1, got 0"),
        (lambda: CG(max_iter=-3), "CG max_iter"),
        (lambda: CG(damping=-1e-3), "CG damping must be a finite number >= 0"),
        (lambda: CG(damping=math.nan), "CG damping"),
        (lambda: CG(damping=math.inf), "CG damping"),
        (lambda: CG(batch_size=0), "CG batch_size must be an integer >= 1"),
        (lambda: CG(tol=-1.0), "CG tol"),
        (lambda: CG(on_negative_curvature="rasie"), "CG on_negative_curvature must be one of"),
        (lambda: LiSSA(depth=0), "LiSSA depth must be an integer >= 1"),
        (lambda: LiSSA(scale=0.0), "LiSSA scale must be a finite number > 0"),
        (lambda: LiSSA(damping=-1.0), "LiSSA damping"),
        (lambda: Explicit(chunk_size=0), "Explicit chunk_size"),
        (lambda: Explicit(max_params=0), "Explicit max_params"),
        (lambda: Identity(batch_size=0), "Identity batch_size"),
        (lambda: solver_from_dict({"solver": "cg", "max_iter": 0}), "CG max_iter"),
        (lambda: solver_from_dict({"solver": "newton"}), "Unknown solver 'newton'"),
    ],
)
def test_impossible_solver_settings_fail_at_construction(make, match):
    with _settings_error(match) as info:
        make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RepinfLensError)


def test_valid_solver_settings_are_kept_unchanged():
    cg = CG(damping=0, max_iter=1, tol=0.0, batch_size=1)  # damping 0 and tol 0 (= run every iteration) are valid
    assert cg.to_dict() == {"solver": "cg", "damping": 0, "batch_size": 1, "gauss_newton": False, "max_iter": 1,
                            "tol": 0.0, "on_negative_curvature": "warn"}  # fmt: skip
    assert LiSSA(scale=1e3, depth=1).depth == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
        ({"damping": -1.0}, "damping must be a finite number >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"prefilter_fraction": 0.0}, r"prefilter_fraction must be in \(0, 1\] or None, got 0.0"),
        ({"prefilter_fraction": 1.5}, "prefilter_fraction must be in"),
        ({"prefilter_fraction": math.nan}, "prefilter_fraction must be in"),
        ({"prefilter_top_k": 0}, "prefilter_top_k must be an integer >= 1"),
        ({"prefilter_top_k": 5, "prefilter_fraction": 0.1}, "both prefilter_fraction=0.1 and prefilter_top_k=5"),
        ({"hessian_examples": 0}, "hessian_examples"),
        ({"sketch_dim": 0}, "sketch_dim"),
        ({"shard_size": 0}, "shard_size"),
        ({"query_chunk_size": 0}, "query_chunk_size"),
        ({"solver": "newton"}, "solver must be one of"),
    ],
)
def test_attribution_config_refuses_impossible_settings(kwargs, match):
    with _settings_error(match):
        AttributionConfig(**kwargs)


def test_attribution_config_defaults_and_none_are_valid():
    AttributionConfig()
    AttributionConfig(prefilter_fraction=1.0, query_chunk_size=None, damping=0.0, solver="identity")


def test_prefilter_settings_fail_before_any_store_or_gradient_work(split, tmp_path):
    rows = toy_mcqa_rows(2)
    # the store does not even exist: the setting is refused first (no load, no sketching of the queries)
    for kw in ({"top_fraction": 1.5}, {"top_fraction": 0.0}, {"top_k": 0}, {}, {"top_k": 3, "top_fraction": 0.1}):
        with pytest.raises(SettingsError, match="Fix:"):
            prefilter(rows, tmp_path / "no-store", split=split, **kw)
    with pytest.raises(SettingsError, match="top_fraction must be in"):
        top_count(10, top_fraction=2.0)
    for kw in ({"batch_size": 0}, {"shard_size": 0}, {"dim": 0}):
        with pytest.raises(SettingsError, match="Fix:"):
            build_sketches(split, None, rows, out_dir=tmp_path / "s", progress=False, **kw)
    assert not (tmp_path / "s").exists()


def test_attributor_settings(split, tmp_path):
    for kw in ({"batch_size": 0}, {"query_chunk_size": 0}, {"swap_chunk_size": 0}):
        with _settings_error(next(iter(kw))):
            InfluenceAttributor(split, use_cache=False, progress=False, **kw)
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False)
    with _settings_error("shard_size"):
        att.attribute_streaming(toy_mcqa_rows(1), toy_mcqa_rows(2), out_dir=tmp_path / "r", shard_size=0)
    with _settings_error("fit batch_size"):
        att.fit(toy_mcqa_rows(2), batch_size=0)


# ---------------------------------------------------------------------------------------------- non-finite values
def test_check_finite_names_the_tensor():
    good = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    assert check_finite("s_test", good) is good
    bad = {"a": torch.ones(3), "blocks.1.mlp.W_out": torch.tensor([1.0, math.nan, math.inf, -math.inf])}
    with pytest.raises(NonFiniteError, match=r"s_test is not finite in tensor: 'blocks.1.mlp.W_out' \(1 NaN, 2 inf "
                       r"of 4\) after the solve\. Fix: "):  # fmt: skip
        check_finite("s_test", bad, where="after the solve")
    with pytest.raises(FloatingPointError, match="scores is not finite: 1 NaN"):
        check_finite("scores", torch.tensor([0.0, math.nan]))
    check_finite("ids", torch.tensor([1, 2]))  # integer tensors are always finite


def _poisoned_hvp(v):
    """H = I except that every product has a NaN in the tensor ``"w2"``."""
    out = {k: t.clone() for k, t in v.items()}
    out["w2"] = out["w2"] + math.nan
    return out


G = {"w1": torch.ones(3), "w2": torch.ones(2)}


@pytest.mark.parametrize("solver", [CG(max_iter=3), LiSSA(depth=3), Explicit()])
def test_non_finite_s_test_names_the_parameter_tensor(solver):
    with pytest.raises(NonFiniteError, match=r"'w2'.*Fix: "):
        solver.solve(_poisoned_hvp, G)
    with pytest.raises(NonFiniteError, match=r"'w2'.*Fix: "):
        solver.solve_many(_poisoned_hvp, [G, G])


def test_non_finite_gradient_is_refused_by_cg():
    with pytest.raises(NonFiniteError, match=r"g_test.*'w1'"):
        CG().solve(lambda v: v, {"w1": torch.tensor([math.nan, 1.0]), "w2": torch.ones(2)})


def test_non_finite_scores_raise_before_ranking_naming_query_and_examples(split, monkeypatch):
    import repinf_lens.influence.attributor as attributor

    real = attributor.latent_influence_multi

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        for li in out:
            li.example_scores[1] = math.nan  # the second example of each batch
        return out

    monkeypatch.setattr(attributor, "latent_influence_multi", poisoned)
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=4)
    train = toy_mcqa_rows(4, prefix="t")
    with pytest.raises(NonFiniteError, match=r"query 'q0' are NaN/inf for 1 training example\(s\): \['t1'\].*Fix: "):
        att.attribute(toy_mcqa_rows(1), train)


def test_result_refuses_to_rank_non_finite_scores():
    ex = torch.tensor([[0.5, math.nan, 1.0], [0.1, 0.2, 0.3]])
    lat = torch.zeros(2, 3, 4)
    lat[1, 2, 0] = math.inf
    res = InfluenceResult(example_scores=ex, latent_scores=lat, query_ids=["qa", "qb"], train_ids=["x", "y", "z"])
    with pytest.raises(NonFiniteError, match=r"example scores of query 'qa' are NaN/inf .*\['y'\].*Fix: "):
        res.top_examples(0, k=2)
    assert res.top_examples(1, k=2)["id"].tolist() == ["z", "y"]
    with pytest.raises(NonFiniteError, match=r"latent scores of query 'qb' .*\['z'\]"):
        res.top_latents(1)
    with pytest.raises(SettingsError, match="Query index 5 is out of range"):
        res.top_examples(5)
    with _settings_error("top_examples k"):
        res.top_examples(1, k=0)
