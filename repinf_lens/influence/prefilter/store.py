"""Sketches of a whole training set on disk: build once (sharded, resumable, checksummed), reuse for every query.

:func:`build_sketches` writes a :class:`SketchStore` (``manifest.json`` + ``shards/shard_*.safetensors``);
:func:`open_store` opens a store folder or a shipped index by name (:func:`shipped_indexes`). Sign convention:
the stored sketches are of per-example theta2 gradients; their cosines are POSITIVE for a first-order proponent.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._cache import fingerprint_rows
from repinf_lens._io import as_rows
from repinf_lens._shards import (
    ManifestMismatchError,
    mmap_tensor,
    open_manifest,
    shard_checksum,
    shard_is_done,
    shard_plan,
    write_json_atomic,
    write_shard,
)
from repinf_lens.errors import check_choice, check_int
from repinf_lens.influence.prefilter.metrics import sketch_overlap
from repinf_lens.influence.prefilter.sketch import GradientSketcher, Projection, compact_grads, grad_dots, grad_norms
from repinf_lens.task.base import token_batches

__all__ = [
    "ManifestMismatchError",
    "SketchStore",
    "build_sketches",
    "open_store",
    "shipped_index_dir",
    "shipped_indexes",
]

_KIND = "repinf_lens.sketches"
_SIGN = (
    "cosine of per-example theta2 gradients; positive = the training gradient points along the test gradient "
    "(a first-order proponent)"
)


# ---------------------------------------------------------------------------------------------- the store
class SketchStore:
    """Sketches of a training set on disk (``manifest.json`` + ``shards/shard_*.safetensors``).

    Attributes:
        directory: the store's folder.
        manifest: the parsed ``manifest.json`` (fingerprint, ids, shard list, ...).
        ids: the training examples' ids, in order.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], shards: list[tuple[int, Tensor, Tensor]]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.ids: list[str] = list(manifest["ids"])
        self._shards = shards

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True, verify: bool = False) -> SketchStore:
        """Open a store written by :func:`build_sketches` (shards memory-mapped unless ``mmap=False``).

        ``verify=True`` also reads every shard and checks it against the sha256 in its header (a damaged shard
        is named in a warning, deleted and reported missing); by default only headers are read, so opening a
        large store stays cheap (:func:`build_sketches` verifies every finished shard when it resumes).

        Raises:
            FileNotFoundError: no ``manifest.json`` in ``directory``.
            RuntimeError: the store is incomplete (an interrupted :func:`build_sketches`, or a damaged shard).
        """
        d = Path(directory)
        path = d / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{d} holds no sketch store (no manifest.json). Fix: pass the out_dir given to build_sketches()."
            )
        manifest = json.loads(path.read_text())
        if manifest.get("kind") != _KIND:
            raise ValueError(f"{d} holds {manifest.get('kind')!r} outputs, not a sketch store.")
        shards = []
        missing = []
        for s in manifest["shards"]:
            f = d / s["file"]
            if not shard_is_done(
                f, fingerprint=manifest["fingerprint_hash"], start=s["start"], stop=s["stop"], verify=verify
            ):
                missing.append(s["index"])
                continue
            if mmap:
                shards.append((s["start"], mmap_tensor(f, "sketches"), mmap_tensor(f, "grad_norms")))
            else:
                from safetensors.torch import load_file

                t = load_file(str(f))
                shards.append((s["start"], t["sketches"], t["grad_norms"]))
        if missing:
            raise RuntimeError(
                f"The sketch store at {d} is incomplete: {len(missing)} of {len(manifest['shards'])} shards are "
                "missing (an interrupted build_sketches). Fix: rerun build_sketches(...) with the same arguments; "
                "it computes only the missing shards."
            )
        return cls(d, manifest, shards)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    def check_rows(self, rows: Any) -> None:
        """Raise ``ValueError`` unless the store was built over exactly ``rows`` (same ids, texts and order)."""
        rows = as_rows(rows, "training set")
        want = self.fingerprint.get("train")
        got = json.loads(json.dumps(fingerprint_rows(rows), default=str))
        if want != got:
            ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
            same_ids = ids == self.ids
            raise ValueError(
                f"The sketch store at {self.directory} was built over {self.n} other training rows than the "
                f"{len(rows)} given ({'same ids, other contents' if same_ids else 'other ids or order'}): its "
                "indices would name the wrong examples. Fix: pass the training rows the store was built with, or "
                "build a store for these rows with build_sketches(...)."
            )

    @property
    def config(self) -> dict[str, Any]:
        """The sketcher settings the store was built with (dim, seed, projection, ...)."""
        return self.manifest["fingerprint"]["sketch"]

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return self.n

    def iter_shards(self) -> Iterator[tuple[int, Float[Tensor, "n_shard dim"]]]:
        """``(start, sketches)`` per shard, in order (memory-mapped: nothing is read before it is used)."""
        for start, sk, _ in self._shards:
            yield start, sk

    @property
    def sketches(self) -> Float[Tensor, "n dim"]:
        """All sketches ``[N, dim]`` (a memory map with one shard, otherwise concatenated in memory)."""
        parts = [sk for _, sk, _ in self._shards]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def grad_norms(self) -> Float[Tensor, " n"]:
        """Exact (unprojected) per-example gradient norms ``[N]``."""
        return torch.cat([nrm for _, _, nrm in self._shards])

    @property
    def has_check(self) -> bool:
        """Whether the store was built with ``check_queries`` (exact cosines stored for validation)."""
        return "check_ids" in self.manifest

    def check_cosines(self) -> tuple[Float[Tensor, "q n"], Float[Tensor, "q n"]]:
        """``(exact, sketched)`` cosines ``[Q, N]`` of the check queries with every training example.

        ``exact`` uses the full theta2 gradients (the ``check_dots`` computed during :func:`build_sketches`
        and the exact norms); ``sketched`` is what :func:`prefilter` computes from the stored sketches.
        POSITIVE = first-order proponent in both.

        Raises:
            ValueError: the store was built without ``check_queries``.
        """
        if not self.has_check:
            raise ValueError(
                f"The sketch store at {self.directory} has no check queries. Fix: build it with "
                "build_sketches(..., check_queries=some_test_rows) (same pass, exact cosines stored)."
            )
        f = self.directory / "check.safetensors"
        q = len(self.manifest["check_ids"])
        if not shard_is_done(f, fingerprint=self.manifest["fingerprint_hash"], start=0, stop=q):
            raise RuntimeError(f"{f} is missing or from another build. Fix: rerun build_sketches(...).")
        q_sk, q_nrm = mmap_tensor(f, "query_sketches"), mmap_tensor(f, "query_norms")
        dots = torch.cat([mmap_tensor(self.directory / s["file"], "check_dots") for s in self.manifest["shards"]])
        tiny = torch.finfo(torch.float32).tiny
        exact = dots.T.float() / (q_nrm[:, None].float() * self.grad_norms[None, :].float()).clamp_min(tiny)
        sketched = self.cosines(q_sk)
        return exact, sketched

    def cosines(self, query_sketches: Float[Tensor, "q dim"]) -> Float[Tensor, "q n"]:
        """``[Q, N]`` cosine of each query sketch with every stored sketch (POSITIVE = first-order proponent).

        One matrix product ``[Q, dim] x [dim, n_shard]`` per shard, all queries together.
        """
        q = query_sketches.detach().float().cpu()
        q = q[None] if q.ndim == 1 else q
        tiny = torch.finfo(torch.float32).tiny
        qn = q / q.norm(dim=1, keepdim=True).clamp_min(tiny)
        out = torch.empty(q.shape[0], self.n)
        for start, sk in self.iter_shards():
            sk = sk.float()
            out[:, start : start + sk.shape[0]] = (qn @ sk.T) / sk.norm(dim=1).clamp_min(tiny)
        return out

    def check_report(self, fracs: Sequence[float] = (0.01, 0.05, 0.10)) -> dict[str, Any]:
        """How well the sketches preserve the exact cosine ranking of the check queries.

        Returns a dict: ``top_overlap`` (``{frac: share of the exact top-frac the sketch's top-frac also
        keeps}``, mean over queries, see :func:`sketch_overlap`), ``spearman`` / ``pearson`` (mean over queries
        of the rank / linear correlation of sketched and exact cosines over all N examples), ``max_abs_error``
        (largest |sketched - exact| cosine), and the sizes.
        """
        from repinf_lens._stats import spearman

        exact, sketched = self.check_cosines()
        q = exact.shape[0]
        pear = [float(torch.corrcoef(torch.stack([exact[i], sketched[i]]))[0, 1]) for i in range(q)]
        return {
            "n": self.n,
            "queries": q,
            "dim": self.dim,
            "projection": self.config.get("projection"),
            "top_overlap": {str(f): sketch_overlap(exact, sketched, f) for f in fracs},
            "spearman": sum(float(spearman(exact[i], sketched[i])) for i in range(q)) / q,
            "pearson": sum(pear) / q,
            "max_abs_error": float((exact - sketched).abs().max()),
        }


