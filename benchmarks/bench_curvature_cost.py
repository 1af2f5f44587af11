"""The cost of s_test, EK-FAC vs CG, side by side in one run on the shipped finetune (issue 18, "Cost").

At ``--hook`` (theta2 = everything downstream), on one thread:

* CG, ``--cg-iters`` iterations over ``--cg-hessian`` Hessian examples (the faithfulness runs' setting), for
  the first ``--cg-queries`` queries in lockstep (default: all ``--queries``): wall time per query and the stage's
  peak RSS (prepared HVPs, the default), and the iterations each query ran: CG stops a query at negative curvature
  (``on_negative_curvature="warn"``, the default); with ``--cg-full`` also CG running all ``--cg-iters`` iterations
  (``"ignore"``), timed the same way;
* EK-FAC (``--fisher``: the sampled true Fisher by default) fitted ONCE on ``--fit-examples`` training questions:
  fit time and peak RSS, then s_test for 1, 8 and ``--queries`` queries (at most ``--chunk`` per batched
  preconditioning pass; only the CG queries' s_tests are kept, for the cosines): time per query and peak RSS;
* the speed-up per query (CG / EK-FAC, after the fit) and the cosine between the two s_tests per query;
* the share of EK-FAC's s_test that is the query gradient itself (timed alone), and the same s_tests with the
  eigenbasis rotations in bfloat16 (``precondition_dtype="bfloat16"``): time and cosine with the float32 ones;
* Woodbury (the exact damped Gauss-Newton) on CG's own ``--cg-hessian`` rows: fit, s_test per query, cosine with
  CG's s_test (CG solves the exact Hessian, Woodbury its Gauss-Newton part).

``--stream`` (for an early hook such as ``blocks.8``, where one s_test is ~0.3 GB and 64 do not fit in memory):
skip CG and the sub-batches, solve ``--queries`` s_tests with ``s_test(keep=False)`` into a temporary s_test cache,
``--query-chunk`` at a time, and report the stage's peak RSS (the issue's "64 queries below blocks.8 in 8 GB").

The s_test cache is off (every solve is timed). The factors go to a temporary folder unless ``--factor-dir``.

Usage::

    python benchmarks/bench_curvature_cost.py --hook blocks.22.hook_resid_post --threads 1 \\
        --out benchmarks/results/curvature_cost_L22.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-openbookqa")
    ap.add_argument("--hook", default="blocks.22.hook_resid_post")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--cg-hessian", type=int, default=8)
    ap.add_argument("--cg-queries", type=int, default=None, help="CG's queries (lockstep; default: --queries)")
    ap.add_argument("--chunk", type=int, default=8, help="EK-FAC / Woodbury queries per batched pass")
    ap.add_argument("--cg-full", action="store_true", help="also time CG through every iteration (no early stop)")
    ap.add_argument("--fisher", default="true", choices=("true", "expected", "empirical"), help="EK-FAC's Fisher")
    ap.add_argument("--fit-examples", type=int, default=256)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--factor-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stream", action="store_true", help="no CG; s_test(keep=False) into a temporary cache")
    ap.add_argument("--query-chunk", type=int, default=8, help="queries per preconditioning pass with --stream")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/curvature_cost.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from repinf_lens import InfluenceAttributor, MultipleChoiceTask, SplitModel, load_mcqa, load_model
    from repinf_lens._resources import StageMeter
    from repinf_lens._tree import tdot
    from repinf_lens.curvature import EKFAC, Woodbury

    model = load_model(args.model)
    task = MultipleChoiceTask(model.tokenizer, template="plain")
    split = SplitModel(model, args.hook, task=task)
    train = [dict(r) for r in load_mcqa("openbookqa", "train", offline=True)]
    queries = [dict(r) for r in load_mcqa("openbookqa", "test", offline=True)][: args.queries]
    cg_queries = queries[: args.cg_queries or len(queries)]
    n_params = sum(t.numel() for t in split.downstream_params().values())
    meter = StageMeter()
    rep: dict = {"model": args.model, "hook": args.hook, "theta2_params": n_params, "threads": args.threads,
                 "damping": args.damping, "fisher": args.fisher, "queries": len(queries), "cg_queries": len(cg_queries),
                 "chunk": args.chunk}  # fmt: skip

    if args.stream:
        return stream(args, split, train, queries, meter, rep)

    s_cg, cg_s, infos = time_cg(args, split, train, cg_queries, meter, "cg")
    rep["cg"] = {
        "iterations": args.cg_iters, "hessian_examples": args.cg_hessian, "queries": len(cg_queries),
        "s": round(cg_s, 1), "s_per_query": round(cg_s / len(cg_queries), 2),
        "peak_rss_mb": round(meter.stages["cg"]["peak_rss_mb"]),
        "iterations_run": [i.iterations for i in infos], "hvps": [i.n_hvp for i in infos],
        "negative_curvature": [i.negative_curvature for i in infos],
    }  # fmt: skip
    print("cg", rep["cg"], flush=True)
    if args.cg_full:  # the same CG through every iteration (negative curvature ignored)
        _, dt, infos = time_cg(args, split, train, cg_queries, meter, "cg_full", tol=0.0,
                               on_negative_curvature="ignore")  # fmt: skip
        rep["cg_full"] = {"s": round(dt, 1), "s_per_query": round(dt / len(cg_queries), 2),
                          "hvps": [i.n_hvp for i in infos],
                          "peak_rss_mb": round(meter.stages["cg_full"]["peak_rss_mb"])}  # fmt: skip
        print("cg_full", rep["cg_full"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(args.factor_dir or Path(tmp) / "factors")
        ek = EKFAC(damping=args.damping, batch_size=args.batch_size, fisher=args.fisher, factor_dir=folder,
                   progress=False)  # fmt: skip
        att = InfluenceAttributor(split, hessian=ek, use_cache=False, progress=False, query_chunk_size=None)
        fit_ekfac(att, train[: args.fit_examples], folder, meter, rep)
        rep["ekfac"] = {}
        s_ek: list = []
        for q in sorted({1, min(8, len(queries)), len(queries)}):
            name = f"ekfac_{q}"
            with meter.stage(name):
                t = time.perf_counter()
                out = s_tests(att, queries[:q], args.chunk, len(cg_queries))
                dt = time.perf_counter() - t
            rep["ekfac"][str(q)] = {"s": round(dt, 2), "s_per_query": round(dt / q, 3),
                                    "peak_rss_mb": round(meter.stages[name]["peak_rss_mb"])}  # fmt: skip
            print(name, rep["ekfac"][str(q)], flush=True)
            if q == len(queries):
                s_ek = out
        with meter.stage("query_gradients"):
            t = time.perf_counter()
            for row in queries:
                att.query_gradient(row)
            dt = time.perf_counter() - t
        rep["query_gradient_s_per_query"] = round(dt / len(queries), 3)
        print("query gradients alone, s per query", rep["query_gradient_s_per_query"], flush=True)
        ek.precondition_dtype = "bfloat16"  # the same fitted factors, rotations in bf16
        with meter.stage("ekfac_bf16"):
            t = time.perf_counter()
            s_bf = s_tests(att, queries, args.chunk, len(cg_queries))
            dt = time.perf_counter() - t
        rep["ekfac_bf16"] = {
            "s": round(dt, 2), "s_per_query": round(dt / len(queries), 3),
            "peak_rss_mb": round(meter.stages["ekfac_bf16"]["peak_rss_mb"]),
            "cosine_vs_float32": [round(_cos(tdot, a, b), 5) for a, b in zip(s_bf, s_ek, strict=True)],
        }  # fmt: skip
        print("ekfac_bf16", rep["ekfac_bf16"], flush=True)
    # Woodbury on CG's own Hessian rows: the exact damped Gauss-Newton of those rows, one solve per query
    with meter.stage("woodbury_fit"):
        wb = Woodbury(damping=args.damping, batch_size=args.batch_size, progress=False)
        att = InfluenceAttributor(split, hessian=wb, use_cache=False, progress=False, query_chunk_size=None)
        t = time.perf_counter()
        att.fit(train[: args.cg_hessian])
        fit_s = time.perf_counter() - t
    with meter.stage("woodbury"):
        t = time.perf_counter()
        s_wb = s_tests(att, queries, args.chunk, len(cg_queries))
        dt = time.perf_counter() - t
    rep["woodbury"] = {
        "hessian_examples": args.cg_hessian, "rank": wb.rank, "fit_s": round(fit_s, 1),
        "fit_peak_rss_mb": round(meter.stages["woodbury_fit"]["peak_rss_mb"]), "s": round(dt, 2),
        "s_per_query": round(dt / len(queries), 3), "peak_rss_mb": round(meter.stages["woodbury"]["peak_rss_mb"]),
        "cosine_vs_cg": [round(_cos(tdot, a, b), 3) for a, b in zip(s_wb, s_cg, strict=True)],
    }  # fmt: skip
    rep["speedup_per_query_woodbury"] = round(rep["cg"]["s_per_query"] / rep["woodbury"]["s_per_query"], 1)
    print("woodbury", rep["woodbury"], flush=True)
    del att
    per_q = rep["ekfac"][str(len(queries))]["s_per_query"]
    rep["speedup_per_query_after_fit_bf16"] = round(rep["cg"]["s_per_query"] / rep["ekfac_bf16"]["s_per_query"], 1)
    rep["speedup_per_query_after_fit"] = round(rep["cg"]["s_per_query"] / per_q, 1)
    if "cg_full" in rep:
        full = rep["cg_full"]["s_per_query"]
        rep["speedup_vs_cg_full"] = {
            "ekfac": round(full / per_q, 1), "ekfac_bf16": round(full / rep["ekfac_bf16"]["s_per_query"], 1),
            "woodbury": round(full / rep["woodbury"]["s_per_query"], 1),
        }  # fmt: skip
    rep["cosine_cg_vs_ekfac"] = [round(_cos(tdot, a, b), 3) for a, b in zip(s_cg, s_ek, strict=True)]
    keys = (
        "speedup_per_query_after_fit",
        "speedup_per_query_after_fit_bf16",
        "speedup_per_query_woodbury",
        "cosine_cg_vs_ekfac",
        "speedup_vs_cg_full",
    )
    print(json.dumps({k: rep[k] for k in keys if k in rep}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


def time_cg(args, split, train, rows, meter, stage: str, **cg_settings) -> tuple[list, float, list]:
    """CG (``--cg-iters`` iterations on the first ``--cg-hessian`` training rows, plus ``cg_settings``) solving
    ``rows`` in lockstep inside ``meter`` stage ``stage``: (s_tests, seconds of the solve, per-query SolveInfo)."""
    from repinf_lens import CG, InfluenceAttributor

    with meter.stage(stage):
        cg = CG(damping=args.damping, max_iter=args.cg_iters, batch_size=args.batch_size, **cg_settings)
        att = InfluenceAttributor(split, hessian=cg, use_cache=False, progress=False, query_chunk_size=None)
        att.fit(train[: args.cg_hessian])
        t = time.perf_counter()
        out = att.s_test(rows)
        dt = time.perf_counter() - t
    return out, dt, att.solve_infos


def s_tests(att, rows, chunk: int, keep: int) -> list:
    """s_test of every row, ``chunk`` queries per batched pass; returns the first ``keep`` (the CG queries', for
    the cosines), so that 64 s_tests of a large theta2 need not be held at once."""
    kept: list = []
    for lo in range(0, len(rows), chunk):
        out = att.s_test(rows[lo : lo + chunk])
        kept.extend(out[: max(0, keep - len(kept))])
        del out
    return kept


def _cos(tdot, a, b) -> float:
    return float(tdot(a, b) / (tdot(a, a) * tdot(b, b)) ** 0.5)


def fit_ekfac(att, rows, folder, meter, rep) -> None:
    """The one-off EK-FAC fit, timed: ``rep["ekfac_fit"]`` (seconds, factor size on disk, the stage's peak RSS)."""
    with meter.stage("ekfac_fit"):
        t = time.perf_counter()
        att.fit(rows)
        fit_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    rep["ekfac_fit"] = {
        "examples": len(rows), "s": round(fit_s, 1), "factor_mb": round(size / 2**20),
        "peak_rss_mb": round(meter.stages["ekfac_fit"]["peak_rss_mb"]),
    }  # fmt: skip
    print("ekfac_fit", rep["ekfac_fit"], flush=True)


def stream(args, split, train, queries, meter, rep) -> int:
    """EK-FAC fit, then every query's s_test into a temporary s_test cache, ``--query-chunk`` at a time."""
    from repinf_lens import InfluenceAttributor
    from repinf_lens.curvature import EKFAC

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(args.factor_dir or Path(tmp) / "factors")
        ek = EKFAC(damping=args.damping, batch_size=args.batch_size, factor_dir=folder, progress=False)
        att = InfluenceAttributor(
            split, hessian=ek, cache_dir=Path(tmp) / "s_test", progress=False, query_chunk_size=args.query_chunk
        )
        fit_ekfac(att, train[: args.fit_examples], folder, meter, rep)
        with meter.stage("ekfac_stream"):
            t = time.perf_counter()
            att.s_test(queries, keep=False)
            dt = time.perf_counter() - t
        on_disk = sum(p.stat().st_size for p in (Path(tmp) / "s_test").rglob("*") if p.is_file())
        rep["ekfac_stream"] = {
            "queries": len(queries), "query_chunk": args.query_chunk, "s": round(dt, 1),
            "s_per_query": round(dt / len(queries), 2), "s_test_cache_mb": round(on_disk / 2**20),
            "peak_rss_mb": round(meter.stages["ekfac_stream"]["peak_rss_mb"]),
        }  # fmt: skip
        print("ekfac_stream", rep["ekfac_stream"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
