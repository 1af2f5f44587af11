"""What a ``HookedTransformer`` does that a split must reproduce: the steps after the last block, the order in
which hook points fire, and the SAEs a ``HookedSAETransformer`` has attached.

Everything here reads TransformerLens / SAELens objects through their public attributes, so the downstream
function of :class:`~repinf_lens.split.SplitModel` computes exactly what ``model(tokens)`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "AttachedSAE",
    "attached_saes",
    "final_logits",
    "final_norm",
    "hook_firing_order",
    "is_transcoder",
    "logit_softcap",
    "sae_hooks",
]


def final_norm(model: Any, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """``model.ln_final(resid)``, or ``resid`` for ``normalization_type=None`` (as ``HookedTransformer.forward``)."""
    if getattr(model.cfg, "normalization_type", None) is None:
        return resid
    return model.ln_final(resid)


def logit_softcap(model: Any, logits: Tensor) -> Tensor:
    """Gemma-2-style ``cap * tanh(logits / cap)`` when ``cfg.output_logits_soft_cap > 0``, else ``logits``.

    TransformerLens applies it after the unembedding (``apply_softcap``); it is elementwise, so it may be applied
    to any subset of vocabulary columns.
    """
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is None or float(cap) <= 0:
        return logits
    cap = float(cap)
    return cap * torch.tanh(logits / cap)


def final_logits(model: Any, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Every step ``HookedTransformer.forward`` applies after the last block: final norm, unembed, softcap."""
    return logit_softcap(model, model.unembed(final_norm(model, resid)))


def is_transcoder(sae: Any) -> bool:
    """Whether ``sae`` writes to another hook than it reads (SAELens ``Transcoder`` / ``SkipTranscoder``)."""
    meta = getattr(sae.cfg, "metadata", None)
    out = getattr(meta, "hook_name_out", None)
    return bool(out) and out != getattr(meta, "hook_name", None)


def sae_hooks(sae: Any) -> tuple[str | None, str | None]:
    """``(input hook, output hook)`` of an SAE or transcoder (equal for an SAE; ``None`` when unrecorded)."""
    meta = getattr(sae.cfg, "metadata", None)
    hook_in = getattr(meta, "hook_name", None) or getattr(sae.cfg, "hook_name", None)
    hook_out = getattr(meta, "hook_name_out", None) or hook_in
    return hook_in, hook_out


@dataclass(frozen=True)
class AttachedSAE:
    """An SAE (or transcoder) attached to a ``HookedSAETransformer`` with ``add_sae``."""

    sae: Any
    hook_in: str
    hook_out: str
    use_error_term: bool
    exclude_special_tokens: Any

    def describe(self) -> str:
        kind = "transcoder" if self.hook_in != self.hook_out else "SAE"
        where = self.hook_in if self.hook_in == self.hook_out else f"{self.hook_in} -> {self.hook_out}"
        return f"{kind} {type(self.sae).__name__} at {where!r} (use_error_term={self.use_error_term})"


def attached_saes(model: Any) -> list[AttachedSAE]:
    """The SAEs attached to a ``HookedSAETransformer`` (empty for a plain ``HookedTransformer``)."""
    saes = getattr(model, "acts_to_saes", None)
    if not isinstance(saes, dict):
        return []
    out = []
    for hook_in, sae in saes.items():
        _, hook_out = sae_hooks(sae)
        hook_out = hook_out or hook_in
        try:
            wrapper = model.get_submodule(hook_out)
        except AttributeError:
            wrapper = None
        out.append(
            AttachedSAE(
                sae=sae,
                hook_in=str(hook_in),
                hook_out=str(hook_out),
                use_error_term=bool(getattr(wrapper, "use_error_term", getattr(sae, "use_error_term", False))),
                exclude_special_tokens=getattr(wrapper, "exclude_special_tokens", False),
            )
        )
    return out


@torch.no_grad()
def hook_firing_order(model: Any, n_tokens: int = 3) -> list[str]:
    """Hook point names in the order one forward pass on ``n_tokens`` zeros calls them (each name once)."""
    order: list[str] = []
    seen: set[str] = set()

    def record(act: Tensor, hook: Any) -> Tensor:
        if hook.name not in seen:
            seen.add(hook.name)
            order.append(hook.name)
        return act

    tokens = torch.zeros((1, n_tokens), dtype=torch.long, device=model.cfg.device)
    hooks = [(name, record) for name in model.hook_dict]
    model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    return order
