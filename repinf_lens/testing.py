"""Tiny, fully offline stand-ins for tests and examples: a byte-level tokenizer and random HookedTransformers.

They let the unit tests (and users' own tests) exercise every code path in seconds without any download.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = ["TINY_CHAT_TEMPLATE", "random_sae", "tiny_hf_llama", "tiny_model", "tiny_tokenizer", "toy_mcqa_rows"]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(chat: bool = True) -> Any:
    """A byte-level BPE tokenizer with 256 byte symbols, 10 merges (``" A"``..``" J"``) and 3 special tokens.

    Every string can be encoded; option letters are single tokens with and without a leading space.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_syms = list(pre_tokenizers.ByteLevel.alphabet())
    byte_syms.sort()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for sym in byte_syms:
        vocab.setdefault(sym, len(vocab))
    merges = []
    for letter in "ABCDEFGHIJ":
        merges.append(("Ġ", letter))
        vocab["Ġ" + letter] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": _SPECIAL})
    if chat:
        fast.chat_template = TINY_CHAT_TEMPLATE
    # TransformerLens re-loads tokenizers by ``name_or_path``, so hand back one loaded from a saved folder.
    from transformers import AutoTokenizer

    from repinf_lens._cache import cache_dir

    folder = cache_dir("testing", f"tiny-tokenizer-v1-{'chat' if chat else 'plain'}")
    if not (folder / "tokenizer.json").exists():
        fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_model(
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_mlp: int = 64,
    n_ctx: int = 256,
    *,
    chat: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    act_fn: str = "gelu",
    normalization_type: str = "LN",
) -> HookedTransformer:
    """A randomly initialised HookedTransformer over :func:`tiny_tokenizer` (about 40k parameters)."""
    tokenizer = tiny_tokenizer(chat=chat)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        d_vocab=len(tokenizer),
        act_fn=act_fn,
        normalization_type=normalization_type,
        seed=seed,
        device=str(device),
        dtype=dtype,
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg, tokenizer, move_to_device=True, default_padding_side="right")
    return model.eval()


_RANDOM_SAE_ARCHS = ("topk", "standard", "jumprelu", "gated", "transcoder", "skip_transcoder")


def random_sae(
    model: HookedTransformer,
    hook_name: str,
    d_sae: int = 64,
    k: int = 8,
    *,
    architecture: str = "topk",
    seed: int = 0,
    normalize_activations: str = "none",
    hook_name_out: str | None = None,
) -> Any:
    """A randomly initialised SAELens SAE or transcoder for ``hook_name`` of ``model``.

    ``architecture``: ``"topk"``, ``"standard"``, ``"jumprelu"``, ``"gated"`` (SAEs) or ``"transcoder"``,
    ``"skip_transcoder"`` (read ``hook_name``, write ``hook_name_out``). Biases and thresholds are set so that a
    realistic share of latents fire on the model's activations.
    """
    from sae_lens import (
        SAE,
        GatedSAEConfig,
        JumpReLUSAEConfig,
        SkipTranscoderConfig,
        StandardSAEConfig,
        TopKSAEConfig,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    if architecture not in _RANDOM_SAE_ARCHS:
        raise ValueError(f"architecture must be one of {_RANDOM_SAE_ARCHS}, got {architecture!r}.")
    transcoder = architecture in ("transcoder", "skip_transcoder")
    if transcoder and not hook_name_out:
        raise ValueError("A transcoder needs hook_name_out (the hook it writes, e.g. 'blocks.0.hook_mlp_out').")

    def width(hook: str) -> int:
        with torch.no_grad():
            tokens = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
            _, cache = model.run_with_cache(tokens, names_filter=hook)
        return int(torch.tensor(cache[hook].shape[2:]).prod())

    d_in = width(hook_name)
    meta = SAEMetadata(hook_name=hook_name, model_name=str(getattr(model.cfg, "model_name", "unknown")))
    if transcoder:
        meta.hook_name_out = hook_name_out
    common: dict[str, Any] = dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        device=str(model.cfg.device),
        normalize_activations=normalize_activations,
        metadata=meta,
    )
    if hook_name.endswith("hook_z") and not transcoder:
        common["reshape_activations"] = "hook_z"
    if transcoder:
        common["apply_b_dec_to_input"] = False
    if architecture == "topk":
        cfg = TopKSAEConfig(k=k, **common)
    elif architecture == "standard":
        cfg = StandardSAEConfig(**common)
    elif architecture == "jumprelu":
        cfg = JumpReLUSAEConfig(**common)
    elif architecture == "gated":
        cfg = GatedSAEConfig(**common)
    elif architecture == "transcoder":
        cfg = TranscoderConfig(d_out=width(str(hook_name_out)), **common)
    else:
        cfg = SkipTranscoderConfig(d_out=width(str(hook_name_out)), **common)
    torch.manual_seed(seed)
    sae = SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        if transcoder:
            sae.W_dec.normal_(0, d_sae**-0.5)
            sae.b_dec.normal_(0, 0.1)
        else:
            sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        if architecture == "gated":
            sae.b_gate.fill_(-0.3)
            sae.b_mag.normal_(0, 0.1)
            sae.r_mag.normal_(0, 0.1)
        else:
            sae.b_enc.fill_(0.0 if architecture == "topk" else -0.5)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.05)
        if architecture == "skip_transcoder":
            sae.W_skip.normal_(0, d_in**-0.5)
    return sae.eval()


def tiny_hf_llama(folder: str | os.PathLike, *, seed: int = 0, initializer_range: float = 0.02) -> Any:
    """Save a random 2-layer Llama (HF ``save_pretrained`` layout) with :func:`tiny_tokenizer` into ``folder``.

    Returns the tokenizer. Useful to exercise local-folder loading and LoRA finetuning in seconds.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


TOY_WORDS = ("sun", "moon", "rock", "tree", "water", "fire", "plant", "cold", "heat", "light")


def toy_mcqa_rows(
    n: int,
    seed: int = 0,
    *,
    prefix: str = "q",
    words: Sequence[str] = TOY_WORDS,
    question: str = "What does the {0} do to the {1}?",
) -> list[dict[str, Any]]:
    """``n`` short random 4-option questions (``id, question, choices, answer``) for tests on tiny models.

    Ids are ``f"{prefix}{i}"``; ``question`` is formatted with two random ``words``, the options are four more.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        w = [words[int(j)] for j in torch.randint(0, len(words), (6,), generator=g)]
        rows.append(
            {
                "id": f"{prefix}{i}",
                "question": question.format(w[0], w[1]),
                "choices": [w[2], w[3], w[4], w[5]],
                "answer": int(torch.randint(0, 4, (1,), generator=g)),
            }
        )
    return rows
