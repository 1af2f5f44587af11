"""Publish SAEs to the Hugging Face Hub in SAELens format, with a model card and a SAELens registry entry.

:func:`publish_saes` writes, under ``out_dir``::

    <sae_id>/cfg.json, <sae_id>/sae_weights.safetensors   one inference SAE per id (SAELens layout)
    README.md                                             Hugging Face model card (``library_name: saelens``)
    pretrained_saes.yaml                                  the release block for a PR to SAELens' registry

and, with ``dry_run=False``, uploads the SAE folders with ``sae_lens.upload_saes_to_huggingface`` and the model
card with ``huggingface_hub``. Once uploaded, ``SAE.from_pretrained(repo_id, sae_id)`` (SAELens accepts repo ids
directly) and :func:`repinf_lens.saes.loading.load_sae` load them; after the registry PR is merged,
``SAE.from_pretrained(release, sae_id)`` does too. ``SAE.from_pretrained`` does not read local folders; load
``out_dir`` itself with ``load_sae(out_dir, sae_id)`` or ``SAE.load_from_disk(out_dir / sae_id)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repinf_lens._io import write_text_atomic
from repinf_lens.saes.loading import load_sae, resolve_local_folder, sae_hook_name

__all__ = ["PublishResult", "publish_saes", "registry_block"]

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_EXTRA_FILES = ("sparsity.safetensors",)
_DEFAULT_TAGS = ["saelens", "sae", "sparse-autoencoder", "interpretability", "repinf-lens"]


@dataclass
class PublishResult:
    """What :func:`publish_saes` wrote (and whether it uploaded).

    Attributes:
        out_dir: the folder holding everything.
        readme_path: ``out_dir / "README.md"``, the model card.
        yaml_path: ``out_dir / "pretrained_saes.yaml"``, the registry block.
        yaml_block: the registry block as text (paste it into SAELens' ``pretrained_saes.yaml``).
        uploaded: whether the files were uploaded to the Hub.
        sae_paths: ``sae_id -> out_dir / sae_id``.
        release: the release name used in the registry block.
    """

    out_dir: Path
    readme_path: Path
    yaml_path: Path
    yaml_block: str
    uploaded: bool
    sae_paths: dict[str, Path] = field(default_factory=dict)
    release: str = ""


def _default_release(repo_id: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", repo_id.split("/")[-1].lower()).strip("-") or "saes"


def _check_sae_id(sae_id: str) -> None:
    parts = sae_id.split("/")
    if not sae_id or sae_id.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in sae_id:
        raise ValueError(
            f"Invalid sae_id {sae_id!r}: it becomes the SAE's subfolder in the repo. "
            "Fix: use a relative path of plain names, e.g. 'blocks.3.hook_resid_post' or 'layer_3/width_2k'."
        )


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return round(float(value), 6)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _unwrap(ref: Any) -> tuple[Any, Path | None, dict[str, Any]]:
    """``(SAE or None, source folder or None, stats found with it)`` for one entry of ``saes``."""
    if isinstance(ref, (str, os.PathLike)):
        if not Path(ref).exists():
            raise ValueError(f"No such SAE folder: {os.fspath(ref)!r}.")
        folder = resolve_local_folder(Path(ref), None)
        stats: dict[str, Any] = {}
        record = folder / "training.json"  # written by repinf_lens.saes.training.train_sae
        if record.is_file():
            try:
                stats = dict(json.loads(record.read_text()).get("stats") or {})
            except (ValueError, AttributeError):
                stats = {}
        return None, folder, stats
    if hasattr(ref, "sae") and hasattr(ref, "stats"):  # repinf_lens.saes.training.TrainedSAE
        return ref.sae, None, dict(ref.stats or {})
    return ref, None, {}


def _write_sae(sae: Any, dest: Path) -> None:
    from sae_lens.saes.sae import TrainingSAE

    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(dest)  # inference config, training-only state folded away
    else:
        sae.save_model(dest)


def registry_block(
    release: str,
    repo_id: str,
    model: str,
    saes: list[dict[str, Any]],
    *,
    links: Mapping[str, str] | None = None,
) -> str:
    """The YAML block of one release in SAELens' ``pretrained_saes.yaml``.

    Args:
        release: the release name (top-level key).
        repo_id: Hugging Face repo holding the SAEs.
        model: the model name SAELens uses for the release (as in ``SAE.cfg.metadata.model_name``).
        saes: entries ``{"id", "path", "l0"?, "variance_explained"?, "neuronpedia"?}``; ``None`` values are left out
            (SAELens' parser then uses its defaults).
        links: optional ``links`` mapping (``model``, ``dataset``, ``publication``, ...).
    """
    entries = [{k: v for k, v in e.items() if v is not None} for e in saes]
    body: dict[str, Any] = {"repo_id": repo_id, "model": model, "conversion_func": None}
    if links:
        body["links"] = dict(links)
    body["saes"] = entries
    return yaml.safe_dump({release: body}, sort_keys=False, allow_unicode=True, width=1000)


def _model_card(
    *,
    repo_id: str,
    release: str,
    model_name: str,
    dataset: str | None,
    rows: list[dict[str, Any]],
    acc_keys: list[str],
    yaml_block: str,
    extra_metadata: Mapping[str, Any] | None,
) -> str:
    front: dict[str, Any] = {"library_name": "saelens", "tags": list(_DEFAULT_TAGS)}
    if _REPO_RE.match(model_name):
        front["base_model"] = model_name
    if dataset:
        front["datasets"] = [dataset]
    for key, value in (extra_metadata or {}).items():
        if key == "tags":
            front["tags"] = front["tags"] + [t for t in value if t not in front["tags"]]
        else:
            front[key] = value
    head = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"

    cols = ["SAE id", "hook", "d_in", "d_sae", "architecture", "k", "L0", "variance explained"]
    cols += [k.replace("_", " ") for k in acc_keys]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"`{r['id']}`", f"`{r['hook']}`", r["d_in"], r["d_sae"], r["architecture"], r["k"]]
        cells += [r["l0"], r["variance_explained"]] + [r["accuracy"].get(k) for k in acc_keys]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    table = "\n".join(lines)
    first = rows[0]["id"]
    trained_on = f" on `{dataset}`" if dataset else ""
    acc_note = (
        "\nTask accuracy columns are those reported by the publisher (e.g. `accuracy base`: the model alone; "
        "`accuracy with sae`: the SAE reconstruction replaces the activation; `accuracy with sae and error`: the "
        "reconstruction plus the SAE error, which equals the model).\n"
        if acc_keys
        else ""
    )
    return f"""{head}
# SAEs for {model_name}

Sparse autoencoders in [SAELens](https://github.com/decoderesearch/SAELens) format, trained on activations of
`{model_name}`{trained_on}. Each SAE is in its own folder (`<sae id>/cfg.json`, `<sae id>/sae_weights.safetensors`).
Published with `repinf_lens` (representation-level influence functions).

{table}
{acc_note}
L0 is the mean number of active latents per token; variance explained is `1 - ||x - x_hat||^2 / ||x - mean(x)||^2`.

## Loading

```python
from sae_lens import SAE

sae = SAE.from_pretrained("{repo_id}", "{first}")
```

or, checking it against the model it reads:

```python
from repinf_lens.saes.loading import load_sae

sae = load_sae("{repo_id}", "{first}", model=model)
```

## SAELens registry entry

The block below, added to SAELens' `pretrained_saes.yaml`, makes
`SAE.from_pretrained("{release}", "{first}")` work:

```yaml
{yaml_block.rstrip()}
```
"""


def publish_saes(
    saes: Mapping[str, Any],
    repo_id: str,
    *,
    out_dir: str | os.PathLike,
    release: str | None = None,
    model_name: str | None = None,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    task_accuracy: Mapping[str, Mapping[str, Any]] | None = None,
    dataset: str | None = None,
    dry_run: bool = True,
    private: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> PublishResult:
    """Write SAEs in SAELens layout with a model card and a registry block, and optionally upload them.

    Args:
        saes: ``{sae_id: SAE}``; a value may also be a SAELens SAE folder (path) or a
            :class:`repinf_lens.saes.training.TrainedSAE`. Training SAEs are written in inference form
            (``save_inference_model``). ``sae_id`` becomes the subfolder in the repo (``/`` allowed for nesting).
        repo_id: the Hugging Face repo ``owner/name``.
        out_dir: local folder to write into (created; existing ``<sae_id>`` subfolders are replaced).
        release: release name for the SAELens registry block (default: derived from the repo name).
        model_name: the model the SAEs read (default: ``cfg.metadata.model_name`` shared by the SAEs).
        stats: ``{sae_id: {"l0": .., "variance_explained": ..}}`` (``explained_variance`` also accepted). Missing
            values come from a ``TrainedSAE``'s stats, a folder's ``training.json``, or ``cfg.metadata``.
        task_accuracy: ``{sae_id: {"accuracy_base": .., "accuracy_with_sae": .., ...}}``, one column per key.
        dataset: the dataset the SAEs were trained on (model card ``datasets``).
        dry_run: only write files (default). ``False`` also uploads to ``repo_id``.
        private: create the repo as private (upload only).
        extra_metadata: extra model-card front-matter keys (e.g. ``{"license": "mit"}``); ``tags`` are appended.

    Returns:
        A :class:`PublishResult`.

    Raises:
        ValueError: no SAEs, a bad repo id or sae_id, or no model name known.
        ConnectionError: the upload could not reach the Hub (the files stay in ``out_dir``).
    """
    if not saes:
        raise ValueError("publish_saes needs at least one SAE: saes={sae_id: SAE or folder}.")
    if not _REPO_RE.match(repo_id):
        raise ValueError(f"Invalid Hugging Face repo id {repo_id!r}. Fix: use 'owner/name'.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    release = release or _default_release(repo_id)
    stats = stats or {}
    task_accuracy = task_accuracy or {}
    unknown = sorted(set(stats) - set(saes)) + sorted(set(task_accuracy) - set(saes))
    if unknown:
        raise ValueError(f"stats/task_accuracy name SAEs not in saes: {unknown}. SAE ids: {sorted(saes)}.")

    rows: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}
    model_names: list[str] = []
    for sae_id, ref in saes.items():
        _check_sae_id(sae_id)
        sae, src, found_stats = _unwrap(ref)
        dest = out / sae_id
        if src is not None:
            sae = load_sae(src)  # validates the folder; written back in inference form below
        if src is not None and dest.exists() and src.resolve() == dest.resolve():
            pass  # already in place (re-publishing out_dir itself)
        else:
            if dest.exists():
                shutil.rmtree(dest)
            _write_sae(sae, dest)
            if src is not None:
                for extra in _EXTRA_FILES:
                    if (src / extra).is_file():
                        shutil.copy2(src / extra, dest / extra)
        paths[sae_id] = dest
        meta = sae.cfg.metadata
        if meta.model_name:
            model_names.append(str(meta.model_name))
        given = {**found_stats, **dict(stats.get(sae_id, {}))}
        l0 = given.get("l0", meta.get("l0"))
        var = given.get("variance_explained", given.get("explained_variance", meta.get("variance_explained")))
        rows.append(
            {
                "id": sae_id,
                "hook": sae_hook_name(sae),
                "d_in": int(sae.cfg.d_in),
                "d_sae": int(sae.cfg.d_sae),
                "architecture": sae.cfg.architecture(),
                "k": getattr(sae.cfg, "k", None),
                "l0": _num(l0),
                "variance_explained": _num(var),
                "accuracy": {
                    k: _num(v) if _num(v) is not None else v for k, v in task_accuracy.get(sae_id, {}).items()
                },
            }
        )

    if model_name is None:
        distinct = sorted(set(model_names))
        if len(distinct) != 1:
            raise ValueError(
                f"Cannot tell which model the SAEs read (cfg.metadata.model_name: {distinct or 'none'}). "
                "Fix: pass model_name= (the name SAELens/TransformerLens loads, e.g. 'gpt2-small' or "
                "'Qwen/Qwen3-0.6B')."
            )
        model_name = distinct[0]
    _warn_on_release_clash(release, repo_id)

    acc_keys: list[str] = []
    for r in rows:
        acc_keys += [k for k in r["accuracy"] if k not in acc_keys]
    block = registry_block(
        release,
        repo_id,
        model_name,
        [{"id": r["id"], "path": r["id"], "l0": r["l0"], "variance_explained": r["variance_explained"]} for r in rows],
    )
    yaml_path = out / "pretrained_saes.yaml"
    write_text_atomic(yaml_path, block)
    readme = _model_card(
        repo_id=repo_id,
        release=release,
        model_name=model_name,
        dataset=dataset,
        rows=rows,
        acc_keys=acc_keys,
        yaml_block=block,
        extra_metadata=extra_metadata,
    )
    readme_path = out / "README.md"
    write_text_atomic(readme_path, readme)

    uploaded = False
    if not dry_run:
        _upload(paths, repo_id, readme_path, private=private)
        uploaded = True
    return PublishResult(
        out_dir=out,
        readme_path=readme_path,
        yaml_path=yaml_path,
        yaml_block=block,
        uploaded=uploaded,
        sae_paths=paths,
        release=release,
    )


def _warn_on_release_clash(release: str, repo_id: str) -> None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    known = get_pretrained_saes_directory().get(release)
    if known is not None and known.repo_id != repo_id:
        warnings.warn(
            f"SAELens already has a release named {release!r} (repo {known.repo_id!r}). "
            "Pass release= a new name before opening the registry PR.",
            UserWarning,
            stacklevel=3,
        )


def _upload(paths: Mapping[str, Path], repo_id: str, readme_path: Path, *, private: bool) -> None:
    import huggingface_hub
    import sae_lens
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        sae_lens.upload_saes_to_huggingface(
            {sae_id: path for sae_id, path in paths.items()}, hf_repo_id=repo_id, add_default_readme=False
        )
        huggingface_hub.HfApi().upload_file(
            path_or_fileobj=str(readme_path),
            path_in_repo="README.md",
            repo_id=repo_id,
            repo_type="model",
            commit_message="Add model card (repinf_lens)",
        )
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError) as e:
        raise ConnectionError(
            f"Could not upload to {repo_id!r}: the Hugging Face Hub is unreachable. The files are ready in "
            f"{str(readme_path.parent)!r}; retry with dry_run=False when online, or upload that folder with "
            f"`hf upload {repo_id} {readme_path.parent}`. Original error: {type(e).__name__}: {e}"
        ) from e
