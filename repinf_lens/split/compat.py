"""Can this SAE (or transcoder) be spliced into this model at this hook? The checks shared by
:class:`~repinf_lens.split.SplitModel` and :func:`~repinf_lens.saes.loading.load_sae`.

Only TransformerLens / SAELens facts (:mod:`repinf_lens.models.hooked`) and the error classes are needed here, so both
the split and the SAE loaders import it without importing each other.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch
from transformer_lens import HookedTransformer

from repinf_lens.errors import RepinfLensError
from repinf_lens.models.hooked import is_transcoder, sae_hooks

__all__ = [
    "SUPPORTED_NORMS",
    "HookNameError",
    "SAECompatibilityError",
    "activation_shape",
    "check_sae_compatibility",
    "sae_hook_name",
]

SUPPORTED_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
"""Activation normalisations whose decoder needs no state saved by the encoder (spliceable)."""


class HookNameError(RepinfLensError, ValueError):
    """The hook name is not a hook point of the model, never fires, or is not position-indexed."""


class SAECompatibilityError(RepinfLensError, ValueError):
    """The SAE cannot be spliced at this hook (d_in, hook name, normalisation, an SAE attached there)."""


@torch.no_grad()
def activation_shape(model: HookedTransformer, hook: str, n_tokens: int = 2) -> tuple[int, ...]:
    """Shape of ``hook``'s activation for one prompt of ``n_tokens`` zeros (``[1, n_tokens, ...]`` when it is
    position-indexed). Raises :class:`HookNameError` when the hook does not fire."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    stop = int(m.group(1)) + 1 if m else None
    tokens = torch.zeros((1, n_tokens), dtype=torch.long, device=model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=stop)
    if hook not in cache.cache_dict:
        raise HookNameError(
            f"{hook!r} is a hook point of this model but did not fire in a forward pass. Fix: choose a hook that "
            "fires (e.g. 'blocks.L.hook_resid_post'), or turn on the setting that computes it (set_use_hook_mlp_in, "
            "set_use_split_qkv_input, set_use_attn_result)."
        )
    return tuple(cache[hook].shape)


def sae_hook_name(sae: Any) -> str:
    """The hook point an SAE reads, from ``sae.cfg.metadata.hook_name`` (SAELens >= 6) or ``sae.cfg.hook_name``.

    Raises:
        ValueError: the SAE's config records no hook name.
    """
    cfg = sae.cfg
    name = getattr(getattr(cfg, "metadata", None), "hook_name", None) or getattr(cfg, "hook_name", None)
    if not name:
        raise ValueError(
            "This SAE's config records no hook name (cfg.metadata.hook_name is empty). "
            "Fix: pass hook_name= to load_sae, or set sae.cfg.metadata.hook_name."
        )
    return str(name)


def _check_hook_point(model: HookedTransformer, hook_name: str) -> None:
    names = sorted(model.hook_dict)
    if hook_name in model.hook_dict:
        return
    close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    n_layers = int(model.cfg.n_layers)
    depth = (
        f"The model has {n_layers} layers (blocks.0 .. blocks.{n_layers - 1}): the SAE was probably trained on "
        "another model. "
        if m and int(m.group(1)) >= n_layers
        else ""
    )
    attached = (
        "An SAE is attached there with model.add_sae (HookedSAETransformer): Fix: model.reset_saes() first. "
        if any(n.startswith(hook_name + ".hook_sae") for n in names)
        else ""
    )
    raise HookNameError(
        f"The SAE reads {hook_name!r}, which is not a hook point of this model. {depth}{attached}"
        + (f"Closest: {close}. " if close else "")
        + f"Valid hook points ({len(names)}): {', '.join(names)}. "
        "Fix: use an SAE trained on this model, or pass hook_name= one of these if the activations are the same."
    )


