"""On-disk cache of s_test vectors (safetensors), keyed by everything they depend on.

Each entry's header records the sha256 of its tensors; :meth:`STestCache.get` checks it, so a damaged or
truncated entry is named in a :class:`~repinf_lens._shards.CorruptFileWarning`, deleted and reported as a miss
(the attributor then solves that s_test again and writes a healthy entry) instead of failing every later run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["STestCache", "cache_key"]


def cache_key(**parts: Any) -> str:
    """sha256 (24 hex digits) of the JSON of ``parts`` (model fingerprint, hook, theta2, solver, data, query)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class STestCache:
    """A folder of ``<key>.safetensors`` files with the solve's metadata in the safetensors header."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether ``key`` is cached, reading its header only (a truncated or unreadable entry is discarded
        with a warning and counts as missing; :meth:`get` also checks the tensors' checksum)."""
        from repinf_lens._shards import discard_corrupt

        p = self.path(key)
        if not p.exists():
            return False
        try:
            with safe_open(str(p), framework="pt") as fh:
                fh.metadata()
        except Exception as e:
            discard_corrupt(p, f"unreadable: {type(e).__name__}: {str(e)[:200]}")
            return False
        return True

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The cached tensors, or ``None`` when absent or damaged (checksum mismatch, truncated: then the file is
        named in a warning and deleted, so the caller recomputes and :meth:`put` heals the entry)."""
        from repinf_lens._shards import discard_corrupt, read_verified

        p = self.path(key)
        if not p.exists():
            return None
        _, tensors, problem = read_verified(p)
        if problem is not None:
            discard_corrupt(p, problem)
            return None
        return tensors

    def put(self, key: str, tree: dict[str, Tensor], meta: dict[str, Any] | None = None) -> Path:
        """Write atomically (unique temporary file, fsync, rename), so a crash never leaves a truncated entry;
        the header records the sha256 of the tensors (checked by :meth:`get`)."""
        from repinf_lens._fingerprint import state_digest
        from repinf_lens._io import atomic_file
        from repinf_lens._shards import CONTENT_KEY

        p = self.path(key)
        cpu = {k: v.detach().contiguous().cpu() for k, v in tree.items()}
        with atomic_file(p) as tmp:
            save_file(
                cpu,
                tmp,
                metadata={"meta": json.dumps(meta or {}, default=str), CONTENT_KEY: state_digest(cpu, cache=False)},
            )
        return p
