"""Compatibility matrix: the SAEs, transcoders, architectures and hook points users bring, each either exact or refused.

Every accepted case is compared with TransformerLens' OWN forward, never with repinf_lens' logits path alone:
- logits: ``model.run_with_hooks(tokens, fwd_hooks=[(hook, replace)])`` (or plain ``model(tokens)`` when the error
  term reconstructs the activation exactly) at the answer position, <= 1e-5;
- example and latent scores: ``split.check`` = ``torch.func.functional_call`` on the WHOLE model with the hook
  written, a reverse-mode gradient for the example score and one forward-over-reverse JVP per latent, <= 1e-4
  relative.
Each refused case asserts its message. Tiny random models: seconds each.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from repinf_lens.influence.check import SplitCheckError, check_split
from repinf_lens.split import HookNameError, SAECompatibilityError, SplitConfigError, SplitModel
from repinf_lens.task import MultipleChoiceTask
from repinf_lens.testing import random_sae, tiny_model, tiny_tokenizer, toy_mcqa_rows

LOGITS_TOL = 1e-5
REL_TOL = 1e-4

_ARCHS = {
    "gpt2": {},
    "llama_gqa": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
        final_rms=True,
    ),
    # both softcaps, small enough to bend the random model's logits and attention scores
    "gemma2": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        final_rms=True,
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=0.5,
        output_logits_soft_cap=0.3,
        use_local_attn=True,
        attn_types=["local", "global"],
        window_size=4,
    ),
    "gemma3": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        rotary_base_local=10000,
        n_key_value_heads=1,
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        final_rms=True,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        use_local_attn=True,
        attn_types=["local", "global"],
        window_size=4,
    ),
    "parallel_attn": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=8),
    "no_norm": dict(normalization_type=None),
}


def _model(kind: str, cls: type = HookedTransformer, seed: int = 0) -> HookedTransformer:
    tok = tiny_tokenizer()
    kw = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=256, d_vocab=len(tok), act_fn="gelu",
        normalization_type="LN", seed=seed, device="cpu", default_prepend_bos=False, tokenizer_prepends_bos=False,
    )  # fmt: skip
    kw.update(_ARCHS[kind])
    torch.manual_seed(seed)
    model = cls(HookedTransformerConfig(**kw), tok, default_padding_side="right")
    with torch.no_grad():  # larger weights than the init: softcaps and norms then matter
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "W_U")):
                p.mul_(3.0)
    return model.eval()


def _batch(model: HookedTransformer, n: int = 2):
    task = MultipleChoiceTask.from_model(model)
    return task.collate(toy_mcqa_rows(n, seed=1))


def _answer(logits: torch.Tensor, batch) -> torch.Tensor:
    return logits[torch.arange(logits.shape[0]), batch.answer_pos]


def _assert_matches_tl(split: SplitModel, batch) -> None:
    """Spliced logits == TL's run_with_hooks; scores == functional_call JVPs through the whole model."""
    model = split.model
    inp = split.prepare(batch)
    with torch.no_grad():
        got = split.logits(inp.latents, inp.batch, None, inp.error, inp.base, anchor=inp.anchor)
        if split.sae is None or split.use_error_term:
            want = _answer(model(batch.tokens), batch)
        else:
            written = split.sae.decode(inp.latents).reshape(*inp.latents.shape[:2], *split.act_shape)
            want = _answer(model.run_with_hooks(batch.tokens, fwd_hooks=[(split.out_hook, lambda a, hook: written)]),
                           batch)  # fmt: skip
    assert (got - want).abs().max() <= LOGITS_TOL, float((got - want).abs().max())
    report = check_split(split, batch, logits_tol=LOGITS_TOL, rel_tol=REL_TOL)
    assert report.ok and sum(len(v) for v in report.latents_checked.values()) >= 2, report.summary()


# ----------------------------------------------------------------------------------------- SAE classes
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
@pytest.mark.parametrize("use_error_term", [True, False])
def test_sae_classes(arch, use_error_term):
    model = _model("gpt2")
    sae = random_sae(model, "blocks.0.hook_resid_post", architecture=arch)
    _assert_matches_tl(SplitModel(model, "blocks.0.hook_resid_post", sae, use_error_term=use_error_term), _batch(model))


def test_hook_z_reshaped_sae():
    model = _model("llama_gqa")
    sae = random_sae(model, "blocks.1.attn.hook_z", architecture="topk")
    assert sae.cfg.reshape_activations == "hook_z"
    split = SplitModel(model, "blocks.1.attn.hook_z", sae)
    assert split.act_shape == (4, 8)
    _assert_matches_tl(split, _batch(model))


