"""Retraining checks of influence itself: leave-one-out and the linear datamodeling score (LDS).

The paper validates influence only through latent ablations; Kronfluence, dattri and TRAK report LDS. Both
harnesses here retrain theta2 (the parameters downstream of the split's hook, or any subset the
:class:`~repinf_lens.split.SplitModel` was built with) on cached upstream inputs, so they run on these machines.

The retraining objective is the one whose inverse Hessian the solvers approximate::

    J_S(theta2) = mean_{i in S} loss_i(theta2) + damping / 2 * ||theta2 - theta2_0||^2

First theta2 is refit on the full training set (``theta2*``), and influence is computed there (the influence
function assumes an optimum); each subset is then refit from ``theta2*``. ``theta2_0`` is the model's theta2
when the harness starts, and the model's parameters are restored on exit.

Sign convention: POSITIVE score = proponent (up-weighting lowers the test loss). So for a subset S the
predicted test loss is lower the more proponents it contains: ``predicted_S = - sum_{i in S} score_i``, and
LDS is the Spearman correlation over subsets between ``predicted_S`` and the retrained test loss (TRAK's
definition, averaged over test queries). Leave-one-out predicts ``loss_{-i} - loss = + score_i / n``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._stats import spearman  # re-exported: it lives below the analyses (the prefilter uses it)
from repinf_lens.curvature.solvers import InverseHessianSolver, get_solver_class
from repinf_lens.influence.attributor import InfluenceAttributor, as_rows
from repinf_lens.split import Params, SplitModel

__all__ = [
    "RetrainingCheck",
    "default_solvers",
    "leave_one_out",
    "linear_datamodeling_score",
    "refit_downstream",
    "spearman",
]


def default_solvers(
    damping: float, names: Sequence[str] = ("cg", "lissa", "identity")
) -> dict[str, InverseHessianSolver]:
    """The registered solvers ``names`` (default CG, LiSSA and Identity) with the retraining objective's damping.

    Each is built by its class's ``from_config(damping=damping, **accurate_settings)``: the near-exact settings
    the class declares (CG: 100 iterations, tol 1e-8; LiSSA: depth 400, scale 50), so a solver added with
    :func:`~repinf_lens.curvature.solvers.register_solver` can be checked here too.
    """
    out: dict[str, InverseHessianSolver] = {}
    for name in names:
        cls = get_solver_class(name)
        out[name] = cls.from_config(damping=damping, **cls.accurate_settings)
    return out


@dataclass
class RetrainingCheck:
    """Predicted vs actual test-loss changes, per solver.

    Attributes:
        kind: ``"lds"`` or ``"loo"``.
        spearman: per solver, the mean over queries of the Spearman correlation.
        per_query: per solver, the Spearman correlation of each query.
        pearson: per solver, mean Pearson correlation (LOO only meaningful; reported for both).
        sign_agreement: per solver, share of (query, subset) pairs whose predicted and actual changes have the
            same sign (LOO; for LDS the changes are centred per query first).
        predicted: per solver ``[Q, M]`` predictions; ``actual``: ``[Q, M]`` retrained test-loss changes.
        seconds: time spent retraining and per solver.
    """

    kind: str
    spearman: dict[str, float]
    per_query: dict[str, list[float]]
    pearson: dict[str, float]
    sign_agreement: dict[str, float]
    predicted: dict[str, Tensor]
    actual: Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per solver: the numbers a README table needs."""
        return [
            {
                "solver": name,
                "kind": self.kind,
                "spearman": self.spearman[name],
                "pearson": self.pearson[name],
                "sign_agreement": self.sign_agreement[name],
                "seconds": self.seconds.get(name),
            }
            for name in self.spearman
        ]


@contextlib.contextmanager
def _restored(split: SplitModel) -> Iterator[Params]:
    """Yield a copy of theta2 and put the model's original values back on exit."""
    original = {k: v.detach().clone() for k, v in split.downstream_params().items()}
    try:
        yield original
    finally:
        split.load_downstream_params(original)


