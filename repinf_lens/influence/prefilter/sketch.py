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
import warnings
from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import grad
from tqdm.auto import tqdm

from repinf_lens._io import as_rows
from repinf_lens.curvature.hvp import per_example_grads
from repinf_lens.errors import check_choice, check_int
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = ["Compact", "GradientSketcher", "Projection", "compact_grads", "grad_dots", "grad_norms"]

Projection = Literal["sjlt", "rademacher"]
_CHUNK_ELEMS = 2**22  # random entries generated at a time for a dense block (16 MiB of float32)


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
    def from_store(cls, split: Any, store: Any, task: Any | None = None) -> GradientSketcher:
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
        return per_example_grads(self.split, params, inp)

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
