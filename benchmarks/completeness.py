"""Completeness of latent scores on the shipped default: gradient x input vs integrated gradients (issue 17).

On the shipped finetune ``load_model("smollm2-135m-openbookqa")`` with its SAE
``load_sae("repinf-lens-smollm2-135m-openbookqa", "blocks.22.hook_resid_post")`` (SAE error held, the demo's
split), for a few OpenBookQA test questions x their top training candidates (the shipped gradient-sketch index,
as in the demo) and CG s_test (damping 1e-3, a few iterations over a few Hessian examples, as the demo's quick
settings), with P(r) = <G(r), s_test> (the example score) and P(0) = all latents off (error and b_dec kept):

* per pair: the example score P(r), P(0) and its share P(0) / P(r), the latent-sum completeness
  latent_sum / (P(r) - P(0)) of gradient x input (gxi) and of integrated gradients (IG, ``--steps-max`` nodes);
* the ray P(a r) on a grid of a (forward JVPs): how far from the straight line P(0) + a (P(r) - P(0)) it is. The
  gxi latent sum is exactly the slope dP(a r)/da at a = 1, so a bent ray is why gxi is incomplete;
* IG convergence in m (``--rule``, the library default; m = 1, 2, 4, ..., ``--steps-max``): the identity error
  |P(r) - P(0) - latent sum| relative to |P(r)| and to the path's scale max(|P(r)|, |P(r) - P(0)|), and how much
  the latent ranking still moves between the last two m;
* per question: Spearman and top-k overlap (k = 10, 50) between the gxi and IG latent rankings (mean IFR over
  the question's training examples, the paper's s_k; signed, descending), over the latents active in any of them.

Writes ``OUT/completeness.json`` (everything, incrementally) and ``OUT/completeness.md`` (the tables).
Sized for one CPU thread in about 10 minutes with the defaults (3 questions x 4 examples, CG 5 iterations over
4 Hessian examples). Sign convention: POSITIVE = proponent.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/completeness.py --out runs/completeness_L22 [--questions 3 --examples 4]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the demo's shipped assets (mirrors repinf_lens/demo.py: DEFAULT_FINETUNE, DEFAULT_SAE_RELEASE, DEFAULT_SAE_ID,
# DEFAULT_INDEX)
FINETUNE = "smollm2-135m-openbookqa"
SAE_RELEASE = "repinf-lens-smollm2-135m-openbookqa"
SAE_ID = "blocks.22.hook_resid_post"
INDEX = "smollm2-135m-openbookqa-L22"

PAIR_COLS = ["query", "example", "score", "P0", "P0_share", "gxi_sum", "gxi_completeness", "ig_sum", "ig_completeness",
             "ig_rel_err", "ig_rel_err_path", "error_term", "ray_max_dev_from_line"]  # fmt: skip
RANK_COLS = ["query", "n_active", "spearman", "top10_overlap", "top50_overlap", "top10_overlap_abs",
             "top50_overlap_abs"]  # fmt: skip


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho with average ranks for ties (Pearson of the ranks)."""
    import pandas as pd

    ra = torch.tensor(pd.Series(a.double().numpy()).rank(method="average").to_numpy())
    rb = torch.tensor(pd.Series(b.double().numpy()).rank(method="average").to_numpy())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else float("nan")


