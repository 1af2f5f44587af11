"""The split: a TransformerLens model cut at a hook point, an SAE spliced in, and theta2 = the parameters
downstream of the hook (the ones influence is computed over).

* :mod:`~repinf_lens.split.model`: :class:`SplitModel` (upstream once, downstream as a pure function of
  explicit parameters) and :class:`SplitInputs`.
* :mod:`~repinf_lens.split.compat`: SAE / transcoder compatibility checks against the model's hook points.
* :mod:`~repinf_lens.split.lora`: :class:`LoraSplit`, theta2 = the unmerged LoRA adapters downstream of the hook.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from repinf_lens.split.compat import (
    SUPPORTED_NORMS,
    HookNameError,
    SAECompatibilityError,
    activation_shape,
    check_sae_compatibility,
    sae_hook_name,
)
from repinf_lens.split.lora import PEFT_TO_TL, LoraSplit, lora_delta, lora_split_from_peft
from repinf_lens.split.model import Params, SplitConfigError, SplitInputs, SplitModel

__all__ = [
    "PEFT_TO_TL",
    "SUPPORTED_NORMS",
    "HookNameError",
    "LoraSplit",
    "Params",
    "SAECompatibilityError",
    "SplitConfigError",
    "SplitInputs",
    "SplitModel",
    "activation_shape",
    "check_sae_compatibility",
    "lora_delta",
    "lora_split_from_peft",
    "sae_hook_name",
]
