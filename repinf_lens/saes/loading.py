"""Load SAEs in SAELens format (local folder, SAELens release, Hugging Face repo) and check them against a model.

:func:`load_sae` accepts the three forms SAELens users meet:

1. a local folder written by SAELens (``SAE.save_model`` / ``TrainingSAE.save_inference_model``:
   ``cfg.json`` + ``sae_weights.safetensors``), loaded with ``SAE.load_from_disk`` (which upgrades pre-6.0
   configs). A folder holding several such SAEs in subfolders (e.g. the output of
   :func:`repinf_lens.saes.publish.publish_saes`) works with ``sae_id`` = the subfolder, or without it when it
   holds exactly one;
2. a release name of SAELens' registry (``pretrained_saes.yaml``) with its ``sae_id``;
3. a Hugging Face repo id ``owner/name`` in SAELens layout, ``sae_id`` being the subfolder that holds the SAE.
   SAELens (>= 6) accepts repo ids directly in ``SAE.from_pretrained``, so forms 2 and 3 both go through it.

With ``model=`` the SAE is checked against the model (:func:`check_sae_compatibility`): hook point, input width
and normalisation, with the same rules as :class:`repinf_lens.split.SplitModel`, so a loaded SAE can be spliced.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from transformer_lens import HookedTransformer

from repinf_lens.errors import CorruptFileError
from repinf_lens.split.compat import check_sae_compatibility, sae_hook_name

__all__ = [
    "check_sae_compatibility",
    "find_sae_folders",
    "load_folder",
    "load_sae",
    "sae_hook_name",
    "shipped_sae_releases",
]

_CFG = "cfg.json"
_WEIGHTS = "sae_weights.safetensors"
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_MAX_IDS_SHOWN = 20

_ACCEPTED_FORMS = (
    "load_sae accepts (1) a local folder written by SAELens (cfg.json + sae_weights.safetensors, e.g. from "
    "SAE.save_model), (2) a SAELens release name from its pretrained_saes.yaml with sae_id, e.g. "
    "load_sae('gpt2-small-res-jb', 'blocks.8.hook_resid_pre'), or (3) a Hugging Face repo id 'owner/name' in "
    "SAELens format with sae_id = the subfolder holding cfg.json and sae_weights.safetensors."
)


def find_sae_folders(root: str | os.PathLike, max_depth: int = 4) -> list[Path]:
    """Folders under ``root`` (``root`` included) that hold a SAELens SAE (``cfg.json`` + weights), sorted."""
    root = Path(root)
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / _CFG).is_file() and (folder / _WEIGHTS).is_file():
            found.append(folder)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return sorted(found)


def _dtype_str(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith((".", "/", "~", "\\"))
        or s.endswith(("/", "\\"))
        or s.count("/") > 1
        or "\\" in s
        or (len(s) > 1 and s[1] == ":")  # Windows drive
    )


def resolve_local_folder(path: Path, sae_id: str | None) -> Path:
    if path.is_file():
        if path.name in (_CFG, _WEIGHTS):
            path = path.parent
        else:
            raise ValueError(f"{str(path)!r} is a file, not an SAE folder. {_ACCEPTED_FORMS}")
    if sae_id is not None and not ((path / _CFG).is_file() and (path / _WEIGHTS).is_file()):
        sub = path / sae_id
        if (sub / _CFG).is_file() and (sub / _WEIGHTS).is_file():
            return sub
        found = find_sae_folders(path)
        rel = [str(f.relative_to(path)) for f in found]
        close = difflib.get_close_matches(sae_id, rel, n=5, cutoff=0.5)
        raise ValueError(
            f"No SAE {sae_id!r} in folder {str(path)!r}. "
            + (f"Closest: {close}. " if close else "")
            + (f"SAEs there: {rel[:_MAX_IDS_SHOWN]}." if rel else "It holds no cfg.json + sae_weights.safetensors.")
        )
    if (path / _CFG).is_file():
        if not (path / _WEIGHTS).is_file():
            raise ValueError(
                f"{str(path)!r} has cfg.json but no {_WEIGHTS}. Fix: save the SAE with SAELens' SAE.save_model or "
                "TrainingSAE.save_inference_model, which write both files."
            )
        return path
    found = find_sae_folders(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"Folder {str(path)!r} holds no SAE (no cfg.json + {_WEIGHTS} in it or below). {_ACCEPTED_FORMS}"
        )
    rel = [str(f.relative_to(path)) for f in found]
    raise ValueError(
        f"Folder {str(path)!r} holds {len(found)} SAEs: {rel[:_MAX_IDS_SHOWN]}"
        + (" ..." if len(rel) > _MAX_IDS_SHOWN else "")
        + f". Fix: pass sae_id= one of them, e.g. load_sae({str(path)!r}, {rel[0]!r})."
    )


def _load_from_hub(release: str, sae_id: str, device: str, dtype: str | None) -> Any:
    """``SAE.from_pretrained`` (registry release or repo id) with clear errors for offline / missing repos."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )
    from sae_lens import SAE

    what = f"SAE {sae_id!r} of {release!r}"
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
        raise ConnectionError(
            f"Could not download {what}: the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE=1) and "
            "the files are not in the local cache. Fix: run once with network access (the files are then cached), "
            "or download the SAE folder elsewhere (e.g. `hf download REPO --include 'SAE_ID/*'`) and pass its "
            f"local path to load_sae. Original error: {type(e).__name__}: {e}"
        ) from e
    except GatedRepoError as e:
        raise PermissionError(
            f"Could not download {what}: the repository is gated. Fix: accept its terms on huggingface.co and log "
            "in (`hf auth login` or HF_TOKEN)."
        ) from e
    except RepositoryNotFoundError as e:
        raise ValueError(
            f"Could not download {what}: the Hugging Face repository does not exist or is private. "
            f"Fix: check the repo id, or log in (`hf auth login`) if it is private. {_ACCEPTED_FORMS}"
        ) from e
    except EntryNotFoundError as e:
        raise ValueError(
            f"Could not download {what}: the repository has no {sae_id}/{_CFG} or {sae_id}/{_WEIGHTS}. "
            "Fix: sae_id must be the subfolder of the repo that holds the SAE (SAELens layout)."
        ) from e


