"""The settings of attribution: ONE :class:`AttributionConfig` for the CLI, the demo and the runners.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from repinf_lens.curvature.solvers import InverseHessianSolver, build_solver, get_solver_class
from repinf_lens.errors import SettingsError, check_float, check_int
from repinf_lens.influence.math import check_latent_method

__all__ = ["FISHERS", "AttributionConfig", "config_fields", "override", "solver_from_config"]

#: the values of :attr:`AttributionConfig.fisher` (each fitted curvature accepts some of them)
FISHERS: tuple[str, ...] = ("true", "expected", "empirical")


def _knob(default: Any, help: str, **meta: Any) -> Any:
    """A config field with what a command-line flag needs: its help and its check (``minimum``, ``fraction``,
    ``choices``, ``exclusive`` group), read by :func:`config_fields` (the CLI builds its flags from them)."""
    return field(default=default, metadata={"help": help, **meta})


def config_fields(cls: type) -> list[Field[Any]]:
    """The fields of a config dataclass, each with ``metadata["help"]`` (and optional ``minimum``, ``fraction``,
    ``choices``, ``exclusive``), in declaration order: what ``repinf-lens`` turns into ``--flags``."""
    out = list(fields(cls))
    missing = [f.name for f in out if "help" not in f.metadata or f.default is MISSING]
    if missing:
        raise TypeError(f"{cls.__name__} fields {missing} lack a default or a help text. Fix: declare them with _knob.")
    return out


def override(config: Any, values: dict[str, Any], *, what: str = "settings") -> Any:
    """``config`` with the fields in ``values`` replaced (checked again); an unknown name is refused, naming the
    valid ones."""
    names = {f.name for f in fields(config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SettingsError(f"Unknown {what} {unknown} for {type(config).__name__}. Fix: use one of {sorted(names)}.")
    return replace(config, **values)


@dataclass
class AttributionConfig:
    """Knobs of attribution (saved in every manifest): one config for the ``repinf-lens`` subcommands (whose
    ``--flags`` are generated from these fields), the demo (:class:`~repinf_lens.workflows.demo.DemoConfig`'s
    ``attribution``) and the runners (:func:`~repinf_lens.workflows.attribution.run_attribution`,
    :func:`~repinf_lens.workflows.faithfulness.run_faithfulness`,
    :func:`~repinf_lens.workflows.case_studies.run_case_studies`).

    ``solver`` names a solver of :mod:`repinf_lens.curvature` (``cg``, ``lissa``, ``explicit``, ``identity``);
    ``gauss_newton`` uses the PSD Gauss-Newton curvature (with few Hessian examples the exact Hessian of the real
    model is indefinite and CG meets negative curvature within a few iterations; then use it with damping ~1);
    ``hessian_examples`` training examples define H. ``fisher`` picks the Fisher of a fitted curvature (the solver,
    or CG's ``preconditioner``): ``"expected"`` is K-FAC / EK-FAC's true Fisher in closed form (on the peer
    benchmark above the sampled one on both settings, and tied with / above the empirical one), ``"true"`` samples
    it (Woodbury: closed form), ``"empirical"`` uses the rows' labels. With ``prefilter_fraction`` /
    ``prefilter_top_k`` the candidates are the union over queries of each query's most gradient-similar training
    examples.
    ``sketches``: a prebuilt sketch store (a folder, or the name of an index shipped in the package, e.g.
    ``"smollm2-135m-openbookqa-L22"``) used read-only instead of sketching the training set (checked against
    the split and the training rows before use).

    Impossible values (``max_iter=0``, a negative ``damping``, ``batch_size=0``, a ``prefilter_fraction``
    outside (0, 1], both prefilter knobs at once, ...) raise :class:`~repinf_lens.errors.SettingsError` here,
    before any model or data is touched.
    """

    solver: str = _knob("cg", "inverse-HVP solver (repinf_lens.register_solver adds one)", choices="solvers")
    damping: float = _knob(1e-3, "lambda in (H + lambda I)^-1", minimum=0.0)
    preconditioner: str | None = _knob(
        None,
        "CG only: precondition with fitted factors (ekfac, kfac, woodbury): CG's answer in fewer iterations",
        choices="factor_solvers",
    )
    block_cg: bool = _knob(False, "CG only: block CG, the queries solved together share one search space")
    fisher: str | None = _knob(
        None,
        "the Fisher of a fitted curvature (kfac, ekfac, woodbury; the solver or CG's preconditioner): true (K-FAC: "
        "labels sampled from the model; Woodbury: in closed form), expected (K-FAC: the true Fisher in closed form), "
        "empirical (the rows' labels); default: the solver's own",
        choices=FISHERS,
    )
    gauss_newton: bool = _knob(False, "PSD Gauss-Newton curvature instead of the Hessian")
    max_iter: int = _knob(20, "CG iterations / LiSSA depth", minimum=1)
    hessian_examples: int = _knob(64, "training examples that define H", minimum=1)
    prefilter_fraction: float | None = _knob(None, "keep this share per query (0.01-0.1)", fraction=True,
                                             exclusive="prefilter")  # fmt: skip
    prefilter_top_k: int | None = _knob(None, "keep this many per query", minimum=1, exclusive="prefilter")
    latent_method: str = _knob(
        "grad_x_input",
        "latent scores: grad_x_input (the paper, one swap), ig (exactly complete, ig_steps swaps) or none "
        "(example scores only, one forward JVP per batch)",
        choices="latent_methods",
    )
    ig_steps: int = _knob(64, "integrated-gradients quadrature nodes (latent_method ig)", minimum=1)
    ig_rule: str = _knob("graded", "integrated-gradients quadrature: graded, gauss or midpoint", choices="ig_rules")
    baseline: bool = _knob(False, "also score P(0) (every latent off) per pair, for completeness (+1 JVP)")
    sketch_dim: int = _knob(4096, "dimension of the gradient sketches of the prefilter", minimum=1)
    sketches: str | None = _knob(
        None, "prebuilt sketch store: a folder or a shipped index (smollm2-135m-openbookqa-L22)"
    )
    batch_size: int = _knob(8, "examples per forward / backward pass", minimum=1)
    max_batch_tokens: int | None = _knob(
        None,
        "also cap each batch at this many padded tokens (rows x longest): bounds memory on long prompts",
        minimum=1,
    )
    shard_size: int = _knob(256, "training examples per result shard (the unit of resuming)", minimum=1)
    query_chunk_size: int | None = _knob(8, "queries solved / scored together (memory grows)", minimum=1)

    def require_latents(self, where: str) -> None:
        """Raise :class:`SettingsError` when ``where`` (a workflow that ranks latents) got ``latent_method="none"``."""
        if self.latent_method == "none":
            raise SettingsError(
                f"{where} ranks SAE latents and tokens, but latent_method='none' computes example scores only. "
                "Fix: pass latent_method='grad_x_input' (the default) or 'ig'; use `repinf-lens attribute` or "
                "InfluenceAttributor(latent_method='none') for example scores alone."
            )

    def __post_init__(self) -> None:
        get_solver_class(self.solver, setting="AttributionConfig solver")  # any solver registered by now
        if self.block_cg and self.solver != "cg":
            raise SettingsError(
                f"AttributionConfig block_cg=True with solver={self.solver!r}: block CG is a CG variant. Fix: pass "
                "solver='cg' (with or without a preconditioner), or block_cg=False."
            )
        if self.preconditioner is not None:
            pre = get_solver_class(self.preconditioner, setting="AttributionConfig preconditioner")
            if self.solver != "cg" or not pre(damping=self.damping).fits_factors:
                raise SettingsError(
                    f"AttributionConfig preconditioner={self.preconditioner!r} with solver={self.solver!r}: a "
                    "preconditioner is a solver with fitted factors (ekfac, kfac, woodbury) for solver='cg'. Fix: pass "
                    "solver='cg', preconditioner='ekfac', or no preconditioner."
                )
        if self.fisher is not None:
            self._check_fisher()
        check_float(
            "AttributionConfig damping", self.damping, minimum=0.0,
            fix="pass damping >= 0 (the paper: 1e-3; about 1 with gauss_newton=True).",
        )  # fmt: skip
        check_int(
            "AttributionConfig max_iter", self.max_iter, minimum=1,
            why="CG iterations / LiSSA depth; none leaves s_test = 0 and every score 0",
            fix="pass max_iter=20 (the paper) or another count >= 1; solver='identity' skips the curvature.",
        )  # fmt: skip
        check_int("AttributionConfig hessian_examples", self.hessian_examples, minimum=1,
                  why="the training examples whose mean loss defines H")  # fmt: skip
        check_float(
            "AttributionConfig prefilter_fraction", self.prefilter_fraction, minimum=0.0, inclusive=False,
            maximum=1.0, allow_none=True,
            fix="pass a share in (0, 1], e.g. 0.05 keeps each query's top 5 % (the paper: 0.01-0.1), or None.",
        )  # fmt: skip
        check_int("AttributionConfig prefilter_top_k", self.prefilter_top_k, minimum=1, allow_none=True)
        if self.prefilter_fraction is not None and self.prefilter_top_k is not None:
            raise SettingsError(
                f"AttributionConfig got both prefilter_fraction={self.prefilter_fraction} and prefilter_top_k="
                f"{self.prefilter_top_k}. Fix: pass only one of them (or neither, for no prefilter)."
            )
        check_latent_method(self.latent_method, self.ig_steps, self.ig_rule, where="AttributionConfig", prefix="ig_")
        check_int("AttributionConfig sketch_dim", self.sketch_dim, minimum=1)
        check_int("AttributionConfig batch_size", self.batch_size, minimum=1)
        check_int("AttributionConfig max_batch_tokens", self.max_batch_tokens, minimum=1, allow_none=True,
                  fix="pass max_batch_tokens >= 1 (e.g. 2048), or None for batch_size rows of any length.")  # fmt: skip
        check_int("AttributionConfig shard_size", self.shard_size, minimum=1)
        check_int("AttributionConfig query_chunk_size", self.query_chunk_size, minimum=1, allow_none=True,
                  fix="pass query_chunk_size >= 1, or None for all queries at once.")  # fmt: skip

    def _check_fisher(self) -> None:
        """``fisher`` must name a value of :data:`FISHERS` that the fitted curvature (the solver, or CG's
        preconditioner) takes; anything else is refused here, naming the fix."""
        target = self.preconditioner or self.solver
        cls = get_solver_class(target, setting="AttributionConfig solver")
        if self.fisher not in FISHERS or "fisher" not in {f.name for f in fields(cls)}:
            raise SettingsError(
                f"AttributionConfig fisher={self.fisher!r} with solver={self.solver!r}"
                + (f", preconditioner={self.preconditioner!r}" if self.preconditioner else "")
                + f": fisher is one of {list(FISHERS)} and sets the Fisher of a fitted curvature (kfac, ekfac, "
                "woodbury). Fix: solver='ekfac' (or solver='cg', preconditioner='ekfac') with fisher='expected', "
                "'true' or 'empirical', or leave fisher unset."
            )
        cls.from_config(damping=self.damping, fisher=self.fisher)  # its own check names a value it does not take


def solver_from_config(cfg: AttributionConfig) -> InverseHessianSolver:
    """The registered solver ``cfg.solver`` built from the config's generic knobs (each solver takes its own:
    ``config_knobs``, e.g. LiSSA reads ``max_iter`` as its depth, Identity reads none); with ``preconditioner``
    CG gets that factor solver (same damping) as ``M^-1``; ``fisher`` goes to the fitted curvature (the
    preconditioner, else the solver)."""
    settings: dict[str, Any] = {}
    fisher = {} if cfg.fisher is None else {"fisher": cfg.fisher}
    if cfg.preconditioner is not None:
        settings["preconditioner"] = build_solver(
            cfg.preconditioner, damping=cfg.damping, batch_size=cfg.batch_size, **fisher
        )
    else:
        settings.update(fisher)
    if cfg.block_cg:
        settings["block"] = True
    return build_solver(
        cfg.solver, damping=cfg.damping, gauss_newton=cfg.gauss_newton, max_iter=cfg.max_iter,
        batch_size=cfg.batch_size, **settings,
    )  # fmt: skip
