"""Files on disk, written so that a crash never leaves a half-written one; and the examples a caller passes, as rows.

Every file repinf_lens writes goes through here:

* :func:`atomic_file` (a temporary path for a writer that wants a file name, such as safetensors'
  ``save_file``), :func:`write_bytes_atomic`, :func:`write_text_atomic` and :func:`write_json_atomic`: a unique
  temporary file in the target's own folder, flushed to disk (fsync), given the usual permissions and renamed
  onto the target in one ``os.replace``. A failure part-way (full disk, ``kill -9``) leaves the previous file
  untouched and no temporary file behind; concurrent writers never share a temporary file (the last rename wins).
* :func:`atomic_dir`: the same for a whole folder (a staging folder next to it, renamed onto it).
* :func:`cached_json`: a compute-or-read cache of one JSON record, keyed by what it was computed from.

:func:`as_rows` turns whatever holds the examples (a ``datasets.Dataset``, a list of dicts, a dict of columns or
one example) into a list of dicts. Only the standard library is imported, so every module can use this one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from repinf_lens._version import __version__

__all__ = [
    "as_rows",
    "atomic_dir",
    "atomic_file",
    "cached_json",
    "fsync_replace",
    "is_example",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_manifest",
    "write_text_atomic",
]


# ------------------------------------------------------------------------------------------------ atomic files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_replace(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Flush ``tmp`` to disk, give it the usual permissions (mkstemp makes 0600) and rename it to ``target``."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield the name of a new, empty temporary file next to ``path``; on success it replaces ``path``.

    For writers that take a file name (``safetensors.torch.save_file(tensors, tmp)``). The temporary file is
    unique to the call (``.<name>-XXXX.tmp`` in ``path``'s folder, which is created); when the block ends it is
    flushed to disk, given the usual permissions and renamed onto ``path``. When the block raises, ``path`` is
    left as it was and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and one rename.

    A failure part-way leaves the previous file at ``path`` untouched and no temporary file behind. Parent
    folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync and one rename.

    The bytes are written as given (no newline translation). A failure part-way (full disk, ``kill -9``) leaves
    the previous file at ``path`` untouched and no temporary file behind. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
        fsync_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2; what JSON cannot hold as ``str``) to ``path``, atomically
    (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------------------------- atomic folders


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


# ------------------------------------------------------------------------------------------ compute-or-read cache


def cached_json(
    path: str | os.PathLike, key: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]]
) -> dict[str, Any]:
    """The JSON record at ``path`` when it was written for the same ``key``, else ``{"key": key, **compute()}``
    (written to ``path`` atomically, then returned).

    ``key`` holds everything the record depends on (model and weights digest, template, example ids, ...); it is
    compared after a JSON round trip (``str`` for what JSON cannot hold), so tuples and lists compare equal. A
    unique temporary file per write: concurrent runs never share one, and the last one's record stays.
    """
    path = Path(path)
    key = json.loads(json.dumps(dict(key), default=str))
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("key") == key:
            return rec
    rec = {"key": key, **compute()}
    write_json_atomic(path, rec)
    return rec


# ---------------------------------------------------------------------------------------------------- the rows


def is_example(data: Any) -> bool:
    """Whether ``data`` is ONE example (a mapping with some non-column field) rather than a dict of columns.

    A dict of columns maps every field to a list / tuple / array of one value per example; a single example
    has at least one scalar field (its question, prompt, id, label, ...), whatever the task.
    """
    if not isinstance(data, Mapping) or not data:
        return False
    return not all(isinstance(v, (list, tuple)) or len(getattr(v, "shape", ())) >= 1 for v in data.values())


def as_rows(data: Any, what: str | None = None) -> list[dict[str, Any]]:
    """Examples as a list of dicts: a list of mappings, a ``datasets.Dataset``, a dict of columns or one example
    (of any task: a mapping with a scalar field, :func:`is_example`).

    Args:
        data: the examples.
        what: what they are, for the error message (``"training set"``); when given, no examples is an error.

    Raises:
        ValueError: ``what`` is given and ``data`` holds no example.
    """
    if is_example(data):
        rows = [dict(data)]
    elif isinstance(data, Mapping):
        keys = list(data)
        n = len(data[keys[0]]) if keys else 0
        rows = [{k: data[k][i] for k in keys} for i in range(n)]
    else:
        rows = [dict(ex) for ex in data]
    if what is not None and not rows:
        raise ValueError(f"The {what} is empty. Fix: pass at least one example.")
    return rows


def write_manifest(folder: str | os.PathLike, stage: str, args: dict[str, Any], **extra: Any) -> Path:
    """Write ``folder/manifest.json``: which stage, with which arguments, produced the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"stage": stage, "repinf_lens": __version__, "args": args, **extra}
    write_json_atomic(folder / "manifest.json", rec)
    return folder / "manifest.json"
