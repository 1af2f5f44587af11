"""Models: loading TransformerLens models (the offline default, shipped finetunes, TL names, local folders of
any TL architecture, peft adapters merged bit-reproducibly) and reading what a ``HookedTransformer`` does.

* :mod:`~repinf_lens.models.loading`: :func:`load_model`, :func:`load_hf_model`, the shipped finetunes.
* :mod:`~repinf_lens.models.hooked`: the steps after the last block, hook firing order, attached SAEs.
"""

from repinf_lens.models import hooked
from repinf_lens.models.loading import (
    DEFAULT_MODEL,
    DEFAULT_N_CTX,
    SHIPPED_FINETUNES,
    UnknownModelError,
    default_model_dir,
    file_sha256,
    gemma3_270m_dir,
    is_default_model,
    load_hf_model,
    load_model,
    merge_lora,
    merge_peft,
    official_name_for_config,
    resolve_device,
    save_merged,
    shipped_finetune_dir,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_N_CTX",
    "SHIPPED_FINETUNES",
    "UnknownModelError",
    "default_model_dir",
    "file_sha256",
    "gemma3_270m_dir",
    "hooked",
    "is_default_model",
    "load_hf_model",
    "load_model",
    "merge_lora",
    "merge_peft",
    "official_name_for_config",
    "resolve_device",
    "save_merged",
    "shipped_finetune_dir",
]
