"""Retraining checks of influence: leave-one-out and LDS on a tiny model (theta2 retrained exactly)."""

from __future__ import annotations

import pytest
import torch

from repinf_lens.analysis.lds import leave_one_out, linear_datamodeling_score, spearman
from repinf_lens.curvature import CG, Identity
from repinf_lens.split import SplitModel
from repinf_lens.task import MultipleChoiceTask
from repinf_lens.testing import tiny_model, toy_mcqa_rows

_WORDS = ("red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice", "wind", "seed", "moon", "salt")


def _examples(n: int, seed: int) -> list[dict]:
    return toy_mcqa_rows(n, seed, prefix="ex", words=_WORDS, question="Which goes with {0} and {1}?")


@pytest.fixture(scope="module")
def split():
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=32, seed=4, dtype=torch.float64)
    task = MultipleChoiceTask(model.tokenizer, template="plain")
    return SplitModel(model, "blocks.1.hook_resid_post", downstream=["unembed.W_U", "unembed.b_U"], task=task)


def test_spearman_matches_definition():
    a = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.4)


def test_leave_one_out_agrees_and_restores_the_model(split):
    before = {k: v.clone() for k, v in split.downstream_params().items()}
    res = leave_one_out(
        split, _examples(30, 7), _examples(2, 99), solvers={"cg": CG(damping=0.1, max_iter=100, tol=1e-10)},
        n_remove=12, damping=0.1, progress=False,
    )  # fmt: skip
    assert res.actual.shape == (2, 12) and res.predicted["cg"].shape == (2, 12)
    assert res.pearson["cg"] > 0.9 and res.spearman["cg"] > 0.8, res.table()
    assert res.sign_agreement["cg"] >= 0.9
    for k, v in split.downstream_params().items():
        assert torch.equal(v, before[k])


def test_lds_cg_beats_identity_and_is_high(split):
    res = linear_datamodeling_score(
        split,
        _examples(40, 7),
        _examples(3, 99),
        solvers={"cg": CG(damping=0.1, max_iter=100, tol=1e-10), "identity": Identity()},
        n_subsets=16,
        damping=0.1,
        progress=False,
    )
    assert set(res.spearman) == {"cg", "identity"} and res.actual.shape == (3, 16)
    # the change of theta2 is small at this damping, so the first-order prediction is accurate
    assert res.spearman["cg"] > 0.8, res.table()
    assert res.spearman["cg"] >= res.spearman["identity"] - 0.05
    assert [r["solver"] for r in res.table()] == ["cg", "identity"]
    with pytest.raises(ValueError, match="fraction"):
        linear_datamodeling_score(split, _examples(4, 1), _examples(1, 2), fraction=1.5)
