"""Retraining checks on the real default model: linear datamodeling score (LDS) and leave-one-out (issue 6).

Influence functions are only as good as their predictions of retraining. This runs the harness of
:mod:`repinf_lens.analysis.lds` on a setting small enough to retrain many times on a CPU: theta2 = the parameters
downstream of ``--hook`` selected by ``--downstream`` (default: the last block's MLP output matrix, 885k
parameters on the default model, with the hook before that block), an SAE at
the hook (random weights; example scores do not depend on it with the error term held), real OpenBookQA training
prompts. Every subset retrain is a proximal L-BFGS fit from the full-data optimum; predicted test-loss changes
come from CG, Identity (gradient dot product) and LiSSA. Reports Spearman (LDS, as TRAK / Kronfluence / dattri
report it), Pearson and sign agreement, and the time of each part. Writes benchmarks/results/lds.json.

Usage: ``python benchmarks/bench_lds.py [--model DIR] [--n-train 64] [--queries 8] [--subsets 20] [--loo 0]``
(``--tiny`` for a smoke test on a tiny random model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def lds_setting(args: argparse.Namespace) -> tuple[Any, list[dict], list[dict], str]:
    """The harness's setting: ``(split, train rows, query rows, theta2 pattern)`` from ``--tiny``/``--model``,
    ``--n-train``, ``--queries``, ``--hook``, ``--downstream`` and ``--template`` (a random TopK SAE d 256 / k 16
    at the hook: example scores do not depend on it with the error term held). Also used by
    ``sign_by_retraining.py``."""
    from repinf_lens import MultipleChoiceTask, SplitModel, load_mcqa, load_model
    from repinf_lens.testing import random_sae

    need = args.n_train + args.queries
    if args.tiny:
        from repinf_lens.testing import tiny_model, toy_mcqa_rows

        model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
        rows = toy_mcqa_rows(need, seed=0)
    else:
        model = load_model(args.model, n_ctx=512)
        data = load_mcqa("openbookqa", "train", offline=True)
        rows = [dict(data[i]) for i in range(need)]
    n_layers = int(model.cfg.n_layers)
    hook = args.hook or f"blocks.{n_layers - 2}.hook_resid_post"
    downstream = args.downstream or rf"^blocks\.{n_layers - 1}\.mlp\.W_out$"
    task = MultipleChoiceTask.from_model(model, template=args.template)
    split = SplitModel(model, hook, random_sae(model, hook, d_sae=256, k=16, seed=0), task=task,
                       downstream=downstream)  # fmt: skip
    return split, rows[: args.n_train], rows[args.n_train :], downstream


def build_solvers(names: list[str], damping: float) -> dict[str, Any]:
    """The solvers to compare: registered names (``cg``, ``lissa``, ``identity``, ``kfac``, ``ekfac``: their
    near-exact settings, K-FAC / EK-FAC with the true Fisher), ``kfac-emp`` / ``ekfac-emp`` (empirical Fisher)
    and ``pcg<N>`` (CG with ``N`` iterations, no tolerance stop, preconditioned by empirical-Fisher EK-FAC)."""
    import re

    from repinf_lens.analysis.lds import default_solvers
    from repinf_lens.curvature import CG, EKFAC, KFAC

    out: dict[str, Any] = {}
    for name in names:
        pcg = re.fullmatch(r"pcg(\d+)", name)
        if pcg:
            out[name] = CG(damping=damping, max_iter=int(pcg.group(1)), tol=0.0,
                           preconditioner=EKFAC(damping=damping, fisher="empirical", progress=False))  # fmt: skip
        elif name in ("kfac-emp", "ekfac-emp"):
            cls = KFAC if name == "kfac-emp" else EKFAC
            out[name] = cls(damping=damping, fisher="empirical", progress=False)
        else:
            out.update(default_solvers(damping, (name,)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model and toy data (smoke test)")
    p.add_argument("--model", default=None, help="local HF folder (e.g. a finetune's merged/); default: embedded")
    p.add_argument("--template", default="plain")
    p.add_argument("--hook", default=None, help="default: hook_resid_post of the second-to-last block")
    p.add_argument("--downstream", default=None, help="regex selecting theta2 (default: the last block's mlp.W_out)")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--subsets", type=int, default=20, help="LDS subsets (0: skip LDS)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--loo", type=int, default=0, help="leave-one-out retrains (0: skip)")
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument(
        "--solvers",
        nargs="+",
        default=["cg", "identity", "lissa"],
        help="registered names, kfac-emp / ekfac-emp (empirical Fisher), pcg<N> (EK-FAC-preconditioned CG)",
    )
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations per retrain")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / ("lds_tiny.json" if args.tiny else "lds.json")

    from repinf_lens.analysis.lds import leave_one_out, linear_datamodeling_score

    torch.manual_seed(0)
    t0 = time.perf_counter()
    split, train, queries, _ = lds_setting(args)
    solvers = build_solvers(args.solvers, args.damping)
    n_theta2 = sum(v.numel() for v in split.downstream_params().values())
    res: dict = {
        "model": "tiny" if args.tiny else (args.model or "default"),
        "hook": split.hook_name,
        "theta2": sorted(split.downstream_params()),
        "n_theta2": n_theta2,
        "n_train": len(train),
        "queries": len(queries),
        "damping": args.damping,
        "threads": args.threads,
        "load_s": round(time.perf_counter() - t0, 1),
    }
    kw = dict(solvers=solvers, damping=args.damping, max_iter=args.max_iter, progress=True)
    if args.subsets > 0:
        t = time.perf_counter()
        lds = linear_datamodeling_score(split, train, queries, n_subsets=args.subsets, fraction=args.fraction, **kw)
        res["lds"] = {"table": lds.table(), "per_query": lds.per_query, "seconds": lds.seconds,
                      "subsets": args.subsets, "fraction": args.fraction,
                      "total_s": round(time.perf_counter() - t, 1)}  # fmt: skip
    if args.loo > 0:
        t = time.perf_counter()
        loo = leave_one_out(split, train, queries, n_remove=args.loo, **kw)
        res["loo"] = {"table": loo.table(), "seconds": loo.seconds, "n_remove": args.loo,
                      "total_s": round(time.perf_counter() - t, 1)}  # fmt: skip
    res["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for part in ("lds", "loo"):
        for row in res.get(part, {}).get("table", []):
            print(f"{part} {row['solver']:>8}: spearman {row['spearman']:+.3f}  pearson {row['pearson']:+.3f}  "
                  f"sign agreement {row['sign_agreement']:.2f}  ({row['seconds']} s)")  # fmt: skip
    print(f"total {res['total_s']} s; results: {args.out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
