"""Scale benchmark: Q queries scored together vs one at a time, batched CG, throughput (issue 5, "Scale").

Measures, on the same training examples and s_test vectors, side by side in one run:
  * sequential scoring: one ``latent_influence`` call per (training batch, query), as before,
  * batched scoring: one ``latent_influence_multi`` call per training batch for all Q queries (the primal
    forward/backward through theta2 shared, the Q tangents under ``torch.func.vmap``),
    their time ratio, the largest relative difference of their scores, and the peak memory of each,
  * throughput: training examples scored per second (for all Q queries) and (query, example) pairs per second,
    for the batched path and end to end through ``InfluenceAttributor.attribute``,
  * optionally (``--cg-iters N``, N > 0) N CG iterations for the Q queries: per-query ``CG.solve`` vs
    ``CG.solve_many`` (one batched HVP per iteration).
The s_test vectors are the queries' gradients (Identity solver: scoring cost does not depend on them).

Default: the embedded default model (``repinf_lens.load_model()``), the "plain" multiple-choice template,
OpenBookQA train (offline), a random TopK SAE (d_sae 2048, k 64) at blocks.14.hook_resid_post, Q=8, 16 training
examples in batches of 8, swaps of 2 examples (``--swap-chunk``, both paths). Memory: the batched swap holds
``--query-chunk`` (default Q) tangents at once, each costing roughly 0.6x a one-query swap's peak (bench_engine:
7.1 GB for a one-query swap of 8 examples, 4.0 GB in chunks of 4), so lower ``--query-chunk`` or ``--swap-chunk``
when memory is tight; the JSON records both peaks.
``--tiny`` runs the same measurements on a tiny random model in seconds (a smoke test of the script; its numbers
say nothing about the real model). Writes benchmarks/results/scale.json (``--tiny``: scale_tiny.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _setup(args: argparse.Namespace) -> tuple[Any, list[dict], list[dict]]:
    """(split, queries, training rows): queries and training examples are disjoint rows of the data."""
    from repinf_lens import MultipleChoiceTask, SplitModel
    from repinf_lens.testing import random_sae

    torch.manual_seed(0)
    need = args.n_train + args.queries
    if args.tiny:
        from repinf_lens.testing import tiny_model, toy_mcqa_rows

        model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0, device=args.device)
        hook = "blocks.0.hook_resid_post"
        sae = random_sae(model, hook, d_sae=64, k=8, seed=0)
        rows = toy_mcqa_rows(need, seed=0)
    else:
        from repinf_lens import load_mcqa, load_model

        model = load_model(device=args.device, n_ctx=512)
        hook = args.hook
        sae = random_sae(model, hook, d_sae=args.d_sae, k=args.k, seed=0)
        data = load_mcqa("openbookqa", "train", offline=True)
        rows = [data[i] for i in range(need)]
    task = MultipleChoiceTask.from_model(model, template="plain")
    split = SplitModel(model, hook, sae, task=task)
    return split, rows[args.n_train :], rows[: args.n_train]


def _best(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak_mb(fn: Any) -> float | None:
    """Peak RSS (MB) of ``fn()`` above the RSS before it (bench_engine's sampler; ``None`` without psutil)."""
    from bench_engine import _PeakRSS

    try:
        with _PeakRSS() as mem:
            out = fn()
    except ImportError:  # psutil missing
        return None
    del out
    return round(mem.peak_mb, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model and toy data (seconds; smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hook", default="blocks.14.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--queries", type=int, default=8, help="Q, the number of test queries")
    p.add_argument("--n-train", type=int, default=16, help="training examples scored")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query-chunk", type=int, default=None, help="queries per batched swap (default: all Q)")
    p.add_argument(
        "--swap-chunk", type=int, default=2, help="training examples per swap (bounds memory; 0: whole batch)"
    )
    p.add_argument("--cg-iters", type=int, default=2, help="CG iterations timed per-query vs solve_many (0: skip)")
    p.add_argument("--hessian-examples", type=int, default=8, help="Hessian data for the CG timing")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS measurements")
    p.add_argument("--no-end-to-end", action="store_true", help="skip InfluenceAttributor.attribute")
    p.add_argument(
        "--amp", default=None, choices=["bf16", "fp16"], help="also score under torch.autocast and compare to fp32"
    )
    p.add_argument("--out", type=Path, default=None, help="default results/scale.json (--tiny: scale_tiny.json)")
    args = p.parse_args(argv)
    args.swap_chunk = args.swap_chunk or None
    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / ("scale_tiny.json" if args.tiny else "scale.json")
    torch.set_num_threads(args.threads)

    from repinf_lens import CG, Identity, InfluenceAttributor
    from repinf_lens.influence import latent_influence
    from repinf_lens.influence.math import latent_influence_multi, stack_queries

    t_load = time.perf_counter()
    split, queries, train = _setup(args)
    t_load = time.perf_counter() - t_load
    params = split.downstream_params()
    att = InfluenceAttributor(
        split,
        hessian=Identity(),
        use_cache=False,
        progress=False,
        batch_size=args.batch_size,
        swap_chunk_size=args.swap_chunk,
        query_chunk_size=args.query_chunk,
    )
    s_list = att.s_test(queries)  # Identity: s_test = the query gradients
    stacked = stack_queries(s_list, params)
    bs = args.batch_size
    batches = [split.prepare(split.task.collate(train[i : i + bs])) for i in range(0, len(train), bs)]
    tokens = [int(inp.batch.attention_mask.sum()) for inp in batches]

    def sequential() -> list:
        return [
            [latent_influence(split, s, inp, params, chunk_size=args.swap_chunk) for s in s_list] for inp in batches
        ]

    def batched() -> list:
        return [
            latent_influence_multi(
                split, stacked, inp, params, chunk_size=args.swap_chunk, query_chunk_size=args.query_chunk
            )
            for inp in batches
        ]

    # warm-up on the first batch (kernels, decompositions), not timed
    latent_influence(split, s_list[0], batches[0], params, chunk_size=args.swap_chunk)
    latent_influence_multi(
        split, stacked, batches[0], params, chunk_size=args.swap_chunk, query_chunk_size=args.query_chunk
    )
    t_seq, seq = _best(sequential, args.repeats)
    t_bat, bat = _best(batched, args.repeats)
    max_rel = 0.0
    for sb, bb in zip(seq, bat):
        for a, b in zip(sb, bb):
            scale = float(a.latent_scores.abs().max()) or 1.0
            max_rel = max(max_rel, float((a.latent_scores - b.latent_scores).abs().max()) / scale)
            scale = float(a.example_scores.abs().max()) or 1.0
            max_rel = max(max_rel, float((a.example_scores - b.example_scores).abs().max()) / scale)
    amp_res: dict[str, Any] = {}
    if args.amp:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        amp_att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, amp_dtype=amp_dtype)
        amp_stacked = stack_queries(amp_att.s_test(queries), params)  # query gradients under autocast too

        def amp_batched() -> list:
            with amp_att._amp():
                return [
                    latent_influence_multi(split, amp_stacked, inp, params, chunk_size=args.swap_chunk,
                                           query_chunk_size=args.query_chunk)
                    for inp in batches
                ]  # fmt: skip

        t_amp, amp_out = _best(amp_batched, args.repeats)
        full_ex = torch.cat([torch.stack([li.example_scores for li in b]) for b in bat], dim=1).double()
        amp_ex = torch.cat([torch.stack([li.example_scores for li in b]) for b in amp_out], dim=1).double()
        full_lat = torch.cat([torch.stack([li.latent_scores for li in b]) for b in bat], dim=1).double()
        amp_lat = torch.cat([torch.stack([li.latent_scores for li in b]) for b in amp_out], dim=1).double()
        live = (full_lat != 0) | (amp_lat != 0)
        from repinf_lens.analysis.lds import spearman

        amp_res = {
            "amp_dtype": args.amp,
            "amp_batched_s": round(t_amp, 3),
            "amp_time_ratio_vs_fp32": round(t_amp / t_bat, 2),
            "amp_example_pearson": float(torch.corrcoef(torch.stack([full_ex.flatten(), amp_ex.flatten()]))[0, 1]),
            "amp_example_spearman": float(spearman(full_ex.flatten(), amp_ex.flatten())),
            "amp_example_sign_agreement": float((full_ex.sign() == amp_ex.sign()).double().mean()),
            "amp_latent_pearson": float(torch.corrcoef(torch.stack([full_lat[live], amp_lat[live]]))[0, 1]),
        }
        del amp_out
    del seq, bat
    mem_seq = mem_bat = None
    if not args.no_memory:
        mem_seq = _peak_mb(
            lambda: [latent_influence(split, s, batches[0], params, chunk_size=args.swap_chunk) for s in s_list[:1]]
        )
        mem_bat = _peak_mb(
            lambda: latent_influence_multi(
                split, stacked, batches[0], params, chunk_size=args.swap_chunk, query_chunk_size=args.query_chunk
            )
        )

    n, q = len(train), len(queries)
    res: dict[str, Any] = {
        "model": "tiny" if args.tiny else "default",
        "device": args.device,
        "threads": args.threads,
        "hook": split.hook_name,
        "d_sae": split.d_sae,
        "n_theta2": sum(v.numel() for v in params.values()),
        "queries": q,
        "n_train": n,
        "batch_size": bs,
        "tokens_per_example": round(sum(tokens) / n, 1),
        "query_chunk": args.query_chunk,
        "swap_chunk": args.swap_chunk,
        "load_s": round(t_load, 2),
        "sequential_s": round(t_seq, 3),
        "batched_s": round(t_bat, 3),
        "batched_speedup": round(t_seq / t_bat, 2),
        "sequential_examples_per_s": round(n / t_seq, 3),
        "batched_examples_per_s": round(n / t_bat, 3),
        "batched_pairs_per_s": round(n * q / t_bat, 3),
        "batched_vs_sequential_max_rel_diff": max_rel,
        "peak_mb_one_query_swap": mem_seq,
        "peak_mb_batched_swap": mem_bat,
        **amp_res,
    }

    if not args.no_end_to_end:
        t = time.perf_counter()
        result = att.attribute(queries, train)
        res["attribute_s"] = round(time.perf_counter() - t, 3)
        res["attribute_influence_s"] = result.meta["seconds_influence"]
        res["attribute_examples_per_s"] = round(n / max(result.meta["seconds_influence"], 1e-9), 3)

    if args.cg_iters > 0:
        solver = CG(max_iter=args.cg_iters, tol=0.0, on_negative_curvature="ignore")
        cg_att = InfluenceAttributor(split, hessian=solver, use_cache=False, progress=False).fit(
            (train * (1 + args.hessian_examples // max(n, 1)))[: args.hessian_examples]
        )
        gs = [cg_att.query_gradient(r) for r in queries]
        t = time.perf_counter()
        single = [solver.solve(cg_att.hvp, g)[0] for g in gs]
        t_cg_seq = time.perf_counter() - t
        t = time.perf_counter()
        many, _ = solver.solve_many(cg_att.hvp, gs, chunk_size=args.query_chunk)
        t_cg_bat = time.perf_counter() - t
        from repinf_lens._tree import tflatten

        cg_rel = max(
            float((tflatten(a) - tflatten(b)).abs().max() / (tflatten(a).abs().max() or 1.0))
            for a, b in zip(single, many)
        )
        res.update(
            {
                "cg_iters": args.cg_iters,
                "cg_hessian_examples": args.hessian_examples,
                "cg_sequential_s": round(t_cg_seq, 3),
                "cg_batched_s": round(t_cg_bat, 3),
                "cg_batched_speedup": round(t_cg_seq / t_cg_bat, 2),
                "cg_batched_vs_sequential_max_rel_diff": cg_rel,
            }
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