def check_sae_compatibility(sae: Any, model: HookedTransformer, hook_name: str | None = None) -> str:
    """Check that ``sae`` reads an activation of ``model`` and can be spliced there; return the hook name.

    The rules are those of :class:`repinf_lens.split.SplitModel`: the hook must be a hook point of the model,
    ``d_in`` must equal the activation's width there (``n_heads * d_head`` for ``attn.hook_z``, whose SAE must
    flatten heads with ``reshape_activations='hook_z'``), and the normalisation must be stateless
    (``none``, ``expected_average_only_in`` or ``covariance_whitening``).

    Args:
        sae: an ``sae_lens.SAE``.
        model: the HookedTransformer.
        hook_name: the hook point to check (default: :func:`sae_hook_name`).

    Raises:
        HookNameError: the hook point does not exist in the model (the message lists close and valid names).
        SAECompatibilityError: no hook name recorded, wrong ``d_in``, head layout or normalisation.
    """
    if hook_name is None:
        try:
            hook_name = sae_hook_name(sae)
        except ValueError as e:
            raise SAECompatibilityError(str(e)) from e
    hooks = [hook_name]
    out_hook = sae_hooks(sae)[1] if is_transcoder(sae) else hook_name
    if out_hook != hook_name:
        hooks.append(str(out_hook))
    for hook in hooks:
        _check_hook_point(model, hook)
    cfg = sae.cfg
    norm = getattr(cfg, "normalize_activations", "none")
    if norm not in SUPPORTED_NORMS:
        raise SAECompatibilityError(
            f"The SAE uses normalize_activations={norm!r}, whose decoder depends on state saved by the encoder "
            f"(per-token norms), so it cannot be spliced with a held error term. Supported: {SUPPORTED_NORMS}. "
            "Fix: use an SAE trained with normalize_activations='none' or 'expected_average_only_in'."
        )
    if getattr(getattr(cfg, "metadata", None), "hook_head_index", None) is not None:
        raise SAECompatibilityError(
            f"The SAE reads a single attention head (hook_head_index={cfg.metadata.hook_head_index}) of "
            f"{hook_name!r}; SplitModel splices SAEs over the whole activation. "
            "Fix: use an SAE trained on all heads (reshape_activations='hook_z')."
        )
    shape = activation_shape(model, hook_name)[2:]
    width = int(torch.tensor(shape).prod().item()) if shape else 1
    if int(cfg.d_in) != width:
        detail = f" (= {' x '.join(str(s) for s in shape)})" if len(shape) > 1 else ""
        raise SAECompatibilityError(
            f"SAE d_in={cfg.d_in} but the activation at {hook_name!r} has width {width}{detail}. "
            "Fix: use an SAE trained on this model at this hook point (d_in must equal the activation width)."
        )
    if out_hook != hook_name:
        if len(shape) > 1:
            raise SAECompatibilityError(
                f"The transcoder reads {hook_name!r}, whose activation has shape {shape} (heads x d_head); SAELens "
                "transcoders encode flat vectors. Fix: use a transcoder whose input hook is [batch, pos, d] shaped."
            )
        out_shape = activation_shape(model, str(out_hook))[2:]
        out_width = int(torch.tensor(out_shape).prod().item()) if out_shape else 1
        d_out = int(getattr(cfg, "d_out", sae.W_dec.shape[-1]))
        if d_out != out_width:
            raise SAECompatibilityError(
                f"Transcoder d_out={d_out} but the activation at its output hook {out_hook!r} has width "
                f"{out_width}. Fix: use a transcoder trained on this model (d_out must equal that width)."
            )
        return hook_name
    if len(shape) > 1 and getattr(cfg, "reshape_activations", "none") != "hook_z":
        raise SAECompatibilityError(
            f"The activation at {hook_name!r} has shape {shape} (heads x d_head) but the SAE has "
            f"reshape_activations={getattr(cfg, 'reshape_activations', None)!r}, so it cannot encode it. "
            "Fix: sae.cfg.reshape_activations = 'hook_z'; sae.turn_on_forward_pass_hook_z_reshaping()."
        )
    return hook_name
