"""Complete, deterministic content digests of models, SAEs and splits (what caches and run folders are keyed by).

Every digest is a sha256 over the raw bytes of the tensors (plus dtype, shape and name), so two models that
differ in any single weight, upstream or downstream, get different fingerprints, and the same weights give the
same digest in every process (no ``hash()``, no paths, no float sums).

Cost: sha256 runs at about 1 GB/s per core (SHA-NI), so a 135M-parameter fp32 model (540 MB) is hashed in about
0.5 s. The digest of each tensor is cached on the tensor object itself, keyed by its version counter, data
pointer, shape, strides and dtype, so repeated ``split.fingerprint()`` calls on an unchanged model cost
microseconds. Every in-place operation (``p.copy_(...)``, ``p.add_(...)``, also under ``torch.no_grad``) bumps
the version counter and invalidates the cached digest; only writes through ``p.data`` (which has its own version
counter) are invisible to it: after such writes call :func:`clear_digest_cache` (repinf_lens itself never
writes weights through ``.data``).

Buffers: every buffer of the model enters the digest except the ones TransformerLens derives from the config
(already part of the fingerprint) and may resize lazily: the causal ``mask``, the constant ``IGNORE`` and the
rotary ``rotary_sin`` / ``rotary_cos`` tables. SAEs: every parameter and buffer, plus the config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FINGERPRINT_VERSION",
    "clear_digest_cache",
    "folder_digest",
    "model_config_identity",
    "model_digest",
    "model_source_digest",
    "sae_fingerprint",
    "split_fingerprint",
    "state_digest",
    "tensor_digest",
    "tokenizer_digest",
]

#: Bumped whenever the fingerprint layout changes (old caches and run folders then no longer match).
FINGERPRINT_VERSION = 2

_ATTR = "_repinf_lens_digest"
# buffers TransformerLens derives from the config (part of the fingerprint) and may build lazily
_DERIVED_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")
# config entries that name files or devices of this process / machine, not what the model computes
_PROCESS_CFG_KEYS = ("device", "n_devices", "model_name", "tokenizer_name")
_CHUNK = 1 << 26  # 64 MiB per hashlib update (bounded temporary memory for tensors copied off the GPU)


def _signature(t: Tensor) -> tuple | None:
    try:
        return (t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype),
                str(t.device))  # fmt: skip
    except (RuntimeError, NotImplementedError):  # inference tensors have no version counter
        return None


def tensor_digest(t: Tensor, *, cache: bool = True) -> str:
    """sha256 (hex) of a tensor's dtype, shape and raw bytes (complete: every element counts).

    With ``cache`` the digest is remembered on the tensor object and reused while its version counter, data
    pointer, shape, strides and dtype are unchanged (see the module docstring for the ``.data`` caveat).
    """
    sig = _signature(t) if cache else None
    if sig is not None:
        hit = getattr(t, _ATTR, None)
        if hit is not None and hit[0] == sig:
            return hit[1]
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        step = max(1, _CHUNK // max(1, flat.element_size()))
        for lo in range(0, flat.numel(), step):
            part = flat[lo : lo + step].contiguous().cpu()
            h.update(part.view(torch.uint8).numpy().data)
    digest = h.hexdigest()
    if sig is not None:
        try:
            setattr(t, _ATTR, (sig, digest))
        except (AttributeError, RuntimeError):  # pragma: no cover - a tensor subclass without a __dict__
            pass
    return digest


def clear_digest_cache(tensors: Iterable[Tensor]) -> None:
    """Forget the cached digests of ``tensors`` (e.g. ``model.parameters()`` after writes through ``p.data``)."""
    for t in tensors:
        if hasattr(t, _ATTR):
            delattr(t, _ATTR)


def state_digest(named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], *, cache: bool = True) -> str:
    """sha256 (hex) over ``name -> tensor`` pairs in sorted name order (each tensor by :func:`tensor_digest`)."""
    items = sorted(dict(named).items())
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}={tensor_digest(t, cache=cache)};".encode())
    return h.hexdigest()


def _model_tensors(model: Any) -> dict[str, Tensor]:
    out = dict(model.named_parameters())
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS:
            out[f"buffer:{name}"] = b
    return out


def model_digest(model: Any) -> str:
    """sha256 of every parameter and every non-derived buffer of ``model`` (see the module docstring)."""
    return state_digest(_model_tensors(model))


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def sae_fingerprint(sae: Any) -> dict[str, Any]:
    """``{"class", "cfg", "state"}`` of an SAELens SAE: its whole config (without the device) and the digest of
    all its parameters and buffers (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, thresholds, ...)."""
    cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else dict(vars(sae.cfg))
    tensors = dict(sae.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in sae.named_buffers()})
    return {
        "class": type(sae).__name__,
        "cfg": {k: str(v) for k, v in sorted(cfg.items()) if k != "device"},
        "state": state_digest(tensors),
    }


def tokenizer_digest(tok: Any) -> str | None:
    """sha256 of what a Hugging Face tokenizer computes (vocabulary, merges, special tokens, chat template,
    padding side); not its ``name_or_path``. ``None`` without a tokenizer."""
    if tok is None:
        return None
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tok, "get_vocab"):
        h.update(json.dumps(sorted(tok.get_vocab().items()), default=str).encode())
    else:
        h.update(type(tok).__name__.encode())
    extra = {
        "class": type(tok).__name__,
        "special": getattr(tok, "special_tokens_map", None),
        "added": sorted(tok.get_added_vocab().items()) if hasattr(tok, "get_added_vocab") else None,
        "chat_template": getattr(tok, "chat_template", None),
        "padding_side": getattr(tok, "padding_side", None),
        "truncation_side": getattr(tok, "truncation_side", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_config_identity(cfg: Any) -> dict[str, str]:
    """The model config as strings, without entries that depend on this process (device, the local folder or
    temporary link the model was loaded through: ``model_name``, ``tokenizer_name``)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return {k: str(v) for k, v in sorted(d.items()) if k not in _PROCESS_CFG_KEYS}