def refit_downstream(
    split: SplitModel,
    inputs: list[Any],
    weights: Float[Tensor, " n"],
    start: Params,
    anchor: Params,
    *,
    damping: float,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> Params:
    """Minimise ``sum_i w_i loss_i / sum_i w_i + damping/2 ||theta2 - anchor||^2`` over theta2 with L-BFGS.

    Args:
        inputs: prepared :class:`~repinf_lens.split.SplitInputs` batches covering the examples in order.
        weights: one weight per example (0/1 masks for subsets).
        start: initial theta2; ``anchor``: the centre of the proximal term.
    """
    p = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    opt = torch.optim.LBFGS(
        list(p.values()),
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-4,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    total = float(weights.sum())

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.zeros((), dtype=next(iter(p.values())).dtype)
        offset = 0
        for inp in inputs:
            n = len(inp.batch)
            w = weights[offset : offset + n].to(loss.dtype)
            offset += n
            if bool((w != 0).any()):
                loss = loss + (split.inputs_loss(p, inp, reduction="none") * w.to(loss.device)).sum() / total
        loss = loss + 0.5 * damping * sum(((p[k] - anchor[k]) ** 2).sum() for k in p)
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach() for k, v in p.items()}


def _test_losses(split: SplitModel, params: Params, query_inputs: list[Any]) -> Tensor:
    with torch.no_grad():
        return torch.cat([split.inputs_loss(params, inp, reduction="none").double().cpu() for inp in query_inputs])


def _run(
    kind: str,
    split: SplitModel,
    train: Any,
    queries: Any,
    weights: Float[Tensor, "m n"],
    predict: Any,
    *,
    solvers: Mapping[str, InverseHessianSolver] | None,
    damping: float,
    batch_size: int,
    max_iter: int,
    progress: bool,
    config: dict[str, Any],
) -> RetrainingCheck:
    task = split.task
    t_rows, q_rows = as_rows(train, "training set"), as_rows(queries, "query set")
    solvers = dict(solvers) if solvers is not None else default_solvers(damping)
    inputs = [split.prepare(task.collate(t_rows[i : i + batch_size])) for i in range(0, len(t_rows), batch_size)]
    q_inputs = [split.prepare(task.collate([r])) for r in q_rows]
    seconds: dict[str, float] = {}
    with _restored(split) as theta0:
        t0 = time.perf_counter()
        full = refit_downstream(
            split, inputs, torch.ones(len(t_rows)), theta0, theta0, damping=damping, max_iter=max_iter
        )
        split.load_downstream_params(full)
        base_loss = _test_losses(split, full, q_inputs)
        actual = []
        for w in tqdm(weights, desc=f"{kind} retraining", disable=not progress):
            p = refit_downstream(split, inputs, w, full, theta0, damping=damping, max_iter=max_iter)
            actual.append(_test_losses(split, p, q_inputs) - base_loss)
        actual_t = torch.stack(actual, 1)  # [Q, M]
        seconds["retraining"] = round(time.perf_counter() - t0, 2)
        predicted: dict[str, Tensor] = {}
        for name, solver in solvers.items():
            t1 = time.perf_counter()
            att = InfluenceAttributor(  # example scores are all LDS / LOO read: no swap
                split, task, hessian=solver, batch_size=batch_size, use_cache=False, progress=False,
                latent_method="none",
            )  # fmt: skip
            if solver.needs_hessian:
                att.fit(t_rows)
            scores = att.attribute(q_rows, t_rows).example_scores.double()  # [Q, N]
            predicted[name] = predict(scores, weights.double(), len(t_rows))
            seconds[name] = round(time.perf_counter() - t1, 2)
    per_q = {n: [spearman(p[q], actual_t[q]) for q in range(len(q_rows))] for n, p in predicted.items()}

    def pearson(a: Tensor, b: Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    centred = actual_t - actual_t.mean(1, keepdim=True) if kind == "lds" else actual_t
    return RetrainingCheck(
        kind=kind,
        spearman={n: float(torch.tensor(v).nanmean()) for n, v in per_q.items()},
        per_query=per_q,
        pearson={
            n: float(torch.tensor([pearson(p[q], actual_t[q]) for q in range(len(q_rows))]).nanmean())
            for n, p in predicted.items()
        },
        sign_agreement={
            n: float(
                (torch.sign(p - (p.mean(1, keepdim=True) if kind == "lds" else 0)) == torch.sign(centred))
                .double()
                .mean()
            )
            for n, p in predicted.items()
        },
        predicted=predicted,
        actual=actual_t,
        seconds=seconds,
        config=config,
    )


def linear_datamodeling_score(
    split: SplitModel,
    train: Any,
    queries: Any,
    *,
    solvers: Mapping[str, InverseHessianSolver] | None = None,
    n_subsets: int = 20,
    fraction: float = 0.5,
    damping: float = 1e-2,
    seed: int = 0,
    batch_size: int = 16,
    max_iter: int = 200,
    progress: bool = True,
) -> RetrainingCheck:
    """LDS: retrain theta2 on ``n_subsets`` random subsets (each a ``fraction`` of ``train``), correlate.

    ``predicted_S = - sum_{i in S} score_i`` (POSITIVE score = proponent, so more proponents -> lower loss);
    ``actual_S`` is the retrained test loss minus the full-data one. Returns Spearman per solver (mean over
    queries), as TRAK / Kronfluence / dattri report it.
    """
    n = len(as_rows(train, "training set"))
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    m = max(1, round(fraction * n))
    weights = torch.zeros(n_subsets, n)
    for j in range(n_subsets):
        weights[j, torch.randperm(n, generator=g)[:m]] = 1.0

    def predict(scores: Tensor, w: Tensor, n_train: int) -> Tensor:
        return -(scores @ w.T)  # [Q, M]

    cfg = {"n_subsets": n_subsets, "fraction": fraction, "damping": damping, "seed": seed, "n_train": n}
    return _run(
        "lds", split, train, queries, weights, predict, solvers=solvers, damping=damping, batch_size=batch_size,
        max_iter=max_iter, progress=progress, config=cfg,
    )  # fmt: skip


def leave_one_out(
    split: SplitModel,
    train: Any,
    queries: Any,
    *,
    solvers: Mapping[str, InverseHessianSolver] | None = None,
    n_remove: int = 20,
    damping: float = 1e-2,
    batch_size: int = 16,
    max_iter: int = 200,
    progress: bool = True,
) -> RetrainingCheck:
    """Leave-one-out: retrain without each of the first ``n_remove`` examples; predicted change ``+score_i/n``."""
    n = len(as_rows(train, "training set"))
    k = min(n_remove, n)
    weights = torch.ones(k, n)
    weights[torch.arange(k), torch.arange(k)] = 0.0

    def predict(scores: Tensor, w: Tensor, n_train: int) -> Tensor:
        return scores[:, :k] / n_train

    cfg = {"n_remove": k, "damping": damping, "n_train": n}
    return _run(
        "loo", split, train, queries, weights, predict, solvers=solvers, damping=damping, batch_size=batch_size,
        max_iter=max_iter, progress=progress, config=cfg,
    )  # fmt: skip
