"""On-disk cache of s_test vectors (safetensors), keyed by everything they depend on."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["cache_key", "STestCache"]


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
        """Whether ``key`` is cached (without reading it)."""
        return self.path(key).exists()

    def get(self, key: str) -> dict[str, Tensor] | None:
        p = self.path(key)
        return load_file(str(p)) if p.exists() else None

    def put(self, key: str, tree: dict[str, Tensor], meta: dict[str, Any] | None = None) -> Path:
        """Write atomically (temporary file + rename), so a crash never leaves a truncated entry."""
        p = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tree.items()},
                tmp,
                metadata={"meta": json.dumps(meta or {}, default=str)},
            )
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return p
