"""Resumable sharded outputs on disk: a ``manifest.json`` plus safetensors shards, each written atomically.

Used by :func:`repinf_lens.influence.prefilter.build_sketches` and
:meth:`repinf_lens.influence.InfluenceAttributor.attribute_streaming`. A shard is written to a temporary file
in its final folder, flushed to disk and renamed, so a crash (even ``kill -9``) leaves every shard either
complete or absent. Each shard's safetensors header carries the run's fingerprint hash, its example range and
a sha256 of its tensors' bytes (``content_sha256``), so a rerun recognises finished shards and never recomputes
them, while a shard whose bytes were damaged since (disk error, partial copy, a stray edit) is detected, named in a
:class:`CorruptFileWarning`, deleted and recomputed. The manifest's ``finished`` list and ``checksums`` (file ->
content digest) mirror that state for people and monitoring scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from repinf_lens._io import atomic_file, write_json_atomic, write_text_atomic
from repinf_lens.errors import RepinfLensError

__all__ = [
    "CorruptFileWarning",
    "ManifestMismatchError",
    "diff_fields",
    "fingerprint_hash",
    "mmap_tensor",
    "open_manifest",
    "read_verified",
    "shard_checksum",
    "shard_is_done",
    "verify_tensors_file",
    "write_json_atomic",
    "write_shard",
    "write_text_atomic",
]

_MANIFEST = "manifest.json"


class ManifestMismatchError(RepinfLensError, ValueError):
    """An output folder holds a manifest written for different inputs (model, data, settings)."""


class CorruptFileWarning(UserWarning):
    """A finished output or cache file failed its checksum (or could not be read); it is discarded and recomputed."""


CONTENT_KEY = "content_sha256"


def discard_corrupt(path: Path, why: str) -> None:
    warnings.warn(
        f"{path} is corrupted ({why}); it is discarded and recomputed. If this repeats, check the disk.",
        CorruptFileWarning,
        stacklevel=3,
    )
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 (32 hex digits) of the JSON of ``fingerprint`` (sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:32]


def write_shard(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], *, fingerprint: str, start: int, stop: int
) -> str:
    """Write one shard atomically; its header records the fingerprint hash, the example range and the sha256 of
    its tensors (returned)."""
    from repinf_lens._fingerprint import state_digest

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = state_digest(cpu, cache=False)
    with atomic_file(path) as tmp:
        save_file(
            cpu,
            tmp,
            metadata={"fingerprint": fingerprint, "start": str(start), "stop": str(stop), CONTENT_KEY: digest},
        )
    return digest


def read_verified(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor] | None, str | None]:
    """``(header metadata, tensors, problem)`` of a safetensors file written with a ``content_sha256`` entry.

    ``problem`` is ``None`` (and ``tensors`` the file's tensors) when the file reads back and its tensors' sha256
    equals the recorded one; otherwise ``tensors`` is ``None`` and ``problem`` a short reason (unreadable or
    truncated, no checksum, checksum mismatch).
    """
    from repinf_lens._fingerprint import state_digest

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            want = meta.get(CONTENT_KEY)
            if want is None:
                return meta, None, "it records no content checksum (written by an older repinf_lens)"
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # truncated, damaged header, unreadable
        return {}, None, f"unreadable: {type(e).__name__}: {str(e)[:200]}"
    got = state_digest(tensors, cache=False)
    if got != want:
        return meta, None, f"content sha256 {got[:12]}... differs from the recorded {want[:12]}..."
    return meta, tensors, None


def verify_tensors_file(path: str | os.PathLike) -> tuple[dict[str, str], str | None]:
    """``(header metadata, problem)``: :func:`read_verified` without keeping the tensors."""
    meta, _, problem = read_verified(path)
    return meta, problem


def shard_checksum(path: str | os.PathLike) -> str | None:
    """The content sha256 recorded in a shard's header (``None`` when absent or unreadable); reads the header only."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get(CONTENT_KEY)
    except Exception:
        return None


def shard_is_done(path: str | os.PathLike, *, fingerprint: str, start: int, stop: int, verify: bool = True) -> bool:
    """True when ``path`` is a complete shard of this run (fingerprint and example range match).

    With ``verify`` (default) the shard's tensors are read and checked against the sha256 in its header; a
    damaged or unreadable shard is named in a :class:`CorruptFileWarning`, deleted, and reported as not done (so
    it is recomputed). ``verify=False`` reads the header only.
    """
    path = Path(path)
    if not path.exists():
        return False
    if verify:
        meta, problem = verify_tensors_file(path)
    else:
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta, problem = dict(fh.metadata() or {}), None
        except Exception as e:
            meta, problem = {}, f"unreadable: {type(e).__name__}: {str(e)[:200]}"
    if meta.get("fingerprint", fingerprint) != fingerprint or meta.get("start", str(start)) != str(start):
        return False  # a shard of another run: recomputed and replaced atomically
    if meta.get("stop", str(stop)) != str(stop):
        return False
    if problem is not None:
        discard_corrupt(path, problem)
        return False
    return True


def diff_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries that differ between two JSON-like values (``["config.lr", "data_hash"]``)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_fields(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    same = json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str)
    return [] if same else [prefix[:-1] or "(value)"]


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [
        k
        for k in keys
        if json.dumps(old.get(k), sort_keys=True, default=str) != json.dumps(new.get(k), sort_keys=True, default=str)
    ]


def open_manifest(
    directory: str | os.PathLike,
    *,
    kind: str,
    fingerprint: Mapping[str, Any],
    overwrite: bool,
    owned: tuple[str, ...],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Create ``directory/manifest.json`` or check that the existing one was written for the same inputs.

    Args:
        directory: the output folder.
        kind: what the folder holds (``"repinf_lens.sketches"``, ``"repinf_lens.influence_shards"``).
        fingerprint: everything the outputs depend on (model, data, settings).
        overwrite: remove the files listed in ``owned`` (and nothing else) when the fingerprint differs.
        owned: names (files or folders) inside ``directory`` that this kind of output writes.
        extra: fields stored next to the fingerprint in a new manifest (shard list, ids, ...).

    Raises:
        ManifestMismatchError: the folder holds outputs for different inputs and ``overwrite`` is False.
    """
    directory = Path(directory)
    path = directory / _MANIFEST
    fp_hash = fingerprint_hash(fingerprint)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if not overwrite:
                raise ManifestMismatchError(
                    f"{path} is not valid JSON ({e}), so it is not known what the outputs in {directory} were "
                    "computed from. Fix: pass a new out_dir, or pass overwrite=True to discard them."
                ) from e
            old = {}
        if old.get("kind") == kind and old.get("fingerprint_hash") == fp_hash:
            return old
        if not overwrite:
            top = _diff_keys(old.get("fingerprint", {}), fingerprint)
            nested = diff_fields(old.get("fingerprint", {}), json.loads(json.dumps(fingerprint, default=str)))
            more = " ..." if len(nested) > 8 else ""
            detail = f" (fields: {', '.join(nested[:8])}{more})" if nested and nested != top else ""
            what = (
                f"differs in {top}{detail}"
                if old.get("kind") == kind
                else f"holds {old.get('kind')!r} outputs, not {kind!r}"
            )
            raise ManifestMismatchError(
                f"{directory} already holds a manifest written for other inputs (its fingerprint {what}). "
                "Resuming would mix results of different runs. Fix: pass a new out_dir, rerun with exactly "
                "the same model, data and settings to resume, or pass overwrite=True to discard the old outputs."
            )
        _remove_owned(directory, owned)
    elif any((directory / name).exists() for name in owned):
        if not overwrite:
            raise ManifestMismatchError(
                f"{directory} holds outputs ({[n for n in owned if (directory / n).exists()]}) but no {_MANIFEST}, "
                "so it is not known what they were computed from. Fix: pass a new out_dir, or pass "
                "overwrite=True to discard them."
            )
        _remove_owned(directory, owned)
    manifest = {"kind": kind, "format_version": 1, "fingerprint_hash": fp_hash, "fingerprint": dict(fingerprint)}
    manifest.update(extra)
    write_json_atomic(path, manifest)
    return manifest


def _remove_owned(directory: Path, owned: tuple[str, ...]) -> None:
    import shutil

    for name in (*owned, _MANIFEST):
        p = directory / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def mmap_tensor(path: str | os.PathLike, name: str) -> Tensor:
    """Memory-map tensor ``name`` of a safetensors file (read lazily by the OS, copy-on-write in memory).

    Falls back to reading the tensor when its dtype has no NumPy equivalent (bfloat16).
    """
    path = str(path)
    with open(path, "rb") as fh:
        (n_header,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n_header))
    info = header[name]
    shape = tuple(int(s) for s in info["shape"])
    dtype = _ST_DTYPES.get(info["dtype"])
    begin, end = info["data_offsets"]
    if dtype is None or end == begin:
        with safe_open(path, framework="pt") as fh:
            return fh.get_tensor(name)
    arr = np.memmap(path, dtype=dtype, mode="c", offset=8 + n_header + begin, shape=shape)
    return torch.from_numpy(arr)


def shard_plan(n: int, shard_size: int) -> list[dict[str, Any]]:
    """The manifest's shard list: contiguous ranges of ``shard_size`` examples over ``n``, one file each."""
    return [
        {"index": i, "file": f"shards/shard_{i:05d}.safetensors", "start": lo, "stop": min(n, lo + shard_size)}
        for i, lo in enumerate(range(0, n, shard_size))
    ]
