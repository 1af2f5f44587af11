"""Inverse-Hessian-vector solvers: s = (H + lambda I)^-1 g on theta2.

Each solver is a small config dataclass with a ``solve(hvp_fn, g)`` method (one class per variant, a name ->
class registry, as SAELens does for SAE architectures). ``hvp_fn(v)`` returns ``H v`` for the MEAN loss over
the whole Hessian dataset (one pass over it per call); damping is added by the solver.

The registry: :func:`register_solver` (a decorator or a call) adds a solver under a name; :func:`get_solver_class`,
:func:`list_solvers` and :func:`build_solver` read it, and ``AttributionConfig(solver=...)``, ``repinf-lens
attribute --solver`` and :func:`solver_from_dict` accept every registered name. Each class says which of the
generic knobs (:data:`GENERIC_KNOBS`: damping, gauss_newton, max_iter, batch_size) it takes, and as which of its
fields, in ``config_knobs``; :meth:`InverseHessianSolver.from_config` builds it from them. Adding a solver::

    @register_solver("scaled_identity")
    @dataclass
    class ScaledIdentity(InverseHessianSolver):
        c: float = 1.0
        config_knobs: ClassVar[dict[str, str]] = {"damping": "damping"}

        @property
        def needs_hessian(self) -> bool:
            return False

        def solve(self, hvp_fn, g):
            return {k: v / (self.c + self.damping) for k, v in g.items()}, SolveInfo()

Solvers that fit their own curvature model on the Hessian rows instead of reading it through HVPs (K-FAC and
EK-FAC, :mod:`repinf_lens.curvature.kfac`, registered there as ``"kfac"`` / ``"ekfac"``) say so with
:attr:`InverseHessianSolver.fits_factors`: ``InfluenceAttributor.fit`` then calls their
:meth:`~InverseHessianSolver.fit_factors` with the split, the task and the rows, and their
:meth:`~InverseHessianSolver.cache_identity` adds the fitted factors' fingerprint to the s_test cache key.

``solve_many(hvp_fn, gs)`` solves for several right-hand sides (one per test query) together. CG runs the queries
in lockstep: the HVPs of all still-running queries come from ONE pass over the Hessian data (``torch.func.vmap``
over ``hvp_fn``: the primal forward/backward is shared, the tangents are batched), and each query stops once its
own residual is below ``tol`` (a per-query convergence mask), so every query does exactly the iterations of its
own :meth:`CG.solve`. The base class loops over :meth:`solve`.
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from repinf_lens._cache import fingerprint_rows
from repinf_lens._tree import (
    tadd,
    tcombine,
    tdot,
    tflatten,
    tgram,
    tnorm,
    tnumel,
    tscale,
    tstack,
    tunflatten,
    tunstack,
    tzeros_like,
)  # fmt: skip
from repinf_lens.errors import NonFiniteError, SettingsError, check_choice, check_finite, check_float, check_int

__all__ = [
    "CG",
    "GENERIC_KNOBS",
    "SOLVERS",
    "Explicit",
    "FittedSolver",
    "Identity",
    "InverseHessianSolver",
    "LiSSA",
    "NegativeCurvatureWarning",
    "SolveInfo",
    "batched_hvp",
    "build_solver",
    "get_solver_class",
    "list_solvers",
    "register_solver",
    "solver_from_dict",
    "unregister_solver",
]

Tree = dict[str, Tensor]
HVPFn = Callable[[Tree], Tree]
PrepareFn = Callable[[Sequence[Mapping[str, Any]]], Any]  # one batch of rows -> its SplitInputs
_S = TypeVar("_S", bound="InverseHessianSolver")

#: The solver knobs of ``AttributionConfig`` and ``repinf-lens attribute`` (``--damping``, ``--gauss-newton``,
#: ``--max-iter``, ``--batch-size``): each solver takes some of them (its ``config_knobs``) and ignores the others.
GENERIC_KNOBS: tuple[str, ...] = ("damping", "gauss_newton", "max_iter", "batch_size")


class NegativeCurvatureWarning(RuntimeWarning):
    """CG met a direction with p^T (H + lambda I) p <= 0: the damped Hessian is not positive definite."""


@dataclass
class SolveInfo:
    """What a solve did: iterations, residual norms (relative to ||g||), flags."""

    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool = True
    negative_curvature: bool = False
    n_hvp: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dense(block: Tree) -> dict[str, Tensor]:
    """Every tensor in row-major order (an HVP or a preconditioner may return a transposed weight's layout): block
    CG's products and updates then run on one layout, without a copy per operation."""
    return {k: v.contiguous() for k, v in block.items()}


def stacked_hvp(hvp_fn: HVPFn, block: Tree, *, chunk_size: int | None = None) -> dict[str, Tensor]:
    """``H v_i`` for every vector of a block (tensors ``[m, *shape]``), as a block: ``torch.func.vmap`` over
    ``hvp_fn``.

    Under ``vmap`` the primal part of each HVP (forward and backward on the Hessian data) runs once for all
    vectors and only the tangents are batched. ``chunk_size`` vectors at a time bound the memory (``None``: all).
    Falls back to one call per vector when ``hvp_fn`` uses an operation without a batching rule.
    """
    m = next(iter(block.values())).shape[0]
    step = m if chunk_size is None else max(1, int(chunk_size))
    parts: list[dict[str, Tensor]] = []
    for lo in range(0, m, step):
        part = {k: v[lo : lo + step] for k, v in block.items()}
        if step == 1 or m - lo == 1:
            parts.append({k: t.unsqueeze(0) for k, t in hvp_fn(tunstack(part)[0]).items()})
            continue
        try:
            parts.append(torch.func.vmap(hvp_fn)(part))
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one HVP per vector
            parts.append(tstack([hvp_fn(v) for v in tunstack(part)]))
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def batched_hvp(hvp_fn: HVPFn, vs: list[Tree], *, chunk_size: int | None = None) -> list[Tree]:
    """``[hvp_fn(v) for v in vs]`` computed together (:func:`stacked_hvp` on the stacked vectors)."""
    if not vs:
        return []
    if len(vs) == 1:
        return [hvp_fn(vs[0])]
    return tunstack(stacked_hvp(hvp_fn, tstack(vs), chunk_size=chunk_size))


@dataclass
class InverseHessianSolver:
    """Base class: ``damping`` (lambda), ``batch_size`` (Hessian batches), ``gauss_newton`` (PSD curvature)."""

    name: ClassVar[str] = "base"
    #: Which generic knobs (:data:`GENERIC_KNOBS`) this solver takes, as ``{generic knob: field of this class}``;
    #: :meth:`from_config` ignores the knobs not listed. CG takes ``max_iter`` and ``batch_size``, LiSSA takes
    #: ``max_iter`` as its ``depth``, Identity takes none.
    config_knobs: ClassVar[Mapping[str, str]] = {"damping": "damping", "gauss_newton": "gauss_newton"}
    #: :meth:`from_config` keyword arguments for a near-exact solve, added to the damping by
    #: :func:`~repinf_lens.analysis.lds.default_solvers` (the retraining checks, LDS / leave-one-out).
    accurate_settings: ClassVar[Mapping[str, Any]] = {}
    damping: float = 1e-3
    batch_size: int = 8
    gauss_newton: bool = False

    @classmethod
    def from_config(
        cls: type[_S],
        *,
        damping: float | None = None,
        gauss_newton: bool | None = None,
        max_iter: int | None = None,
        batch_size: int | None = None,
        **settings: Any,
    ) -> _S:
        """This solver built from the generic knobs (``None``: not given, the field keeps its default).

        Each knob listed in :attr:`config_knobs` goes to its field, the others are ignored; ``settings`` are
        fields of this class set as given (``scale=50.0`` for LiSSA) and win over the knobs. What
        ``AttributionConfig`` and ``repinf-lens attribute --solver NAME`` call (through :func:`build_solver`).
        """
        knobs = {"damping": damping, "gauss_newton": gauss_newton, "max_iter": max_iter, "batch_size": batch_size}
        kwargs = {cls.config_knobs[k]: v for k, v in knobs.items() if v is not None and k in cls.config_knobs}
        return cls(**{**kwargs, **settings})

    def __post_init__(self) -> None:
        """Refuse impossible settings at construction (:class:`~repinf_lens.errors.SettingsError`), before any HVP."""
        cls = type(self).__name__
        check_float(
            f"{cls} damping", self.damping, minimum=0.0,
            why="lambda in (H + lambda I); a negative one makes the damped Hessian less positive definite",
            fix="pass damping >= 0 (the paper: 1e-3; with gauss_newton=True about 1).",
        )  # fmt: skip
        check_int(f"{cls} batch_size", self.batch_size, minimum=1, why="Hessian examples per batch")

    def _checked(self, x: Tree, *, query: int | None = None) -> Tree:
        """``x`` (a solution) after :func:`~repinf_lens.errors.check_finite`: NaN/inf raise, naming the tensor."""
        where = f"after the {type(self).__name__} solve" + ("" if query is None else f" (query {query} of the solve)")
        return check_finite(
            "s_test = (H + lambda I)^-1 g_test", x, where=where,
            fix="raise the damping or use gauss_newton=True (the solve diverged), and check the Hessian data and "
            "the model weights for NaN/inf (with float16/bfloat16 try float32).",
        )  # fmt: skip

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        raise NotImplementedError

    def solve_many(
        self, hvp_fn: HVPFn, gs: list[Tree], *, chunk_size: int | None = None
    ) -> tuple[list[Tree], list[SolveInfo]]:
        """Solve ``(H + damping I) s_q = g_q`` for every ``g_q`` in ``gs`` (one per query).

        The base implementation calls :meth:`solve` once per query; :class:`CG` and :class:`Explicit` share
        the work between queries. ``chunk_size`` bounds how many vectors are pushed through one batched HVP.

        Returns:
            ``(solutions, infos)`` in the order of ``gs``.
        """
        pairs = []
        for q, g in enumerate(gs):
            try:
                pairs.append(self.solve(hvp_fn, g))
            except NonFiniteError as err:
                raise NonFiniteError(f"Query {q} of the solve: {err}") from err
        return [s for s, _ in pairs], [i for _, i in pairs]

    @property
    def needs_hessian(self) -> bool:
        return True

    @property
    def uses_hvp(self) -> bool:
        """Whether :meth:`solve` calls ``hvp_fn`` (then ``InfluenceAttributor.fit`` prepares the Hessian batches).

        True for the iterative solvers (CG, LiSSA, Explicit); False for those that precondition with fitted
        factors only (:class:`~repinf_lens.curvature.KFAC`, :class:`~repinf_lens.curvature.EKFAC`).
        """
        return self.needs_hessian

    @property
    def fits_factors(self) -> bool:
        """Whether the solver fits its own curvature model on the Hessian rows (:meth:`fit_factors`).

        False (the default: CG, LiSSA, Explicit, Identity): :meth:`InfluenceAttributor.fit
        <repinf_lens.influence.InfluenceAttributor.fit>` prepares the Hessian batches and :meth:`solve` reads the
        curvature through ``hvp_fn``. True (:class:`~repinf_lens.curvature.kfac.KFAC`,
        :class:`~repinf_lens.curvature.kfac.EKFAC`): ``fit`` calls :meth:`fit_factors` with the split, the task and
        the rows instead, and :meth:`solve` ignores ``hvp_fn``.
        """
        return False

    def fit_factors(
        self, split: Any, task: Any, rows: Sequence[Mapping[str, Any]], *, batch_size: int | None = None,
        progress: bool = True, prepare: PrepareFn | None = None,
    ) -> None:  # fmt: skip
        """Fit the solver's curvature model on the Hessian rows (only for solvers with :attr:`fits_factors`).

        Args:
            split: the :class:`~repinf_lens.split.SplitModel` whose theta2 the curvature is over.
            task: the task whose loss defines the curvature (the split's task when it is the same object).
            rows: the Hessian data (the examples whose MEAN loss defines H).
            batch_size: examples per pass (default: the solver's ``batch_size``).
            progress: show tqdm bars.
            prepare: ``rows -> SplitInputs`` of one batch of rows (default ``split.prepare(task.collate(rows))``).
                ``InfluenceAttributor.fit`` passes one that keeps the prepared inputs, so a second pass over the
                rows, the HVP batches and the scoring of the same rows reuse them instead of rerunning the
                upstream part.
        """
        raise NotImplementedError(
            f"{type(self).__name__} reads the curvature through HVPs and fits nothing. Fix: call "
            "InfluenceAttributor.fit(rows), which prepares the Hessian batches for it."
        )

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this solver's s_test vectors in caches and run manifests (default :meth:`to_dict`).

        Solvers that fit a curvature model add the identity of the fitted factors, so vectors solved with other
        factors (or by another solver) are never returned for them.
        """
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"solver": self.name, **asdict(self)}


class FittedSolver(InverseHessianSolver):
    """Base of the solvers that fit their curvature model on the Hessian rows (:meth:`fit_factors`) and never call
    ``hvp_fn``: K-FAC / EK-FAC (:mod:`repinf_lens.curvature.kfac`) and Woodbury
    (:mod:`repinf_lens.curvature.woodbury`). They can serve as CG's ``preconditioner``."""

    @property
    def fits_factors(self) -> bool:
        return True

    @property
    def uses_hvp(self) -> bool:
        return False

    @staticmethod
    def fit_fingerprint(
        split: Any, rows: Sequence[Mapping[str, Any]], batch_size: int, *, format_version: int, **settings: Any
    ) -> dict[str, Any]:
        """The identity of a fit (what a factor folder's manifest holds): the file format, the split, the Hessian rows,
        the batch size, and the solver's own ``settings`` (fisher, seed, ...), normalised through JSON."""
        fp = {
            "format_version": format_version,
            "split": split.fingerprint(),
            "rows": fingerprint_rows(rows),
            "n_rows": len(rows),
            "batch_size": int(batch_size),
            **settings,
        }
        return json.loads(json.dumps(fp, default=str))


@dataclass
class Identity(InverseHessianSolver):
    """No curvature: s = g (gradient dot product, TracIn-style). ``damping`` is ignored."""

    name: ClassVar[str] = "identity"
    config_knobs: ClassVar[Mapping[str, str]] = {}
    damping: float = 0.0

    @property
    def needs_hessian(self) -> bool:
        return False

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        return {k: v.clone() for k, v in g.items()}, SolveInfo()


def _no_hvp(v: Tree) -> Tree:
    raise RuntimeError("A CG preconditioner solves with its fitted factors only; it must not call hvp_fn.")


@dataclass
class CG(InverseHessianSolver):
    """Conjugate gradient on ``(H + damping I) s = g`` (the paper: damping 1e-3, 20 iterations, batches of 8).

    Args:
        damping: lambda added to the Hessian.
        max_iter: CG iterations (one HVP over the Hessian data each).
        tol: stop when ||residual|| <= tol * ||g||.
        batch_size: Hessian batch size (memory only: the HVP is the mean over the whole Hessian dataset).
        gauss_newton: use Gauss-Newton HVPs (PSD) instead of exact ones.
        on_negative_curvature: ``"warn"`` (default: warn, stop, return the last iterate), ``"raise"``, or
            ``"ignore"`` (keep iterating).
        preconditioner: a solver with fitted factors (``EKFAC(damping=...)``, ``KFAC(...)``) used as ``M^-1``:
            preconditioned CG on the EXACT damped Hessian (or its Gauss-Newton), so the answer is CG's and only
            the number of iterations changes. Its factors are fitted by ``InfluenceAttributor.fit`` (which also
            prepares the Hessian batches for the HVPs). ``None``: plain CG.
        block: in :meth:`solve_many`, block CG over the queries solved together (O'Leary 1980, in the
            breakdown-free form of Ji & Li 2017): one search space spanned by every query's (preconditioned)
            residuals, so each query's iterate minimises its error in the ``(H + lambda I)``-norm over the span of
            ALL the queries' Krylov spaces, which contains its own: per iteration never worse than plain
            (P)CG in exact arithmetic, and fewer iterations when the queries' gradients share directions (they
            do: the same option letters, the same model). The same HVPs per iteration (one batched pass);
            dependent directions are dropped by an eigenvalue cut of their Gram matrix. A query's result then
            depends on the others solved with it only through its accuracy; ``solve`` (one query) is plain CG.
            Part of the s_test cache key only when True.

    Preconditioned CG (``M^-1`` symmetric positive definite, here the damped Kronecker-factored Fisher's
    inverse): ``z = M^-1 r``, ``alpha = r.z / p.(H + lambda) p``, ``beta = r'.z' / r.z``, ``p' = z' + beta p``;
    with ``M = I`` it is the plain iteration. The residual reported and compared with ``tol`` is ``||r|| / ||g||``
    in both.
    """

    name: ClassVar[str] = "cg"
    config_knobs: ClassVar[Mapping[str, str]] = {
        "damping": "damping", "gauss_newton": "gauss_newton", "max_iter": "max_iter", "batch_size": "batch_size",
    }  # fmt: skip
    accurate_settings: ClassVar[Mapping[str, Any]] = {"max_iter": 100, "tol": 1e-8}
    max_iter: int = 20
    tol: float = 1e-6
    on_negative_curvature: str = "warn"
    preconditioner: Any = None
    block: bool = False

    #: block CG drops the directions whose Gram eigenvalue is below this times the largest (singular values
    #: below 1e-4 of the largest: float32 rounding of the larger ones)
    block_rank_tol: ClassVar[float] = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        pre = self.preconditioner
        if pre is not None and not (isinstance(pre, InverseHessianSolver) and pre.fits_factors):
            raise SettingsError(
                f"CG preconditioner must be a solver with fitted factors (EKFAC, KFAC, Woodbury), got "
                f"{type(pre).__name__}. "
                "Fix: CG(preconditioner=EKFAC(damping=...)), or leave it None for plain CG."
            )
        check_int(
            "CG max_iter", self.max_iter, minimum=1, why="no iteration leaves s_test = 0 and every score 0",
            fix="pass max_iter=20 (the paper) or another count >= 1; Identity() is the no-curvature solver.",
        )  # fmt: skip
        check_float("CG tol", self.tol, minimum=0.0, fix="pass tol >= 0 (0 = always run max_iter).")
        check_choice("CG on_negative_curvature", self.on_negative_curvature, ("warn", "raise", "ignore"))
        if not isinstance(self.block, bool):
            raise SettingsError(f"CG block must be True or False, got {self.block!r}. Fix: CG(block=True).")

    @property
    def fits_factors(self) -> bool:
        return self.preconditioner is not None

    @property
    def uses_hvp(self) -> bool:
        return True

    def fit_factors(
        self, split: Any, task: Any, rows: Sequence[Mapping[str, Any]], *, batch_size: int | None = None,
        progress: bool = True, prepare: PrepareFn | None = None,
    ) -> None:  # fmt: skip
        """Fit the preconditioner's factors (the HVP batches are prepared by ``InfluenceAttributor.fit``)."""
        if self.preconditioner is None:
            super().fit_factors(split, task, rows, batch_size=batch_size, progress=progress, prepare=prepare)
        self.preconditioner.fit_factors(split, task, rows, batch_size=batch_size or self.batch_size,
                                        progress=progress, prepare=prepare)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The settings; ``preconditioner`` only when there is one, so plain CG's dict (and with it every s_test
        cache key and run manifest written before preconditioning existed) is unchanged."""
        d = {"solver": self.name, **{k: v for k, v in asdict(self).items() if k != "preconditioner"}}
        if not self.block:  # (block=False is the CG every earlier key and manifest was written with)
            del d["block"]
        if self.preconditioner is not None:
            d["preconditioner"] = self.preconditioner.to_dict()
        return d

    def cache_identity(self) -> dict[str, Any]:
        d = self.to_dict()
        if self.preconditioner is not None:
            d["preconditioner"] = self.preconditioner.cache_identity()
        return d

    def _precondition(self, rs: list[Tree]) -> list[Tree]:
        """``M^-1 r`` for every residual (one batched pass), or ``r`` itself for plain CG."""
        if self.preconditioner is None:
            return rs
        return self.preconditioner.solve_many(_no_hvp, rs)[0]

    def _curvature_not_finite(self, pap: Tensor, ap: Tree, it: int, q: int | None = None) -> None:
        """Raise when p^T (H + lambda I) p is NaN/inf: name the tensors of the HVP that are not finite."""
        if bool(torch.isfinite(pap)):
            return
        where = f"at CG iteration {it}" + ("" if q is None else f" (query {q} of the solve)")
        fix = (
            "check the Hessian data, the model weights and the SAE for NaN/inf (with float16/bfloat16 try "
            "float32), or raise the damping."
        )
        check_finite("The Hessian-vector product (H + lambda I) p", ap, where=where, fix=fix)
        raise NonFiniteError(f"p^T (H + lambda I) p = {float(pap)} {where}. Fix: {fix}")

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        info = SolveInfo(converged=False)
        x = tzeros_like(g)
        r = {k: v.clone() for k, v in g.items()}
        g_norm = float(tnorm(g))
        if not math.isfinite(g_norm):
            check_finite("g_test (the right-hand side)", g, where="given to CG.solve")
        if g_norm == 0.0:
            info.converged = True
            return x, info
        z = self._precondition([r])[0]
        p = {k: v.clone() for k, v in z.items()}
        rs = tdot(r, z)
        info.residuals.append(1.0)
        for it in range(self.max_iter):
            ap = tadd(hvp_fn(p), p, self.damping)
            info.n_hvp += 1
            pap = tdot(p, ap)
            self._curvature_not_finite(pap, ap, it)
            if float(pap) <= 0.0:
                info.negative_curvature = True
                if self._negative_curvature(f"CG iteration {it}: p^T (H + {self.damping:g} I) p = {float(pap):.3e}"):
                    break
            alpha = rs / pap
            x = tadd(x, p, alpha)
            r = tadd(r, ap, -alpha)
            info.iterations = it + 1
            rel = float(tnorm(r)) / g_norm
            info.residuals.append(rel)
            if rel <= self.tol:
                info.converged = True
                break
            if it == self.max_iter - 1:
                break
            z = self._precondition([r])[0]
            rs_new = tdot(r, z)
            p = tadd(z, p, rs_new / rs)
            rs = rs_new
        return self._checked(x), info

    def solve_many(
        self, hvp_fn: HVPFn, gs: list[Tree], *, chunk_size: int | None = None
    ) -> tuple[list[Tree], list[SolveInfo]]:
        """CG for several right-hand sides in lockstep, with per-query convergence masks.

        Each iteration computes ``H p_q`` for every still-running query in one batched pass over the Hessian data
        (:func:`batched_hvp`, ``chunk_size`` vectors at a time) and then applies exactly :meth:`solve`'s update
        to each query. A query leaves the active set once its relative residual is ``<= tol`` (or, with
        ``on_negative_curvature="warn"``, when it meets negative curvature), so its iterations, residuals and
        solution are those of its own :meth:`solve` (up to float rounding of the batched HVP).

        With ``block=True`` (and more than one non-zero query) the queries share one search space instead
        (:meth:`_solve_block`).
        """
        g_norms, infos, active = self._start(gs)
        if self.block and len(active) > 1:
            return self._solve_block(hvp_fn, gs, g_norms, infos, active, chunk_size=chunk_size)
        xs = [tzeros_like(g) for g in gs]
        rs_ = [dict(g) for g in gs]  # no copies: every update below makes new tensors, gs is never modified
        ps: list[Tree] = [dict(g) for g in gs]
        rss: dict[int, Tensor] = {}  # per active query: r.z (r.r for plain CG)
        for q, z in zip(active, self._precondition([rs_[q] for q in active])):
            ps[q] = dict(z)
            rss[q] = tdot(rs_[q], z)
        for it in range(self.max_iter):
            if not active:
                break
            hps = batched_hvp(hvp_fn, [ps[q] for q in active], chunk_size=chunk_size)
            still: list[int] = []
            for q, hp in zip(active, hps):
                info, p = infos[q], ps[q]
                ap = tadd(hp, p, self.damping)
                info.n_hvp += 1
                pap = tdot(p, ap)
                self._curvature_not_finite(pap, ap, it, q)
                if float(pap) <= 0.0:
                    info.negative_curvature = True
                    what = f"CG iteration {it} (query {q}): p^T (H + {self.damping:g} I) p = {float(pap):.3e}"
                    if self._negative_curvature(what):
                        continue
                alpha = rss[q] / pap
                xs[q] = tadd(xs[q], p, alpha)
                rs_[q] = tadd(rs_[q], ap, -alpha)
                info.iterations = it + 1
                rel = float(tnorm(rs_[q])) / g_norms[q]
                info.residuals.append(rel)
                if rel <= self.tol:
                    info.converged = True
                    continue
                still.append(q)
            if it == self.max_iter - 1:
                break
            for q, z in zip(still, self._precondition([rs_[q] for q in still])):  # one batched M^-1 pass
                rs_new = tdot(rs_[q], z)
                ps[q] = tadd(z, ps[q], rs_new / rss[q])
                rss[q] = rs_new
            active = still
        return [self._checked(x, query=q) for q, x in enumerate(xs)], infos

    def _orth(self, w: Tree) -> Tree | None:
        """An orthonormal basis of the block's span (``None`` if it is zero): ``W V diag(ev)^-1/2`` from the
        eigendecomposition of its Gram matrix, directions with eigenvalue below ``block_rank_tol`` times the
        largest dropped."""
        ev, vec = torch.linalg.eigh(tgram(w, w))
        top = float(ev.max()) if ev.numel() else 0.0
        if not top > 0.0 or not math.isfinite(top):
            return None
        keep = ev > self.block_rank_tol * top
        return tcombine(w, vec[:, keep] / ev[keep].sqrt())

    def _precondition_stacked(self, r: Tree) -> Tree:
        """``M^-1 r_i`` for every vector of a block, as a block (``r`` itself for plain CG)."""
        if self.preconditioner is None:
            return r
        solve_stacked = getattr(self.preconditioner, "solve_stacked", None)
        if solve_stacked is not None:
            return solve_stacked(r)
        return tstack(self._precondition(tunstack(r)))

    def _start(self, gs: list[Tree]) -> tuple[list[float], list[SolveInfo], list[int]]:
        """Per query: ``||g||`` (a non-finite one raises, naming the tensor), a fresh :class:`SolveInfo` (converged
        for ``g = 0``, else with the initial relative residual 1), and the queries with ``g != 0``."""
        g_norms = [float(tnorm(g)) for g in gs]
        infos = [SolveInfo(converged=False) for _ in gs]
        active: list[int] = []
        for q, g in enumerate(gs):
            if not math.isfinite(g_norms[q]):
                check_finite("g_test (the right-hand side)", g, where=f"for query {q} of the solve")
            if g_norms[q] == 0.0:
                infos[q].converged = True
                continue
            infos[q].residuals.append(1.0)
            active.append(q)
        return g_norms, infos, active

    def _negative_curvature(self, what: str) -> bool:
        """``what`` (a curvature <= 0 at some iteration) under ``on_negative_curvature``: raise, or warn and return
        True (stop), or return False (``"ignore"``: keep iterating)."""
        msg = (
            f"{what} <= 0, the damped Hessian is not positive definite on theta2. Fix: CG(gauss_newton=True) (PSD "
            "Gauss-Newton curvature) or a larger damping."
        )
        if self.on_negative_curvature == "raise":
            raise FloatingPointError(msg)
        if self.on_negative_curvature == "warn":
            warnings.warn(msg, NegativeCurvatureWarning, stacklevel=4)
            return True
        return False

    def _solve_block(
        self, hvp_fn: HVPFn, gs: list[Tree], g_norms: list[float], infos: list[SolveInfo], active: list[int],
        *, chunk_size: int | None = None,
    ) -> tuple[list[Tree], list[SolveInfo]]:  # fmt: skip
        """Block (preconditioned) CG over every non-zero query (``block=True``): breakdown-free block CG.

        ``R = G``, ``P = orth(M^-1 R)``; per iteration ``Q = (H + lambda) P``, ``alpha = (P^T Q)^-1 P^T R``,
        ``X += P alpha``, ``R -= Q alpha``, ``beta = -(P^T Q)^-1 Q^T M^-1 R``, ``P = orth(M^-1 R + P beta)``, all
        Gram matrices in float64. ``P^T Q`` not positive definite is negative curvature (the block's
        ``on_negative_curvature`` applies to every query). It stops when every query's relative residual is
        ``<= tol`` or after ``max_iter`` iterations; a query that converged earlier keeps being refined.
        """
        norms = torch.tensor([g_norms[q] for q in active], dtype=torch.float64)
        b = tstack([gs[q] for q in active])
        x = {k: torch.zeros_like(v) for k, v in b.items()}
        r: Tree = b
        p = self._orth(_dense(self._precondition_stacked(r)))
        for it in range(self.max_iter):
            if p is None:  # (every residual exactly zero)
                break
            q_blk = tadd(_dense(stacked_hvp(hvp_fn, p, chunk_size=chunk_size)), p, self.damping)
            pq = tgram(p, q_blk)
            pq = (pq + pq.T) / 2
            if not bool(torch.isfinite(pq).all()):
                check_finite("The Hessian-vector products (H + lambda I) P", q_blk, where=f"at block CG iteration {it}",
                             fix="check the Hessian data, the model weights and the SAE for NaN/inf, or raise the "
                             "damping.")  # fmt: skip
            for q in active:
                infos[q].n_hvp += 1
            low = float(torch.linalg.eigvalsh(pq).min())
            if low <= 0.0:
                for q in active:
                    infos[q].negative_curvature = True
                what = (
                    f"block CG iteration {it}: the smallest eigenvalue of P^T (H + {self.damping:g} I) P is {low:.3e}"
                )
                if self._negative_curvature(what):
                    break
            alpha = torch.linalg.solve(pq, tgram(p, r))
            x = tadd(x, tcombine(p, alpha))
            r = tadd(r, tcombine(q_blk, alpha), -1.0)
            rel = (tgram(r, r).diagonal().clamp_min(0).sqrt() / norms).tolist()
            for j, q in enumerate(active):
                infos[q].iterations = it + 1
                infos[q].residuals.append(rel[j])
                infos[q].converged = rel[j] <= self.tol
            if all(infos[q].converged for q in active) or it == self.max_iter - 1:
                break
            z = _dense(self._precondition_stacked(r))
            beta = -torch.linalg.solve(pq, tgram(q_blk, z))
            p = self._orth(tadd(z, tcombine(p, beta)))
        xs = [tzeros_like(g) for g in gs]
        for q, xq in zip(active, tunstack(x)):
            xs[q] = xq
        return [self._checked(xq, query=q) for q, xq in enumerate(xs)], infos


@dataclass
class LiSSA(InverseHessianSolver):
    """LiSSA (Agarwal et al. 2017): h <- g + h - (H + damping I) h / scale, s = h / scale.

    Converges when ``scale`` exceeds the largest eigenvalue of ``H + damping I``. ``depth`` iterations of one
    full-Hessian-data HVP each; ``tol`` stops early on a small relative update.
    """

    name: ClassVar[str] = "lissa"
    config_knobs: ClassVar[Mapping[str, str]] = {
        "damping": "damping",
        "gauss_newton": "gauss_newton",
        "max_iter": "depth",
    }
    accurate_settings: ClassVar[Mapping[str, Any]] = {"max_iter": 400, "scale": 50.0}
    scale: float = 10.0
    depth: int = 200
    tol: float = 1e-7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(
            "LiSSA scale", self.scale, minimum=0.0, inclusive=False,
            fix="pass a scale > 0, above the largest eigenvalue of H + damping I (e.g. 10 or 100).",
        )  # fmt: skip
        check_int(
            "LiSSA depth", self.depth, minimum=1, why="no iteration leaves s_test = g_test / scale",
            fix="pass depth >= 1 (e.g. 200).",
        )  # fmt: skip
        check_float("LiSSA tol", self.tol, minimum=0.0, fix="pass tol >= 0 (0 = always run depth).")

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        info = SolveInfo(converged=False)
        h = {k: v.clone() for k, v in g.items()}
        g_norm = float(tnorm(g)) or 1.0
        for it in range(self.depth):
            ah = tadd(hvp_fn(h), h, self.damping)
            info.n_hvp += 1
            new = tadd(tadd(g, h), ah, -1.0 / self.scale)
            delta = float(tnorm(tadd(new, h, -1.0))) / g_norm
            h = new
            info.iterations = it + 1
            info.residuals.append(delta)
            if not math.isfinite(delta):
                check_finite(
                    "The LiSSA iterate", new, where=f"at iteration {it} (it diverged)",
                    fix="increase `scale` (> largest eigenvalue of H + damping I), and check the model and the "
                    "Hessian data for NaN/inf.",
                )  # fmt: skip
                raise NonFiniteError(
                    f"LiSSA diverged at iteration {it} (the update is NaN/inf). Fix: increase `scale` (> largest "
                    "eigenvalue of H + damping I), and check the model and the Hessian data for NaN/inf."
                )
            if delta <= self.tol:
                info.converged = True
                break
        return self._checked(tscale(h, 1.0 / self.scale)), info


@dataclass
class Explicit(InverseHessianSolver):
    """Dense solve: build H column by column with |theta2| HVPs, then ``torch.linalg.solve`` (small theta2 only)."""

    name: ClassVar[str] = "explicit"
    max_params: int = 20000
    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Explicit max_params", self.max_params, minimum=1)
        check_int("Explicit chunk_size", self.chunk_size, minimum=1, why="HVP columns per batch")

    def matrix(self, hvp_fn: HVPFn, like: Tree) -> Tensor:
        """The dense, symmetrised Hessian ``[n, n]`` (float64) of the mean loss over the Hessian data.

        Columns are HVPs with basis vectors, ``chunk_size`` at a time under ``torch.func.vmap`` (one at a time
        when the model does not support vmap).
        """
        n = tnumel(like)
        if n > self.max_params:
            raise ValueError(
                f"Explicit() would build a {n} x {n} Hessian (> max_params={self.max_params}). Fix: "
                "use CG(), or restrict theta2 with SplitModel(..., downstream=...)."
            )
        device = next(iter(like.values())).device
        batched = torch.func.vmap(lambda flat: tflatten(hvp_fn(tunflatten(flat, like))))
        cols = []
        for start in range(0, n, self.chunk_size):
            stop = min(n, start + self.chunk_size)
            eye = torch.zeros(stop - start, n, device=device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            try:
                cols.append(batched(eye).double().cpu())
            except RuntimeError:  # an op without a batching rule: one HVP per column
                cols.append(torch.stack([tflatten(hvp_fn(tunflatten(e, like))).double().cpu() for e in eye]))
        h = torch.cat(cols, dim=0).T
        return 0.5 * (h + h.T)

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        h = self.matrix(hvp_fn, g)
        n = h.shape[0]
        a = h + self.damping * torch.eye(n, dtype=h.dtype)
        s = torch.linalg.solve(a, tflatten(g).double().cpu())
        info = SolveInfo(iterations=1, n_hvp=n)
        return self._checked({k: v.to(g[k].device) for k, v in tunflatten(s, g).items()}), info

    def solve_many(
        self, hvp_fn: HVPFn, gs: list[Tree], *, chunk_size: int | None = None
    ) -> tuple[list[Tree], list[SolveInfo]]:
        """Build the dense Hessian ONCE and solve for every query (the first info counts its HVPs)."""
        if not gs:
            return [], []
        h = self.matrix(hvp_fn, gs[0])
        n = h.shape[0]
        a = h + self.damping * torch.eye(n, dtype=h.dtype)
        rhs = torch.stack([tflatten(g).double().cpu() for g in gs], dim=1)
        sol = torch.linalg.solve(a, rhs)
        outs = [
            self._checked({k: v.to(g[k].device) for k, v in tunflatten(sol[:, i], g).items()}, query=i)
            for i, g in enumerate(gs)
        ]
        infos = [SolveInfo(iterations=1, n_hvp=n if i == 0 else 0) for i in range(len(gs))]
        return outs, infos


# ---------------------------------------------------------------------------------------------------------------
# the registry
_REGISTRY: dict[str, type[InverseHessianSolver]] = {}

#: The registered solvers, ``name -> class`` (a read-only, live view: register with :func:`register_solver`).
SOLVERS: Mapping[str, type[InverseHessianSolver]] = MappingProxyType(_REGISTRY)


def _check_registrable(name: str, cls: Any) -> None:
    """Raise unless ``cls`` is an :class:`InverseHessianSolver` subclass."""
    if not (isinstance(cls, type) and issubclass(cls, InverseHessianSolver)):
        raise TypeError(
            f"register_solver({name!r}, {cls!r}): not an InverseHessianSolver subclass. Fix: register a "
            "@dataclass subclass of repinf_lens.curvature.InverseHessianSolver that implements solve(hvp_fn, g)."
        )


def _check_declarations(name: str, cls: type[InverseHessianSolver]) -> None:
    """Raise unless ``cls``'s declared ``name`` is ``name`` (or absent) and its ``config_knobs`` name real fields."""
    declared = cls.__dict__.get("name")
    if declared is not None and declared != name:
        raise SettingsError(
            f"register_solver({name!r}, {cls.__name__}): the class declares name = {declared!r}, so its to_dict() "
            f"would record a solver {declared!r}. Fix: register it as {declared!r}, or set name = {name!r} in the "
            "class (or leave `name` out: register_solver sets it)."
        )
    init_fields = {f.name for f in fields(cls) if f.init} if is_dataclass(cls) else set()
    bad_knobs = sorted(set(cls.config_knobs) - set(GENERIC_KNOBS))
    bad_fields = sorted(f for f in cls.config_knobs.values() if f not in init_fields)
    if bad_knobs or bad_fields:
        raise SettingsError(
            f"{cls.__name__}.config_knobs = {dict(cls.config_knobs)}: "
            + (f"{bad_knobs} are not generic knobs {list(GENERIC_KNOBS)}" if bad_knobs else "")
            + ("; " if bad_knobs and bad_fields else "")
            + (f"{bad_fields} are not dataclass fields of {cls.__name__}" if bad_fields else "")
            + f". Fix: map generic knobs {list(GENERIC_KNOBS)} to fields of the class "
            "(is it decorated with @dataclass?)."
        )


