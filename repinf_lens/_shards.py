"""Resumable sharded outputs on disk: a ``manifest.json`` plus safetensors shards, each written atomically.

Used by :func:`repinf_lens.prefiltering.build_sketches` and
:meth:`repinf_lens.influence.InfluenceAttributor.attribute_streaming`. A shard is written to a temporary file
in its final folder, flushed to disk and renamed, so a crash (even ``kill -9``) leaves every shard either
complete or absent. Each shard's safetensors header carries the run's fingerprint hash and its example range,
so a rerun recognises finished shards by reading headers only and never recomputes them; the manifest's
``finished`` list mirrors that state for people and monitoring scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "ManifestMismatchError",
    "fingerprint_hash",
    "write_json_atomic",
    "write_shard",
    "shard_is_done",
    "open_manifest",
    "mmap_tensor",
]

_MANIFEST = "manifest.json"


class ManifestMismatchError(ValueError):
    """An output folder holds a manifest written for different inputs (model, data, settings)."""


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 (32 hex digits) of the JSON of ``fingerprint`` (sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_replace(tmp: str, target: Path) -> None:
    """Flush ``tmp`` to disk, give it the usual permissions (mkstemp makes 0600) and rename it to ``target``."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
        _fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_shard(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], *, fingerprint: str, start: int, stop: int
) -> None:
    """Write one shard atomically; its header records the fingerprint hash and the example range."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            tmp,
            metadata={"fingerprint": fingerprint, "start": str(start), "stop": str(stop)},
        )
        _fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shard_is_done(path: str | os.PathLike, *, fingerprint: str, start: int, stop: int) -> bool:
    """True when ``path`` is a complete shard of this run (fingerprint and example range match)."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # an unreadable file is recomputed (and then replaced atomically)
        return False
    return meta.get("fingerprint") == fingerprint and meta.get("start") == str(start) and meta.get("stop") == str(stop)


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
        old = json.loads(path.read_text())
        if old.get("kind") == kind and old.get("fingerprint_hash") == fp_hash:
            return old
        if not overwrite:
            what = (
                f"differs in {_diff_keys(old.get('fingerprint', {}), fingerprint)}"
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
