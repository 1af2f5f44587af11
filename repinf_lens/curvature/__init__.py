"""Curvature on theta2: HVPs (exact and Gauss-Newton), inverse-HVP solvers, and the s_test cache."""

from repinf_lens.curvature.cache import STestCache, cache_key
from repinf_lens.curvature.hvp import dataset_grad, dataset_hvp, gnhvp, hvp, loss_grad
from repinf_lens.curvature.solvers import (
    CG,
    GENERIC_KNOBS,
    SOLVERS,
    Explicit,
    Identity,
    InverseHessianSolver,
    LiSSA,
    NegativeCurvatureWarning,
    SolveInfo,
    batched_hvp,
    build_solver,
    get_solver_class,
    list_solvers,
    register_solver,
    solver_from_dict,
    unregister_solver,
)

__all__ = [
    "CG",
    "GENERIC_KNOBS",
    "SOLVERS",
    "Explicit",
    "Identity",
    "InverseHessianSolver",
    "LiSSA",
    "NegativeCurvatureWarning",
    "STestCache",
    "SolveInfo",
    "batched_hvp",
    "build_solver",
    "cache_key",
    "dataset_grad",
    "dataset_hvp",
    "get_solver_class",
    "gnhvp",
    "hvp",
    "list_solvers",
    "loss_grad",
    "register_solver",
    "solver_from_dict",
    "unregister_solver",
]