_REGISTRY_YAML = "pretrained_saes.yaml"


def load_folder(
    folder: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    cfg_overrides: dict[str, Any] | None = None,
    norm_scaling_factor: float | None = None,
    what: str | None = None,
) -> Any:
    """``SAE.load_from_disk`` on one SAELens folder, with the registry's ``config_overrides`` and
    ``norm_scaling_factor`` applied as ``SAE.from_pretrained`` applies them, and errors that name a corrupt file.

    An ``expected_average_only_in`` SAE is folded with ``norm_scaling_factor`` (it then reads raw activations);
    without a factor it is loaded as saved, with a warning: it expects activations scaled to norm sqrt(d_in).
    """
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    folder = Path(folder)
    extra = dict(cfg_overrides or {})

    def converter(path: Any, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None) -> Any:
        cfg_dict, state = sae_lens_disk_loader(path, device, cfg_overrides={**extra, **(cfg_overrides or {})})
        if extra and isinstance(cfg_dict.get("metadata"), dict):
            # SAELens >= 6 nests metadata (model_name, hook_name, neuronpedia_id, ...): an override of such a
            # field must land there, or the saved value would win
            import dataclasses

            cls = SAE.get_sae_config_class_for_architecture(cfg_dict.get("architecture", "standard"))
            top = {f.name for f in dataclasses.fields(cls)}
            for k, v in extra.items():
                if k not in top:
                    cfg_dict["metadata"][k] = v
        return cfg_dict, state

    cfg_path, weights_path = folder / _CFG, folder / _WEIGHTS
    try:
        json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            f"The SAE config {str(cfg_path)!r} is not valid JSON ({e}). Fix: restore the file (re-download or "
            "re-save the SAE with SAE.save_model).",
            cfg_path,
        ) from e
    try:
        sae = SAE.load_from_disk(str(folder), device=device, dtype=dtype, converter=converter)
    except Exception as e:
        if _is_safetensors_error(e):
            raise CorruptFileError(
                f"The SAE weights file {str(weights_path)!r} cannot be read ({type(e).__name__}: {e}); it is "
                "truncated or corrupt. Fix: restore the file (re-download or re-save the SAE).",
                weights_path,
            ) from e
        raise
    name = what or str(folder)
    if sae.cfg.normalize_activations == "expected_average_only_in":
        if norm_scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(float(norm_scaling_factor))
        else:
            warnings.warn(
                f"SAE {name!r} uses normalize_activations='expected_average_only_in' and no norm_scaling_factor is "
                "known, so it is loaded unfolded: it expects activations rescaled to norm sqrt(d_in), but the split "
                "feeds it raw activations (its latents are then mis-scaled). Fix: add norm_scaling_factor to its "
                f"entry in {_REGISTRY_YAML}, or call sae.fold_activation_norm_scaling_factor(factor).",
                stacklevel=3,
            )
    return sae


