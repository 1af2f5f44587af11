"""Tiny, fully offline stand-ins for tests and examples: a byte-level tokenizer and random HookedTransformers.

They let the unit tests (and users' own tests) exercise every code path in seconds without any download.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = ["tiny_tokenizer", "tiny_model", "TINY_CHAT_TEMPLATE"]

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
