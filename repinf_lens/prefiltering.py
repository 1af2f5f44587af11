"""Gradient-similarity prefilter (paper Section 5.3 and Appendix B.3): keep the top 1-10 % training candidates.

For a test query and every training example the paper ranks by the cosine of per-example loss gradients,

    sim(z_i, z_test) = <g_i, g_test> / (||g_i|| ||g_test||),   g = grad_theta2 loss(z),

and computes exact influence only for the best-ranked candidates. Here the gradients are taken with respect to
theta2 (the split's downstream parameters, the same ones influence differentiates) and compressed ONCE for the
whole training set into low-dimensional sketches ``S g`` (a seeded random projection with
``E[S^T S] = I``, so ``<S g, S h>`` is an unbiased estimate of ``<g, h>``; Johnson-Lindenstrauss). A query is
then one matrix product against the stored sketches.

Sign convention: the prefilter's scores are cosines. POSITIVE = the training gradient points along the test
gradient, i.e. up-weighting the example lowers the test loss to first order (a proponent under the identity
Hessian), matching the influence scores' POSITIVE = proponent. ``prefilter`` keeps the largest cosines (the
paper's TopK); ``absolute=True`` keeps the largest magnitudes (proponents and opponents).

Projections (``projection=``); neither ever builds a dense ``[P, dim]`` matrix for the whole parameter vector:

* ``"sjlt"`` (default; a sparse Johnson-Lindenstrauss transform / CountSketch, the sparse projection of
  GraSS-style gradient compression): every theta2 coordinate is added, with a random sign, to one random
  coordinate of the sketch. ``E[S^T S] = I`` and the
  variance of ``<S g, S h>`` is ``(||g||^2 ||h||^2 + <g, h>^2 - 2 sum_i g_i^2 h_i^2) / dim``, never more than a
  dense Gaussian projection's; only gradients concentrated on a few coordinates fare worse (heavier tails).
  Cost ``O(P)`` per example and ``O(P)`` random numbers per batch, so it scales to theta2 of ~10^8 parameters
  on a CPU.
* ``"rademacher"`` (TRAK-style dense JL): every tensor is multiplied by its own dense ``[n, dim]`` Rademacher
  block (entries +-1/sqrt(dim)). Cost ``O(n dim)`` per batch for the random numbers and per example for the
  product: the textbook JL guarantee, affordable for small theta2 or on a GPU.

A LoGra-style Kronecker factorisation (``A^T G B`` per weight matrix) was tried and rejected: a per-example
gradient of the unembedding is rank one (one answer position), the worst case for a Kronecker sketch, and it
gave 2-4x the cosine error of the two projections above at the same ``dim`` on the test models.

Both projections are applied tensor by tensor and chunk by chunk (at most 2**22 random entries at a time),
and the per-tensor sketches are SUMMED into one ``dim``-vector, which is exactly a projection of the
concatenated gradient. Random numbers come from CPU generators seeded by ``(seed, tensor name, chunk)`` only,
so the same settings give the same projection on any device, in any process and in any shard order. Generated
blocks are cached in memory up to ``cache_bytes``.

``exact=True`` skips the projection: the "sketch" is the full flattened per-example gradient (``dim = |theta2|``),
for small settings and tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import grad, vmap
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
from repinf_lens.errors import SettingsError, check_choice, check_float, check_int
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = [
    "GradientSketcher",
    "ManifestMismatchError",
    "PrefilterResult",
    "SketchStore",
    "build_sketches",
    "compact_grads",
    "grad_dots",
    "grad_norms",
    "open_store",
    "prefilter",
    "shipped_index_dir",
    "shipped_indexes",
    "sketch_overlap",
    "top_count",
]

Projection = Literal["sjlt", "rademacher"]
_KIND = "repinf_lens.sketches"
_CHUNK_ELEMS = 2**22  # random entries generated at a time for a dense block (16 MiB of float32)
_SIGN = (
    "cosine of per-example theta2 gradients; positive = the training gradient points along the test gradient "
    "(a first-order proponent)"
)


# ---------------------------------------------------------------------------------------------- projections
def _seed_for(seed: int, *parts: object) -> int:
    blob = "|".join(str(p) for p in (seed, *parts)).encode()
    return int(hashlib.sha256(blob).hexdigest()[:15], 16)


def _touched(g: Tensor) -> Tensor:
    """``g.ne(0).any(0)``, reduced in g's memory order (vmap's per-example gradients are often permuted views,
    and a reduction over a transposed layout is many times slower), returned in logical order."""
    order = sorted(range(1, g.ndim), key=lambda d: -g.stride(int(d)))
    touched = g.permute(0, *order).ne(0).any(0)
    inverse = [order.index(d) for d in range(1, g.ndim)]
    return touched.permute(*inverse)


Compact = dict[str, tuple[Tensor, Tensor | None]]


def compact_grads(grads: Mapping[str, Tensor]) -> Compact:
    """Per-example gradients ``{name: [B, *shape]}`` as ``{name: (values [B, m] float32, coords [m] | None)}``.

    Tensors whose non-zero coordinates (over the batch) are under a quarter of the tensor, e.g. the unembedding,
    whose gradient only touches the columns the loss reads, keep just those ``m`` coordinates (``coords``:
    their flat C-order indices); the others are flattened whole (``coords`` None). Reading a strided vmap
    gradient once here is many times cheaper than reducing over it in every consumer.
    """
    out: Compact = {}
    for name, g in grads.items():
        n = g.shape[0]
        live = _touched(g)
        n_live = int(live.sum())
        if n_live * 4 < live.numel():
            out[name] = (g[:, live].float(), live.flatten().nonzero().squeeze(1))
        else:
            out[name] = (g.reshape(n, -1).float(), None)
    return out


def _as_compact(grads: Mapping[str, Any]) -> Compact:
    first = next(iter(grads.values()))
    return cast(Compact, grads) if isinstance(first, tuple) else compact_grads(grads)  # already compact


def grad_norms(grads: Mapping[str, Any]) -> Float[Tensor, " batch"]:
    """Exact Euclidean norms ``[B]`` (float32) of per-example gradients ``{name: [B, *shape]}`` (or their
    :func:`compact_grads` form)."""
    comp = _as_compact(grads)
    first = next(iter(comp.values()))[0]
    norms = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    for vals, _ in comp.values():
        norms += vals.square().sum(1, dtype=torch.float64)
    return norms.sqrt().float()


def grad_dots(grads: Mapping[str, Any], against: Mapping[str, Tensor]) -> Float[Tensor, "batch q"]:
    """Exact inner products ``[B, Q]`` between per-example gradients ``{name: [B, *shape]}`` (or their
    :func:`compact_grads` form) and ``Q`` reference gradients ``{name: [Q, *shape]}`` (same keys; float32
    products, float64 sum over tensors). Coordinates no example touches are skipped."""
    comp = _as_compact(grads)
    first = next(iter(comp.values()))[0]
    q = next(iter(against.values())).shape[0]
    out = torch.zeros(first.shape[0], q, dtype=torch.float64, device=first.device)
    for name, (vals, coords) in comp.items():
        a = against[name].reshape(q, -1).to(device=vals.device, dtype=torch.float32)
        out += (vals @ (a if coords is None else a[:, coords]).T).double()
    return out.float()


class GradientSketcher:
    """Per-example gradients of the task loss w.r.t. theta2, projected to ``dim`` dimensions.

    Args:
        split: the :class:`~repinf_lens.split.SplitModel` (or an ``InfluenceAttributor``, whose split is used).
        task: the task whose loss is differentiated (default: the split's task).
        dim: sketch dimension (ignored with ``exact=True``).
        seed: seed of the random projection (the same seed gives the same projection everywhere).
        projection: ``"sjlt"`` (sparse JL / CountSketch, default) or ``"rademacher"`` (dense, TRAK-style);
            see the module docstring for the trade-off.
        exact: return the full flattened per-example gradients (``dim = |theta2|``) instead of a projection.
        method: ``"vmap"`` (``torch.func.vmap(grad(...))`` over the batch), ``"loop"`` (one ``grad`` per
            example) or ``"auto"`` (vmap, falling back to the loop with a warning if vmap fails).
        cache_bytes: generated projection blocks are kept in memory up to this many bytes.

    Sign convention: the sketches are gradients of the loss (not of its negative); cosines between them are
    POSITIVE when up-weighting one example lowers the other's loss to first order (a proponent).
    """

    def __init__(
        self,
        split: Any,
        task: Any | None = None,
        *,
        dim: int = 4096,
        seed: int = 0,
        projection: Projection = "sjlt",
        exact: bool = False,
        method: Literal["auto", "vmap", "loop"] = "auto",
        cache_bytes: int = 2**30,
    ) -> None:
        split = getattr(split, "split", split)
        if not isinstance(split, SplitModel):
            raise TypeError(f"Expected a SplitModel or an InfluenceAttributor, got {type(split).__name__}.")
        self.split = split if task is None or task is split.task else split.with_task(task)
        self.task = self.split.task
        check_choice("GradientSketcher projection", projection, ("sjlt", "rademacher"))
        check_choice("GradientSketcher method", method, ("auto", "vmap", "loop"))
        if not exact:
            check_int("GradientSketcher dim", dim, minimum=1, why="the sketch dimension")
        check_int("GradientSketcher cache_bytes", cache_bytes, minimum=0)
        params = self.split.downstream_params()
        self.shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.n_params = sum(v.numel() for v in params.values())
        self.exact = exact
        self.dim = self.n_params if exact else int(dim)
        self.seed = int(seed)
        self.projection: Projection = projection
        self.method = method
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, str, int], tuple[Tensor, ...]] = {}
        self._cached_bytes = 0

    @classmethod
    def from_store(cls, split: Any, store: SketchStore, task: Any | None = None) -> GradientSketcher:
        """A sketcher with the projection a store was built with (for query sketches); checks the split.

        Raises:
            ValueError: ``split`` (model weights, hook, SAE, theta2, task) is not the one the store was built for.
        """
        cfg = store.config
        sk = cls(
            split,
            task,
            dim=int(cfg["dim"]),
            seed=int(cfg["seed"]),
            projection=cfg["projection"] or "sjlt",
            exact=cfg["exact"],
        )
        want = store.fingerprint.get("split")
        got = json.loads(json.dumps(sk.split.fingerprint(), default=str))
        if want is not None and json.dumps(want, sort_keys=True) != json.dumps(got, sort_keys=True):
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise ValueError(
                f"The sketch store at {store.directory} was built for another split (differs in {diff}): query "
                "and training sketches would not be comparable. Fix: pass the split (model, hook, SAE, theta2, "
                "task) the store was built with, or rebuild the store with build_sketches(...) for this split."
            )
        if json.dumps(sk.config, sort_keys=True) != json.dumps(cfg, sort_keys=True):
            raise ValueError(
                f"The sketch store at {store.directory} used projection settings {cfg} but this version "
                f"computes {sk.config}. Fix: rebuild the store with build_sketches(..., overwrite=True)."
            )
        return sk

    @property
    def config(self) -> dict[str, Any]:
        """Everything the sketches depend on besides the split and the data (stored in the manifest)."""
        return {
            "over": "theta2",
            "exact": self.exact,
            "dim": self.dim,
            "seed": self.seed,
            "projection": None if self.exact else self.projection,
            "chunk_elems": _CHUNK_ELEMS,
            "theta2": {k: list(s) for k, s in self.shapes.items()},
        }

    # ------------------------------------------------------------------ gradients
    def per_example_grads(self, inp: SplitInputs) -> dict[str, Float[Tensor, "batch ..."]]:
        """Gradient of each example's loss w.r.t. theta2: ``{name: [B, *shape]}`` (detached, model dtype)."""
        params = self.split.downstream_params()
        if self.method in ("auto", "vmap"):
            try:
                return self._vmap_grads(params, inp)
            except Exception as err:  # any vmap limitation: fall back to the exact loop
                if self.method == "vmap":
                    raise
                warnings.warn(
                    f"vmap over per-example gradients failed ({type(err).__name__}: {err}); using a loop over "
                    "examples instead (same gradients, slower). Pass method='loop' to silence this.",
                    stacklevel=2,
                )
                self.method = "loop"
        return self._loop_grads(params, inp)

    def _vmap_grads(self, params: Params, inp: SplitInputs) -> dict[str, Tensor]:
        bt = inp.batch
        n = len(inp)
        names = [f.name for f in fields(bt)]
        batched = {
            k: getattr(bt, k) for k in names if isinstance(getattr(bt, k), Tensor) and getattr(bt, k).shape[:1] == (n,)
        }
        constant = {k: getattr(bt, k) for k in names if k not in batched}
        split = self.split

        def one(
            p: Params, lat: Tensor, err: Tensor | None, base: Tensor, anchor: Any, cols: dict[str, Tensor]
        ) -> Tensor:
            batch = type(bt)(**{k: v[None] for k, v in cols.items()}, **constant)
            single = SplitInputs(
                latents=lat[None],
                error=None if err is None else err[None],
                base=base[None],
                batch=batch,
                anchor=None if anchor is None else tuple(a[None] for a in anchor),
            )
            return split.inputs_loss(p, single)

        maybe = (0 if inp.error is not None else None, 0 if inp.anchor is not None else None)
        out = vmap(grad(one), in_dims=(None, 0, maybe[0], 0, maybe[1], 0))(
            params, inp.latents, inp.error, inp.base, inp.anchor, batched
        )
        return {k: v.detach() for k, v in out.items()}

    def _loop_grads(self, params: Params, inp: SplitInputs) -> dict[str, Tensor]:

        per: list[Params] = []
        for i in range(len(inp)):
            one = inp.slice(i, i + 1)
            per.append(grad(lambda p, one=one: self.split.inputs_loss(p, one))(params))
        return {k: torch.stack([g[k].detach() for g in per]) for k in params}

    # ------------------------------------------------------------------ projection
    def _block(self, name: str, chunk: int, rows: int, device: torch.device) -> tuple[Tensor, ...]:
        """The projection of coordinates ``chunk * C ...`` of tensor ``name`` (``C`` = rows per chunk)."""
        key = (name, self.projection, chunk)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        gen = torch.Generator().manual_seed(_seed_for(self.seed, *key))
        if self.projection == "rademacher":
            bits = torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8)
            scale = self.dim**-0.5
            block: tuple[Tensor, ...] = (bits.to(torch.float32).mul_(2.0 * scale).sub_(scale).to(device),)
        else:
            idx = torch.randint(0, self.dim, (rows,), generator=gen)
            sign = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
            block = (idx.to(device), sign.to(device))
        nbytes = sum(t.numel() * t.element_size() for t in block)
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[key] = block
            self._cached_bytes += nbytes
        return block

    def project(self, grads: Mapping[str, Any]) -> Float[Tensor, "batch dim"]:
        """Project per-example gradients ``{name: [B, *shape]}`` (theta2 keys; or their :func:`compact_grads`
        form) to sketches ``[B, dim]`` (float32)."""
        if self.exact:
            if isinstance(next(iter(grads.values())), tuple):
                raise TypeError("exact=True sketches need the raw per-example gradients, not compact_grads().")
            n = next(iter(grads.values())).shape[0]
            return torch.cat([grads[k].reshape(n, -1).float() for k in self.shapes], dim=1)
        comp = _as_compact(grads)
        first = next(iter(comp.values()))[0]
        n, device = first.shape[0], first.device
        out = torch.zeros(n, self.dim, dtype=torch.float32, device=device)
        rows = _CHUNK_ELEMS if self.projection == "sjlt" else max(1, _CHUNK_ELEMS // self.dim)
        for name in self.shapes:
            vals, coords = comp[name]
            numel = math.prod(self.shapes[name])
            if coords is not None:  # e.g. the unembedding: only the columns the loss reads are non-zero
                if coords.numel() == 0:
                    continue
                chunk_of = coords // rows
                for c in chunk_of.unique().tolist():
                    sel = (chunk_of == c).nonzero().squeeze(1)
                    off = coords[sel] - c * rows
                    block = self._block(name, c, min(rows, numel - c * rows), device)
                    if self.projection == "rademacher":
                        out.addmm_(vals[:, sel], block[0][off])
                    else:
                        out.index_add_(1, block[0][off], vals[:, sel] * block[1][off])
                continue
            for c, lo in enumerate(range(0, numel, rows)):
                part = vals[:, lo : lo + rows]
                block = self._block(name, c, part.shape[1], device)
                if self.projection == "rademacher":
                    out.addmm_(part, block[0])
                else:
                    out.index_add_(1, block[0], part * block[1])
        return out

    def sketch_inputs(self, inp: SplitInputs) -> tuple[Float[Tensor, "batch dim"], Float[Tensor, " batch"]]:
        """Sketches ``[B, dim]`` and exact gradient norms ``[B]`` of a prepared batch."""
        grads = self.per_example_grads(inp)
        if self.exact:
            return self.project(grads), grad_norms(grads)
        comp = compact_grads(grads)
        del grads
        return self.project(comp), grad_norms(comp)

    def sketch(self, examples: Any, *, batch_size: int = 8, progress: bool = False) -> Float[Tensor, "n dim"]:
        """Sketches ``[N, dim]`` (CPU, float32) of examples (a dict, a list of dicts or a ``datasets.Dataset``)."""
        rows = as_rows(examples, "example set")
        parts = []
        for lo in tqdm(range(0, len(rows), batch_size), desc="sketch", disable=not progress):
            inp = self.split.prepare(self.task.collate(rows[lo : lo + batch_size]))
            parts.append(self.sketch_inputs(inp)[0].cpu())
        return torch.cat(parts)


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
        sketched = prefilter(q_sk, self, top_k=1).all_scores
        return exact, sketched

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
) -> dict[str, Tensor]:
    """Sketches and gradient norms of one shard's rows, batch by batch (memory: one batch of gradients), plus
    the exact inner products with the check queries' gradients when ``check`` is given."""
    sks, norms, dots = [], [], []
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo : lo + batch_size]
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
    sketcher: GradientSketcher, rows: Sequence[Mapping[str, Any]], batch_size: int
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Full theta2 gradients ``{name: [Q, *shape]}``, sketches ``[Q, dim]`` and norms ``[Q]`` of the check queries."""
    parts: list[dict[str, Tensor]] = []
    for lo in range(0, len(rows), batch_size):
        parts.append(
            sketcher.per_example_grads(sketcher.split.prepare(sketcher.task.collate(rows[lo : lo + batch_size])))
        )
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

    Returns:
        The :class:`SketchStore`. Cosines between its sketches are POSITIVE for first-order proponents.

    Raises:
        ValueError: ``train`` is empty.
        ManifestMismatchError: ``out_dir`` holds a store built from other inputs (and ``overwrite`` is False).
    """
    check_int("build_sketches batch_size", batch_size, minimum=1)
    check_int("build_sketches shard_size", shard_size, minimum=1)
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
            check, q_sk, q_nrm = _check_gradients(sketcher, check_rows, batch_size)
            write_shard(check_file, {"query_sketches": q_sk, "query_norms": q_nrm}, fingerprint=fp, start=0,
                        stop=len(check_rows))  # fmt: skip
    with tqdm(total=sum(s["stop"] - s["start"] for s in todo), desc="sketches", disable=not progress) as bar:
        for s in todo:
            tensors = _sketch_shard(sketcher, rows[s["start"] : s["stop"]], batch_size, bar, check)
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


