"""Token-budget batching (``max_batch_tokens``): batches bounded in padded tokens, same scores as fixed batches."""

from __future__ import annotations

import pytest
import torch

from repinf_lens.curvature import Identity
from repinf_lens.influence import InfluenceAttributor
from repinf_lens.influence.prefilter import GradientSketcher, build_sketches
from repinf_lens.split import SplitModel
from repinf_lens.task import token_batches
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows


class _Lengths:
    """A task whose only capability is ``encode``: row ``i`` is ``lengths[i]`` tokens long."""

    def encode(self, example: dict) -> list[int]:
        return [0] * example["n"]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("batch_size,max_tokens", [(8, 64), (4, 100), (3, 10), (8, None)])
def test_batches_cover_in_order_within_both_budgets_and_are_greedy(seed, batch_size, max_tokens):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 40, (50,), generator=g)]
    rows = [{"n": n} for n in lengths]
    got = token_batches(_Lengths(), rows, batch_size, max_tokens)
    assert [lo for lo, _ in got] == [0] + [hi for _, hi in got[:-1]] and got[-1][1] == len(rows)
    for lo, hi in got:
        assert 1 <= hi - lo <= batch_size
        padded = (hi - lo) * max(lengths[lo:hi])
        if max_tokens is not None and hi - lo > 1:
            assert padded <= max_tokens
    for (lo, hi), _ in zip(got[:-1], got[1:]):  # greedy: the next row would break a budget
        grown = (hi - lo + 1) * max(lengths[lo : hi + 1])
        assert hi - lo == batch_size or (max_tokens is not None and grown > max_tokens)
    if max_tokens is None:
        assert got == [(lo, min(50, lo + batch_size)) for lo in range(0, 50, batch_size)]


def _varied_rows(n: int, seed: int) -> list[dict]:
    rows = toy_mcqa_rows(n, seed, prefix=f"v{seed}-")
    for i, r in enumerate(rows):  # lengths from a few tokens to several times that
        r["question"] = " ".join([r["question"]] * (1 + (i * 7) % 3))
    return rows


@pytest.fixture(scope="module")
def split():
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
    hook = "blocks.0.hook_resid_post"
    return SplitModel(model, hook, random_sae(model, hook, d_sae=48, k=6))


def test_sketches_with_a_token_budget_equal_fixed_batches_and_use_more_batches(split, tmp_path, monkeypatch):
    train = _varied_rows(12, seed=1)
    lengths = [len(split.task.encode(r)) for r in train]
    budget = 2 * max(lengths)  # binds: fixed batches of 6 would hold 6 x max tokens
    calls: list[int] = []
    real = GradientSketcher.per_example_grads

    def spy(self, inp):
        calls.append(int(inp.batch.tokens.shape[0] * inp.batch.tokens.shape[1]))
        return real(self, inp)

    monkeypatch.setattr(GradientSketcher, "per_example_grads", spy)
    kw = dict(dim=128, batch_size=6, seed=3, progress=False)
    fixed = build_sketches(split, None, train, out_dir=tmp_path / "fixed", **kw)
    n_fixed = len(calls)
    calls.clear()
    budgeted = build_sketches(split, None, train, out_dir=tmp_path / "tok", max_batch_tokens=budget, **kw)
    assert n_fixed == 2 and len(calls) > n_fixed and max(calls) <= budget
    assert torch.allclose(budgeted.sketches, fixed.sketches, rtol=1e-4, atol=1e-6)
    assert torch.allclose(budgeted.grad_norms, fixed.grad_norms, rtol=1e-5)
    assert budgeted.fingerprint == fixed.fingerprint  # memory only: the store is the same


def test_attribution_with_a_token_budget_equals_fixed_batches(split):
    train, queries = _varied_rows(10, seed=2), toy_mcqa_rows(2, 5, prefix="q")
    budget = 2 * max(len(split.task.encode(r)) for r in train)

    def run(max_batch_tokens):
        att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=5,
                                  max_batch_tokens=max_batch_tokens)  # fmt: skip
        return att.attribute(queries, train)

    a, b = run(None), run(budget)
    assert torch.allclose(a.example_scores, b.example_scores, rtol=1e-4, atol=1e-7)
    assert torch.allclose(a.latent_scores, b.latent_scores, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(x, y) for x, y in zip(a.train_tokens, b.train_tokens))


def test_a_bad_budget_is_refused_before_any_work(split, tmp_path):
    from repinf_lens.errors import SettingsError
    from repinf_lens.workflows.config import AttributionConfig

    with pytest.raises((ValueError, SettingsError), match="max_batch_tokens"):
        build_sketches(split, None, _varied_rows(2, 0), out_dir=tmp_path / "s", max_batch_tokens=0, progress=False)
    with pytest.raises((ValueError, SettingsError), match="max_batch_tokens"):
        AttributionConfig(max_batch_tokens=0)
    with pytest.raises((ValueError, SettingsError), match="max_batch_tokens"):
        InfluenceAttributor(split, hessian=Identity(), max_batch_tokens=-1)
