"""The influence engine on the real default model (SmolLM2-135M-Instruct) and real OpenBookQA rows."""

from __future__ import annotations

import pytest
import torch

from repinf_lens import SplitModel, load_mcqa
from repinf_lens.curvature import loss_grad
from repinf_lens.influence import latent_influence, latent_influence_reference
from repinf_lens.testing import random_sae

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def obqa_rows():
    ds = load_mcqa("openbookqa", "train", offline=True)
    return [ds[i] for i in range(3)]


@pytest.mark.parametrize("hook", ["blocks.14.hook_resid_post", "blocks.14.hook_mlp_out"])
def test_swap_equals_per_latent_jvp_on_default_model(default_model, obqa_rows, hook):
    """TopK SAE (d_sae 2048, k 64; random weights: the identity does not depend on them)."""
    sae = random_sae(default_model, hook, d_sae=2048, k=64, seed=0)
    split = SplitModel(default_model, hook, sae)
    assert split.num_downstream_params() > 30_000_000
    batch = split.task.collate(obqa_rows[:2])
    inp = split.prepare(batch)
    with torch.no_grad():
        spliced = split.logits(inp.latents, batch, None, inp.error, inp.base, inp.anchor)
        unanchored = split.logits(inp.latents, batch, None, inp.error, inp.base)
        original = split.original_logits(batch)
    # float32 logits of about 30: the last MLP at the answer position only (prune) re-blocks its sums, ~2e-5
    assert (spliced - original).abs().max().item() <= 1e-6 * original.abs().max().item() + 1e-5
    assert (unanchored - original).abs().max().item() <= 1e-3  # decode(r) + e re-rounded: ~3e-5 measured
    params = split.downstream_params()
    s = loss_grad(split, params, split.prepare(split.task.collate(obqa_rows[2:3])))
    li = latent_influence(split, s, inp, params)
    active = torch.nonzero((li.latents[1] != 0).any(0)).flatten()
    assert len(active) >= 64
    sample = active[torch.randperm(len(active), generator=torch.Generator().manual_seed(0))[:6]].tolist()
    ref = latent_influence_reference(split, s, inp, example=1, latents=sample, params=params)
    got = li.latent_scores[1, sample]
    want = torch.tensor([ref[j] for j in sample])
    scale = li.latent_scores[1].abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