# ---------------------------------------------------------------------------------------------- querying
def top_count(n: int, *, top_k: int | None = None, top_fraction: float | None = None) -> int:
    """How many of ``n`` candidates are kept: ``min(top_k, n)`` or ``max(1, ceil(top_fraction * n))``.

    Exactly one of ``top_k`` and ``top_fraction`` must be given.
    """
    if (top_k is None) == (top_fraction is None):
        raise SettingsError(
            f"Pass exactly one of top_k and top_fraction, got top_k={top_k} and top_fraction={top_fraction}. "
            "Fix: e.g. top_fraction=0.05 keeps the top 5 %, top_k=100 the best 100."
        )
    if top_k is not None:
        check_int("top_k", top_k, minimum=1, why="training examples kept per query")
        return min(int(top_k), n)
    assert top_fraction is not None
    check_float(
        "top_fraction", top_fraction, minimum=0.0, inclusive=False, maximum=1.0,
        fix="pass a share in (0, 1], e.g. 0.05 keeps the top 5 % (the paper: 0.01-0.1).",
    )  # fmt: skip
    return max(1, min(n, math.ceil(top_fraction * n - 1e-9)))


@dataclass
class PrefilterResult:
    """Training candidates kept per query by the gradient-similarity prefilter.

    Attributes:
        indices: ``[Q, k]`` indices into the training set, best first.
        scores: ``[Q, k]`` their cosine similarity with the query gradient (POSITIVE = first-order proponent).
        ids: per query, the kept examples' ids (best first).
        all_scores: ``[Q, N]`` the cosine of every training example (for overlap checks and thresholds).
    """

    indices: Int[Tensor, "q k"]
    scores: Float[Tensor, "q k"]
    ids: list[list[str]]
    all_scores: Float[Tensor, "q n"] = field(repr=False)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def select(self, train: Any, q: int = 0) -> list[dict[str, Any]]:
        """The kept training examples for query ``q`` (best first), ready for ``attributor.attribute``."""
        rows = as_rows(train, "training set")
        if len(rows) != self.all_scores.shape[1]:
            raise ValueError(
                f"The training set has {len(rows)} examples but the prefilter scored {self.all_scores.shape[1]}. "
                "Fix: pass the training set the sketch store was built from."
            )
        return [rows[i] for i in self.indices[q].tolist()]

    def union(self) -> Int[Tensor, " m"]:
        """Sorted indices kept for at least one query."""
        return torch.unique(self.indices)