def _is_safetensors_error(e: BaseException) -> bool:
    text = f"{type(e).__module__}.{type(e).__name__}: {e}".lower()
    return "safetensor" in text or "deserializ" in text or "header" in text or "incomplete metadata" in text


def _read_registry(path: Path) -> dict[str, Any]:
    file = path / _REGISTRY_YAML
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CorruptFileError(f"{str(file)!r} is not valid YAML ({e}). Fix: repair or delete it.", file) from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "saes" in v for v in data.values()):
        raise CorruptFileError(
            f"{str(file)!r} is not a SAELens registry (expected 'release: {{repo_id, model, saes: [{{id, path}}]}}'). "
            "Fix: write it with repinf_lens.saes.publish_saes, or delete it to load the folder by subfolder.",
            file,
        )
    return data


def shipped_sae_releases() -> dict[str, Path]:
    """SAE releases shipped inside the package: ``{release: folder}``.

    Each ``repinf_lens/assets/saes/<folder>`` is what :func:`repinf_lens.saes.publish_saes` writes (a
    ``pretrained_saes.yaml`` block, the model card and one SAELens folder per ``sae_id``), so
    ``load_sae("<release>", "<sae_id>")`` works offline and the same block can be submitted to SAELens' registry.
    """
    from importlib.resources import files

    root = Path(str(files("repinf_lens.assets").joinpath("saes")))
    out: dict[str, Path] = {}
    for folder in sorted(p.parent for p in root.glob(f"*/{_REGISTRY_YAML}")):
        for release in _read_registry(folder):
            out[str(release)] = folder
    return out


def _local_release(path: Path, sae_id: str | None) -> dict[str, Any] | None:
    """The release entry of a local HF-repo-like folder with a ``pretrained_saes.yaml``, else ``None``."""
    if not path.is_dir() or not (path / _REGISTRY_YAML).is_file():
        return None
    data = _read_registry(path)
    if len(data) > 1 and sae_id is not None:  # several releases: the one that lists this id
        hits = [v for v in data.values() if any(str(e.get("id")) == sae_id for e in v["saes"])]
        if len(hits) == 1:
            return hits[0]
    return next(iter(data.values())) if len(data) == 1 else {"saes": [e for v in data.values() for e in v["saes"]]}


def _load_local_release(path: Path, release: dict[str, Any], sae_id: str | None, dev: str, dt: str | None) -> Any:
    entries = [dict(e) for e in release["saes"]]
    ids = [str(e.get("id")) for e in entries]
    by_id = {str(e.get("id")): e for e in entries}
    by_path = {str(e.get("path")).strip("/"): e for e in entries}
    if sae_id is None and len(entries) == 1:
        sae_id = ids[0]
    entry = by_id.get(sae_id) if sae_id is not None else None
    if entry is None and sae_id is not None:
        entry = by_path.get(sae_id.strip("/"))
    if entry is None:
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.5) if sae_id else []
        head = "needs sae_id" if sae_id is None else f"has no SAE {sae_id!r}"
        raise ValueError(
            f"The release folder {str(path)!r} ({_REGISTRY_YAML}) {head}. "
            + (f"Closest: {close}. " if close else "")
            + f"Valid sae_ids: {ids[:_MAX_IDS_SHOWN]}{' ...' if len(ids) > _MAX_IDS_SHOWN else ''}. "
            f"Fix: load_sae({str(path)!r}, {ids[0]!r})."
        )
    folder = path / str(entry.get("path", entry.get("id")))
    if not ((folder / _CFG).is_file() and (folder / _WEIGHTS).is_file()):
        raise ValueError(
            f"{_REGISTRY_YAML} in {str(path)!r} lists SAE {entry.get('id')!r} at path {entry.get('path')!r}, but "
            f"{str(folder)!r} holds no {_CFG} + {_WEIGHTS}. Fix: correct the path in {_REGISTRY_YAML}."
        )
    overrides = dict(release.get("config_overrides") or {})
    if entry.get("neuronpedia") is not None:
        overrides["neuronpedia_id"] = entry["neuronpedia"]
    return load_folder(
        folder,
        device=dev,
        dtype=dt,
        cfg_overrides=overrides,
        norm_scaling_factor=entry.get("norm_scaling_factor"),
        what=f"{path.name}/{entry.get('id')}",
    )


