"""Influence-engine benchmark on the embedded default model (issue: influence engine, `make bench`).

Measures, on one batch of real OpenBookQA training examples, side by side in one run:
  * forward+backward on theta2 (gradient of the mean loss from the latents),
  * the derivative swap (latent_influence: example, latent and token scores in one extra differentiation),
  * the per-latent JVP reference loop on the same pairs (timed on a sample of latents, extrapolated to all
    active latents of the batch),
  * peak memory of the swap and of forward+backward (each in a fresh subprocess, RSS above the loaded state),
  * CG time per query (s_test) on a Hessian batch.
The SAE is a TopK SAE (d_sae 2048, k 64) at blocks.14.hook_resid_post; its weights are random unless
--sae points to a trained SAELens folder (cost does not depend on the weights, only on d_sae and k).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakRSS


def _setup(args: argparse.Namespace):
    from repinf_lens import SplitModel, load_mcqa, load_model
    from repinf_lens.testing import random_sae

    torch.manual_seed(0)
    model = load_model(device=args.device, n_ctx=512)
    if args.sae:
        from sae_lens import SAE

        sae = SAE.load_from_disk(args.sae, device=args.device)
    else:
        sae = random_sae(model, args.hook, d_sae=args.d_sae, k=args.k, seed=0)
    split = SplitModel(model, args.hook, sae)
    train = load_mcqa("openbookqa", "train", offline=True)
    rows = [train[i] for i in range(args.batch_size)]
    batch = split.task.collate(rows)
    return split, rows, batch


def _measure_memory(kind: str, args_dict: dict, queue: mp.Queue) -> None:
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    from repinf_lens.curvature import loss_grad
    from repinf_lens.influence import latent_influence

    split, rows, batch = _setup(args)
    params = split.downstream_params()
    inp = split.prepare(batch)
    s = {k: torch.randn_like(v) * 1e-3 for k, v in params.items()}
    chunk = args.swap_chunk if kind == "swap_chunked" else None
    fn = (
        (lambda: loss_grad(split, params, inp))
        if kind == "fwd_bwd"
        else (lambda: latent_influence(split, s, inp, params, chunk_size=chunk))
    )
    fn()  # warm-up outside the measurement (kernels, decompositions)
    with PeakRSS(interval=0.002, trim=True) as mem:
        out = fn()
    del out
    queue.put(mem.peak_mb)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hook", default="blocks.14.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--sae", default=None, help="a trained SAELens SAE folder (default: random TopK)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reference-latents", type=int, default=8, help="latents timed in the per-latent JVP loop")
    p.add_argument("--cg-iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--swap-chunk", type=int, default=4, help="also time/measure the swap in chunks of this size")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _record import Recorder

    from repinf_lens import CG, InfluenceAttributor
    from repinf_lens.curvature import loss_grad
    from repinf_lens.influence import latent_influence, latent_influence_reference

    rec = Recorder(args.out)  # every measurement is written as soon as it exists
    split, rows, batch = _setup(args)
    params = split.downstream_params()
    inp = split.prepare(batch)
    n_theta2 = sum(v.numel() for v in params.values())
    rec.update(device=args.device, threads=args.threads, hook=args.hook, d_sae=args.d_sae, k=args.k,
               batch_size=args.batch_size, tokens_per_example=int(batch.attention_mask.sum(1).float().mean()),
               n_theta2=n_theta2)  # fmt: skip
    s = {k: v for k, v in loss_grad(split, params, split.prepare(split.task.collate(rows[:1]))).items()}
    # warm-up (first calls load kernels and decompositions)
    loss_grad(split, params, inp)
    latent_influence(split, s, inp, params)

    def timeit(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    t_fb = timeit(lambda: loss_grad(split, params, inp))
    t_swap = timeit(lambda: latent_influence(split, s, inp, params))
    rec.update(fwd_bwd_s=round(t_fb, 3), swap_s=round(t_swap, 3), swap_over_fwd_bwd=round(t_swap / t_fb, 2))
    t_swap_chunked = timeit(lambda: latent_influence(split, s, inp, params, chunk_size=args.swap_chunk))
    rec.update(swap_chunk=args.swap_chunk, swap_chunked_s=round(t_swap_chunked, 3),
               swap_chunked_over_fwd_bwd=round(t_swap_chunked / t_fb, 2))  # fmt: skip
    li = latent_influence(split, s, inp, params)
    active_per_example = [int((li.latents[i] != 0).any(0).sum()) for i in range(len(batch))]
    n_active = sum(active_per_example)
    # per-latent reference on the same pairs: time a sample of latents of example 0, check agreement
    latents0 = torch.nonzero((li.latents[0] != 0).any(0)).flatten().tolist()[: args.reference_latents]
    t0 = time.perf_counter()
    ref = latent_influence_reference(split, s, inp, example=0, latents=latents0, params=params)
    t_ref_each = (time.perf_counter() - t0) / len(latents0)
    got = li.latent_scores[0, latents0]
    want = torch.tensor([ref[j] for j in latents0])
    max_rel = float((got - want).abs().max() / want.abs().max())
    t_ref_total = t_ref_each * n_active
    rec.update(active_latents_in_batch=n_active, reference_s_per_latent=round(t_ref_each, 3),
               reference_s_extrapolated=round(t_ref_total, 1),
               swap_speedup_vs_reference=round(t_ref_total / t_swap, 1),
               swap_vs_reference_max_rel_diff=max_rel)  # fmt: skip

    # CG per query on a Hessian batch of the same size
    att = InfluenceAttributor(
        split,
        hessian=CG(max_iter=args.cg_iters, tol=0.0, on_negative_curvature="ignore"),
        use_cache=False,
        progress=False,
    ).fit(rows)
    t = time.perf_counter()
    att.s_test([rows[0]])
    t_cg = time.perf_counter() - t
    rec.update(cg_iters=args.cg_iters, cg_s_per_query=round(t_cg, 2))
    del att, li  # free the parent's memory before the measuring processes start

    mem = {}
    if not args.no_memory:
        ctx = mp.get_context("spawn")
        for kind in ("fwd_bwd", "swap", "swap_chunked"):
            q = ctx.Queue()
            proc = ctx.Process(target=_measure_memory, args=(kind, vars(args) | {"out": str(args.out)}, q))
            proc.start()
            mem[kind] = q.get()
            proc.join()

    if mem:
        rec.update(
            peak_mb_fwd_bwd=round(mem["fwd_bwd"], 1),
            peak_mb_swap=round(mem["swap"], 1),
            swap_over_fwd_bwd_memory=round(mem["swap"] / max(mem["fwd_bwd"], 1e-9), 2),
            peak_mb_swap_chunked=round(mem["swap_chunked"], 1),
            swap_chunked_over_fwd_bwd_memory=round(mem["swap_chunked"] / max(mem["fwd_bwd"], 1e-9), 2),
        )
    res = rec.data
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