def split_fingerprint(split: Any, *, task_config: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a split's results depend on, as a JSON-able dict (deterministic across processes).

    Keys: ``model`` (config, process-dependent entries removed), ``model_weights`` (digest of ALL parameters,
    upstream and downstream, and buffers), ``tokenizer``, ``hook`` / ``out_hook``, ``theta2`` (names),
    ``unembed_columns``, ``sae`` (class, config and digest of all its tensors), ``attached_saes`` (SAEs a
    ``HookedSAETransformer`` carries), ``use_error_term``, ``task`` / ``task_config`` / ``task_tokenizer``,
    ``fingerprint_version``.
    """
    if task_config is None:
        from repinf_lens.task import task_config as default_task_config

        task_config = default_task_config
    model = split.model
    task = split.task
    model_tok = getattr(model, "tokenizer", None)
    task_tok = getattr(task, "tokenizer", None)
    from repinf_lens.models.hooked import attached_saes

    attached_fp = {
        a.hook_in: {
            **sae_fingerprint(a.sae),
            "hook_out": a.hook_out,
            "use_error_term": a.use_error_term,
            "exclude_special_tokens": str(a.exclude_special_tokens),
        }
        for a in sorted(attached_saes(model), key=lambda a: a.hook_in)
    } or None
    cols = split.unembed_columns()
    fp = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "model": model_config_identity(model.cfg),
        "model_weights": model_digest(model),
        "tokenizer": tokenizer_digest(model_tok),
        "hook": split.hook_name,
        "out_hook": getattr(split, "out_hook", split.hook_name),
        "theta2": list(split.param_names),
        "sae": None if split.sae is None else sae_fingerprint(split.sae),
        "attached_saes": attached_fp,
        "use_error_term": split.use_error_term,
        "unembed_columns": None if cols is None else cols.tolist(),
        "task": type(task).__name__,
        "task_config": task_config(task),
        "task_tokenizer": None if task_tok is None or task_tok is model_tok else tokenizer_digest(task_tok),
    }
    return _jsonable(fp)


# ---------------------------------------------------------------------------------------------- model folders
_FILE_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes, cached in this process by (path, inode, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _FILE_DIGESTS.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    _FILE_DIGESTS[key] = digest = h.hexdigest()
    return digest


def folder_digest(folder: str | os.PathLike) -> str:
    """sha256 over the relative paths and bytes of every file in a model folder (weights, config, tokenizer).

    Hidden files and ``*.md`` notes are skipped; the folder's own location is not part of it, so a moved or
    copied folder has the same digest. File digests are cached per process by (path, inode, size, mtime).
    """
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts) or p.suffix == ".md":
            continue
        h.update(f"{rel.as_posix()}={_file_digest(p)};".encode())
    return h.hexdigest()


def model_source_digest(name_or_path: str | os.PathLike | None) -> str | None:
    """:func:`folder_digest` of what :func:`repinf_lens.load_model` would read: the embedded default's folder or
    a local folder; ``None`` for a hub model name (identified by its name)."""
    from repinf_lens.models import default_model_dir, is_default_model

    if name_or_path is None or is_default_model(name_or_path):
        return folder_digest(default_model_dir())
    path = Path(os.fspath(name_or_path)).expanduser()
    return folder_digest(path) if path.is_dir() else None