def _overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    k = min(k, a.numel())
    ta, tb = set(torch.topk(a, k).indices.tolist()), set(torch.topk(b, k).indices.tolist())
    return len(ta & tb) / k


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (completeness.json, completeness.md)")
    ap.add_argument("--questions", type=int, default=3, help="test questions (the first ones of the test split)")
    ap.add_argument("--first-question", type=int, default=0)
    ap.add_argument("--examples", type=int, default=4, help="training examples per question (prefilter top-k)")
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--hessian-examples", type=int, default=4)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--steps-max", type=int, default=64, help="IG convergence: m = 1, 2, 4, ..., steps-max")
    ap.add_argument("--grid", type=int, default=11, help="points a in [0, 1] of the ray P(a r)")
    ap.add_argument("--chunk", type=int, default=16, help="IG evaluations (example x node) per swap")
    ap.add_argument("--rule", default=None, help="IG quadrature rule (default: the library's)")
    ap.add_argument("--compare-rules", default="", help="comma-separated rules also run at --steps-max")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-prefilter", action="store_true", help="use the first training examples instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _record import Recorder
    from transformers import AutoTokenizer

    from repinf_lens import CG, InfluenceAttributor, MultipleChoiceTask, SplitModel, load_mcqa, load_model, load_sae
    from repinf_lens.influence import example_influence, latent_influence, latent_influence_ig
    from repinf_lens.influence.attributor import as_rows
    from repinf_lens.influence.math import check_latent_method
    from repinf_lens.models import default_model_dir

    rule = args.rule or inspect.signature(latent_influence_ig).parameters["rule"].default
    others = [r for r in args.compare_rules.split(",") if r and r != rule]
    for r in (rule, *others):
        check_latent_method("ig", args.steps_max, r, where="completeness.py")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    rec = Recorder(args.out / "completeness.json", echo=False)
    t0 = time.perf_counter()
    model = load_model(FINETUNE, device="cpu", n_ctx=1024)
    sae = load_sae(SAE_RELEASE, SAE_ID, model=model, device="cpu")
    task = MultipleChoiceTask(AutoTokenizer.from_pretrained(str(default_model_dir())), max_length=1024,
                              template="plain")  # fmt: skip
    split = SplitModel(model, sae.cfg.metadata.hook_name, sae, task=task)
    train = as_rows(load_mcqa("openbookqa", "train", offline=True), "train")
    test = as_rows(load_mcqa("openbookqa", "test", offline=True), "test")
    queries = test[args.first_question : args.first_question + args.questions]
    params = split.downstream_params()
    rec.update(
        setup={
            "model": FINETUNE, "sae": f"{SAE_RELEASE}/{SAE_ID}", "hook": split.hook_name, "d_sae": split.d_sae,
            "n_theta2": split.num_downstream_params(), "use_error_term": split.use_error_term,
            "queries": [str(q["id"]) for q in queries], "cg": {"damping": args.damping, "max_iter": args.cg_iters,
            "hessian_examples": args.hessian_examples}, "threads": args.threads, "ig_rule": rule,
            "compare_rules": others,
            "load_s": round(time.perf_counter() - t0, 1),
        }
    )  # fmt: skip

    # candidates: each question's most gradient-similar training examples (the shipped index, as in the demo)
    t = time.perf_counter()
    if args.no_prefilter:
        cand = [list(range(args.examples)) for _ in queries]
    else:
        from repinf_lens.prefiltering import open_store, prefilter, shipped_index_dir

        store = open_store(shipped_index_dir(INDEX))
        store.check_rows(train)
        pf = prefilter(queries, store, split=split, top_k=args.examples)
        cand = [pf.indices[q].tolist() for q in range(len(queries))]
    att = InfluenceAttributor(split, task, hessian=CG(damping=args.damping, max_iter=args.cg_iters, batch_size=8),
                              use_cache=False, progress=False)  # fmt: skip
    att.fit(train[: args.hessian_examples])
    s_list = att.s_test(queries)
    rec.update(candidates={str(q["id"]): [str(train[i]["id"]) for i in c] for q, c in zip(queries, cand)},
               s_test_s=round(time.perf_counter() - t, 1),
               solve_infos=[i.to_dict() for i in att.solve_infos])  # fmt: skip

    ms = [m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if m <= args.steps_max]
    grid = torch.linspace(0, 1, args.grid, dtype=torch.float64).tolist()
    pairs: list[dict[str, Any]] = []
    rankings: list[dict[str, Any]] = []
    conv: dict[str, list[float]] = {str(m): [] for m in ms}
    conv_path: dict[str, list[float]] = {str(m): [] for m in ms}
    timing: dict[str, Any] = {"gxi_s": 0.0, "ig_s": {str(m): 0.0 for m in ms}, "ray_s": 0.0,
                              "compare_s": {r: 0.0 for r in others}}  # fmt: skip
    compare: list[dict[str, Any]] = []
    for qi, (query, s, idx) in enumerate(zip(queries, s_list, cand)):
        qid = str(query["id"])
        rows = [train[i] for i in idx]
        inp = split.prepare(task.collate(rows))
        t = time.perf_counter()
        gxi = latent_influence(split, s, inp, params, baseline=True)
        timing["gxi_s"] += time.perf_counter() - t
        igs = {}
        for m in ms:
            t = time.perf_counter()
            igs[m] = latent_influence_ig(split, s, inp, params, steps=m, rule=rule, chunk_size=args.chunk)
            timing["ig_s"][str(m)] += time.perf_counter() - t
        ig = igs[ms[-1]]
        for r in others:
            t = time.perf_counter()
            alt = latent_influence_ig(split, s, inp, params, steps=ms[-1], rule=r, chunk_size=args.chunk)
            timing["compare_s"][r] += time.perf_counter() - t
            for i in range(len(rows)):
                sc, d = float(alt.example_scores[i]), float(alt.example_scores[i] - alt.baseline_scores[i])
                res_alt, res_ig = abs(float(alt.residual[i])), abs(float(ig.residual[i]))
                compare.append({"query": qid, "example": str(rows[i]["id"]), "m": ms[-1],
                                f"{rule}_rel_err_path": res_ig / max(abs(sc), abs(d)),
                                "rule": r, "rule_rel_err_path": res_alt / max(abs(sc), abs(d))})  # fmt: skip
        # the ray P(a r), forward JVPs on the latents scaled by a (error and b_dec held)
        t = time.perf_counter()
        ray = []
        for a in grid:
            sub = inp.slice(0, len(inp))
            sub.latents = inp.latents * a
            ray.append(example_influence(split, s, sub, params).double())
        ray_t = torch.stack(ray, 1)  # [n, grid]
        timing["ray_s"] += time.perf_counter() - t
        for i in range(len(rows)):
            score, p0 = float(gxi.example_scores[i]), float(gxi.baseline_scores[i])
            delta = score - p0
            lin = torch.tensor([p0 + a * delta for a in grid], dtype=torch.float64)
            bend = float((ray_t[i] - lin).abs().max()) / abs(delta) if delta else float("nan")
            errs = {str(m): abs(float(igs[m].residual[i])) / abs(score) for m in ms}
            path = max(abs(score), abs(delta))
            errs_path = {str(m): abs(float(igs[m].residual[i])) / path for m in ms}
            for m in ms:
                conv[str(m)].append(errs[str(m)])
                conv_path[str(m)].append(errs_path[str(m)])
            pairs.append(
                {
                    "query": qid, "example": str(rows[i]["id"]), "score": score, "P0": p0,
                    "P0_share": p0 / score if score else float("nan"),
                    "gxi_sum": float(gxi.latent_sum[i]), "gxi_ratio": float(gxi.latent_sum[i]) / score,
                    "gxi_completeness": float(gxi.latent_sum[i]) / delta if delta else float("nan"),
                    "ig_sum": float(ig.latent_sum[i]),
                    "ig_completeness": float(ig.latent_sum[i]) / delta if delta else float("nan"),
                    "ig_rel_err": errs[str(ms[-1])], "ig_rel_err_path": errs_path[str(ms[-1])],
                    "error_term": float(gxi.error_term[i]),
                    "bias_term": float(gxi.bias_term[i]), "ray_max_dev_from_line": bend,
                    "ray": [float(v) for v in ray_t[i]], "ig_rel_err_by_m": errs, "ig_rel_err_path_by_m": errs_path,
                    "n_active_latents": int((inp.latents[i] != 0).any(0).sum()),
                }
            )  # fmt: skip
        # latent rankings: mean IFR over this question's examples (signed, descending), active latents only
        rg, ri = gxi.latent_scores.double().mean(0), ig.latent_scores.double().mean(0)
        active = (inp.latents != 0).any(1).any(0)
        prev = igs[ms[-2]].latent_scores.double().mean(0) if len(ms) > 1 else ri
        rankings.append(
            {
                "query": qid, "n_active": int(active.sum()), "spearman": _spearman(rg[active], ri[active]),
                "top10_overlap": _overlap(rg, ri, 10), "top50_overlap": _overlap(rg, ri, 50),
                "top10_overlap_abs": _overlap(rg.abs(), ri.abs(), 10),
                "top50_overlap_abs": _overlap(rg.abs(), ri.abs(), 50),
                # how much the IG ranking still moves between the last two m (relative L2 of mean IFR, Spearman)
                "ig_prev_m_rel_l2": float((prev - ri).norm() / ri.norm()),
                "ig_prev_m_spearman": _spearman(prev[active], ri[active]),
                "ig_prev_m_top10_overlap": _overlap(prev, ri, 10),
            }
        )  # fmt: skip
        rec.update(pairs=pairs, rankings=rankings, grid=grid, steps=ms, rule_comparison=compare,
                   timing={**timing, "n_pairs": len(pairs)}, done_questions=qi + 1)  # fmt: skip

    def med(v: list[float]) -> float:
        return float(torch.tensor(v, dtype=torch.float64).median())

    convergence = [
        {"m": m, "median_rel_err": med(conv[str(m)]), "max_rel_err": max(conv[str(m)]),
         "median_rel_err_path": med(conv_path[str(m)]), "max_rel_err_path": max(conv_path[str(m)]),
         "seconds_per_question": timing["ig_s"][str(m)] / len(queries)}
        for m in ms
    ]  # fmt: skip
    n_ex = sum(len(c) for c in cand)
    summary = {
        "median_P0_share": med([p["P0_share"] for p in pairs]),
        "median_gxi_completeness": med([p["gxi_completeness"] for p in pairs]),
        "median_gxi_ratio_latent_sum_over_score": med([p["gxi_ratio"] for p in pairs]),
        "median_ig_completeness": med([p["ig_completeness"] for p in pairs]),
        "max_ig_rel_err": max(p["ig_rel_err"] for p in pairs),
        "median_ig_rel_err_path": med([p["ig_rel_err_path"] for p in pairs]),
        "max_ig_rel_err_path": max(p["ig_rel_err_path"] for p in pairs),
        "median_ray_max_dev_from_line": med([p["ray_max_dev_from_line"] for p in pairs]),
        "mean_spearman": sum(r["spearman"] for r in rankings) / len(rankings),
        "mean_top10_overlap": sum(r["top10_overlap"] for r in rankings) / len(rankings),
        "mean_top50_overlap": sum(r["top50_overlap"] for r in rankings) / len(rankings),
        "gxi_seconds_per_example": timing["gxi_s"] / n_ex,
        "ig_seconds_per_example_at_max_m": timing["ig_s"][str(ms[-1])] / n_ex,
        "total_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
    }
    rec.update(convergence=convergence, summary=summary)

    how = "the first training examples" if args.no_prefilter else "top-k of the shipped prefilter index"
    md = [
        "# Completeness of latent scores: gradient x input vs integrated gradients",
        "",
        f"Shipped `{FINETUNE}` + SAE `{SAE_RELEASE}/{SAE_ID}` (error term held), {len(queries)} OpenBookQA test "
        f"questions x {args.examples} training candidates each ({how}), "
        f"CG s_test (damping {args.damping:g}, {args.cg_iters} iterations, {args.hessian_examples} Hessian "
        f"examples), IG rule {rule!r} with m = {ms[-1]} nodes. P(r) = example score, P(0) = all latents off "
        "(SAE error and b_dec kept); completeness = latent sum / (P(r) - P(0)); ray dev = max over a of "
        "|P(a r) - (P(0) + a (P(r) - P(0)))| / |P(r) - P(0)|. POSITIVE = proponent.",
        "",
        "## Per pair",
        "",
        _table(pairs, PAIR_COLS),
        "",
        "## IG convergence: identity error |P(r) - P(0) - latent sum| / |P(r)| (rel_err) and / max(|P(r)|, "
        "|P(r) - P(0)|) (rel_err_path), over all pairs",
        "",
        _table(
            convergence,
            ["m", "median_rel_err", "max_rel_err", "median_rel_err_path", "max_rel_err_path", "seconds_per_question"],
        ),
        "",
        "## gxi vs IG latent rankings (mean IFR over each question's examples)",
        "",
        _table(rankings, RANK_COLS),
        "",
        f"IG ranking stability between m = {ms[-2] if len(ms) > 1 else ms[-1]} and m = {ms[-1]}:",
        "",
        _table(rankings, ["query", "ig_prev_m_rel_l2", "ig_prev_m_spearman", "ig_prev_m_top10_overlap"]),
        "",
        *(
            [
                "## Other quadrature rules at m = " + str(ms[-1]) + " (rel_err_path)",
                "",
                _table(compare, ["query", "example", "rule", f"{rule}_rel_err_path", "rule_rel_err_path"]),
                "",
            ]
            if compare
            else []
        ),
        "## Ray P(a r) (a = " + ", ".join(f"{a:.1f}" for a in grid) + ")",
        "",
        _table(
            [
                {"pair": f"{p['query']}/{p['example']}", "P(a r)": ", ".join(f"{v:.3g}" for v in p["ray"])}
                for p in pairs
            ],
            ["pair", "P(a r)"],
        ),
        "",
        "## Summary",
        "",
        _table([{"metric": k, "value": v} for k, v in summary.items()], ["metric", "value"]),
        "",
    ]
    (args.out / "completeness.md").write_text("\n".join(md))
    print("\n".join(md))
    return rec.data


if __name__ == "__main__":
    main()