def prefilter(
    query: Any,
    store: SketchStore | str | os.PathLike,
    *,
    split: Any | None = None,
    top_fraction: float | None = None,
    top_k: int | None = None,
    over: str = "theta2",
    absolute: bool = False,
    batch_size: int = 8,
) -> PrefilterResult:
    """Keep the training examples whose gradients have the largest cosine with each query's gradient.

    Args:
        query: query sketches ``[dim]`` or ``[Q, dim]`` made with the store's projection (e.g.
            ``GradientSketcher.from_store(split, store).sketch(queries)``), or query examples (a dict, list of
            dicts or dataset), which are sketched here with the store's projection (needs ``split``).
        store: a :class:`SketchStore` or its folder.
        split: the ``SplitModel``/``InfluenceAttributor`` the store was built with (only for query examples).
        top_fraction: keep ``max(1, ceil(top_fraction * N))`` examples per query (the paper: 0.01-0.10).
        top_k: keep ``min(top_k, N)`` examples per query (exactly one of ``top_k``/``top_fraction``).
        over: the parameters the gradients are taken over; only ``"theta2"`` (the split's downstream
            parameters, those influence differentiates) is supported.
        absolute: rank by ``|cosine|`` (keep opponents too) instead of by cosine.
        batch_size: batch size for sketching query examples.

    Returns:
        A :class:`PrefilterResult`; its scores are cosines, POSITIVE = first-order proponent. Cost: one matrix
        product ``[Q, dim] x [dim, n_shard]`` per shard for all queries together.

    Raises:
        SettingsError: not exactly one of ``top_k`` / ``top_fraction``, or one out of range (checked first).
    """
    top_count(1, top_k=top_k, top_fraction=top_fraction)  # impossible settings fail before any gradient
    check_int("prefilter batch_size", batch_size, minimum=1)
    if over != "theta2":
        raise ValueError(
            f"over={over!r} is not supported: sketches are gradients w.r.t. theta2, the split's downstream "
            "parameters. Fix: pass over='theta2' (choose theta2 with SplitModel(..., downstream=...))."
        )
    if not isinstance(store, SketchStore):
        store = SketchStore.load(store)
    if store.config.get("over", "theta2") != over:
        raise ValueError(f"The store holds gradients over {store.config.get('over')!r}, not {over!r}.")
    if isinstance(query, Tensor):
        q = query.detach().float().cpu()
        q = q[None] if q.ndim == 1 else q
    else:
        if split is None:
            raise ValueError(
                "Query examples need the split to compute their gradients. Fix: prefilter(queries, store, "
                "split=attributor_or_split, ...), or pass query sketches from GradientSketcher.from_store(...)."
            )
        q = GradientSketcher.from_store(split, store).sketch(query, batch_size=batch_size)
    if q.ndim != 2 or q.shape[1] != store.dim:
        raise ValueError(
            f"Query sketches have shape {tuple(q.shape)} but the store's sketches have dim={store.dim}. Fix: sketch "
            "the queries with GradientSketcher.from_store(split, store) (same dim, seed and projection)."
        )
    k = top_count(store.n, top_k=top_k, top_fraction=top_fraction)
    qn = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    all_scores = torch.empty(q.shape[0], store.n)
    for start, sk in store.iter_shards():
        sk = sk.float()
        cos = (qn @ sk.T) / sk.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        all_scores[:, start : start + sk.shape[0]] = cos
    key = all_scores.abs() if absolute else all_scores
    idx = torch.topk(key, k, dim=1).indices
    return PrefilterResult(
        indices=idx,
        scores=all_scores.gather(1, idx),
        ids=[[store.ids[i] for i in row] for row in idx.tolist()],
        all_scores=all_scores,
    )


def sketch_overlap(
    exact_scores: Float[Tensor, "*q n"], sketch_scores: Float[Tensor, "*q n"], frac: float = 0.05
) -> float:
    """Share of the exact top-``frac`` candidates that the sketch's top-``frac`` also keeps (mean over queries).

    Both arguments are scores of the same N training examples (``[N]`` or ``[Q, N]``), e.g. exact cosines
    from ``exact=True`` sketches and approximate ones from projected sketches (larger = kept; POSITIVE cosine =
    first-order proponent). ``k = max(1, ceil(frac * N))``; 1.0 means the sketch keeps the same candidates.
    """
    a = exact_scores[None] if exact_scores.ndim == 1 else exact_scores
    b = sketch_scores[None] if sketch_scores.ndim == 1 else sketch_scores
    if a.shape != b.shape:
        raise ValueError(f"Score shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.")
    k = top_count(a.shape[1], top_fraction=frac)
    ta = torch.topk(a, k, dim=1).indices
    tb = torch.topk(b, k, dim=1).indices
    shared = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)]
    return float(sum(shared) / len(shared))
