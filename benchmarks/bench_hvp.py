"""Forward-over-reverse HVPs vs the prepared (primal-once, reverse-over-reverse) HVP, side by side in one run.

CG calls ``v -> H v`` on the SAME Hessian data every iteration. ``dataset_hvp`` redoes the forward, backward and
forward-mode passes per call; ``prepared_dataset_hvp`` keeps each Hessian batch's gradient graph and pulls ``v``
back through it (one backward per call). Measured on the shipped finetune (``smollm2-135m-openbookqa``), theta2 =
everything downstream of ``--hook``, ``--hessian-examples`` OpenBookQA training questions in batches of
``--batch-size``; per mode: the one-off preparation, the time per product (median of ``--reps``), ``--queries``
products under ``vmap`` (batched CG), a CG solve of ``--cg-iters`` iterations, the stage's own peak RSS, and the
largest relative difference between the two modes' products and s_tests.

Usage::

    python benchmarks/bench_hvp.py --hook blocks.22.hook_resid_post --threads 1 --out benchmarks/results/hvp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-openbookqa")
    ap.add_argument("--hook", default="blocks.22.hook_resid_post")
    ap.add_argument("--hessian-examples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--modes", nargs="+", default=["forward_over_reverse", "prepared"],
        choices=["forward_over_reverse", "prepared"], help="one mode alone: its peak RSS without the other's run",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hvp.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from repinf_lens import CG, MultipleChoiceTask, SplitModel, load_mcqa, load_model
    from repinf_lens._resources import StageMeter
    from repinf_lens._tree import tdot
    from repinf_lens.curvature import batched_hvp, dataset_hvp, loss_grad, prepared_dataset_hvp

    model = load_model(args.model)
    task = MultipleChoiceTask(model.tokenizer, template="plain")
    split = SplitModel(model, args.hook, task=task)
    rows = [dict(r) for r in load_mcqa("openbookqa", "train", offline=True)]
    h_rows, q_rows = rows[: args.hessian_examples], rows[-args.queries :]
    bs = args.batch_size
    inputs = [split.prepare(task.collate(h_rows[i : i + bs])) for i in range(0, len(h_rows), bs)]
    params = split.downstream_params()
    n_params = sum(t.numel() for t in params.values())
    gs = [
        {k: t.detach() for k, t in loss_grad(split, params, split.prepare(task.collate([r]))).items()} for r in q_rows
    ]
    meter = StageMeter()
    report: dict = {"model": args.model, "hook": args.hook, "theta2_params": n_params, "threads": args.threads,
                    "hessian_examples": len(h_rows), "batch_size": bs, "queries": len(gs), "modes": {}}  # fmt: skip
    products, solutions = {}, {}
    solver = CG(damping=1e-3, max_iter=args.cg_iters, tol=0.0)
    for mode in args.modes:
        with meter.stage(mode):
            t = time.perf_counter()
            if mode == "prepared":
                fn = prepared_dataset_hvp(split, params, inputs)
            else:

                def fn(v, inputs=inputs):
                    return dataset_hvp(split, params, inputs, v)

            prep = time.perf_counter() - t
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                out = fn(gs[0])
                times.append(time.perf_counter() - t)
            products[mode] = out
            t = time.perf_counter()
            batched_hvp(fn, gs, chunk_size=None)
            batched = time.perf_counter() - t
            t = time.perf_counter()
            sols, _ = solver.solve_many(fn, gs)
            cg = time.perf_counter() - t
            solutions[mode] = sols
            del fn
        report["modes"][mode] = {
            "prepare_s": round(prep, 2), "hvp_s_median": round(statistics.median(times), 3),
            f"vmap_{len(gs)}_hvps_s": round(batched, 2), f"cg_{args.cg_iters}_iters_{len(gs)}_queries_s": round(cg, 2),
            "peak_rss_mb": round(meter.stages[mode]["peak_rss_mb"]),
        }  # fmt: skip
        print(mode, report["modes"][mode], flush=True)

    def rel(a, b):
        return float(tdot(_sub(a, b), _sub(a, b)) ** 0.5 / tdot(b, b) ** 0.5)

    def _sub(a, b):
        return {k: a[k] - b[k] for k in a}

    if len(args.modes) < 2:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    fr, pr = report["modes"]["forward_over_reverse"], report["modes"]["prepared"]
    report["hvp_rel_diff"] = rel(products["prepared"], products["forward_over_reverse"])
    report["s_test_rel_diff_max"] = max(
        rel(a, b) for a, b in zip(solutions["prepared"], solutions["forward_over_reverse"], strict=True)
    )
    key = f"cg_{args.cg_iters}_iters_{len(gs)}_queries_s"
    report["speedup_per_hvp"] = round(fr["hvp_s_median"] / pr["hvp_s_median"], 2)
    report["speedup_cg_including_prepare"] = round(fr[key] / (pr[key] + pr["prepare_s"]), 2)
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
