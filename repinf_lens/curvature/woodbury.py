"""The exact damped Gauss-Newton (or empirical Fisher) of the Hessian rows, inverted in sample space (Woodbury).

The curvature of the MEAN loss over ``N`` Hessian rows is a sum of ``N`` per-example terms, and each term has low
rank in theta2:

* ``fisher="true"``: the Gauss-Newton matrix ``(1/N) sum_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of example
  ``n``'s loss-position logits (the columns the loss reads, :meth:`~repinf_lens.split.SplitModel.loss_columns`) and
  ``H_n`` the Hessian of its loss in those logits (for the softmax cross-entropy: the exact true Fisher, the
  expectation over the model's own labels that K-FAC / EK-FAC ``fisher="true"`` sample). It is what
  ``CG(gauss_newton=True)`` solves, here without iterations. Rank at most ``N x`` (logits the loss reads): 4 per
  example for four answer letters.
* ``fisher="empirical"``: ``(1/N) sum_n g_n g_n^T`` with ``g_n`` the gradient of example ``n``'s loss at its own
  label. Rank at most ``N``.

So ``F = U^T U`` with ``r`` rows ``U`` (one per example and eigen-direction of ``H_n``; rows of zero weight are
dropped), and the Woodbury identity inverts the damped matrix through an ``r x r`` system::

    (U^T U + lambda I)^-1 g = (g - U^T (lambda I + U U^T)^-1 U g) / lambda

No Kronecker factorisation, no sampling: the solve is exact for that matrix, whatever the architecture of theta2
(attention, norms, biases, the unembedding). The rows are computed once per (split, Hessian rows,
fisher) by :meth:`Woodbury.fit_factors` (one vmapped backward per example and direction), ``U U^T`` and its
Cholesky factor once; each query then costs two passes over the rows (``U g`` and ``U^T c``), ``2 r``
multiply-adds per theta2 entry. Memory: the rows, ``r x |theta2|`` floats (the fit refuses more than
``max_memory_gb`` before any work). It is the right tool when the Hessian data is small (the paper's 8-64 rows)
and theta2 is large; with many Hessian rows use EK-FAC.

As a preconditioner, ``CG(preconditioner=Woodbury(...))`` runs preconditioned CG on the EXACT damped Hessian with
the damped Gauss-Newton's exact inverse as ``M^-1``: the Hessian minus its Gauss-Newton part (the curvature of the
network itself, weighted by the loss's gradient) is what is left for the iterations.

Persistence (``factor_dir``): the rows of every Hessian batch in ``rows-<batch>.safetensors`` (written atomically
with a content sha256, one file per batch: a rerun after a kill resumes after the last finished batch), under a
``manifest.json`` that names the fingerprint (split, rows, fisher, batch size); a folder of other inputs is refused.
``None`` (the default): the rows stay in memory only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._io import write_json_atomic
from repinf_lens._shards import fingerprint_hash, open_manifest, read_verified, shard_is_done, write_shard
from repinf_lens._tree import tcombine, tgram, tstack, tunstack
from repinf_lens.curvature.hvp import (
    dataset_hvp,
    gauss_newton_directions,
    loss_grad,
    per_example_grads,
    per_example_logit_vjps,
)
from repinf_lens.curvature.solvers import FittedSolver, HVPFn, PrepareFn, SolveInfo, register_solver
from repinf_lens.errors import RepinfLensError, SettingsError, check_choice, check_float, check_int
from repinf_lens.split import Params, SplitInputs, SplitModel

__all__ = ["Woodbury", "WoodburyCheckError", "gauss_newton_rows"]

Tree = dict[str, Tensor]

_KIND = "repinf_lens.woodbury_rows"
_FORMAT = 1

#: how :func:`gauss_newton_directions`' errors name this solver and its alternative
_GN_WHO, _GN_FIX = "Woodbury(fisher='true')", "Woodbury(fisher='empirical') (one row per example), EKFAC()"


class WoodburyCheckError(RepinfLensError, RuntimeError):
    """The rows of the first Hessian batch do not reproduce the curvature computed by the independent path."""


def gauss_newton_rows(
    split: SplitModel, params: Params, inp: SplitInputs, *, max_outputs: int = 256, chunk_size: int | None = 16
) -> tuple[dict[str, Tensor], Tensor]:
    """Rows ``u_r`` with ``sum_r u_r u_r^T = sum_n J_n^T H_n J_n`` over the examples ``n`` of ``inp``.

    ``J_n``: Jacobian of example n's loss-position logits (the columns its loss reads) w.r.t. theta2; ``H_n``: the
    Hessian of its loss in them. One row ``sqrt(e_k) J_n^T v_k`` per direction of
    :func:`gauss_newton_directions`, by :func:`~repinf_lens.curvature.hvp.per_example_logit_vjps`.

    Returns:
        ``({name: [R, *shape]}, example index [R])``.
    """
    idx, cots = gauss_newton_directions(split, params, inp, max_outputs=max_outputs, who=_GN_WHO, fix=_GN_FIX)
    if not len(idx):
        return {k: p.new_zeros((0, *p.shape)) for k, p in params.items()}, idx
    return per_example_logit_vjps(split, params, inp, idx, cots, chunk_size=chunk_size), idx


@dataclass
class Woodbury(FittedSolver):
    """``(F + damping I)^-1 g`` for the exact Gauss-Newton / empirical Fisher ``F`` of the Hessian rows (Woodbury).

    See the module docstring for the rows, the identity, the cost and the folder. Sign convention: as every solver,
    it returns ``s_test = (F + lambda I)^-1 g_test``; the attributor's scores are ``+ s_test . g_train`` (positive =
    proponent: up-weighting the training example lowers the test loss).

    Args:
        damping: lambda (> 0), added to the curvature of the MEAN loss (the same lambda as CG's).
        batch_size: Hessian examples per pass while fitting (the generic ``batch_size`` knob).
        fisher: ``"true"`` (the Gauss-Newton: the exact true Fisher for the softmax cross-entropy, no sampling)
            or ``"empirical"`` (the rows' own labels).
        factor_dir: a folder to keep the rows in (resumable; ``None``: in memory only).
        max_memory_gb: refuse a fit whose rows would take more than this (checked before any work).
        solve_dtype: ``"float32"`` (default): ``U g`` from float32 products over chunks of 65,536 entries summed in
            float64, ``U^T c`` in float32 (relative deviation from the float64 path about 3e-5 on the peer
            benchmark's W_out, at a fifth of its time); ``"float64"``: both in float64 (for a very small
            damping, where the solution cancels most of ``g`` along the rows). Part of the s_test cache key.
        chunk_size: rows (examples x directions) per vmapped backward pass, at most; fewer for a large theta2 (about
            2**26 theta2 entries per pass), which bounds the fit's memory.
        overwrite: replace a ``factor_dir`` fitted on other inputs instead of raising.
        progress: show a tqdm bar while fitting.
        gauss_newton: always True (a Gauss-Newton / Fisher curvature; False is refused).
    """

    name: ClassVar[str] = "woodbury"
    config_knobs: ClassVar[Mapping[str, str]] = {"damping": "damping", "batch_size": "batch_size"}
    damping: float = 1e-3
    gauss_newton: bool = True
    fisher: str = "true"
    factor_dir: str | None = None
    max_memory_gb: float = 8.0
    solve_dtype: str = "float32"
    chunk_size: int = 16
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gauss_newton is not True:
            raise SettingsError(
                f"Woodbury inverts the Gauss-Newton / Fisher curvature; it has no exact-Hessian mode "
                f"(gauss_newton={self.gauss_newton!r}). Fix: leave gauss_newton=True, or use CG() for the exact "
                "Hessian (CG(preconditioner=Woodbury(...)) uses this inverse to precondition it)."
            )
        check_float(
            "Woodbury damping", self.damping, minimum=0.0,
            why="the Fisher of N rows has rank <= N x outputs, far below |theta2|: without damping it has no inverse",
            fix="pass damping > 0 (the same lambda as CG's, e.g. 1e-3).",
        )  # fmt: skip
        if not self.damping > 0.0:
            raise SettingsError(
                "Woodbury damping=0: the Fisher of the Hessian rows has rank at most N x outputs, far below |theta2|, "
                "so F + 0 I has no inverse. Fix: pass damping > 0 (the same lambda as CG's, e.g. 1e-3)."
            )
        check_choice("Woodbury fisher", self.fisher, ("true", "empirical"))
        check_float("Woodbury max_memory_gb", self.max_memory_gb, minimum=0.0)
        check_choice("Woodbury solve_dtype", self.solve_dtype, ("float32", "float64"))
        check_int("Woodbury chunk_size", self.chunk_size, minimum=1, why="directions per vmapped backward pass")
        self.rows: Tree | None = None
        self.chol: Tensor | None = None
        self.fit_info: dict[str, Any] = {}
        self._fingerprint: str | None = None
        self._damping_fitted: float | None = None

    def cache_identity(self) -> dict[str, Any]:
        """The settings that change s_test plus the fingerprint of the rows it was fitted on (not the folder)."""
        d = self.to_dict()
        for k in ("factor_dir", "overwrite", "progress", "max_memory_gb", "chunk_size"):
            d.pop(k, None)
        d["rows_fingerprint"] = self._fingerprint
        return d

    @property
    def rank(self) -> int:
        """Rows kept by the fit (the rank bound of the curvature), 0 before :meth:`fit_factors`."""
        return 0 if self.rows is None else int(next(iter(self.rows.values())).shape[0])

    # ------------------------------------------------------------------ fitting
    def fingerprint(self, split: SplitModel, rows: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, Any]:
        """Everything the rows depend on: the split (model, hook, SAE, theta2, task), the rows, fisher, batching."""
        return self.fit_fingerprint(split, rows, batch_size, format_version=_FORMAT, fisher=self.fisher)

    def _check_memory(self, params: Params, n_rows: int, per_example: float) -> None:
        numel = sum(p.numel() for p in params.values())
        itemsize = next(iter(params.values())).element_size()
        need = n_rows * per_example * numel * itemsize / 2**30
        if need > self.max_memory_gb:
            raise SettingsError(
                f"Woodbury(fisher={self.fisher!r}) keeps about {n_rows} x {per_example:g} rows of theta2 "
                f"({numel:,} entries): {need:.1f} GB, above max_memory_gb={self.max_memory_gb:g}. Fix: fewer Hessian "
                "rows, a smaller theta2 (a later split, downstream=...), fisher='empirical' (one row per example), "
                "EKFAC() (factors independent of the number of rows), or a larger max_memory_gb."
            )

    def _check_first(self, split: SplitModel, params: Params, inp: SplitInputs, rows: Tree) -> None:
        """The first batch's rows against an independent computation of the same curvature (its mean gradient,
        or a Gauss-Newton-vector product by forward mode, :func:`~repinf_lens.curvature.hvp.gnhvp`)."""
        n = len(inp)
        if self.fisher == "empirical":
            want = loss_grad(split, params, inp)
            got = {k: v.sum(0) / n for k, v in rows.items()}
            what = "the mean of the per-example gradients vs the batch's gradient"
        else:
            gen = torch.Generator().manual_seed(0)
            v = {k: torch.randn(p.shape, generator=gen).to(p) for k, p in params.items()}
            want = dataset_hvp(split, params, [inp], v, gauss_newton=True)
            coef = tgram(rows, tstack([v]))  # [R, 1]
            got = {k: t[0] / n for k, t in tcombine(rows, coef).items()}
            what = "sum_r u_r (u_r . v) / B vs the Gauss-Newton-vector product J^T H_z J v"
        num = math.sqrt(sum(float((got[k].detach().double() - want[k].detach().double()).pow(2).sum()) for k in want))
        den = math.sqrt(sum(float(want[k].detach().double().pow(2).sum()) for k in want))
        if not num <= 1e-3 * max(den, 1e-30):
            raise WoodburyCheckError(
                f"Woodbury's rows of the first Hessian batch do not reproduce the curvature ({what}: relative error "
                f"{num / max(den, 1e-30):.2e}). The per-example path (torch.func.vmap over one-example inputs) does "
                "not compute what the batch's loss does: the task's mean loss is probably not the mean of its "
                "per-example losses, or the downstream part mixes examples. Fix: EKFAC() or CG(); report the task."
            )

    def fit_factors(
        self, split: Any, task: Any, rows: Sequence[Mapping[str, Any]], *, batch_size: int | None = None,
        progress: bool = True, prepare: PrepareFn | None = None,
    ) -> None:  # fmt: skip
        """Compute (or read back) the rows of the curvature of ``split``'s theta2 on ``rows``, and factor
        ``lambda I + U U^T`` (Cholesky, float64). Batches of ``batch_size`` rows (default: the solver's); ``prepare``
        as in :meth:`InverseHessianSolver.fit_factors` (the attributor's keeps the upstream inputs for scoring).

        Raises:
            SettingsError: the rows would exceed ``max_memory_gb``, or the loss has no Gauss-Newton matrix.
            ManifestMismatchError: ``factor_dir`` holds rows fitted on other inputs (and not ``overwrite``).
            WoodburyCheckError: the first batch's rows disagree with the independent curvature check.
        """
        check_int("Woodbury.fit_factors batch_size", batch_size, minimum=1, allow_none=True)
        if task is not None and task is not split.task:
            split = split.with_task(task)
        rows = list(rows)
        if not rows:
            raise ValueError("fit_factors got no Hessian rows. Fix: pass the examples whose mean loss defines H.")
        bs = int(batch_size or self.batch_size)
        params = {k: v.detach() for k, v in split.downstream_params().items()}
        fp = self.fingerprint(split, rows, bs)
        fp_hash = fingerprint_hash(fp)
        folder = Path(self.factor_dir) if self.factor_dir else None
        manifest = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            manifest = open_manifest(folder, kind=_KIND, fingerprint=fp, overwrite=self.overwrite,
                                     owned=("rows",), extra={"batches_done": 0})  # fmt: skip
            (folder / "rows").mkdir(exist_ok=True)
        batches = [(lo, min(len(rows), lo + bs)) for lo in range(0, len(rows), bs)]
        n = len(rows)
        # rows per vmapped backward: at most chunk_size, and about 2**26 theta2 entries per call (the per-row
        # intermediates of a large theta2 take GBs each)
        chunk = min(self.chunk_size, max(1, (1 << 26) // max(1, sum(p.numel() for p in params.values()))))
        t0 = time.perf_counter()
        parts: list[Tree] = []
        loaded: list[int] = []
        computed: list[int] = []
        task_ = split.task
        for bi, (lo, hi) in enumerate(tqdm(batches, desc="Woodbury rows", disable=not (progress and self.progress))):
            path = None if folder is None else folder / "rows" / f"rows-{bi:05d}.safetensors"
            if path is not None and shard_is_done(path, fingerprint=fp_hash, start=lo, stop=hi):
                tensors = read_verified(path)[1]
                if tensors is not None:
                    parts.append(tensors)
                    loaded.append(bi)
                    continue
            inp = prepare(rows[lo:hi]) if prepare is not None else split.prepare(task_.collate(rows[lo:hi]))
            if self.fisher == "empirical":
                if not computed:
                    self._check_memory(params, n, 1.0)
                part = per_example_grads(split, params, inp, chunk_size=chunk)
            else:
                idx, cots = gauss_newton_directions(split, params, inp, who=_GN_WHO, fix=_GN_FIX)
                if not computed:  # (rows per example from the first batch: e.g. 3 for 4 options in 10 letters)
                    self._check_memory(params, n, len(idx) / len(inp))
                part = per_example_logit_vjps(split, params, inp, idx, cots, chunk_size=chunk)
            if not computed:
                self._check_first(split, params, inp, part)
            part = {k: v / math.sqrt(n) for k, v in part.items()}  # (1/N) sum over the examples of the mean loss
            if path is not None:
                write_shard(path, part, fingerprint=fp_hash, start=lo, stop=hi)
                assert manifest is not None and folder is not None
                manifest["batches_done"] = bi + 1
                write_json_atomic(folder / "manifest.json", manifest)
            parts.append(part)
            computed.append(bi)
        u: Tree = {}
        for k in params:  # one entry at a time, each batch's part freed as it is copied: the peak is the rows + one
            u[k] = torch.cat([p.pop(k).to(params[k]) for p in parts])
        del parts
        gram = tgram(u, u, product_dtype=torch.float64 if self.solve_dtype == "float64" else None)
        keep = torch.nonzero(gram.diagonal() > 0).flatten()
        if len(keep) < gram.shape[0]:  # (rows of examples whose loss is flat in theta2)
            for k in u:
                u[k] = u[k].index_select(0, keep.to(u[k].device))
            gram = gram.index_select(0, keep).index_select(1, keep)
        eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
        self.chol = torch.linalg.cholesky(0.5 * (gram + gram.T) + self.damping * eye)
        self.rows = u
        self._fingerprint = fp_hash
        self._damping_fitted = self.damping
        self.fit_info = {
            "folder": None if folder is None else str(folder), "fingerprint": fp_hash, "rank": self.rank,
            "n_rows": n, "batches_loaded": loaded, "batches_computed": computed,
            "seconds": time.perf_counter() - t0,
            "gram_top_eigenvalue": float(torch.linalg.eigvalsh(gram)[-1]) if gram.numel() else 0.0,
        }  # fmt: skip

    # ------------------------------------------------------------------ solving
    def _fitted(self) -> tuple[Tree, Tensor]:
        if self.rows is None or self.chol is None:
            raise RuntimeError(
                "Woodbury has no rows. Fix: call attributor.fit(hessian_rows) (or solver.fit_factors(split, task, "
                "rows)) first."
            )
        if self._damping_fitted is not None and self._damping_fitted != self.damping:
            raise RuntimeError(
                f"Woodbury was factored with damping {self._damping_fitted:g} and now has {self.damping:g}. Fix: call "
                "fit_factors again after changing the damping."
            )
        return self.rows, self.chol

    def solve_stacked(self, block: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``(U^T U + lambda I)^-1 g_i`` for every vector of a block (``[m, *shape]`` per theta2 entry)."""
        u, chol = self._fitted()
        missing = sorted(set(u) ^ set(block))
        if missing:
            raise KeyError(
                f"Woodbury's rows are over {sorted(u)} but the vectors have {sorted(block)} (differ in {missing}). "
                "Fix: solve for gradients of the split the rows were fitted on."
            )
        if self.solve_dtype == "float64":
            coef = torch.cholesky_solve(tgram(u, block), chol)  # [R, m]: (lambda I + U U^T)^-1 U g
            back = tcombine(u, coef, dtype=torch.float64)
            out = {k: ((g.to(torch.float64) - back[k]) / self.damping).to(g.dtype) for k, g in block.items()}
        else:
            coef = torch.cholesky_solve(tgram(u, block, product_dtype=None), chol)
            back = tcombine(u, coef)
            out = {k: (g - back[k].to(g.dtype)) / self.damping for k, g in block.items()}
        return self._checked(out)

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        """``(F + damping I)^-1 g`` with the fitted rows (``hvp_fn`` is not used)."""
        s = self.solve_stacked(tstack([g]))
        return tunstack(s)[0], SolveInfo(iterations=1, converged=True)

    def solve_many(
        self, hvp_fn: HVPFn, gs: list[Tree], *, chunk_size: int | None = None
    ) -> tuple[list[Tree], list[SolveInfo]]:
        """Every query in one pass over the rows (``chunk_size`` queries at a time; ``None``: all)."""
        if not gs:
            return [], []
        step = len(gs) if chunk_size is None else max(1, int(chunk_size))
        out: list[Tree] = []
        for lo in range(0, len(gs), step):
            out.extend(tunstack(self.solve_stacked(tstack(gs[lo : lo + step]))))
        return out, [SolveInfo(iterations=1, converged=True) for _ in gs]


register_solver("woodbury", Woodbury)
