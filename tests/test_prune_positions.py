"""``prune``: after the last attention layer the downstream function runs at the loss positions only.

Checked against TransformerLens' own forward (``run_with_hooks`` with the same splice) and against the unpruned
function: same logits, same gradients in theta2 and in the latents, for one and for several loss positions."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from repinf_lens import SplitModel
from repinf_lens.task import CompletionTask, mcqa_to_completion
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=3, d_model=32, n_heads=4, d_mlp=64, seed=2, dtype=torch.float64)


def _loss_and_grads(split, batch):
    inp = split.prepare(batch)
    params = split.downstream_params()

    def f(p, r):
        return split.loss(r, inp.batch, p, inp.error, inp.base)

    gp, gr = grad(f, argnums=(0, 1))(params, inp.latents)
    return f(params, inp.latents), gp, gr


@pytest.mark.parametrize(
    "hook,prunes",
    [
        ("blocks.0.hook_resid_post", True),
        ("blocks.2.hook_resid_pre", True),
        ("blocks.2.attn.hook_z", True),
        ("blocks.2.hook_mlp_out", False),  # fires after the last resid_mid: nothing left to prune
        ("blocks.2.hook_resid_post", False),
    ],
)
@pytest.mark.parametrize("kind", ["mcqa", "completion"])
def test_pruned_downstream_equals_every_position_and_transformer_lens(model, hook, prunes, kind):
    rows = toy_mcqa_rows(4, seed=3)
    sae = random_sae(model, hook, d_sae=40, k=6, seed=1)
    task = None
    if kind == "completion":
        rows = mcqa_to_completion(rows)
        task = CompletionTask(model.tokenizer)
    pruned = SplitModel(model, hook, sae, task=task)
    full = SplitModel(model, hook, sae, task=task, prune=False)
    assert (pruned.prune_hook is not None) == prunes and full.prune_hook is None
    batch = pruned.task.collate(rows)
    if kind == "completion":
        assert batch.answer_pos.ndim == 2 and batch.answer_pos.shape[1] > 1  # several loss positions
    # independent reference: TransformerLens' forward with the same splice (decode + error at the hook)
    inp = pruned.prepare(batch)
    with torch.no_grad():
        x = pruned.downstream_input(inp.latents, inp.error)
        ref = model.run_with_hooks(batch.tokens, fwd_hooks=[(pruned.out_hook, lambda a, hook: x.to(a.dtype))])
        pos = batch.answer_pos
        rows_i = torch.arange(len(batch))
        ref = ref[rows_i, pos] if pos.ndim == 1 else ref[rows_i[:, None], pos]
        got = pruned.logits(inp.latents, batch, pruned.downstream_params(), inp.error, inp.base)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    lp, gp, gr = _loss_and_grads(pruned, batch)
    lf, gpf, grf = _loss_and_grads(full, batch)
    torch.testing.assert_close(lp, lf, rtol=1e-12, atol=1e-12)
    assert gp.keys() == gpf.keys()
    for k in gp:
        torch.testing.assert_close(gp[k], gpf[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gr, grf, rtol=1e-9, atol=1e-12)
    assert max(float(v.detach().abs().max()) for v in gp.values()) > 1e-6 and float(gr.detach().abs().max()) > 1e-6


def test_pruning_runs_the_last_mlp_on_the_loss_positions_only(model):
    hook = "blocks.0.hook_resid_post"
    split = SplitModel(model, hook, random_sae(model, hook, d_sae=40, k=6, seed=1))
    batch = split.task.collate(toy_mcqa_rows(3, seed=4))
    inp = split.prepare(batch)
    seen: list[tuple[int, ...]] = []
    model.blocks[2].mlp.hook_post.add_hook(lambda a, hook: seen.append(tuple(a.shape)))
    try:
        with torch.no_grad():
            split.logits(inp.latents, batch, None, inp.error, inp.base)
    finally:
        model.reset_hooks()
    assert seen == [(3, 1, model.cfg.d_mlp)]


def test_the_loss_unembeds_only_its_columns_and_an_undeclared_read_is_not_finite(model):
    from repinf_lens import MultipleChoiceTask

    hook = "blocks.1.hook_resid_post"
    sae = random_sae(model, hook, d_sae=40, k=6, seed=2)
    for trim in (True, False):
        pruned = SplitModel(model, hook, sae, trim_unembed=trim)
        full = SplitModel(model, hook, sae, trim_unembed=trim, prune=False)
        batch = pruned.task.collate(toy_mcqa_rows(3, seed=5))
        assert pruned.loss_columns().tolist() == pruned.task.loss_vocab() == full.loss_columns().tolist()
        inp = pruned.prepare(batch)
        # the loss from TransformerLens' own logits (every column) and the loss-only path agree, with gradients
        with torch.no_grad():
            ref = pruned.task.loss(pruned.original_logits(batch), batch)
        lp, gp, gr = _loss_and_grads(pruned, batch)
        lf, gpf, grf = _loss_and_grads(full, batch)
        torch.testing.assert_close(lp.detach(), ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(lp, lf, rtol=1e-12, atol=1e-12)
        for k in gp:
            torch.testing.assert_close(gp[k], gpf[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gr, grf, rtol=1e-9, atol=1e-12)
        logits = pruned.logits(inp.latents, batch, None, inp.error, inp.base, loss_only=True)
        read = torch.zeros(logits.shape[-1], dtype=torch.bool)
        read[pruned.loss_columns()] = True
        assert torch.isnan(logits[:, ~read]).all() and torch.isfinite(logits[:, read]).all()
        assert torch.isfinite(pruned.logits(inp.latents, batch, None, inp.error, inp.base)).all()  # public: all

    class Liar(MultipleChoiceTask):
        """Declares only the first two letters but reads all four."""

        def loss_vocab(self):
            return sorted(set(self.letter_ids))[:2]

    liar = SplitModel(model, hook, sae, task=Liar(model.tokenizer))
    batch = liar.task.collate(toy_mcqa_rows(3, seed=5))
    inp = liar.prepare(batch)
    assert not torch.isfinite(liar.inputs_loss(liar.downstream_params(), inp))
