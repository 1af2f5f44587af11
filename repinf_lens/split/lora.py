"""theta2 = LoRA adapters downstream of the hook, kept unmerged (``W = W0 + A B`` inside the functional call).

After a LoRA finetune the parameters that were actually trained are the adapters, not the full matrices. A
:class:`LoraSplit` is a :class:`~repinf_lens.split.SplitModel` whose theta2 is ``{name.lora_A, name.lora_B}``
for every adapted matrix downstream of the hook: each downstream call rebuilds ``W = W_model - A0 B0 + A B``
(exactly ``W_model``, the merged weight, at the trained adapters) so gradients, HVPs, CG and the derivative swap
run over far fewer parameters (r (in + out) per matrix instead of in x out). Everything that takes a split
(``InfluenceAttributor``, the prefilter, ablations, reports) takes a ``LoraSplit``.

TransformerLens layout: for a matrix viewed as ``[in, out]`` the delta is ``A @ B`` with ``A [in, r]``,
``B [r, out]``; ``W_Q / W_K / W_V`` ([heads, d_model, d_head]) use ``in = d_model``, ``out = heads * d_head``;
``W_O`` ([heads, d_head, d_model]) uses ``in = heads * d_head``; 2-D weights (``W_in``, ``W_gate``, ``W_out``,
``W_U``) are ``[in, out]`` already. :func:`lora_split_from_peft` converts a peft adapter (``lora_A.weight
[r, in]``, ``lora_B.weight [out, r]``, scale ``alpha / r``) of a Llama-style model: ``A = lora_A^T``,
``B = scale * lora_B^T``.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repinf_lens.split.model import Params, SplitModel

__all__ = ["PEFT_TO_TL", "LoraSplit", "lora_delta", "lora_split_from_peft"]

PEFT_TO_TL: dict[str, str] = {
    "self_attn.q_proj": "attn.W_Q",
    "self_attn.k_proj": "attn.W_K",
    "self_attn.v_proj": "attn.W_V",
    "self_attn.o_proj": "attn.W_O",
    "mlp.gate_proj": "mlp.W_gate",
    "mlp.up_proj": "mlp.W_in",
    "mlp.down_proj": "mlp.W_out",
}
"""peft module names of a Llama-style HF model -> TransformerLens parameter names (inside ``blocks.L.``)."""


def lora_delta(name: str, shape: torch.Size | tuple[int, ...], a: Tensor, b: Tensor) -> Tensor:
    """``A @ B`` laid out like the TransformerLens parameter ``name`` of ``shape`` (see the module docstring)."""
    ab = a @ b
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("W_Q", "W_K", "W_V", "_W_K", "_W_V") and len(shape) == 3:
        heads, d_model, d_head = shape
        return ab.reshape(d_model, heads, d_head).permute(1, 0, 2)
    if leaf == "W_O" and len(shape) == 3:
        return ab.reshape(shape)
    if len(shape) == 2:
        return ab
    raise ValueError(f"No LoRA layout for parameter {name!r} of shape {tuple(shape)}.")


class LoraSplit(SplitModel):
    """A :class:`SplitModel` whose theta2 is LoRA factors of downstream matrices (see the module docstring).

    Args:
        split: the split of the MERGED model (its hook, SAE, task; its own theta2 is replaced).
        adapters: ``{tl_param_name: (A [in, r], B [r, out])}`` at the trained values; every name must be a
            parameter downstream of the hook (upstream adapters are not part of theta2 and are dropped with a
            note in :attr:`dropped`).
    """

    def __init__(self, split: SplitModel, adapters: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        self.__dict__.update(split.__dict__)
        named = dict(self.model.named_parameters())
        unknown = sorted(set(adapters) - set(named))
        if unknown:
            raise ValueError(f"LoRA adapters for unknown parameters {unknown[:5]}. Valid names look like "
                             f"{sorted(n for n in named if n.startswith('blocks.'))[:4]}.")  # fmt: skip
        downstream = set(split.param_names)
        self.dropped = sorted(n for n in adapters if n not in downstream)
        self.adapted = [n for n in adapters if n in downstream]
        if not self.adapted:
            raise ValueError(f"No LoRA adapter is downstream of {split.hook_name}: nothing to attribute over. Fix: "
                             "choose an earlier hook, or adapters of later layers.")  # fmt: skip
        self._shapes = {n: named[n].shape for n in self.adapted}
        self._lora: Params = {}
        for n in self.adapted:
            a, b = adapters[n]
            self._lora[f"{n}.lora_A"] = a.detach().to(named[n].device, named[n].dtype)
            self._lora[f"{n}.lora_B"] = b.detach().to(named[n].device, named[n].dtype)
            delta = lora_delta(n, named[n].shape, self._lora[f"{n}.lora_A"], self._lora[f"{n}.lora_B"])
            if delta.shape != named[n].shape:
                raise ValueError(f"LoRA factors of {n} give a delta of shape {tuple(delta.shape)}, the weight is "
                                 f"{tuple(named[n].shape)}.")  # fmt: skip
        self.param_names = list(self._lora)

    def downstream_params(self) -> Params:
        """theta2: ``{name.lora_A: A, name.lora_B: B}`` at the trained adapters."""
        return dict(self._lora)

    def expand(self, params: Params) -> Params:
        """The full weights ``W_model - A0 B0 + A B`` for LoRA factors ``params`` (differentiable in them)."""
        named = dict(self.model.named_parameters())
        out: Params = {}
        for n in self.adapted:
            a0, b0 = self._lora[f"{n}.lora_A"], self._lora[f"{n}.lora_B"]
            a, b = params.get(f"{n}.lora_A", a0), params.get(f"{n}.lora_B", b0)
            base = named[n].detach() - lora_delta(n, self._shapes[n], a0, b0)
            out[n] = base + lora_delta(n, self._shapes[n], a, b)
        return out

    def _run_downstream(
        self, x: Tensor, base: Tensor, answer_pos: Tensor, params: Params | None, loss_only: bool = False
    ) -> Tensor:
        full = self.expand(params) if params else None
        return super()._run_downstream(x, base, answer_pos, full, loss_only)

    def fingerprint(self) -> dict[str, Any]:
        """The split's fingerprint plus the adapted matrices and a digest of every LoRA factor (all bytes)."""
        from repinf_lens._fingerprint import state_digest

        fp = super().fingerprint()
        fp["theta2"] = "lora"
        fp["lora_adapted"] = list(self.adapted)
        fp["lora_state"] = state_digest(self._lora)
        return fp