def load_sae(
    release_or_path: str | os.PathLike,
    sae_id: str | None = None,
    *,
    model: HookedTransformer | None = None,
    hook_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """Load an SAE in SAELens format and, with ``model``, check that it can be spliced into it.

    Args:
        release_or_path: a local SAE folder (``cfg.json`` + ``sae_weights.safetensors``, or a folder with SAEs in
            subfolders), a release shipped with repinf_lens (:func:`shipped_sae_releases`, offline), a SAELens
            release name (``pretrained_saes.yaml``), or a Hugging Face repo id ``owner/name`` in SAELens layout.
        sae_id: the SAE inside the release (required), the subfolder of the repo (required), or the subfolder
            of a local folder holding several SAEs.
        model: when given, the SAE is checked against it with :func:`check_sae_compatibility`.
        hook_name: override of the SAE's hook point; it is written into ``sae.cfg.metadata.hook_name`` so that
            ``SplitModel(model, hook_name, sae)`` accepts the SAE.
        device: where to put the SAE (default: the model's device, else ``"cpu"``).
        dtype: e.g. ``"float32"`` or ``torch.float32`` (default: the saved dtype for local folders, ``float32``
            for downloads).

    Returns:
        The ``sae_lens.SAE`` (an inference SAE, in ``eval`` mode).

    Raises:
        ValueError: the string is neither an SAE folder, a release nor a repo id (the message lists the three
            accepted forms and close release names), or ``sae_id`` is missing or unknown (valid ids are listed).
        ConnectionError: the SAE must be downloaded but the Hugging Face Hub is unreachable.
        HookNameError, SAECompatibilityError: the SAE does not fit ``model`` (see :func:`check_sae_compatibility`).
    """

    dev = str(device) if device is not None else (str(model.cfg.device) if model is not None else "cpu")
    dt = _dtype_str(dtype)
    raw = os.fspath(release_or_path)
    path = Path(raw).expanduser()
    if isinstance(release_or_path, os.PathLike) or path.exists() or _looks_like_path(raw):
        if not path.exists():
            raise ValueError(f"No such SAE folder: {raw!r}. {_ACCEPTED_FORMS}")
        release = _local_release(path, sae_id)
        if release is not None:
            sae = _load_local_release(path, release, sae_id, dev, dt)
        else:
            folder = resolve_local_folder(path, sae_id)
            sae = load_folder(folder, device=dev, dtype=dt)
    elif raw in (shipped := shipped_sae_releases()):
        sae = _load_local_release(shipped[raw], _read_registry(shipped[raw])[raw], sae_id, dev, dt)
    else:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if raw in directory:
            valid = list(directory[raw].saes_map)
            if sae_id is None or sae_id not in directory[raw].saes_map:
                close = difflib.get_close_matches(sae_id, valid, n=5, cutoff=0.6) if sae_id else []
                shown = ", ".join(repr(v) for v in valid[:_MAX_IDS_SHOWN])
                more = f" ... ({len(valid)} in all)" if len(valid) > _MAX_IDS_SHOWN else ""
                head = "needs sae_id" if sae_id is None else f"has no SAE {sae_id!r}"
                raise ValueError(
                    f"SAELens release {raw!r} {head}. "
                    + (f"Closest: {close}. " if close else "")
                    + f"Valid sae_ids: {shown}{more}. Fix: load_sae({raw!r}, {valid[0]!r})."
                )
            sae = _load_from_hub(raw, sae_id, dev, dt)
        elif _HF_REPO_RE.match(raw):
            if not sae_id:
                raise ValueError(
                    f"Loading from the Hugging Face repo {raw!r} needs sae_id = the subfolder that holds the SAE "
                    f"(SAELens layout: <sae_id>/{_CFG} and <sae_id>/{_WEIGHTS})."
                )
            sae = _load_from_hub(raw, sae_id, dev, dt)
        else:
            close = difflib.get_close_matches(raw, [*shipped, *directory], n=5, cutoff=0.6)
            raise ValueError(
                f"{raw!r} is not an existing SAE folder, a SAELens release or a Hugging Face repo id. "
                + (f"Did you mean the release(s) {close}? " if close else "")
                + _ACCEPTED_FORMS
            )
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    if model is not None:
        check_sae_compatibility(sae, model)
    return sae.eval()