def register_solver(name: str, cls: type[_S] | None = None, *, overwrite: bool = False) -> Any:
    """Register the solver class ``cls`` under ``name``; usable as a decorator (``@register_solver("mine")``).

    Then ``AttributionConfig(solver=name)``, ``repinf-lens attribute --solver name`` (register it before
    ``repinf_lens.cli.main`` runs), :func:`build_solver` and :func:`solver_from_dict` build it. The class gets
    ``name`` as its ``name`` (what :meth:`InverseHessianSolver.to_dict` records) unless it declares it itself.

    Args:
        name: the registry key (no whitespace; it is a CLI value).
        cls: a ``@dataclass`` subclass of :class:`InverseHessianSolver`; its ``config_knobs`` say which generic
            knobs it takes (default: ``damping`` and ``gauss_newton``).
        overwrite: replace an existing entry (built-ins included) instead of raising.

    Returns:
        ``cls`` itself (so the decorator leaves the class unchanged), or the decorator when ``cls`` is None.

    Raises:
        SettingsError: ``name`` is taken (and ``overwrite`` is False), is not a usable name, differs from the
            class's declared ``name``, or ``config_knobs`` names something that does not exist.
        TypeError: ``cls`` is not an :class:`InverseHessianSolver` subclass.
    """
    if not isinstance(name, str) or not name or any(ch.isspace() for ch in name) or name.startswith("-"):
        raise SettingsError(
            f"register_solver: {name!r} is not a usable solver name. Fix: pass a non-empty string without "
            "whitespace that does not start with '-' (it is a value of --solver), e.g. 'my_solver'."
        )

    def deco(c: type[_S]) -> type[_S]:
        _check_registrable(name, c)
        old = _REGISTRY.get(name)
        if old is not None and old is not c and not overwrite:
            raise SettingsError(
                f"A solver named {name!r} is already registered ({old.__module__}.{old.__qualname__}). Fix: pick "
                f"another name, or pass overwrite=True to replace it."
            )
        _check_declarations(name, c)
        if "name" not in c.__dict__:
            c.name = name
        _REGISTRY[name] = c
        return c

    return deco if cls is None else deco(cls)