def _sketch_shard(
    sketcher: GradientSketcher,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    bar: Any,
    check: Mapping[str, Tensor] | None = None,
    max_tokens: int | None = None,
) -> dict[str, Tensor]:
    """Sketches and gradient norms of one shard's rows, batch by batch (memory: one batch of gradients, at most
    ``max_tokens`` padded tokens when given), plus the exact inner products with the check queries' gradients
    when ``check`` is given."""
    sks, norms, dots = [], [], []
    for lo, hi in token_batches(sketcher.task, rows, batch_size, max_tokens):
        batch = rows[lo:hi]
        grads: Any = sketcher.per_example_grads(sketcher.split.prepare(sketcher.task.collate(batch)))
        if not sketcher.exact:
            grads = compact_grads(grads)
        sks.append(sketcher.project(grads).cpu())
        norms.append(grad_norms(grads).cpu())
        if check is not None:
            dots.append(grad_dots(grads, check).cpu())
        del grads
        bar.update(len(batch))
    out = {"sketches": torch.cat(sks), "grad_norms": torch.cat(norms)}
    if check is not None:
        out["check_dots"] = torch.cat(dots)
    return out


def _check_gradients(
    sketcher: GradientSketcher, rows: Sequence[Mapping[str, Any]], batch_size: int, max_tokens: int | None = None
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Full theta2 gradients ``{name: [Q, *shape]}``, sketches ``[Q, dim]`` and norms ``[Q]`` of the check queries."""
    parts: list[dict[str, Tensor]] = []
    for lo, hi in token_batches(sketcher.task, rows, batch_size, max_tokens):
        parts.append(sketcher.per_example_grads(sketcher.split.prepare(sketcher.task.collate(rows[lo:hi]))))
    grads = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    del parts
    sketches, norms = sketcher.project(grads).cpu(), grad_norms(grads).cpu()
    flat = {k: v.reshape(v.shape[0], -1).float().contiguous() for k, v in grads.items()}
    return flat, sketches, norms


def build_sketches(
    attributor_or_split: Any,
    task: Any | None,
    train: Any,
    *,
    out_dir: str | os.PathLike,
    dim: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
    shard_size: int = 1024,
    projection: Projection = "sjlt",
    exact: bool = False,
    method: Literal["auto", "vmap", "loop"] = "auto",
    overwrite: bool = False,
    progress: bool = True,
    check_queries: Any | None = None,
    storage_dtype: Literal["float32", "float16"] = "float32",
    max_batch_tokens: int | None = None,
) -> SketchStore:
    """Sketch the per-example theta2 gradients of a whole training set ONCE and store them on disk.

    Writes ``out_dir/manifest.json`` (fingerprint of split, model weights, task, data, dim, seed, projection;
    the shard list; the ids) and ``out_dir/shards/shard_XXXXX.safetensors`` (``sketches [n, dim]`` float32 and
    the exact ``grad_norms [n]``), each shard atomically. Resumable: a rerun with the same arguments skips every
    finished shard (also after ``kill -9``). Memory: one batch of per-example gradients plus one shard of
    sketches.

    Args:
        attributor_or_split: an ``InfluenceAttributor`` or a :class:`~repinf_lens.split.SplitModel`.
        task: the task whose loss is differentiated (``None``: the split's/attributor's task).
        train: the training set (``datasets.Dataset``, list of dicts or dict of columns).
        out_dir: the store's folder.
        dim, seed, projection, exact, method: see :class:`GradientSketcher`.
        batch_size: examples per gradient batch.
        shard_size: examples per shard (the unit of resumption).
        overwrite: discard an existing store built from other inputs instead of raising.
        progress: show a tqdm bar.
        check_queries: optional query examples whose EXACT cosines with every training gradient are computed in
            the same pass (each batch's per-example gradients are dotted with the queries' full theta2
            gradients before projection; memory: ``len(check_queries) x |theta2|`` floats). They are stored as
            ``check_dots`` in the shards and the queries' sketches in ``check.safetensors``, and
            :meth:`SketchStore.check_report` then says how well the sketch preserves the exact ranking (top-k
            overlap, rank correlation) on your own data at no extra gradient pass.
        storage_dtype: ``"float16"`` halves the store on disk (e.g. an index shipped with a package); the
            rounding (relative 5e-4 per coordinate) is far below the projection's own error at any practical
            ``dim``. Matching always runs in float32.
        max_batch_tokens: also cap each gradient batch at this many padded tokens (rows x the longest row;
            :func:`~repinf_lens.task.token_batches`): bounds the peak memory on long prompts (MedQA) without
            slowing short ones. Memory only: not part of the store's fingerprint.

    Returns:
        The :class:`SketchStore`. Cosines between its sketches are POSITIVE for first-order proponents.

    Raises:
        ValueError: ``train`` is empty.
        ManifestMismatchError: ``out_dir`` holds a store built from other inputs (and ``overwrite`` is False).
    """
    check_int("build_sketches batch_size", batch_size, minimum=1)
    check_int("build_sketches shard_size", shard_size, minimum=1)
    check_int("build_sketches max_batch_tokens", max_batch_tokens, minimum=1, allow_none=True)
    check_choice("build_sketches storage_dtype", storage_dtype, ("float32", "float16"))
    rows = as_rows(train, "training set")
    sketcher = GradientSketcher(
        attributor_or_split,
        task,
        dim=dim,
        seed=seed,
        projection=projection,
        exact=exact,
        method=method,
    )
    out = Path(out_dir)
    n = len(rows)
    check_rows = None if check_queries is None else as_rows(check_queries, "check query set")
    fingerprint = json.loads(
        json.dumps(
            {
                "split": sketcher.split.fingerprint(),
                "train": fingerprint_rows(rows),
                "n": n,
                "sketch": sketcher.config,
                "shard_size": shard_size,
                **({} if check_rows is None else {"check": fingerprint_rows(check_rows)}),
                **({} if storage_dtype == "float32" else {"storage_dtype": storage_dtype}),
            },
            default=str,
        )
    )
    shards = shard_plan(n, shard_size)
    manifest = open_manifest(
        out,
        kind=_KIND,
        fingerprint=fingerprint,
        overwrite=overwrite,
        owned=("shards",),
        extra={
            "sign_convention": _SIGN,
            "n": n,
            "dim": sketcher.dim,
            "shard_size": shard_size,
            "ids": [str(r.get("id", i)) for i, r in enumerate(rows)],
            "shards": shards,
            "finished": [],
            "complete": False,
            **({} if check_rows is None else {"check_ids": [str(r.get("id", i)) for i, r in enumerate(check_rows)]}),
        },
    )
    fp = manifest["fingerprint_hash"]
    done = {
        s["index"] for s in shards if shard_is_done(out / s["file"], fingerprint=fp, start=s["start"], stop=s["stop"])
    }
    todo = [s for s in shards if s["index"] not in done]
    manifest["finished"] = sorted(done)
    # content sha256 per finished shard (the shard headers hold the same; checked on every resume)
    manifest["checksums"] = {s["file"]: shard_checksum(out / s["file"]) for s in shards if s["index"] in done}
    t0 = time.perf_counter()
    check = None
    if check_rows is not None:
        check_file = out / "check.safetensors"
        need = bool(todo) or not shard_is_done(check_file, fingerprint=fp, start=0, stop=len(check_rows))
        if need:  # the queries' full gradients (recomputed on resume: cheap next to the training pass)
            check, q_sk, q_nrm = _check_gradients(sketcher, check_rows, batch_size, max_batch_tokens)
            write_shard(check_file, {"query_sketches": q_sk, "query_norms": q_nrm}, fingerprint=fp, start=0,
                        stop=len(check_rows))  # fmt: skip
    with tqdm(total=sum(s["stop"] - s["start"] for s in todo), desc="sketches", disable=not progress) as bar:
        for s in todo:
            tensors = _sketch_shard(sketcher, rows[s["start"] : s["stop"]], batch_size, bar, check, max_batch_tokens)
            tensors["sketches"] = tensors["sketches"].to(getattr(torch, storage_dtype))
            manifest["checksums"][s["file"]] = write_shard(
                out / s["file"], tensors, fingerprint=fp, start=s["start"], stop=s["stop"]
            )
            done.add(s["index"])
            manifest["finished"] = sorted(done)
            write_json_atomic(out / "manifest.json", manifest)
    manifest["complete"] = True
    manifest.setdefault("runs", []).append(
        {"computed": [s["index"] for s in todo], "seconds": round(time.perf_counter() - t0, 3)}
    )
    write_json_atomic(out / "manifest.json", manifest)
    return SketchStore.load(out)


def shipped_index_dir(name: str) -> Path:
    """The package folder of a sketch index shipped with repinf_lens (``repinf_lens/assets/prefilter/<name>``)."""
    from importlib.resources import files

    return Path(str(files("repinf_lens.assets").joinpath("prefilter").joinpath(name)))


def shipped_indexes() -> list[str]:
    """Names of the sketch indexes shipped with repinf_lens."""
    root = shipped_index_dir(".")
    return sorted(p.parent.name for p in root.glob("*/manifest.json"))


def open_store(spec: SketchStore | str | os.PathLike) -> SketchStore:
    """A :class:`SketchStore` from itself, its folder, or the name of a shipped index (:func:`shipped_indexes`).

    Raises:
        FileNotFoundError: ``spec`` is neither a store folder nor a shipped index (the message lists them).
    """
    if isinstance(spec, SketchStore):
        return spec
    path = Path(os.fspath(spec)).expanduser()
    if (path / "manifest.json").exists():
        return SketchStore.load(path)
    if isinstance(spec, str) and (shipped_index_dir(spec) / "manifest.json").exists():
        return SketchStore.load(shipped_index_dir(spec))
    raise FileNotFoundError(
        f"{os.fspath(spec)!r} is neither a sketch store folder (with manifest.json) nor a shipped index "
        f"({shipped_indexes() or 'none shipped'}). Fix: pass the out_dir of build_sketches(...) or a shipped name."
    )
