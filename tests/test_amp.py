"""Mixed precision (``amp_dtype``): scores close to full precision, kept apart in the caches."""

from __future__ import annotations

import numpy as np
import torch

from repinf_lens import CG, InfluenceAttributor, SplitModel
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

HOOK = "blocks.0.hook_resid_post"


def test_bf16_autocast_scores_track_full_precision(tmp_path):
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=5)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=32, k=4, seed=1))
    rows = toy_mcqa_rows(20, seed=2)
    queries, train = rows[:2], rows[2:]

    def run(amp):
        att = InfluenceAttributor(split, hessian=CG(damping=1e-2, max_iter=5, batch_size=6), batch_size=6,
                                  cache_dir=tmp_path / "s_test", progress=False, amp_dtype=amp)  # fmt: skip
        return att.fit(train[:6]), att.attribute(queries, train)

    att32, full = run(None)
    att16, half = run(torch.bfloat16)
    assert att16._s_test_key(queries[0]) != att32._s_test_key(queries[0])  # never read each other's s_test
    assert half.example_scores.dtype == full.example_scores.dtype == torch.float32
    assert not torch.equal(half.example_scores, full.example_scores)  # autocast really ran in bf16
    for q in range(2):
        a, b = full.example_scores[q].numpy(), half.example_scores[q].numpy()
        assert np.corrcoef(a, b)[0, 1] > 0.95
        assert (np.sign(a) == np.sign(b)).mean() >= 0.8
    assert half.meta["amp_dtype"] == "torch.bfloat16" and full.meta["amp_dtype"] is None