def unregister_solver(name: str) -> type[InverseHessianSolver]:
    """Remove ``name`` from the registry (built-ins included) and return its class; unknown names raise."""
    cls = get_solver_class(name)
    del _REGISTRY[name]
    return cls


def list_solvers() -> list[str]:
    """The registered solver names, sorted (the values ``--solver`` and ``AttributionConfig.solver`` accept)."""
    return sorted(_REGISTRY)


def get_solver_class(name: str, *, setting: str | None = None) -> type[InverseHessianSolver]:
    """The solver class registered as ``name``; an unknown name raises :class:`SettingsError` with the closest.

    ``setting`` names where the name came from (``"AttributionConfig solver"``) for the message.
    """
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
    hint = "" if not close else f" Did you mean {close[0]!r}?" if len(close) == 1 else f" Did you mean one of {close}?"
    problem = (
        f"Unknown solver {name!r}.{hint} Registered solvers: {list_solvers()}."
        if setting is None
        else f"{setting} must be one of the registered solvers {list_solvers()}, got {name!r}.{hint}"
    )
    raise SettingsError(
        f"{problem} Fix: pass one of these, or register yours first with repinf_lens.register_solver(name, cls)."
    )


def build_solver(name: str, **knobs: Any) -> InverseHessianSolver:
    """``get_solver_class(name).from_config(**knobs)``: the solver ``name`` built from the generic knobs.

    ``build_solver("lissa", damping=1e-3, max_iter=200, batch_size=4)`` is ``LiSSA(damping=1e-3, depth=200)``
    (LiSSA takes ``max_iter`` as its depth and ignores ``batch_size``); see
    :meth:`InverseHessianSolver.from_config`.
    """
    return get_solver_class(name).from_config(**knobs)


def solver_from_dict(cfg: Mapping[str, Any]) -> InverseHessianSolver:
    """Rebuild a solver from :meth:`InverseHessianSolver.to_dict` (what configs and result folders store).

    Any registered solver; ``"solver"`` names it (default ``"cg"``), the other keys are its fields.
    """
    cfg = dict(cfg)
    name = cfg.pop("solver", "cg")
    cls = get_solver_class(name)
    if is_dataclass(cls):
        valid = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise SettingsError(
                f"Solver {name!r} ({cls.__name__}) has no setting {unknown}. Fix: pass only its fields {valid}."
            )
    return cls(**cfg)


for _builtin in (CG, LiSSA, Explicit, Identity):
    register_solver(_builtin.name, _builtin)
del _builtin
