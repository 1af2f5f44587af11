"""Prefilter benchmark (issue 5, "Scale"): the one-off sketch pass over the whole training set, how well the
sketch preserves the exact cosine ranking, and the per-query prefilter cost with cached sketches.

Default: the embedded default model, the "plain" template, ALL 4957 OpenBookQA training examples, theta2 =
everything downstream of ``--hook`` (default blocks.22.hook_resid_post: 7 blocks + ln_final + unembedding, 53M
parameters), sparse JL sketches of dim 4096, 8 OpenBookQA test questions as check queries. The SAE is a random
TopK SAE: with the error term the downstream forward is the model's, so theta2 gradients do not depend on it.

Measured, each written to the JSON as soon as it exists (``--out``, default
benchmarks/results/prefilter.json):
  * ``sketch_pass_s`` / ``sketch_examples_per_s``: the one-off pass (``build_sketches``; resumable: a rerun
    after a crash computes only the missing shards; a store built with other settings or another code version
    is replaced);
  * ``check``: top-1/5/10 % overlap of the sketched vs the exact cosine ranking over all N examples, Spearman
    and Pearson of the cosines, max |error| (``SketchStore.check_report``; the exact cosines come from the
    same pass, dotting each batch's per-example gradients with the check queries' full gradients);
  * per-query cost with cached sketches: ``query_sketch_s`` (the query's gradient + projection),
    ``match_cold_s`` (first matrix product against a freshly opened memory-mapped store), ``match_warm_s``
    (best of 5), ``match_batched_per_query_s`` (Q queries in one product, per query) and their sum
    ``prefilter_per_query_s`` (goal: <= 2 s on these machines).
``--tiny`` runs it on a tiny random model in seconds (smoke test; numbers say nothing about the real model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import Recorder


def _setup(args: argparse.Namespace) -> tuple[Any, list[dict], list[dict]]:
    """(split, training rows, check queries): bench_scale's set-up with all training rows (``--tiny``: 200)."""
    import bench_scale

    ns = argparse.Namespace(tiny=args.tiny, device=args.device, model=None, hook=args.hook, d_sae=2048, k=64,
                            queries=args.check_queries, n_train=args.n_train or (200 if args.tiny else 0))  # fmt: skip
    split, queries, train = bench_scale._setup(ns)
    return split, train, queries


def _best(fn: Any, repeats: int) -> float:
    import bench_scale

    return bench_scale._best(fn, repeats)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model and toy data (seconds; smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hook", default="blocks.22.hook_resid_post")
    p.add_argument("--n-train", type=int, default=0, help="training examples (0: all 4957)")
    p.add_argument("--check-queries", type=int, default=8, help="test questions with exact cosines")
    p.add_argument("--dim", type=int, default=4096, help="sketch dimension")
    p.add_argument("--projection", default="sjlt", choices=["sjlt", "rademacher"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--store", type=Path, default=None, help="sketch store folder (default runs/bench/sketches_*)")
    p.add_argument("--out", type=Path, default=None, help="default results/prefilter.json (--tiny: _tiny)")
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parent
    tag = "tiny" if args.tiny else args.hook.split(".")[1]
    args.out = args.out or here / "results" / ("prefilter_tiny.json" if args.tiny else "prefilter.json")
    args.store = args.store or here.parent / "runs" / "bench" / f"sketches_{tag}_d{args.dim}"
    torch.set_num_threads(args.threads)

    from repinf_lens.influence.prefilter import GradientSketcher, SketchStore, build_sketches, prefilter, top_count

    rec = Recorder(args.out)
    t = time.perf_counter()
    split, train, queries = _setup(args)
    n_theta2 = sum(v.numel() for v in split.downstream_params().values())
    rec.update(model="tiny" if args.tiny else "default", device=args.device, threads=args.threads,
               hook=split.hook_name, n_theta2=n_theta2, n_train=len(train), check_queries=len(queries),
               dim=args.dim, projection=args.projection, batch_size=args.batch_size, store=str(args.store),
               load_s=round(time.perf_counter() - t, 2))  # fmt: skip

    t = time.perf_counter()
    store = build_sketches(split, None, train, out_dir=args.store, dim=args.dim, projection=args.projection,
                           batch_size=args.batch_size, shard_size=args.shard_size, check_queries=queries,
                           overwrite=True)  # fmt: skip
    wall = time.perf_counter() - t
    runs = store.manifest.get("runs", [])
    total = sum(r["seconds"] for r in runs if r["computed"])
    rec.update(
        sketch_pass_s=round(total, 1),
        sketch_examples_per_s=round(len(train) / total, 3) if total else None,
        sketch_pass_runs=runs,
        sketch_call_this_run_s=round(wall, 1),
        store_mb=round(sum(f.stat().st_size for f in args.store.rglob("*.safetensors")) / 2**20, 1),
    )
    rec.update(check=store.check_report())

    # per-query cost with cached sketches
    sketcher = GradientSketcher.from_store(split, store)
    q_sk = sketcher.sketch(queries, batch_size=args.batch_size)
    one = [queries[0]]
    sketch_s = _best(lambda: sketcher.sketch(one), 3)
    fresh = SketchStore.load(args.store)  # memory-mapped, nothing read yet
    t = time.perf_counter()
    prefilter(q_sk[:1], fresh, top_fraction=0.05)
    cold = time.perf_counter() - t
    warm = _best(lambda: prefilter(q_sk[:1], fresh, top_fraction=0.05), 5)
    batched = _best(lambda: prefilter(q_sk, fresh, top_fraction=0.05), 5)
    end_to_end = _best(lambda: prefilter(one, fresh, split=split, top_fraction=0.05), 3)
    rec.update(
        top_5pct_kept=top_count(len(train), top_fraction=0.05),
        query_sketch_s=round(sketch_s, 3),
        match_cold_s=round(cold, 4),
        match_warm_s=round(warm, 4),
        match_batched_per_query_s=round(batched / len(queries), 4),
        prefilter_per_query_s=round(sketch_s + cold, 3),
        prefilter_end_to_end_s=round(end_to_end, 3),
    )
    return rec.data


if __name__ == "__main__":
    main(sys.argv[1:])
