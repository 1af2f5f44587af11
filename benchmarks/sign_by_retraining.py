"""Which sign do the example scores deserve? Remove each query's top proponents / opponents and retrain (issue 17).

The package's convention is ``score(z_train, z_test) = + g_test^T (H + lambda I)^-1 g_train`` with POSITIVE =
proponent: up-weighting the training example lowers the test loss, so REMOVING a group ``S`` of proponents
should RAISE it. First order (the leave-one-out prediction of :mod:`repinf_lens.analysis.lds`, summed over the
group)::

    predicted_S = loss_{-S} - loss = + sum_{i in S} score_i / n

This settles the sign by retraining alone, independently of latent ablations. The setting is the one of
``benchmarks/bench_lds.py`` (theta2 = the last block's ``mlp.W_out`` by default, hook before that block, an SAE
with random weights at the hook, the first ``--n-train`` OpenBookQA training prompts, the next ``--queries`` as
test queries). As in the retraining harness, theta2 is first refit on all ``n`` training examples (``theta2*``,
proximal objective ``mean loss + damping/2 ||theta2 - theta2_0||^2``, L-BFGS via
:func:`~repinf_lens.analysis.lds.refit_downstream`), influence scores ``[Q, n]`` are computed there with CG
(:func:`~repinf_lens.analysis.lds.default_solvers`), and then for every query ``q`` three groups of ``--m``
training examples are removed in turn and theta2 is refit from ``theta2*`` on the rest:

* ``proponents``: the ``m`` largest scores of ``q`` (expected: the loss of ``q`` rises, ``delta_q > 0``);
* ``opponents``: the ``m`` most negative scores (expected: ``delta_q < 0``);
* ``random``: ``m`` uniformly drawn examples (control: removing any ``m`` examples also renormalises the mean
  loss, which shifts every group by about the same amount; ``proponents - random`` cancels that shift).

``delta_q = loss_q(theta2_{-S}) - loss_q(theta2*)``. Reported per query and overall: mean delta per group with a
percentile-bootstrap 95 % interval over queries, the mean predicted delta, the share of queries whose loss rose,
and the Spearman correlation of predicted vs actual over all (query, group) pairs. Verdict: ``our sign is
supported`` if the proponent interval lies above 0 and the opponent interval below 0; ``reversed`` if the
opposite; else ``undecided``. Writes ``sign_by_retraining.json`` and ``sign_by_retraining.md`` to ``--out``
(rewritten after every query, marked PARTIAL until the last), and ``theta2_star.pt`` (theta2* and the scores),
reused by a rerun with the same setting unless ``--no-cache``. Cost: each retrain is some tens of
forward+backward passes over the training set (about 3 s of one thread each on smollm2-135m); judging by the
timings, L-BFGS stopped by its own tolerance before ``--max-iter 50`` there (not compared with 200 directly).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sign_by_retraining.py --model smollm2-135m-openbookqa \\
        --out runs/sign_by_retraining [--n-train 64] [--queries 8] [--m 5] [--damping 1e-2] [--max-iter 50]
    python benchmarks/sign_by_retraining.py --tiny --damping 1 --out /tmp/sign_tiny   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_lds import lds_setting  # the LDS harness's setting (benchmarks/ is the script's own folder)
from torch import Tensor

GROUPS = ("proponents", "opponents", "random")


def _bootstrap_ci(x: Tensor, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean of ``x`` (resampling its entries, here the queries)."""
    x = x.double()
    if x.numel() < 2:
        v = float(x.mean()) if x.numel() else float("nan")
        return v, v
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def _losses(split: Any, params: dict[str, Tensor], inputs: list[Any]) -> Tensor:
    with torch.no_grad():
        return torch.cat([split.inputs_loss(params, inp, reduction="none").double().cpu() for inp in inputs])