def lora_split_from_peft(split: SplitModel, adapter_dir: str | os.PathLike) -> LoraSplit:
    """A :class:`LoraSplit` from a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    saved by :func:`repinf_lens.finetune` for the model ``split`` holds MERGED (Llama-style module names).

    Raises:
        FileNotFoundError: no adapter files in ``adapter_dir``.
        ValueError: a module the mapping :data:`PEFT_TO_TL` does not know.
    """
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"No peft adapter in {folder} (adapter_config.json + adapter_model.safetensors). "
                                "Fix: pass the adapter/ folder of a repinf_lens.finetune run.")  # fmt: skip
    cfg = json.loads(cfg_path.read_text())
    r = int(cfg["r"])
    scale = float(cfg.get("lora_alpha", r)) / r
    if cfg.get("use_rslora"):
        scale = float(cfg.get("lora_alpha", r)) / r**0.5
    tensors = load_file(str(weights_path))
    pat = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
    factors: dict[str, dict[str, Tensor]] = {}
    named = dict(split.model.named_parameters())
    for key, t in tensors.items():
        m = pat.search(key)
        if m is None:
            continue
        layer, module, which = m.groups()
        if module not in PEFT_TO_TL:
            raise ValueError(f"Adapter module {module!r} ({key}) has no TransformerLens mapping. Known: "
                             f"{sorted(PEFT_TO_TL)}.")  # fmt: skip
        tl = f"blocks.{layer}.{PEFT_TO_TL[module]}"
        if tl not in named and tl.replace(".W_K", "._W_K").replace(".W_V", "._W_V") in named:
            tl = tl.replace(".W_K", "._W_K").replace(".W_V", "._W_V")  # grouped-query attention
        factors.setdefault(tl, {})[which] = t
    adapters = {
        name: (f["A"].T.contiguous(), (scale * f["B"]).T.contiguous()) for name, f in factors.items() if len(f) == 2
    }
    return LoraSplit(split, adapters)