@pytest.mark.parametrize(
    "arch,hook_in,hook_out",
    [
        ("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
        ("skip_transcoder", "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"),
        ("transcoder", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
    ],
)
def test_transcoders(arch, hook_in, hook_out):
    model = _model("gpt2")
    tc = random_sae(model, hook_in, architecture=arch, hook_name_out=hook_out)
    split = SplitModel(model, hook_in, tc)
    assert (split.hook_name, split.out_hook) == (hook_in, hook_out)
    # theta2 = what the OUTPUT hook feeds: the MLP that the transcoder replaces is not in it
    assert not any(n.startswith(f"blocks.{hook_out.split('.')[1]}.mlp.") for n in split.param_names)
    batch = _batch(model)
    _assert_matches_tl(split, batch)
    # the latents are read at the input hook: encode(x_in), and decode(r) + error = the true output
    inp = split.prepare(batch)
    _, cache = model.run_with_cache(batch.tokens, names_filter=[hook_in, hook_out])
    torch.testing.assert_close(inp.latents, tc.encode(cache[hook_in]))
    torch.testing.assert_close(tc.decode(inp.latents) + inp.error, cache[hook_out])
    # also accepted: the output hook's name
    assert SplitModel(model, hook_out, tc).hook_name == hook_in


def test_transcoder_at_a_hook_it_does_not_touch_is_refused():
    model = _model("gpt2")
    tc = random_sae(
        model, "blocks.0.ln2.hook_normalized", architecture="transcoder", hook_name_out="blocks.0.hook_mlp_out"
    )
    with pytest.raises(SAECompatibilityError, match=r"reads 'blocks.0.ln2.hook_normalized' and writes.*Fix"):
        SplitModel(model, "blocks.1.hook_resid_post", tc)


# ----------------------------------------------------------------------------------------- architectures x hooks
_HOOKS = [
    "blocks.1.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_attn_out",
    "blocks.0.hook_mlp_out",
    "blocks.1.attn.hook_z",
    "blocks.1.mlp.hook_post",
]


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "gemma2", "gemma3", "parallel_attn", "no_norm"])
@pytest.mark.parametrize("hook", _HOOKS)
def test_architectures_and_hook_points(kind, hook):
    model = _model(kind)
    if kind == "parallel_attn" and hook.endswith("hook_resid_mid"):  # attention and MLP read the same stream
        with pytest.raises(HookNameError, match="not a hook point of this model.*Fix"):
            SplitModel(model, hook, random_sae(model, "blocks.0.hook_resid_post"))
        return
    sae = random_sae(model, hook, architecture="topk")
    _assert_matches_tl(SplitModel(model, hook, sae), _batch(model))


@pytest.mark.parametrize("kind", ["gemma2", "llama_gqa"])
def test_without_sae(kind):
    model = _model(kind)
    _assert_matches_tl(SplitModel(model, "blocks.0.hook_resid_post"), _batch(model))


def test_softcap_is_applied_and_the_check_would_catch_it(monkeypatch):
    model = _model("gemma2")
    batch = _batch(model)
    split = SplitModel(model, "blocks.0.hook_resid_post", random_sae(model, "blocks.0.hook_resid_post"))
    logits = split.original_logits(batch)
    assert logits.abs().max() <= 0.3 + 1e-6  # the output softcap bounds the model's own logits
    import repinf_lens.models.hooked as hooked
    import repinf_lens.split.model as split_mod

    monkeypatch.setattr(split_mod, "logit_softcap", lambda model, x: x)  # the bug: softcap skipped downstream
    with pytest.raises(SplitCheckError, match="disagrees with TransformerLens' own forward"):
        check_split(split, batch)
    monkeypatch.setattr(hooked, "logit_softcap", lambda model, x: x)  # ... also in task.model_logits
    assert not torch.allclose(split.original_logits(batch), logits)


# ----------------------------------------------------------------------------------------- HookedSAETransformer
def _hooked_sae_model():
    from sae_lens import HookedSAETransformer

    return _model("gpt2", cls=HookedSAETransformer)


@pytest.mark.parametrize("where", ["upstream", "downstream"])
@pytest.mark.parametrize("use_error_term", [True, False])
def test_hooked_sae_transformer_with_attached_saes(where, use_error_term):
    model = _hooked_sae_model()
    split_hook = "blocks.0.hook_resid_post"
    other = "blocks.0.hook_attn_out" if where == "upstream" else "blocks.1.hook_mlp_out"
    attached = random_sae(model, other, architecture="standard", seed=3)
    model.add_sae(attached, use_error_term=use_error_term)
    split = SplitModel(model, split_hook, random_sae(model, split_hook))
    assert [a.hook_in for a in split.downstream_saes] == ([other] if where == "downstream" else [])
    assert not any("hook_sae" in n or n.startswith(other + ".") for n in split.param_names)
    _assert_matches_tl(split, _batch(model))