def _grad_norm(split: Any, inputs: list[Any], w: Tensor, params: dict[str, Tensor], anchor: dict[str, Tensor],
               damping: float) -> float:  # fmt: skip
    """Gradient norm of the harness's objective ``sum w_i loss_i / sum w + damping/2 ||theta2 - anchor||^2``
    (the one :func:`~repinf_lens.analysis.lds.refit_downstream` minimises): a convergence diagnostic."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    total, offset = float(w.sum()), 0
    loss = 0.5 * damping * sum(((p[k] - anchor[k]) ** 2).sum() for k in p)
    for inp in inputs:
        wb = w[offset : offset + len(inp.batch)]
        offset += len(inp.batch)
        if bool((wb != 0).any()):
            per = split.inputs_loss(p, inp, reduction="none")
            loss = loss + (per * wb.to(per.device, per.dtype)).sum() / total
    grads = torch.autograd.grad(loss, list(p.values()))
    return math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))


def _verdict(prop: tuple[float, float], opp: tuple[float, float]) -> str:
    if prop[0] > 0 and opp[1] < 0:
        return "our sign is supported"
    if prop[1] < 0 and opp[0] > 0:
        return "reversed"
    return "undecided"


def _markdown(res: dict) -> str:
    s = res["summary"]
    lines = [
        f"# Sign by retraining ({res['model']})",
        "",
        f"theta2 = {', '.join(res['theta2'])} ({res['n_theta2']} parameters), hook {res['hook']}; n = "
        f"{res['n_train']} training examples, {res['queries']} queries, m = {res['m']} removed per group, damping "
        f"{res['damping']}, solver {res['solver']}, L-BFGS max_iter {res['max_iter']} per group retrain "
        f"({res['refit_max_iter']} for theta2*).",
        "",
        "delta = loss_q(retrained without the group) - loss_q(theta2*); predicted = + sum of removed scores / n.",
        "",
        "| group | mean delta | 95 % CI (bootstrap over queries) | mean predicted | share of queries with delta > 0 |",
        "|---|---|---|---|---|",
    ]
    for g in (*GROUPS, "proponents - random", "opponents - random"):
        r = s[g]
        pred = f"{r['mean_predicted']:+.3e}" if r.get("mean_predicted") is not None else ""
        lines.append(
            f"| {g} | {r['mean_delta']:+.3e} | [{r['ci95'][0]:+.3e}, {r['ci95'][1]:+.3e}] | {pred} | "
            f"{r['share_raised']:.2f} |"
        )
    ratios = ", ".join(f"{g} {s[g]['median_grad_norm_ratio']:.1e}" for g in GROUPS)
    lines += [
        "",
        f"Convergence: median |grad| of the retrain objective after / before each retrain: {ratios}; "
        f"|grad| of the full objective at theta2*: {res['full_refit_grad_norm']:.2e}.",
        "",
        f"Spearman(predicted, actual) over all {3 * len(res['per_query'])} (query, group) pairs: "
        f"{res['spearman_pred_vs_actual']:+.3f}; Pearson {res['pearson_pred_vs_actual']:+.3f}.",
        "",
        f"**Verdict: {res['verdict']}.**"
        + ("" if res["complete"] else f" (PARTIAL: {res['queries_done']} of {res['queries']} queries so far)"),
        "",
        "## Per query",
        "",
        "| query | base loss | prop. predicted | prop. actual | opp. predicted | opp. actual | random predicted "
        "| random actual |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["per_query"]:
        cells = " | ".join(f"{r[g]['predicted']:+.3e} | {r[g]['delta']:+.3e}" for g in GROUPS)
        lines.append(f"| {r['id']} | {r['base_loss']:.4f} | {cells} |")
    lines += ["", f"Total {res['seconds']['total']} s (retraining {res['seconds']['retraining']} s).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model and toy data (smoke test)")
    p.add_argument("--model", default=None, help="local HF folder or shipped finetune name; default: embedded")
    p.add_argument("--template", default="plain")
    p.add_argument("--hook", default=None, help="default: hook_resid_post of the second-to-last block")
    p.add_argument("--downstream", default=None, help="regex selecting theta2 (default: the last block's mlp.W_out)")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--m", type=int, default=5, help="training examples removed per group")
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--solver", default="cg", help="a registered solver, built with its accurate settings")
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations per group retrain")
    p.add_argument("--refit-max-iter", type=int, default=200, help="L-BFGS iterations of the full refit theta2*")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute theta2* and the scores even if OUT/theta2_star.pt matches this setting")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seed of the random groups and of the bootstrap")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bar or printed table")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = (
            Path(__file__).resolve().parent
            / "results"
            / ("sign_by_retraining_tiny" if args.tiny else "sign_by_retraining")
        )
    if not 0 < args.m <= args.n_train // 2:
        p.error(f"--m must be in [1, n_train // 2], got {args.m}")

    from tqdm.auto import tqdm

    from repinf_lens._stats import spearman
    from repinf_lens.analysis.lds import default_solvers, refit_downstream
    from repinf_lens.influence.attributor import InfluenceAttributor

    # --- the setting of benchmarks/bench_lds.py ---
    torch.manual_seed(0)
    t0 = time.perf_counter()
    split, train, queries, downstream = lds_setting(args)
    task, hook = split.task, split.hook_name
    n, n_q, m = len(train), len(queries), args.m
    solver = default_solvers(args.damping, (args.solver,))[args.solver]
    load_s = time.perf_counter() - t0

    bs = args.batch_size
    inputs = [split.prepare(task.collate(train[i : i + bs])) for i in range(0, n, bs)]
    q_inputs = [split.prepare(task.collate([r])) for r in queries]
    kw = dict(damping=args.damping, max_iter=args.max_iter)
    # theta2* and the scores depend only on these; a rerun with other retrain settings reuses them
    key = {"model": "tiny" if args.tiny else (args.model or "default"), "template": args.template, "hook": hook,
           "downstream": downstream, "n_train": n, "queries": n_q, "damping": args.damping, "solver": args.solver,
           "refit_max_iter": args.refit_max_iter, "batch_size": bs}  # fmt: skip
    cache = args.out / "theta2_star.pt"
    cached = None
    if not args.no_cache and cache.is_file():
        blob = torch.load(cache, map_location="cpu", weights_only=True)
        cached = blob if blob.get("key") == key else None
    theta0 = {k: v.detach().clone() for k, v in split.downstream_params().items()}
    g = torch.Generator().manual_seed(args.seed)
    per_query: list[dict[str, Any]] = []

    def report(retrain_s: float, done: bool) -> tuple[dict[str, Any], str]:
        """Summarise the queries retrained so far and write the JSON and markdown (after every query)."""
        delta = {gname: torch.tensor([r[gname]["delta"] for r in per_query], dtype=torch.float64) for gname in GROUPS}
        pred = {
            gname: torch.tensor([r[gname]["predicted"] for r in per_query], dtype=torch.float64) for gname in GROUPS
        }

        def summarise(x: Tensor, pr: Tensor | None, seed: int) -> dict[str, Any]:
            return {
                "mean_delta": float(x.mean()),
                "ci95": list(_bootstrap_ci(x, args.n_boot, seed)),
                "mean_predicted": float(pr.mean()) if pr is not None else None,
                "share_raised": float((x > 0).double().mean()),
            }

        summary = {gname: summarise(delta[gname], pred[gname], args.seed + j) for j, gname in enumerate(GROUPS)}
        for gname in GROUPS:
            ratios = torch.tensor([r[gname]["grad_norm_ratio"] for r in per_query], dtype=torch.float64)
            summary[gname]["median_grad_norm_ratio"] = float(ratios.nanmedian())
        summary["proponents - random"] = summarise(delta["proponents"] - delta["random"],
                                                   pred["proponents"] - pred["random"], args.seed + 10)  # fmt: skip
        summary["opponents - random"] = summarise(delta["opponents"] - delta["random"],
                                                  pred["opponents"] - pred["random"], args.seed + 11)  # fmt: skip
        all_pred = torch.cat([pred[gname] for gname in GROUPS])
        all_delta = torch.cat([delta[gname] for gname in GROUPS])
        rho = spearman(all_pred, all_delta)
        pearson = float(torch.corrcoef(torch.stack([all_pred, all_delta]))[0, 1])
        verdict = _verdict(tuple(summary["proponents"]["ci95"]), tuple(summary["opponents"]["ci95"]))
        res: dict[str, Any] = {
            "model": "tiny" if args.tiny else (args.model or "default"),
            "hook": hook,
            "theta2": sorted(full),
            "n_theta2": sum(v.numel() for v in full.values()),
            "n_train": n,
            "queries": n_q,
            "queries_done": len(per_query),
            "complete": done,
            "m": m,
            "damping": args.damping,
            "solver": args.solver,
            "max_iter": args.max_iter,
            "refit_max_iter": args.refit_max_iter,
            "theta2_star_cached": cached is not None,
            "full_refit_grad_norm": full_grad,
            "threads": args.threads,
            "seed": args.seed,
            "sign_convention": "score = + g_test^T (H + damping I)^-1 g_train; positive = proponent; "
            "predicted delta of removing S = + sum_{i in S} score_i / n",
            "summary": summary,
            "spearman_pred_vs_actual": rho,
            "pearson_pred_vs_actual": pearson,
            "verdict": verdict,
            "per_query": per_query,
            "scores": scores.tolist(),
            "seconds": {
                "load": round(load_s, 1),
                "refit_full": round(refit_s, 1),
                "scores": round(scores_s, 1),
                "retraining": round(retrain_s, 1),
                "total": round(time.perf_counter() - t0, 1),
            },
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sign_by_retraining.json").write_text(json.dumps(res, indent=2))
        md = _markdown(res)
        (args.out / "sign_by_retraining.md").write_text(md)
        return res, md

    try:
        # theta2* on all n examples, as the harness does; influence assumes this optimum
        t = time.perf_counter()
        if cached is not None:
            full = {k: v.to(theta0[k].device, theta0[k].dtype) for k, v in cached["theta2_star"].items()}
        else:
            full = refit_downstream(split, inputs, torch.ones(n), theta0, theta0, damping=args.damping,
                                    max_iter=args.refit_max_iter)  # fmt: skip
        split.load_downstream_params(full)
        base = _losses(split, full, q_inputs)
        full_grad = _grad_norm(split, inputs, torch.ones(n), full, theta0, args.damping)
        refit_s = time.perf_counter() - t
        t = time.perf_counter()
        if cached is not None:
            scores = cached["scores"].double()
        else:
            att = InfluenceAttributor(split, task, hessian=solver, batch_size=bs, use_cache=False, progress=False)
            if solver.needs_hessian:
                att.fit(train)
            scores = att.attribute(queries, train).example_scores.double().cpu()  # [Q, n], + = proponent
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "theta2_star": {k: v.cpu() for k, v in full.items()}, "scores": scores}, cache)
        scores_s = time.perf_counter() - t

        t = time.perf_counter()
        bar = tqdm(total=3 * n_q, desc="retraining", disable=args.quiet)
        for q in range(n_q):
            order = scores[q].argsort(descending=True)
            groups = {
                "proponents": order[:m],
                "opponents": order.flip(0)[:m],
                "random": torch.randperm(n, generator=g)[:m],
            }
            row: dict[str, Any] = {"id": str(queries[q].get("id", q)), "base_loss": float(base[q])}
            for name, idx in groups.items():
                w = torch.ones(n)
                w[idx] = 0.0
                tg = time.perf_counter()
                g_start = _grad_norm(split, inputs, w, full, theta0, args.damping)
                p_s = refit_downstream(split, inputs, w, full, theta0, **kw)
                g_end = _grad_norm(split, inputs, w, p_s, theta0, args.damping)
                loss = float(_losses(split, p_s, [q_inputs[q]])[0])
                shift = math.sqrt(sum(float(((p_s[k] - full[k]) ** 2).sum()) for k in full))
                row[name] = {
                    "removed": idx.tolist(),
                    "removed_scores": scores[q, idx].tolist(),
                    "predicted": float(scores[q, idx].sum()) / n,
                    "delta": loss - float(base[q]),
                    "theta2_shift_norm": shift,
                    # |grad J_{-S}| after / before the retrain (0 = converged)
                    "grad_norm_ratio": g_end / g_start if g_start > 0 else float("nan"),
                    "seconds": round(time.perf_counter() - tg, 2),
                }
                bar.update(1)
            row["n_positive_scores"] = int((scores[q] > 0).sum())
            per_query.append(row)
            if q < n_q - 1:
                report(time.perf_counter() - t, done=False)
        bar.close()
        retrain_s = time.perf_counter() - t
    finally:
        split.load_downstream_params(theta0)

    res, md = report(retrain_s, done=True)
    if not args.quiet:
        print(md)
        print(f"results: {args.out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
