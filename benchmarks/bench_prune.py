"""The downstream function at the loss positions only after the last attention layer (``prune``), side
by side with every position, in one run.

After the last block's ``hook_resid_mid`` nothing mixes positions, so the last MLP, the final norm and the
unembedding need only the loss positions. Measured on the shipped finetune (``smollm2-135m-openbookqa``) and
OpenBookQA training questions (``--batch-size`` per batch), per setting and mode: the time (median of ``--reps``,
the two modes interleaved) of a per-example gradient batch (the sketches), a batch's derivative swap (the
scores: example, latent and token), and an HVP (CG's unit of work), plus the largest relative difference
between the modes' outputs. Settings: ``last`` (hook ``blocks.28.hook_resid_post``, theta2 =
``blocks.29.mlp.W_out``: the LDS / peers setting), ``block`` (same hook, theta2 = all of block 29), ``L22``
(``blocks.22.hook_resid_post``, theta2 = everything downstream: the demo's split).

Usage::

    python benchmarks/bench_prune.py --threads 1 --out benchmarks/results/prune.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SETTINGS = {
    "last": ("blocks.28.hook_resid_post", r"^blocks\.29\.mlp\.W_out$"),
    "block": ("blocks.28.hook_resid_post", r"^blocks\.29\."),
    "L22": ("blocks.22.hook_resid_post", None),
}


def _jobs(inp, batch, params, v) -> dict:
    """The three units of work timed, as functions of the split."""
    from repinf_lens.curvature import hvp
    from repinf_lens.influence import latent_influence
    from repinf_lens.influence.prefilter import GradientSketcher

    return {
        "per-example grads": lambda s: GradientSketcher(s, exact=True).per_example_grads(inp),
        "swap": lambda s: latent_influence(s, v, batch, params),
        "hvp": lambda s: hvp(s, params, inp, v),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-openbookqa")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prune.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from repinf_lens import SplitModel, load_mcqa, load_model
    from repinf_lens.testing import random_sae

    model = load_model(args.model, n_ctx=512)
    data = load_mcqa("openbookqa", "train", offline=True)
    rows = [dict(data[i]) for i in range(args.batch_size)]
    out: dict = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads, "settings": {}}
    for name in args.settings:
        hook, downstream = SETTINGS[name]
        sae = random_sae(model, hook, d_sae=1024, k=64, seed=0)
        splits = {mode: SplitModel(model, hook, sae, downstream=downstream, prune=mode == "pruned")
                  for mode in ("pruned", "every position")}  # fmt: skip
        batch = splits["pruned"].task.collate(rows)
        inp = splits["pruned"].prepare(batch)
        params = splits["pruned"].downstream_params()
        g = torch.Generator().manual_seed(0)
        v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3 for k, p in params.items()}
        jobs = _jobs(inp, batch, params, v)
        times: dict = {m: {j: [] for j in jobs} for m in splits}
        results: dict = {m: {} for m in splits}
        for rep in range(args.reps + 1):  # round 0 warms up (not timed); the modes alternate which goes first
            for job, fn in jobs.items():
                for mode, split in sorted(splits.items(), reverse=rep % 2 == 1):
                    t = time.perf_counter()
                    results[mode][job] = fn(split)
                    if rep:
                        times[mode][job].append(time.perf_counter() - t)

        def flat(x):
            if isinstance(x, dict):
                return torch.cat([t.detach().reshape(-1).double() for t in x.values()])
            return torch.cat(
                [x.example_scores.detach().reshape(-1).double(), x.latent_scores.detach().reshape(-1).double()]
            )

        row: dict = {"hook": hook, "downstream": downstream, "n_theta2": sum(p.numel() for p in params.values()),
                     "tokens": int(batch.tokens.numel()), "jobs": {}}  # fmt: skip
        for job in jobs:
            a, b = flat(results["pruned"][job]), flat(results["every position"][job])
            med = {m: statistics.median(times[m][job]) for m in splits}
            row["jobs"][job] = {
                "pruned_s": round(med["pruned"], 4),
                "every_position_s": round(med["every position"], 4),
                "speedup": round(med["every position"] / med["pruned"], 2),
                "max_rel_diff": float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)),
            }
            print(f"{name:>5} {job:>17}: {med['every position']:.3f} s -> {med['pruned']:.3f} s "
                  f"({row['jobs'][job]['speedup']}x), max rel diff {row['jobs'][job]['max_rel_diff']:.1e}")  # fmt: skip
        out["settings"][name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
