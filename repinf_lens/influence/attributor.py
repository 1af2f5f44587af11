"""InfluenceAttributor: batching, caching and progress around the pure influence math.

Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test query's loss).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._cache import cache_dir as default_cache_dir
from repinf_lens._cache import fingerprint_rows
from repinf_lens.curvature.cache import STestCache, cache_key
from repinf_lens.curvature.hvp import dataset_hvp, loss_grad
from repinf_lens.curvature.solvers import CG, InverseHessianSolver, SolveInfo
from repinf_lens.influence.math import latent_influence
from repinf_lens.influence.result import InfluenceResult
from repinf_lens.split import Params, SplitInputs, SplitModel
from repinf_lens.task import as_rows as task_rows

__all__ = ["InfluenceAttributor", "as_rows"]


def as_rows(data: Any, what: str = "dataset") -> list[dict[str, Any]]:
    """A ``datasets.Dataset``, a list of dicts, a dict of columns or a single example -> list of dicts."""
    single = isinstance(data, Mapping) and isinstance(data.get("question"), str)
    rows = [dict(data)] if single else task_rows(data)
    if not rows:
        raise ValueError(f"The {what} is empty. Fix: pass at least one example.")
    return rows


def _data_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    return fingerprint_rows(rows)[:24]


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
        progress: show tqdm bars.

    Usage::

        attributor = InfluenceAttributor(split, task, hessian=CG(damping=1e-3))
        attributor.fit(hessian_dataset)          # the data whose mean loss defines H
        result = attributor.attribute(queries, train)
        result.top_examples(0, k=5); result.top_latents(0, k=10)

    Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test loss).
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
    ) -> None:
        self.split = split if task is None or task is split.task else split.with_task(task)
        self.task = self.split.task
        self.solver = hessian if hessian is not None else CG()
        self.batch_size = batch_size
        self.progress = progress
        self.store_token_scores = store_token_scores
        self.swap_chunk_size = swap_chunk_size
        self.cache = STestCache(Path(cache_dir) if cache_dir else default_cache_dir("s_test")) if use_cache else None
        self._hessian_inputs: list[SplitInputs] | None = None
        self._hessian_key: str | None = None
        self._fingerprint: dict[str, Any] | None = None
        self.solve_infos: list[SolveInfo] = []

    # ------------------------------------------------------------------ curvature
    def fit(self, hessian_dataset: Any, *, batch_size: int | None = None) -> InfluenceAttributor:
        """Prepare the Hessian data (upstream activations computed once, kept for every HVP)."""
        rows = as_rows(hessian_dataset, "Hessian dataset")
        bs = batch_size or self.solver.batch_size
        self._hessian_inputs = [
            self.split.prepare(self.task.collate(rows[i : i + bs]))
            for i in tqdm(range(0, len(rows), bs), desc="hessian data", disable=not self.progress)
        ]
        self._hessian_key = _data_hash(rows)
        return self

    @property
    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = self.split.fingerprint()
        return self._fingerprint

    def hvp(self, v: Params) -> Params:
        """``H v`` for the mean loss over the Hessian data (needs :meth:`fit`)."""
        if self._hessian_inputs is None:
            raise RuntimeError("No Hessian data. Fix: call attributor.fit(hessian_dataset) first.")
        params = self.split.downstream_params()
        return dataset_hvp(self.split, params, self._hessian_inputs, v, gauss_newton=self.solver.gauss_newton)

    def query_gradient(self, query: Mapping[str, Any]) -> Params:
        """g_test: gradient of the query's loss w.r.t. theta2."""
        inp = self.split.prepare(self.task.collate([query]))
        return {k: v.detach() for k, v in loss_grad(self.split, self.split.downstream_params(), inp).items()}

    def s_test(self, queries: Any) -> list[Params]:
        """s_test = (H + lambda I)^-1 g_test for every query, cached on disk (safetensors)."""
        rows = as_rows(queries, "query set")
        if self.solver.needs_hessian and self._hessian_inputs is None:
            raise RuntimeError(
                f"{type(self.solver).__name__} needs Hessian data. Fix: call "
                "attributor.fit(hessian_dataset) first (or use Identity())."
            )
        out = []
        self.solve_infos = []
        for row in tqdm(rows, desc="s_test", disable=not self.progress or len(rows) == 1):
            key = cache_key(
                split=self.fingerprint,
                solver=self.solver.to_dict(),
                hessian=self._hessian_key if self.solver.needs_hessian else None,
                query=_data_hash([row]),
            )
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                params = self.split.downstream_params()
                out.append({k: cached[k].to(params[k].device, params[k].dtype) for k in params})
                self.solve_infos.append(SolveInfo(iterations=0, converged=True))
                continue
            g = self.query_gradient(row)
            s, info = self.solver.solve(self.hvp, g)
            self.solve_infos.append(info)
            if self.cache is not None:
                self.cache.put(
                    key,
                    s,
                    meta={
                        "query_id": row.get("id"),
                        "solver": self.solver.to_dict(),
                        "info": info.to_dict(),
                        "hook": self.split.hook_name,
                    },
                )
            out.append(s)
        return out

    # ------------------------------------------------------------------ influence
    def attribute(self, queries: Any, train: Any, *, batch_size: int | None = None) -> InfluenceResult:
        """Influence of every training example (and its latents and tokens) on every query.

        Returns an :class:`InfluenceResult` with ``example_scores [Q, N]`` and ``latent_scores [Q, N, d_sae]``.
        POSITIVE = proponent (up-weighting the training example lowers the query's loss).
        """
        q_rows = as_rows(queries, "query set")
        t_rows = as_rows(train, "training set")
        bs = batch_size or self.batch_size
        t0 = time.perf_counter()
        s_list = self.s_test(q_rows)
        t_solve = time.perf_counter() - t0
        params = self.split.downstream_params()
        nq, n, d = len(q_rows), len(t_rows), self.split.d_sae
        ex = torch.zeros(nq, n)
        lat = torch.zeros(nq, n, d)
        diag = {k: torch.zeros(nq, n) for k in ("latent_sum", "error_term", "bias_term")}
        tok_idx: list[list[Tensor]] = [[] for _ in range(nq)]
        tok_val: list[list[Tensor]] = [[] for _ in range(nq)]
        train_tokens: list[Tensor] = []
        t1 = time.perf_counter()
        for start in tqdm(range(0, n, bs), desc="influence", disable=not self.progress):
            batch = self.task.collate(t_rows[start : start + bs])
            inp = self.split.prepare(batch)
            lengths = batch.attention_mask.sum(1)
            train_tokens.extend(batch.tokens[i, : int(lengths[i])].cpu() for i in range(len(batch)))
            for q, s in enumerate(s_list):
                li = latent_influence(self.split, s, inp, params, chunk_size=self.swap_chunk_size)
                sl = slice(start, start + len(batch))
                ex[q, sl] = li.example_scores.float().cpu()
                lat[q, sl] = li.latent_scores.float().cpu()
                diag["latent_sum"][q, sl] = li.latent_sum.float().cpu()
                diag["error_term"][q, sl] = li.error_term.float().cpu()
                diag["bias_term"][q, sl] = li.bias_term.float().cpu()
                if self.store_token_scores:
                    nz = torch.nonzero(li.token_scores != 0).T  # [3, nnz] (example, pos, latent)
                    vals = li.token_scores[nz[0], nz[1], nz[2]].float().cpu()
                    nz = nz.cpu()
                    nz[0] += start
                    tok_idx[q].append(nz)
                    tok_val[q].append(vals)
        t_inf = time.perf_counter() - t1
        query_tokens = []
        for row in q_rows:
            b = self.task.collate([row])
            query_tokens.append(b.tokens[0].cpu())
        meta = {
            "hook_name": self.split.hook_name,
            "sae": None if self.split.sae is None else self.split.sae.cfg.to_dict(),
            "use_error_term": self.split.use_error_term,
            "theta2": self.split.param_names,
            "n_theta2": self.split.num_downstream_params(),
            "solver": self.solver.to_dict(),
            "solve_infos": [i.to_dict() for i in self.solve_infos],
            "seconds_s_test": round(t_solve, 3),
            "seconds_influence": round(t_inf, 3),
            "batch_size": bs,
        }
        return InfluenceResult(
            example_scores=ex,
            latent_scores=lat,
            query_ids=[str(r.get("id", i)) for i, r in enumerate(q_rows)],
            train_ids=[str(r.get("id", i)) for i, r in enumerate(t_rows)],
            train_tokens=train_tokens,
            query_tokens=query_tokens,
            token_indices=[torch.cat(x, 1) if x else torch.zeros(3, 0, dtype=torch.long) for x in tok_idx]
            if self.store_token_scores
            else [],
            token_values=[torch.cat(x) if x else torch.zeros(0) for x in tok_val] if self.store_token_scores else [],
            diagnostics=diag,
            meta=json.loads(json.dumps(meta, default=str)),
            tokenizer=getattr(self.task, "tokenizer", None),
        )