def test_attached_error_term_is_held_constant_in_forward_mode(monkeypatch):
    """SAELens computes the error under no_grad, which jvp ignores: without the detach the swap is wrong."""
    import repinf_lens.split.model as split_mod

    model = _hooked_sae_model()
    model.add_sae(random_sae(model, "blocks.1.hook_mlp_out", architecture="standard", seed=3), use_error_term=True)
    split = SplitModel(model, "blocks.0.hook_resid_post", random_sae(model, "blocks.0.hook_resid_post"))
    batch = _batch(model)
    check_split(split, batch, logits_tol=LOGITS_TOL, rel_tol=REL_TOL)
    monkeypatch.setattr(split_mod, "_detach", lambda act, hook: act)
    with pytest.raises(SplitCheckError):
        check_split(split, batch)


def test_sae_attached_at_the_split_hook_is_named():
    model = _hooked_sae_model()
    sae = random_sae(model, "blocks.0.hook_resid_post")
    model.add_sae(sae, use_error_term=True)
    with pytest.raises(SAECompatibilityError, match=r"attached.*at the split's hook.*reset_saes\(\)"):
        SplitModel(model, "blocks.0.hook_resid_post", sae)
    model.reset_saes()
    _assert_matches_tl(SplitModel(model, "blocks.0.hook_resid_post", sae), _batch(model))


def test_attached_transcoder_spanning_the_split_is_refused():
    model = _hooked_sae_model()
    tc = random_sae(model, "blocks.0.hook_resid_mid", architecture="transcoder", hook_name_out="blocks.0.hook_mlp_out")
    model.add_sae(tc, use_error_term=True)
    with pytest.raises(SAECompatibilityError, match=r"reads upstream of the split.*reset_saes"):
        SplitModel(model, "blocks.0.ln2.hook_normalized")


def test_attached_sae_with_exclude_special_tokens_downstream_is_refused():
    model = _hooked_sae_model()
    model.add_sae(random_sae(model, "blocks.1.hook_mlp_out", architecture="standard"), exclude_special_tokens=True)
    with pytest.raises(SAECompatibilityError, match="exclude_special_tokens"):
        SplitModel(model, "blocks.0.hook_resid_post")


# ----------------------------------------------------------------------------------------- refused models and inputs
def test_hook_that_exists_but_never_fires():
    model = _model("gpt2")
    assert "blocks.0.hook_mlp_in" in model.hook_dict
    with pytest.raises(HookNameError, match=r"never fires.*set_use_hook_mlp_in\(True\)"):
        SplitModel(model, "blocks.0.hook_mlp_in")
    model.set_use_hook_mlp_in(True)
    _assert_matches_tl(SplitModel(model, "blocks.0.hook_mlp_in"), _batch(model))


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"])
def test_attention_pattern_shaped_activation_is_refused(hook):
    model = _model("gpt2")
    with pytest.raises(HookNameError, match=r"not indexed \[batch, pos, \.\.\.\].*Fix"):
        SplitModel(model, hook)


def test_model_without_tokenizer_is_refused_at_construction():
    model = _model("gpt2")
    model.tokenizer = None
    with pytest.raises(SplitConfigError, match="no tokenizer.*Fix: model.set_tokenizer"):
        SplitModel(model, "blocks.0.hook_resid_post")


def test_task_token_ids_outside_the_vocabulary_are_refused():
    tok = tiny_tokenizer()
    small = HookedTransformer(
        HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=128, d_vocab=200,
                                act_fn="gelu", normalization_type="LN"),
        tok,
    )  # fmt: skip
    task = MultipleChoiceTask(tok, template="plain")
    assert max(task.letter_ids) >= 200
    with pytest.raises(SplitConfigError, match=r"token ids \[.*d_vocab=200.*Fix"):
        SplitModel(small, "blocks.0.hook_resid_post", task=task)
    split = SplitModel(
        small, "blocks.0.hook_resid_post", task=MultipleChoiceTask(tok, template="plain", full_vocab=True)
    )
    with pytest.raises(SplitConfigError, match=r"outside the model's vocabulary \(d_vocab=200\)"):
        split.prepare(split.task.collate(toy_mcqa_rows(1)))


def test_nan_upstream_weight_is_refused():
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"blocks.0.attn.W_Q.*1 NaN"):
        SplitModel(model, "blocks.1.hook_resid_post")


def test_attached_saes_and_their_error_term_setting_are_part_of_the_fingerprint():
    from repinf_lens._shards import fingerprint_hash

    model = _hooked_sae_model()
    split_hook = "blocks.0.hook_resid_post"
    sae = random_sae(model, split_hook)
    plain = fingerprint_hash(SplitModel(model, split_hook, sae).fingerprint())
    attached = random_sae(model, "blocks.1.hook_mlp_out", architecture="standard", seed=3)
    model.add_sae(attached, use_error_term=True)
    with_err = fingerprint_hash(SplitModel(model, split_hook, sae).fingerprint())
    model.add_sae(attached, use_error_term=False)
    without_err = fingerprint_hash(SplitModel(model, split_hook, sae).fingerprint())
    assert len({plain, with_err, without_err}) == 3
