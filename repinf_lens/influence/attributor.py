"""InfluenceAttributor: batching, caching and progress around the pure influence math.

Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test query's loss).

Many queries share each pass: s_test vectors missing from the cache are solved together
(:meth:`InverseHessianSolver.solve_many`: batched HVPs), and each training batch is scored for all queries at once
(:func:`~repinf_lens.influence.math.latent_influence_multi`: one primal pass, the queries' tangents under ``vmap``).
``query_chunk_size`` bounds how many queries share a pass (memory grows with it).

Latent scores are gradient x input by default (the paper's Def. 4.2, one swap per batch; its latent sum is only a
first-order estimate of the example score); ``latent_method="ig"`` computes integrated gradients along r(a) = a r
instead (``ig_steps`` quadrature nodes, exactly complete: latent sum + P(0) = example score up to the quadrature
error). Every attribution (:meth:`InfluenceAttributor.attribute`, ``attribute_streaming``,
``attribute_distributed``) scores through the same ``_score_range`` and honours it; ``diagnostics["baseline"]``
holds P(0) (all latents off, SAE error and decoder bias kept) for both methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._cache import cache_dir as default_cache_dir
from repinf_lens._cache import fingerprint_rows
from repinf_lens._dist import broadcast_s_test, is_distributed, shard_ranges
from repinf_lens._io import as_rows as io_rows
from repinf_lens._io import write_json_atomic
from repinf_lens._shards import open_manifest, shard_checksum, shard_is_done, shard_plan, write_shard
from repinf_lens.curvature.cache import STestCache, cache_key
from repinf_lens.curvature.hvp import dataset_hvp, loss_grad, per_example_grads, prepared_dataset_hvp
from repinf_lens.curvature.solvers import CG, InverseHessianSolver, SolveInfo
from repinf_lens.errors import NonFiniteError, check_finite, check_int
from repinf_lens.influence.math import LatentInfluence, check_latent_method, latent_influence_multi, stack_queries
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import Params, SplitInputs, SplitModel
from repinf_lens.task.base import token_batches

__all__ = ["InfluenceAttributor", "as_rows"]


def as_rows(data: Any, what: str = "dataset") -> list[dict[str, Any]]:
    """A ``datasets.Dataset``, a list of dicts, a dict of columns or a single example (of any task: a mapping
    with a scalar field, :func:`repinf_lens._io.is_example`) -> list of dicts; no examples is a ``ValueError``
    naming ``what`` (:func:`repinf_lens._io.as_rows`)."""
    return io_rows(data, what)


_STREAM_KIND = "repinf_lens.influence_shards"
_SIGN = "positive = proponent (up-weighting the training example lowers the test loss)"


def _data_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    return fingerprint_rows(rows)[:24]


def _row_id(row: Mapping[str, Any], i: int) -> str:
    return str(row.get("id", i))


def _check_scores(
    example: Tensor, latent: Tensor, query_id: str, t_rows: Sequence[Mapping[str, Any]], start: int
) -> None:
    """Raise :class:`NonFiniteError` naming the query and the training examples whose scores are NaN/inf.

    ``example`` is ``[n]``, ``latent`` ``[n, d_sae]`` for training examples ``start:start+n`` of ``t_rows``.
    """
    bad = ~torch.isfinite(example)
    if latent.numel():
        bad |= ~torch.isfinite(latent).all(-1)
    if not bool(bad.any()):
        return
    idx = (bad.nonzero().squeeze(1) + start).tolist()
    ids = [_row_id(t_rows[i], i) for i in idx[:10]]
    more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
    raise NonFiniteError(
        f"Influence scores of query {query_id!r} are NaN/inf for {len(idx)} training example(s): {ids}{more}. Fix: "
        "check those examples, the model weights and the SAE for NaN/inf (with float16/bfloat16 or amp_dtype try "
        "float32), and raise the damping if s_test is very large."
    )


class InfluenceAttributor:
    """Compute example-, latent- and token-level influence of training examples on test queries.

    Args:
        split: the :class:`~repinf_lens.split.SplitModel` (hook, SAE, theta2).
        task: the task whose loss is attributed (default: the split's task).
        hessian: the inverse-Hessian solver (default ``CG(damping=1e-3, max_iter=20, batch_size=8)``).
        batch_size: training examples per influence batch (memory only: scores do not depend on it).
        cache_dir: where s_test vectors are cached (default ``$REPINF_LENS_CACHE/s_test``); ``None`` +
            ``use_cache=False`` disables the cache.
        store_token_scores: keep sparse token-level latent scores in the result (needed for heatmaps).
        swap_chunk_size: run the derivative swap this many examples at a time (lower peak memory, same scores).
        max_batch_tokens: also cap each training batch at this many padded tokens (rows x the longest row;
            :func:`~repinf_lens.task.token_batches`), for long prompts (MedQA). Memory only, like ``batch_size``.
        input_cache_mb: the upstream part (everything below the split, :meth:`SplitModel.prepare
            <repinf_lens.split.SplitModel.prepare>`) of each Hessian batch runs ONCE: :meth:`fit` keeps its
            prepared inputs, up to this many MB (default 2048; ``None`` = no cap), and every later pass over the
            same batch reuses them: the solver's factor passes (K-FAC's covariances, EK-FAC's correction pass), the
            HVP batches and the scoring of those rows (when ``train`` is the Hessian data batched alike: the same
            rows and batch size, no ``max_batch_tokens``). The reuse is exact (the same tensors). CG's HVP batches
            are kept whatever the cap (the solver needs them); ``0`` keeps nothing else. ``result.meta
            ["reused_upstream_batches"]`` counts the training batches scored from kept inputs.
        query_chunk_size: queries that share one pass: one swap per training batch (their tangents under
            ``vmap``) and one batched HVP per CG iteration (default 8; ``None`` = all queries at once). Larger is
            faster, but the tangent part of the swap and of the HVPs, and the CG state (about 7 theta2-sized
            vectors per query), grow with it: lower it when memory is tight. Scores do not change.
        amp_dtype: mixed precision: ``torch.autocast`` with this dtype (``torch.bfloat16`` on a GPU) around the
            query gradients, the HVPs and the derivative swap; parameters, s_test and scores stay in the model
            dtype. ``None`` (default) = full precision. Part of the s_test cache key and of the streaming
            manifest. Its effect on the scores is measured by ``benchmarks/bench_scale.py --amp``.
        latent_method: how latent (and token) scores are computed. ``"grad_x_input"`` (default; the paper's
            Def. 4.2): ``r * grad_r P(r)`` with P(r) = <G(r), s_test>, one swap per batch; its latent sum is a
            first-order estimate of P(r) - P(0), not complete. ``"ig"``: integrated gradients along r(a) = a r
            (SAE error and decoder bias held), ``r * int_0^1 grad_r P(a r) da``; latent sum + P(0) = the example
            score up to the quadrature error (:func:`~repinf_lens.influence.math.latent_influence_ig`). IG costs
            ``ig_steps + 1`` swaps per batch; ``swap_chunk_size`` then counts (training example x node)
            evaluations per swap, default ``batch_size`` (the same peak memory as a gradient x input swap; raise
            it on a GPU). Example scores are the same for both. Recorded in ``result.meta["latent_method"]`` and
            in the streaming manifest (a streamed folder of one method is never resumed or returned for the
            other); the s_test cache is shared (s_test does not depend on it). ``"none"``: example scores only,
            as Kronfluence, dattri and TRAK compute them: per training batch one forward-mode JVP of the
            per-example losses along every s_test (no backward pass, no latent or token scores), several times
            cheaper than a swap; ``latent_scores`` is then ``[Q, N, 0]`` and the latent views of the result refuse
            (for LDS / LOO harnesses, prefilter checks and bulk example rankings).
        ig_steps, ig_rule: the quadrature of ``"ig"`` (:func:`~repinf_lens.influence.math.ig_quadrature`):
            ``ig_steps`` nodes (default 64); ``ig_rule="graded"`` (default: Gauss-Legendre on the panels
            [0, 1/8, 1/4, 1/2, 1], most nodes where the real model's path varies fastest) or ``"gauss"`` (on
            [0, 1]), both converging exponentially on smooth models once the nodes resolve the path, or
            ``"midpoint"`` (O(ig_steps^-2)). On the shipped model at layer 22, 64 graded nodes leave a median
            identity error of 0.3 % of the score (up to 10 % on pairs whose P(r) is tiny next to P(0)), 32 nodes
            1.8 %; the latent ranking moves by 1-2 % (L2) between 32 and 64. ``result.completeness()`` reports the
            error per pair, and pairs off by more than 1 % raise a ``RuntimeWarning``.
        baseline: compute P(0) per pair (``diagnostics["baseline"]``; ``result.completeness()`` needs it): one
            forward JVP per training batch. For gradient x input that is NOT cheap: +65 % scoring time on the
            shipped L22 split on a CPU (1.0 s next to a 1.5 s swap for 4 examples), hence off by default
            (``diagnostics["baseline"]`` is NaN then; the demo turns it on). A few per cent for ``"ig"``, where it
            is always on.
        hvp_mode: how the solvers' HVPs are computed during :meth:`s_test`. ``"prepared"`` (default): each
            Hessian batch's gradient graph is built once per :meth:`s_test` call and every CG iteration pulls its
            vectors back through it (:func:`~repinf_lens.curvature.prepared_dataset_hvp`; faster per product,
            the graphs held during the solve; ``benchmarks/bench_hvp.py`` measures both). ``"recompute"``: a
            fresh forward-over-reverse pass per product (:func:`~repinf_lens.curvature.dataset_hvp`; least
            memory). Same values up to float rounding; not part of any cache key. With ``amp_dtype`` the
            products are always recomputed (autocast applies to the pass that runs).
        progress: show tqdm bars.

    Usage::

        attributor = InfluenceAttributor(split, task, hessian=CG(damping=1e-3))
        attributor.fit(hessian_dataset)          # the data whose mean loss defines H
        result = attributor.attribute(queries, train)
        result.top_examples(0, k=5); result.top_latents(0, k=10)

    Under ``torchrun``, :meth:`attribute_distributed` shards the training examples across processes and returns
    the same result on rank 0.

    Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test loss), for example,
    latent and token scores and P(0) alike.
    """

    def __init__(
        self,
        split: SplitModel,
        task: Any | None = None,
        hessian: InverseHessianSolver | None = None,
        *,
        batch_size: int = 8,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        store_token_scores: bool = True,
        progress: bool = True,
        swap_chunk_size: int | None = None,
        query_chunk_size: int | None = 8,
        amp_dtype: torch.dtype | None = None,
        latent_method: str = "grad_x_input",
        ig_steps: int = 64,
        ig_rule: str = "graded",
        baseline: bool = False,
        hvp_mode: str = "prepared",
        max_batch_tokens: int | None = None,
        input_cache_mb: float | None = 2048.0,
    ) -> None:
        if hvp_mode not in ("prepared", "recompute"):
            raise ValueError(f"InfluenceAttributor hvp_mode must be 'prepared' or 'recompute', got {hvp_mode!r}.")
        self.hvp_mode = hvp_mode
        check_int("InfluenceAttributor batch_size", batch_size, minimum=1, why="training examples per batch")
        check_int("InfluenceAttributor swap_chunk_size", swap_chunk_size, minimum=1, allow_none=True)
        check_int("InfluenceAttributor max_batch_tokens", max_batch_tokens, minimum=1, allow_none=True)
        self.max_batch_tokens = max_batch_tokens
        if input_cache_mb is not None and not (float(input_cache_mb) >= 0):
            raise ValueError(
                f"InfluenceAttributor input_cache_mb must be >= 0 MB (or None for no cap), got {input_cache_mb!r}. "
                "Fix: pass e.g. 2048, or 0 to keep only what the solver needs."
            )
        check_int("InfluenceAttributor query_chunk_size", query_chunk_size, minimum=1, allow_none=True,
                  fix="pass query_chunk_size >= 1, or None for all queries at once.")  # fmt: skip
        self.latent_method, self.ig_steps, self.ig_rule = check_latent_method(
            latent_method, ig_steps, ig_rule, where="InfluenceAttributor", prefix="ig_"
        )
        self.baseline = bool(baseline) or self.latent_method == "ig"
        self.split = split if task is None or task is split.task else split.with_task(task)
        self.task = self.split.task
        self.solver = hessian if hessian is not None else CG()
        self.batch_size = batch_size
        self.progress = progress
        self.store_token_scores = store_token_scores
        self.swap_chunk_size = swap_chunk_size
        self.query_chunk_size = query_chunk_size
        self.amp_dtype = amp_dtype
        self.cache = STestCache(Path(cache_dir) if cache_dir else default_cache_dir("s_test")) if use_cache else None
        self._hessian_inputs: list[SplitInputs] | None = None
        self._inputs = _InputStore(self.split, None if input_cache_mb is None else float(input_cache_mb) * 2**20)
        self._factors_fitted = False
        self._hessian_key: str | None = None
        self._fingerprint: dict[str, Any] | None = None
        self.solve_infos: list[SolveInfo] = []

    # ------------------------------------------------------------------ curvature
    def fit(self, hessian_dataset: Any, *, batch_size: int | None = None) -> InfluenceAttributor:
        """Prepare the Hessian data (upstream activations computed once, kept for every HVP).

        A solver that fits its own curvature model (``solver.fits_factors``: :class:`~repinf_lens.curvature.KFAC`,
        :class:`~repinf_lens.curvature.EKFAC`, or CG with such a ``preconditioner``) gets the split, the task and
        the rows (``solver.fit_factors``) and streams them itself; the Hessian batches are then prepared only when
        the solver also uses HVPs (``solver.uses_hvp``: preconditioned CG does, K-FAC / EK-FAC do not). Either way
        each batch's upstream part runs once: its prepared inputs are kept (``input_cache_mb``) for the factor
        passes, the HVPs and the scoring of the same rows.
        """
        check_int("fit batch_size", batch_size, minimum=1, allow_none=True)
        rows = as_rows(hessian_dataset, "Hessian dataset")
        self._factors_fitted = False
        self._hessian_inputs = None
        uses_hvp = bool(getattr(self.solver, "uses_hvp", True))
        self._inputs.clear()
        self._inputs.keep_all = uses_hvp  # CG's HVP batches are held anyway: keep them all for reuse
        self._inputs.collecting = True
        try:
            if getattr(self.solver, "fits_factors", False):  # (duck-typed solvers have only solve())
                fit = self.solver.fit_factors
                extra = {"prepare": self._inputs.prepare} if _accepts(fit, "prepare") else {}  # older solvers
                fit(self.split, self.task, rows, batch_size=batch_size, progress=self.progress, **extra)
                self._factors_fitted = True
            self._hessian_key = _data_hash(rows)
            if not uses_hvp:  # factors only (KFAC, EKFAC): no HVP batches
                return self
            bs = batch_size or self.solver.batch_size
            self._hessian_inputs = [
                self._inputs.prepare(rows[i : i + bs])
                for i in tqdm(range(0, len(rows), bs), desc="hessian data", disable=not self.progress)
            ]
        finally:
            self._inputs.collecting = False
        return self

    def _solver_identity(self) -> dict[str, Any]:
        """The solver in cache keys and manifests: its ``cache_identity()`` (settings plus fitted factors)."""
        identity = getattr(self.solver, "cache_identity", None)
        return identity() if callable(identity) else self.solver.to_dict()

    def _has_hessian_data(self) -> bool:
        """Whether :meth:`fit` ran: the Hessian batches are prepared, or the solver fitted its factors."""
        return self._hessian_inputs is not None or self._factors_fitted

    @property
    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = self.split.fingerprint()
            if self.amp_dtype is not None:
                self._fingerprint = {**self._fingerprint, "amp_dtype": str(self.amp_dtype)}
        return self._fingerprint

    @property
    def _latent_width(self) -> int:
        """Latent columns of the scores: ``d_sae``, or 0 for ``latent_method="none"`` (example scores only)."""
        return 0 if self.latent_method == "none" else self.split.d_sae

    @property
    def latent_settings(self) -> dict[str, Any]:
        """How latent scores are computed: ``{"method": "grad_x_input"}`` or ``{"method": "ig", "steps", "rule"}``
        (``result.meta["latent_method"]``; part of the streaming fingerprint for IG)."""
        if self.latent_method == "ig":
            return {"method": "ig", "steps": self.ig_steps, "rule": self.ig_rule}
        return {"method": self.latent_method}

    def _amp(self) -> Any:
        """``torch.autocast`` with :attr:`amp_dtype` on the split's device (a no-op context when ``None``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.split.device).type, dtype=self.amp_dtype)

    def hvp(self, v: Params) -> Params:
        """``H v`` for the mean loss over the Hessian data (needs :meth:`fit`)."""
        if self._hessian_inputs is None:
            raise RuntimeError("No Hessian data. Fix: call attributor.fit(hessian_dataset) first.")
        params = self.split.downstream_params()
        with self._amp():
            out = dataset_hvp(self.split, params, self._hessian_inputs, v, gauss_newton=self.solver.gauss_newton)
        return {k: t.to(v[k].dtype) for k, t in out.items()}

    def _solve_hvp(self) -> Any:
        """The HVP the solvers get in :meth:`s_test`: prepared once (``hvp_mode="prepared"``) or :meth:`hvp`."""
        uses_hvp = getattr(self.solver, "uses_hvp", True) and getattr(self.solver, "needs_hessian", True)
        if self.hvp_mode != "prepared" or self.amp_dtype is not None or self._hessian_inputs is None or not uses_hvp:
            return self.hvp
        params = self.split.downstream_params()
        prepared = prepared_dataset_hvp(
            self.split, params, self._hessian_inputs, gauss_newton=getattr(self.solver, "gauss_newton", False)
        )

        def hvp_fn(v: Params) -> Params:
            return {k: t.to(v[k].dtype) for k, t in prepared(v).items()}

        return hvp_fn

    def query_gradient(self, query: Mapping[str, Any]) -> Params:
        """g_test: gradient of the query's loss w.r.t. theta2."""
        return self.query_gradients([query])[0]

    def query_gradients(self, queries: Any) -> list[Params]:
        """g_test of every query, in order. The upstream part (theta1 and the SAE encoding) runs once per batch of
        queries (``batch_size`` rows, ``max_batch_tokens``), then each query's gradient through theta2 alone, so
        the result equals one :meth:`query_gradient` call per query up to float rounding (right padding leaves
        every real position's activation as it is)."""
        rows = as_rows(queries, "query set")
        params = self.split.downstream_params()
        # several queries per vmapped backward while their gradients stay small (about 2**26 theta2 entries per
        # call: all of a batch for one matrix, one at a time below early layers, where one gradient's
        # intermediates already take GBs); one backward per query otherwise, or where vmap lacks a rule
        chunk = max(1, (1 << 26) // max(1, sum(p.numel() for p in params.values())))
        out: list[Params] = []
        for lo, hi in token_batches(self.task, rows, self.batch_size, self.max_batch_tokens):
            inp = self.split.prepare(self.task.collate(rows[lo:hi]))
            if chunk > 1 and len(inp) > 1:
                try:
                    with self._amp():
                        per = per_example_grads(self.split, params, inp, chunk_size=chunk)
                    out.extend({k: per[k][i].to(params[k].dtype) for k in params} for i in range(len(inp)))
                    continue
                except (RuntimeError, NotImplementedError):
                    pass  # an op without a batching rule: the loop below computes the same gradients
            for i in range(len(inp)):
                with self._amp():
                    g = loss_grad(self.split, params, inp.slice(i, i + 1))
                out.append({k: v.detach().to(params[k].dtype) for k, v in g.items()})
        return out

    def _s_test_key(self, row: Mapping[str, Any]) -> str:
        return cache_key(
            split=self.fingerprint,
            solver=self._solver_identity(),
            hessian=self._hessian_key if self.solver.needs_hessian else None,
            query=_data_hash([row]),
        )

    def s_test(self, queries: Any, *, keep: bool = True) -> list[Params]:
        """s_test = (H + lambda I)^-1 g_test for every query, cached on disk (safetensors).

        Queries found in the cache are read; the others are solved together, ``query_chunk_size`` at a time,
        with the solver's ``solve_many`` (for CG: one batched HVP per iteration for all still-running queries,
        each query stopping at its own tolerance), then cached. ``self.solve_infos`` holds one
        :class:`SolveInfo` per query (``iterations=0`` for cache hits).

        ``keep=False`` only fills the cache and returns ``[]``: memory then holds one chunk of queries at a time,
        not every s_test (one s_test is the size of theta2: ~0.4 GB in fp32 below an early layer of the default
        model, so 50 kept vectors alone are 20 GB).
        """
        rows = as_rows(queries, "query set")
        if not keep and self.cache is None:
            raise ValueError(
                "s_test(keep=False) only fills the s_test cache, and this attributor has none. "
                "Fix: build it with use_cache=True, or call s_test(queries) and keep the vectors."
            )
        if self.solver.needs_hessian and not self._has_hessian_data():
            raise RuntimeError(
                f"{type(self.solver).__name__} needs Hessian data. Fix: call "
                "attributor.fit(hessian_dataset) first (or use Identity())."
            )
        n = len(rows)
        out: list[Params | None] = [None] * n
        infos: list[SolveInfo | None] = [None] * n
        keys = [self._s_test_key(row) for row in rows]
        params = self.split.downstream_params()
        missing: list[int] = []  # first index of each distinct query to solve
        repeats: dict[str, list[int]] = {}  # key -> indices of the same query later in ``rows``
        for i, key in enumerate(keys):
            if key in repeats:
                repeats[key].append(i)
                continue
            repeats[key] = []
            if not keep and self.cache is not None and self.cache.has(key):
                infos[i] = SolveInfo(iterations=0, converged=True)
                continue
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is None:
                missing.append(i)
                continue
            out[i] = {k: cached[k].to(params[k].device, params[k].dtype) for k in params}
            infos[i] = SolveInfo(iterations=0, converged=True)
        step = self.query_chunk_size or max(1, len(missing))
        hvp_fn = self._solve_hvp() if missing else self.hvp
        with tqdm(total=len(missing), desc="s_test", disable=not self.progress or len(missing) <= 1) as bar:
            for lo in range(0, len(missing), step):
                idx = missing[lo : lo + step]
                gs = self.query_gradients([rows[i] for i in idx])
                for i, g in zip(idx, gs):
                    check_finite(
                        f"The test gradient g_test of query {_row_id(rows[i], i)!r}", g, where="(before the solve)",
                        fix="check that query's loss, the model weights and the SAE for NaN/inf (with float16/"
                        "bfloat16 try float32).",
                    )  # fmt: skip
                solve_many = getattr(self.solver, "solve_many", None)
                try:
                    if solve_many is not None:
                        sols, sol_infos = solve_many(hvp_fn, gs, chunk_size=self.query_chunk_size)
                    else:  # a duck-typed solver with only solve()
                        pairs = [self.solver.solve(hvp_fn, g) for g in gs]
                        sols, sol_infos = [p[0] for p in pairs], [p[1] for p in pairs]
                except NonFiniteError as err:
                    ids = [_row_id(rows[i], i) for i in idx]
                    raise NonFiniteError(f"Solving s_test for queries {ids} (in this order): {err}") from err
                for i, sol in zip(idx, sols):  # duck-typed solvers are checked too
                    check_finite(f"s_test of query {_row_id(rows[i], i)!r}", sol, where="after the solve")
                del gs
                for i, sol, info in zip(idx, sols, sol_infos):
                    out[i], infos[i] = (sol if keep else None), info
                    if self.cache is not None:
                        self.cache.put(
                            keys[i],
                            sol,
                            meta={
                                "query_id": rows[i].get("id"),
                                "solver": self.solver.to_dict(),
                                "info": info.to_dict(),
                                "hook": self.split.hook_name,
                            },
                        )
                del sols
                bar.update(len(idx))
        del hvp_fn  # the prepared graphs of the Hessian batches go with it
        if not keep:
            self.solve_infos = [i for i in infos if i is not None]
            return []
        for key, later in repeats.items():  # a query given twice is solved once
            first = keys.index(key)
            for i in later:
                out[i], infos[i] = out[first], SolveInfo(iterations=0, converged=True)
        self.solve_infos = [i for i in infos if i is not None]
        return [s for s in out if s is not None]

    def _stack_queries(self, s_list: list[Params]) -> list[Params]:
        """s_test vectors stacked per query chunk (``query_chunk_size``), reused for every training batch.

        CONSUMES ``s_list`` (its entries are set to ``None`` once stacked), so the vectors are not held twice.
        """
        params = self.split.downstream_params()
        step = self.query_chunk_size or max(1, len(s_list))
        consumed = cast("list[Params | None]", s_list)  # the same list: chunks already stacked become None
        stacks = []
        for lo in range(0, len(s_list), step):
            chunk = s_list[lo : lo + step]
            stacks.append(stack_queries(chunk, params))
            del chunk
            consumed[lo : lo + step] = [None] * len(s_list[lo : lo + step])
        return stacks

    # ------------------------------------------------------------------ influence
    def attribute(self, queries: Any, train: Any, *, batch_size: int | None = None) -> InfluenceResult:
        """Influence of every training example (and its latents and tokens) on every query.

        Returns an :class:`InfluenceResult` with ``example_scores [Q, N]`` and ``latent_scores [Q, N, d_sae]``.
        POSITIVE = proponent (up-weighting the training example lowers the query's loss).
        For training sets too large to hold per-example scores in memory, or long runs that must survive a
        crash, use :meth:`attribute_streaming` (same scores, written shard by shard and resumable).
        """
        q_rows = as_rows(queries, "query set")
        t_rows = as_rows(train, "training set")
        bs = batch_size or self.batch_size
        t0 = time.perf_counter()
        s_stacks = self._stack_queries(self.s_test(q_rows))
        t_solve = time.perf_counter() - t0
        t1 = time.perf_counter()
        q_ids = [_row_id(r, i) for i, r in enumerate(q_rows)]
        with tqdm(total=len(t_rows), desc="influence", disable=not self.progress) as bar:
            scores = self._score_range(s_stacks, t_rows, 0, len(t_rows), bs, bar, query_ids=q_ids)
        meta = self._meta(bs, t_solve, time.perf_counter() - t1, self.solve_infos)
        return self._result(q_rows, t_rows, scores, meta)

    def attribute_distributed(
        self,
        queries: Any,
        train: Any,
        *,
        batch_size: int | None = None,
        shard: str = "contiguous",
        src: int = 0,
    ) -> InfluenceResult | None:
        """:meth:`attribute` with the training examples sharded across ``torch.distributed`` ranks (``torchrun``).

        Call it on every rank, with the same queries, training set and attributor settings, after
        :func:`repinf_lens.distributed.init_from_env`. Rank ``src`` computes the s_test vectors (solving them or
        reading its s_test cache; only it needs :meth:`fit`) and broadcasts them; each rank scores the training
        batches :func:`~repinf_lens.distributed.shard_ranges` assigns it (``shard``: ``"contiguous"`` blocks of
        batches or ``"strided"``, batch ``b`` on rank ``b % world_size``); rank ``src`` gathers the scores and
        returns the assembled result, equal to :meth:`attribute`'s (same batches, same order;
        ``meta["distributed"]`` records the sharding); other ranks return ``None``. Without an initialised
        process group of more than one process it is :meth:`attribute`. See :mod:`repinf_lens.distributed`.
        POSITIVE = proponent (up-weighting the training example lowers the query's loss).

        Raises:
            RuntimeError: on every rank when rank ``src`` could not compute s_test (e.g. no :meth:`fit`).
        """
        if not is_distributed():
            return self.attribute(queries, train, batch_size=batch_size)
        rank, world = dist.get_rank(), dist.get_world_size()
        q_rows = as_rows(queries, "query set")
        t_rows = as_rows(train, "training set")
        bs = batch_size or self.batch_size
        ranges = shard_ranges(len(t_rows), bs, rank, world, shard)
        params = self.split.downstream_params()

        t0 = time.perf_counter()
        s_list, error = None, None
        if rank == src:
            try:
                s_list = self.s_test(q_rows)
            except Exception as exc:  # tell the other ranks instead of leaving them at the broadcast
                error = f"{type(exc).__name__}: {exc}"
        status = [error]
        dist.broadcast_object_list(status, src=src)
        if status[0] is not None:
            if error is not None:
                raise RuntimeError(f"s_test failed on rank {src}: {error}")
            raise RuntimeError(f"s_test failed on rank {src}: {status[0]}")
        s_list = broadcast_s_test(s_list, params, len(q_rows), src=src)
        infos = self.solve_infos if rank == src else []
        s_stacks = self._stack_queries(s_list)
        del s_list
        t_solve = time.perf_counter() - t0

        t1 = time.perf_counter()
        payload = []
        with tqdm(
            total=sum(b - a for a, b in ranges),
            desc=f"influence (rank {rank}/{world})",
            disable=not self.progress or rank != src,
        ) as bar:
            for lo, hi in ranges:
                part = self._score_range(s_stacks, t_rows, lo, hi, bs, bar)
                payload.append((lo, hi, part.to_tensors(self.store_token_scores)))
                del part
        t_local = time.perf_counter() - t1
        gathered: list[Any] | None = [None] * world if rank == src else None
        dist.gather_object((rank, t_local, payload), gathered, dst=src)
        if rank != src:
            return None
        assert gathered is not None
        nq, n = len(q_rows), len(t_rows)
        scores = _Scores.empty(nq, n, self._latent_width, 0)
        parts = sorted((lo, hi, t) for _, _, pl in gathered for lo, hi, t in pl)
        covered = 0
        for lo, hi, tensors in parts:
            if lo != covered:
                raise RuntimeError(f"Distributed shards do not tile the training set: gap at example {covered}.")
            scores.fill(_Scores.from_tensors(tensors, lo, hi, nq))
            covered = hi
        if covered != n:
            raise RuntimeError(f"Distributed shards cover {covered} of {n} training examples.")
        meta = self._meta(bs, t_solve, time.perf_counter() - t1, infos)
        meta["distributed"] = {
            "world_size": world,
            "backend": str(dist.get_backend()),
            "shard": shard,
            "seconds_per_rank": [round(t, 3) for _, t, _ in sorted(gathered, key=lambda x: x[0])],
        }
        return self._result(q_rows, t_rows, scores, meta)

    def attribute_streaming(
        self,
        queries: Any,
        train: Any,
        *,
        out_dir: str | os.PathLike,
        shard_size: int = 256,
        batch_size: int | None = None,
        overwrite: bool = False,
    ) -> InfluenceResult:
        """:meth:`attribute`, computed shard by shard on disk: bounded memory, resumable after a crash.

        Each shard of ``shard_size`` training examples (rounded up to a multiple of the batch size, so the
        batches are exactly those of :meth:`attribute`) is scored, written atomically to
        ``out_dir/shards/shard_XXXXX.safetensors`` (example and latent scores, diagnostics, sparse token
        scores, token ids) and recorded in ``out_dir/manifest.json``, whose fingerprint covers the split (model
        weights, hook, SAE, theta2, task), the solver, the Hessian data, the queries, the training set and these
        settings. Only one shard of per-example state is held in memory while scoring. A rerun with the same
        inputs (after ``kill -9``, a power cut, Ctrl-C) skips every finished shard. At the end all shards are
        assembled into the result, which is saved into ``out_dir`` in the :meth:`InfluenceResult.save` format
        (``InfluenceResult.load(out_dir)`` reads it) and returned; its scores equal :meth:`attribute`'s with
        the same ``batch_size``. Sign convention: POSITIVE = proponent (up-weighting the training example
        lowers the query's loss).

        Args:
            queries: the test queries (dict, list of dicts, dataset).
            train: the training examples.
            out_dir: the folder for the manifest, the shards and the final result.
            shard_size: training examples per shard (the unit of resumption and of peak memory).
            batch_size: training examples per influence batch (default: the attributor's).
            overwrite: discard outputs of a run with other inputs instead of raising.

        Raises:
            ValueError: empty query or training set.
            ManifestMismatchError: ``out_dir`` holds shards of a run with other inputs (and not ``overwrite``).
            RuntimeError: the solver needs Hessian data and :meth:`fit` was not called.
        """
        check_int("attribute_streaming shard_size", shard_size, minimum=1, why="training examples per shard")
        check_int("attribute_streaming batch_size", batch_size, minimum=1, allow_none=True)
        q_rows = as_rows(queries, "query set")
        t_rows = as_rows(train, "training set")
        bs = batch_size or self.batch_size
        if self.solver.needs_hessian and not self._has_hessian_data():
            raise RuntimeError(
                f"{type(self.solver).__name__} needs Hessian data. Fix: call attributor.fit(hessian_dataset) "
                "first (the same data as in the interrupted run, to resume it), or use Identity()."
            )
        shard_size = -(-shard_size // bs) * bs
        n = len(t_rows)
        out = Path(out_dir)
        fingerprint = json.loads(
            json.dumps(
                {
                    "split": self.fingerprint,
                    "solver": self._solver_identity(),
                    "hessian": self._hessian_key if self.solver.needs_hessian else None,
                    "queries": _data_hash(q_rows),
                    "train": _data_hash(t_rows),
                    "n_queries": len(q_rows),
                    "n_train": n,
                    "batch_size": bs,
                    "shard_size": shard_size,
                    "store_token_scores": self.store_token_scores,
                    # only when not the default, so folders of earlier (gradient x input) runs still resume
                    **({"latent_method": self.latent_settings} if self.latent_method != "grad_x_input" else {}),
                },
                default=str,
            )
        )
        shards = shard_plan(n, shard_size)
        manifest = open_manifest(
            out,
            kind=_STREAM_KIND,
            fingerprint=fingerprint,
            overwrite=overwrite,
            owned=("shards", "result.json", "scores.safetensors", "tokens.safetensors"),
            extra={"sign_convention": _SIGN, "shards": shards, "finished": [], "complete": False},
        )
        fp = manifest["fingerprint_hash"]
        done = {
            s["index"]
            for s in shards
            if shard_is_done(out / s["file"], fingerprint=fp, start=s["start"], stop=s["stop"])
        }
        todo = [s for s in shards if s["index"] not in done]
        resumed = sorted(done)
        manifest["finished"] = resumed
        # content sha256 per finished shard (the shard headers hold the same; checked on every resume)
        manifest["checksums"] = {s["file"]: shard_checksum(out / s["file"]) for s in shards if s["index"] in done}
        t_solve = t_inf = 0.0
        infos: list[SolveInfo] = []
        if todo:
            t0 = time.perf_counter()
            s_stacks = self._stack_queries(self.s_test(q_rows))
            infos = self.solve_infos
            t_solve = time.perf_counter() - t0
            t1 = time.perf_counter()
            with tqdm(
                total=sum(s["stop"] - s["start"] for s in todo), desc="influence", disable=not self.progress
            ) as bar:
                for s in todo:
                    part = self._score_range(s_stacks, t_rows, s["start"], s["stop"], bs, bar,
                                             query_ids=[_row_id(r, i) for i, r in enumerate(q_rows)])  # fmt: skip
                    manifest["checksums"][s["file"]] = write_shard(
                        out / s["file"],
                        part.to_tensors(self.store_token_scores),
                        fingerprint=fp,
                        start=s["start"],
                        stop=s["stop"],
                    )
                    del part
                    done.add(s["index"])
                    manifest["finished"] = sorted(done)
                    write_json_atomic(out / "manifest.json", manifest)
            t_inf = time.perf_counter() - t1
        scores = _Scores.empty(len(q_rows), n, self._latent_width, 0)
        for s in shards:  # one shard read at a time, copied into the preallocated result
            scores.fill(_Scores.from_tensors(load_file(str(out / s["file"])), s["start"], s["stop"], len(q_rows)))
        meta = self._meta(bs, t_solve, t_inf, infos)
        meta["streaming"] = {
            "shard_size": shard_size,
            "n_shards": len(shards),
            "shards_resumed": resumed,
            "shards_computed": [s["index"] for s in todo],
        }
        result = self._result(q_rows, t_rows, scores, meta)
        _save_into(result, out)
        manifest["complete"] = True
        write_json_atomic(out / "manifest.json", manifest)
        return result

    def _score_range(
        self,
        s_stacks: Sequence[Params],
        t_rows: Sequence[Mapping[str, Any]],
        start: int,
        stop: int,
        bs: int,
        bar: Any,
        *,
        query_ids: Sequence[str] | None = None,
    ) -> _Scores:
        """Scores of training examples ``start:stop``, batch by batch (the one loop behind every attribution).

        ``s_stacks`` are the s_test vectors stacked per query chunk (:meth:`_stack_queries`); each training
        batch is scored for all queries of a chunk in one :func:`latent_influence_multi` call, with this
        attributor's ``latent_method`` (IG: ``swap_chunk_size`` or else ``bs`` evaluations per swap). NaN/inf scores
        raise :class:`~repinf_lens.errors.NonFiniteError` at the batch that produced them, naming the query
        (``query_ids``, else its index) and the training examples.
        """
        params = self.split.downstream_params()
        nq = sum(int(next(iter(s.values())).shape[0]) for s in s_stacks)
        part = _Scores.empty(nq, stop - start, self._latent_width, start)
        ig = self.latent_method == "ig"
        chunk = (self.swap_chunk_size or bs) if ig else self.swap_chunk_size
        unconverged: list[float] = []  # IG: relative identity errors above _IG_WARN_REL
        for lo, hi in token_batches(self.task, t_rows[start:stop], bs, self.max_batch_tokens):
            lo, hi = start + lo, start + hi
            batch = self.task.collate(t_rows[lo:hi])
            inp = self._inputs.prepare(t_rows[lo:hi], batch=batch)  # kept by fit() for these rows, or computed
            lengths = batch.attention_mask.sum(1)
            part.train_tokens.extend(batch.tokens[i, : int(lengths[i])].cpu() for i in range(len(batch)))
            sl = slice(lo - start, hi - start)
            q = 0
            for stacked in s_stacks:
                with self._amp():
                    multi = latent_influence_multi(
                        self.split, stacked, inp, params, chunk_size=chunk, method=self.latent_method,
                        steps=self.ig_steps, rule=self.ig_rule, baseline=self.baseline,
                    )  # fmt: skip
                for li in multi:
                    part.example[q, sl] = li.example_scores.float().cpu()
                    part.latent[q, sl] = li.latent_scores.float().cpu()
                    qid = query_ids[q] if query_ids is not None else f"#{q}"
                    _check_scores(part.example[q, sl], part.latent[q, sl], qid, t_rows, lo)
                    part.diag["latent_sum"][q, sl] = li.latent_sum.float().cpu()
                    part.diag["error_term"][q, sl] = li.error_term.float().cpu()
                    part.diag["bias_term"][q, sl] = li.bias_term.float().cpu()
                    if li.baseline_scores is not None:
                        part.diag["baseline"][q, sl] = li.baseline_scores.float().cpu()
                    if ig:
                        unconverged.extend(_ig_unconverged(li))
                    if self.store_token_scores:
                        nz = torch.nonzero(li.token_scores != 0).T  # [3, nnz] (example, pos, latent)
                        vals = li.token_scores[nz[0], nz[1], nz[2]].float().cpu()
                        nz = nz.cpu()
                        nz[0] += lo
                        part.tok_idx[q].append(nz)
                        part.tok_val[q].append(vals)
                    q += 1
            bar.update(hi - lo)
        if unconverged:
            warnings.warn(
                f"Integrated gradients did not converge for {len(unconverged)} (query, training example) pair(s) "
                f"of examples {start}:{stop}: |P(r) - P(0) - latent sum| is up to {max(unconverged):.3g} of the "
                f"score with ig_steps={self.ig_steps} ({self.ig_rule}), so the latent scores miss that share "
                "(result.completeness() shows it per pair). Fix: raise ig_steps. When the downstream input at r = 0 "
                "is (near) zero (no SAE, or use_error_term=False with b_dec ~ 0), the next LayerNorm / RMSNorm is "
                "near-singular close to a = 0 and needs far more nodes; keep the SAE error term (the default).",
                RuntimeWarning,
                stacklevel=3,
            )
        return part

    def _take_hits(self) -> int:
        """Training batches scored from kept upstream inputs since the last result (then reset)."""
        hits, self._inputs.hits = self._inputs.hits, 0
        return hits

    def _meta(self, bs: int, t_solve: float, t_inf: float, infos: Sequence[SolveInfo]) -> dict[str, Any]:
        return {
            "hook_name": self.split.hook_name,
            "sae": None if self.split.sae is None else self.split.sae.cfg.to_dict(),
            "use_error_term": self.split.use_error_term,
            "theta2": self.split.param_names,
            "n_theta2": self.split.num_downstream_params(),
            "solver": self.solver.to_dict(),
            "solve_infos": [i.to_dict() for i in infos],
            "seconds_s_test": round(t_solve, 3),
            "seconds_influence": round(t_inf, 3),
            "batch_size": bs,
            "query_chunk_size": self.query_chunk_size,
            "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype),
            "latent_method": self.latent_settings,
            # training batches whose upstream inputs fit() had kept (input_cache_mb): not recomputed
            "reused_upstream_batches": self._take_hits(),
            # what `InfluenceResult.check_split` compares before ablations / reports reuse the result
            "split_fingerprint": self.fingerprint,
        }

    def _result(
        self, q_rows: Sequence[Mapping[str, Any]], t_rows: Sequence[Mapping[str, Any]], scores: _Scores, meta: dict
    ) -> InfluenceResult:
        for q, row in enumerate(q_rows):  # before anything is ranked (results assembled from shards included)
            _check_scores(scores.example[q], scores.latent[q], _row_id(row, q), t_rows, scores.start)
        query_tokens = [self.task.collate([row]).tokens[0].cpu() for row in q_rows]
        store = self.store_token_scores
        return InfluenceResult(
            example_scores=scores.example,
            latent_scores=scores.latent,
            query_ids=[str(r.get("id", i)) for i, r in enumerate(q_rows)],
            train_ids=[str(r.get("id", i)) for i, r in enumerate(t_rows)],
            train_tokens=scores.train_tokens,
            query_tokens=query_tokens,
            token_indices=[torch.cat(x, 1) if x else torch.zeros(3, 0, dtype=torch.long) for x in scores.tok_idx]
            if store
            else [],
            token_values=[torch.cat(x) if x else torch.zeros(0) for x in scores.tok_val] if store else [],
            diagnostics=scores.diag,
            meta=json.loads(json.dumps(meta, default=str)),
            tokenizer=getattr(self.task, "tokenizer", None),
        )


# per pair: latent sum, error and bias terms (gradient x input at r), baseline = P(0) (NaN where not computed)
_DIAG = ("latent_sum", "error_term", "bias_term", "baseline")
#: integrated gradients whose identity error exceeds this share of the score are reported (a RuntimeWarning)
_IG_WARN_REL = 1e-2


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (or ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _nbytes(inp: SplitInputs) -> int:
    """Bytes held by a batch's prepared inputs (its tensors and the task batch's)."""
    import dataclasses

    tensors = [inp.latents, inp.base, inp.error, *(inp.anchor or ())]
    tensors += [getattr(inp.batch, f.name) for f in dataclasses.fields(inp.batch)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


class _InputStore:
    """Prepared upstream inputs (:meth:`SplitModel.prepare`) of row batches, keyed by the batch's rows.

    While :meth:`InfluenceAttributor.fit` runs (``collecting``), every batch prepared through :meth:`prepare` is
    kept (all of them when ``keep_all``: the solver holds them for its HVPs anyway; else while the total stays
    under ``budget`` bytes, ``None`` = no cap). A later :meth:`prepare` of the same rows (the same content, in the
    same order, batched alike) returns the kept tensors instead of running the upstream part again: a factor
    pass, the HVP batches and the scoring of the Hessian rows all reuse one upstream pass. Outside ``fit``
    nothing is added (scoring a large training set streams). ``hits`` counts the reuses outside ``fit``.
    """

    def __init__(self, split: SplitModel, budget: float | None) -> None:
        self.split, self.budget = split, budget
        self.keep_all = False
        self.collecting = False
        self.hits = 0
        self._kept: dict[str, SplitInputs] = {}
        self._bytes = 0

    def clear(self) -> None:
        self._kept, self._bytes, self.hits = {}, 0, 0

    def prepare(self, rows: Sequence[Mapping[str, Any]], *, batch: Any = None) -> SplitInputs:
        """The prepared inputs of ``rows`` (one batch, ``batch`` = its collated task batch when at hand)."""
        key = f"{len(rows)}:{_data_hash(rows)}" if (self._kept or self.collecting) else None
        if key is not None and key in self._kept:
            self.hits += 0 if self.collecting else 1
            return self._kept[key]
        inp = self.split.prepare(batch if batch is not None else self.split.task.collate(list(rows)))
        if key is not None and self.collecting:
            size = _nbytes(inp)
            if self.keep_all or self.budget is None or self._bytes + size <= self.budget:
                self._kept[key] = inp
                self._bytes += size
        return inp


def _ig_unconverged(li: LatentInfluence) -> list[float]:
    """Relative IG identity errors |P(r) - P(0) - latent sum| / max(|P(r)|, |P(r) - P(0)|) above _IG_WARN_REL."""
    if li.residual is None or li.baseline_scores is None:
        return []
    score, base = li.example_scores.double(), li.baseline_scores.double()
    scale = torch.maximum(score.abs(), (score - base).abs())
    floor = max(1e-6 * float(scale.max()), 1e-30) if scale.numel() else 1e-30
    rel = li.residual.double().abs() / scale.clamp_min(floor)
    return [float(v) for v in rel[rel > _IG_WARN_REL]]


@dataclass
class _Scores:
    """Per-example state of training examples ``start:start+n`` for Q queries (one shard, or everything).

    ``tok_idx[q]`` holds ``[3, nnz]`` (GLOBAL example index, position, latent) parts, ``tok_val[q]`` the values.
    """

    start: int
    example: Tensor
    latent: Tensor
    diag: dict[str, Tensor]
    tok_idx: list[list[Tensor]]
    tok_val: list[list[Tensor]]
    train_tokens: list[Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, nq: int, n: int, d: int, start: int) -> _Scores:
        return cls(
            start=start,
            example=torch.zeros(nq, n),
            latent=torch.zeros(nq, n, d),
            diag={k: torch.full((nq, n), float("nan")) if k == "baseline" else torch.zeros(nq, n) for k in _DIAG},
            tok_idx=[[] for _ in range(nq)],
            tok_val=[[] for _ in range(nq)],
        )

    def to_tensors(self, token_scores: bool) -> dict[str, Tensor]:
        """Flat dict for one safetensors shard (token parts concatenated per query when ``token_scores``)."""
        out = {"example_scores": self.example, "latent_scores": self.latent}
        out.update({f"diag_{k}": v for k, v in self.diag.items()})
        for q, (idx, val) in enumerate(zip(self.tok_idx, self.tok_val) if token_scores else []):
            out[f"tokidx_{q}"] = torch.cat(idx, 1) if idx else torch.zeros(3, 0, dtype=torch.long)
            out[f"tokval_{q}"] = torch.cat(val) if val else torch.zeros(0)
        out.update({f"train_{i}": t for i, t in enumerate(self.train_tokens)})
        return out

    @classmethod
    def from_tensors(cls, t: Mapping[str, Tensor], start: int, stop: int, nq: int) -> _Scores:
        has_tok = "tokidx_0" in t
        nan = torch.full_like(t["example_scores"], float("nan"))
        return cls(
            start=start,
            example=t["example_scores"],
            latent=t["latent_scores"],
            # shards written before P(0) was recorded have no diag_baseline: NaN there
            diag={k: t.get(f"diag_{k}", nan) for k in _DIAG},
            tok_idx=[[t[f"tokidx_{q}"]] if has_tok else [] for q in range(nq)],
            tok_val=[[t[f"tokval_{q}"]] if has_tok else [] for q in range(nq)],
            train_tokens=[t[f"train_{i}"] for i in range(stop - start)],
        )

    def fill(self, part: _Scores) -> None:
        """Copy ``part`` (the next examples, in order) into this preallocated state."""
        sl = slice(part.start - self.start, part.start - self.start + part.example.shape[1])
        self.example[:, sl] = part.example
        self.latent[:, sl] = part.latent
        for k in _DIAG:
            self.diag[k][:, sl] = part.diag[k]
        for q in range(len(self.tok_idx)):
            self.tok_idx[q].extend(part.tok_idx[q])
            self.tok_val[q].extend(part.tok_val[q])
        self.train_tokens.extend(part.train_tokens)


def _save_into(result: InfluenceResult, out: Path) -> None:
    """Save ``result`` into ``out`` (which also holds the manifest and shards) in the ``InfluenceResult.save`` format.

    ``InfluenceResult.save`` replaces its whole target folder, so the result is saved into a staging folder and
    its files are moved into ``out`` one rename each, ``result.json`` (what ``load`` looks for) last.
    """
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".result-staging-"))  # unique: processes never share it
    result.save(staging)
    try:
        (out / "result.json").unlink(missing_ok=True)
        for name in ("scores.safetensors", "tokens.safetensors", "result.json"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
