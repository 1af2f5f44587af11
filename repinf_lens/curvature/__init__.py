"""Curvature on theta2: HVPs (exact and Gauss-Newton), inverse-HVP solvers, and the s_test cache."""

from repinf_lens.curvature.cache import STestCache, cache_key
from repinf_lens.curvature.hvp import dataset_grad, dataset_hvp, gnhvp, hvp, loss_grad
from repinf_lens.curvature.solvers import (
    CG,
    SOLVERS,
    Explicit,
    Identity,
    InverseHessianSolver,
    LiSSA,
    NegativeCurvatureWarning,
    SolveInfo,
    batched_hvp,
    solver_from_dict,
)

__all__ = [
    "CG",
    "SOLVERS",
    "Explicit",
    "Identity",
    "InverseHessianSolver",
    "LiSSA",
    "NegativeCurvatureWarning",
    "STestCache",
    "SolveInfo",
    "batched_hvp",
    "cache_key",
    "dataset_grad",
    "dataset_hvp",
    "gnhvp",
    "hvp",
    "loss_grad",
    "solver_from_dict",
]
