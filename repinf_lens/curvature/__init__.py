"""Curvature on theta2: HVPs (exact and Gauss-Newton), inverse-HVP solvers, and the s_test cache.

:mod:`~repinf_lens.curvature.solvers` holds the HVP-based solvers (CG, LiSSA, Explicit, Identity) and the registry;
:mod:`~repinf_lens.curvature.kfac` the factored ones fitted on the Hessian rows (K-FAC, EK-FAC), registered as
``"kfac"`` and ``"ekfac"``; :mod:`~repinf_lens.curvature.woodbury` the exact damped Gauss-Newton / empirical Fisher of
the Hessian rows inverted in sample space, ``"woodbury"``.
"""

from repinf_lens.curvature.cache import STestCache, cache_key
from repinf_lens.curvature.hvp import (
    dataset_grad,
    dataset_hvp,
    gauss_newton_directions,
    gnhvp,
    hvp,
    loss_grad,
    per_example_grads,
    per_example_logit_vjps,
    prepared_dataset_hvp,
)
from repinf_lens.curvature.kfac import EKFAC, KFAC, FactorBlock, FactorMappingError, KFACFactors, factor_blocks
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
from repinf_lens.curvature.woodbury import Woodbury, WoodburyCheckError, gauss_newton_rows

__all__ = [
    "CG",
    "EKFAC",
    "GENERIC_KNOBS",
    "KFAC",
    "SOLVERS",
    "Explicit",
    "FactorBlock",
    "FactorMappingError",
    "Identity",
    "InverseHessianSolver",
    "KFACFactors",
    "LiSSA",
    "NegativeCurvatureWarning",
    "STestCache",
    "SolveInfo",
    "Woodbury",
    "WoodburyCheckError",
    "batched_hvp",
    "build_solver",
    "cache_key",
    "dataset_grad",
    "dataset_hvp",
    "factor_blocks",
    "gauss_newton_directions",
    "gauss_newton_rows",
    "get_solver_class",
    "gnhvp",
    "hvp",
    "list_solvers",
    "loss_grad",
    "per_example_grads",
    "per_example_logit_vjps",
    "prepared_dataset_hvp",
    "register_solver",
    "solver_from_dict",
    "unregister_solver",
]
