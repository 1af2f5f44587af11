"""The prepared (primal-once) HVP: the same products as the forward-over-reverse one and as autograd's Hessian."""

from __future__ import annotations

import pytest
import torch

from repinf_lens import MultipleChoiceTask, SplitModel
from repinf_lens._tree import tflatten, tunflatten
from repinf_lens.curvature import dataset_hvp, prepared_dataset_hvp
from repinf_lens.testing import tiny_model, toy_mcqa_rows


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(n_layers=2, d_model=8, n_heads=2, d_mlp=16, seed=3)
    task = MultipleChoiceTask(model.tokenizer, template="plain")
    split = SplitModel(model, "blocks.0.hook_resid_post", task=task)
    rows = toy_mcqa_rows(7, seed=4)
    inputs = [split.prepare(task.collate(rows[:4])), split.prepare(task.collate(rows[4:]))]
    return split, inputs


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_prepared_hvp_equals_dataset_hvp_for_several_vectors_and_under_vmap(setup, gauss_newton):
    split, inputs = setup
    params = split.downstream_params()
    prepared = prepared_dataset_hvp(split, params, inputs, gauss_newton=gauss_newton)
    g = torch.Generator().manual_seed(0)
    vs = [{k: torch.randn(t.shape, generator=g) for k, t in params.items()} for _ in range(3)]
    for v in vs:  # the saved graphs serve every later vector
        want = dataset_hvp(split, params, inputs, v, gauss_newton=gauss_newton)
        got = prepared(v)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    stacked = {k: torch.stack([v[k] for v in vs]) for k in params}
    batched = torch.func.vmap(prepared)(stacked)
    for i, v in enumerate(vs):
        want = prepared(v)
        for k in want:
            assert torch.allclose(batched[k][i], want[k], rtol=1e-4, atol=1e-6), k


def test_prepared_hvp_equals_autograds_dense_hessian(setup):
    """Independent reference: torch.autograd.functional.hessian of the example-weighted mean loss."""
    split, inputs = setup
    keys = ["ln_final.w", "unembed.b_U", "blocks.1.mlp.b_out"]
    sub_split = SplitModel(split.model, split.hook_name, downstream=keys, task=split.task)
    params = sub_split.downstream_params()
    sub_inputs = [sub_split.prepare(inp.batch) for inp in inputs]

    def mean_loss(flat):
        p = tunflatten(flat, params)
        return sum(sub_split.inputs_loss(p, inp) * len(inp) for inp in sub_inputs) / sum(map(len, sub_inputs))

    dense = torch.autograd.functional.hessian(mean_loss, tflatten(params).detach())
    prepared = prepared_dataset_hvp(sub_split, params, sub_inputs)
    eye = torch.eye(dense.shape[0])
    cols = torch.stack([tflatten(prepared(tunflatten(eye[i], params))) for i in range(dense.shape[0])], 1)
    assert torch.allclose(cols, dense, atol=1e-5)


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_attributor_s_test_is_the_same_with_prepared_and_recomputed_hvps(setup, gauss_newton):
    from repinf_lens import CG, InfluenceAttributor

    split, _ = setup
    rows = toy_mcqa_rows(9, seed=5)
    out = {}
    for mode in ("prepared", "recompute"):
        cg = CG(damping=0.1, max_iter=6, tol=0.0, gauss_newton=gauss_newton)
        att = InfluenceAttributor(split, hessian=cg, use_cache=False, progress=False, hvp_mode=mode)
        att.fit(rows[:6], batch_size=4)
        out[mode] = att.s_test(rows[6:])
        out[mode + "_hvps"] = [i.n_hvp for i in att.solve_infos]
    assert out["prepared_hvps"] == out["recompute_hvps"] and max(out["prepared_hvps"]) >= 3
    for a, b in zip(out["prepared"], out["recompute"], strict=True):  # (CG may stop at negative curvature)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    with pytest.raises(ValueError, match="hvp_mode must be"):
        InfluenceAttributor(split, hvp_mode="fast")
