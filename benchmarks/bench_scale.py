"""Scale benchmark (issue 5, "Scale"): many queries per pass, batched CG, memory at N vs 4N, torchrun, LoRA theta2.

Sections (``--sections``, default all but ``lora``; each measurement is written to the JSON (``--out``, default
benchmarks/results/scale.json) as soon as it exists, so a killed run keeps what it measured):

* ``multi``: on the same training examples and s_test vectors, side by side in one run:
  sequential scoring (one ``latent_influence`` call per (training batch, query)) vs batched scoring (one
  ``latent_influence_multi`` call per training batch for all Q queries: the primal forward/backward through
  theta2 shared, the Q tangents under ``torch.func.vmap``), their time ratio and largest relative difference,
  the peak memory of each, throughput (training examples scored per second for all Q queries) and end to end
  through ``InfluenceAttributor.attribute``; ``--amp bf16`` also scores under autocast and compares to fp32.
  The s_test vectors are the queries' gradients (Identity solver: scoring cost does not depend on them).
* ``cg``: ``--cg-iters`` CG iterations for the Q queries, per-query ``CG.solve`` vs ``CG.solve_many`` (one
  batched HVP per iteration), exact Hessian of ``--hessian-examples`` examples.
* ``memory``: ``attribute_streaming`` (Identity solver) over N training examples (``--memory-n``), the same N
  repeated 4 times (identical batch shapes: growth would be accumulation) and 4N distinct examples, each in a
  fresh process, with glibc's default allocator and with every allocation above 64 KiB mmapped (no heap
  fragmentation: the program's real high-water mark); peak RSS (``ru_maxrss``).
* ``torchrun``: ``torchrun --standalone --nproc_per_node=K`` for K = 1 and 2 (``--torchrun-procs``), the same
  attribution (``attribute_distributed``, gloo on CPU): throughput of each and the largest difference of the
  2-process result from the 1-process one.
* ``lora``: theta2 = the unmerged LoRA adapters downstream of the hook (``LoraSplit``) vs theta2 = the full
  downstream weights of the merged model, Identity solver: rank agreement of the example scores per query.
  Needs ``--lora-adapter`` (a peft adapter folder) and ``--lora-merged`` (the merged model folder).

Default: the embedded default model (``repinf_lens.load_model()``), the "plain" multiple-choice template,
OpenBookQA train (training examples) and test (queries), offline, a random TopK SAE (d_sae 2048, k 64) at
blocks.22.hook_resid_post (theta2: 53M parameters), Q = 8, 8 training examples in batches of 8, swaps of 8
examples (``--swap-chunk``; default the whole batch), 4 queries per vmap (``--query-chunk``). ``--tiny`` runs
everything on a tiny random model in seconds (a smoke test; its numbers say nothing about the real model).
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

from _record import Recorder


def _setup(args: argparse.Namespace) -> tuple[Any, list[dict], list[dict]]:
    """(split, queries, training rows): queries are test questions, training rows the first ``args.n_train``
    training examples (0: all of them)."""
    from repinf_lens import MultipleChoiceTask, SplitModel
    from repinf_lens.testing import random_sae

    torch.manual_seed(0)
    n = args.n_train
    if args.tiny:
        from repinf_lens.testing import tiny_model, toy_mcqa_rows

        model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0, device=args.device)
        hook = "blocks.0.hook_resid_post"
        sae = random_sae(model, hook, d_sae=64, k=8, seed=0)
        rows = toy_mcqa_rows(n, seed=0)
        queries = toy_mcqa_rows(args.queries, seed=1, prefix="q-")
    else:
        from repinf_lens import load_mcqa, load_model

        model = load_model(args.model, device=args.device, n_ctx=512)
        hook = args.hook
        sae = random_sae(model, hook, d_sae=args.d_sae, k=args.k, seed=0)
        data = load_mcqa("openbookqa", "train", offline=True)
        rows = [data[i] for i in range(min(n, len(data)) if n else len(data))]
        test = load_mcqa("openbookqa", "test", offline=True)
        queries = [test[i] for i in range(args.queries)]
    task = MultipleChoiceTask.from_model(model, template="plain")
    return SplitModel(model, hook, sae, task=task), queries, rows


def _best(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak_mb(fn: Any) -> float | None:
    """Peak RSS (MB) of ``fn()`` above the RSS before it (``None`` where RSS cannot be read)."""
    from _memory import PeakRSS

    with PeakRSS(interval=0.002, trim=True) as mem:
        out = fn()
    del out
    return mem.peak_mb


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model and toy data (seconds; smoke test)")
    p.add_argument("--sections", default="multi,cg,memory,torchrun", help="comma-separated; also: lora")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="model (default: the embedded default)")
    p.add_argument("--hook", default="blocks.22.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--queries", type=int, default=8, help="Q, the number of test queries")
    p.add_argument("--n-train", type=int, default=8, help="training examples scored (multi, torchrun)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query-chunk", type=int, default=4, help="queries per batched swap (0: all Q)")
    p.add_argument(
        "--swap-chunk", type=int, default=0, help="training examples per swap (bounds memory; 0: whole batch)"
    )
    p.add_argument("--cg-iters", type=int, default=2, help="CG iterations timed per-query vs solve_many")
    p.add_argument("--hessian-examples", type=int, default=4, help="Hessian data for the CG timing")
    p.add_argument("--e2e-query-chunks", default="1,4", help="multi: attribute() query chunk sizes to time")
    p.add_argument("--cg-chunk", type=int, default=2, help="queries per batched HVP in solve_many (memory)")
    p.add_argument("--memory-n", type=int, default=16, help="memory section: N (and 4N) training examples")
    p.add_argument("--memory-queries", type=int, default=1, help="memory section: queries")
    p.add_argument("--memory-allocators", default="glibc_default,mmap_above_64k", help="memory section: malloc set-ups")
    p.add_argument("--torchrun-procs", default="1,2", help="torchrun section: process counts")
    p.add_argument("--torchrun-n-train", type=int, default=32, help="torchrun section: training examples")
    p.add_argument("--torchrun-queries", type=int, default=2, help="torchrun section: queries")
    p.add_argument("--lora-adapter", type=Path, default=None, help="lora section: peft adapter folder")
    p.add_argument("--lora-merged", type=Path, default=None, help="lora section: the merged model folder")
    p.add_argument("--lora-n-train", type=int, default=32, help="lora section: training examples")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="multi: skip the peak-RSS measurements")
    p.add_argument("--no-end-to-end", action="store_true", help="multi: skip InfluenceAttributor.attribute")
    p.add_argument(
        "--amp", default=None, choices=["bf16", "fp16"], help="multi: also score under torch.autocast vs fp32"
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default runs/bench/scale[_tiny])")
    p.add_argument("--out", type=Path, default=None, help="default results/scale.json (--tiny: scale_tiny.json)")
    p.add_argument("--worker", default=None, choices=["stream", "dist"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--repeat-train", type=int, default=1, help=argparse.SUPPRESS)
    return p


def _worker(args: argparse.Namespace) -> None:
    """One attribution in this process (``stream``: attribute_streaming; ``dist``: attribute_distributed under
    torchrun); writes its timings and own peak RSS to ``--worker-out``/worker[_rank].json."""
    import resource

    from repinf_lens import Identity, InfluenceAttributor
    from repinf_lens.distributed import cleanup, init_from_env

    info = init_from_env() if args.worker == "dist" else None
    split, queries, train = _setup(args)
    if args.repeat_train > 1:
        train = [
            {**row, "id": f"{row.get('id', i)}#{r}"} for r in range(args.repeat_train) for i, row in enumerate(train)
        ]
    max_tokens = max(int(split.task.collate([row]).attention_mask.sum()) for row in train)
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False,
                              batch_size=args.batch_size, swap_chunk_size=args.swap_chunk)  # fmt: skip
    out = args.worker_out
    t = time.perf_counter()
    if args.worker == "stream":
        result = att.attribute_streaming(queries, train, out_dir=out / "result", shard_size=args.batch_size,
                                         overwrite=True)  # fmt: skip
    else:
        result = att.attribute_distributed(queries, train)
    wall = time.perf_counter() - t
    rank = 0 if info is None else info.rank
    if result is not None:
        if args.worker == "dist":
            result.save(out / "result")
        meta = result.meta
    else:
        meta = {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB (Linux)
    (out / f"worker_{rank}.json").write_text(json.dumps({
        "rank": rank, "wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1), "max_tokens": max_tokens,
        "seconds_influence": meta.get("seconds_influence"), "distributed": meta.get("distributed"),
    }))  # fmt: skip
    if info is not None:
        cleanup()


def _base_cmd(args: argparse.Namespace) -> list[str]:
    cmd = ["--device", args.device, "--hook", args.hook, "--d-sae", str(args.d_sae), "--k", str(args.k),
           "--batch-size", str(args.batch_size), "--swap-chunk", str(args.swap_chunk or 0)]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    return cmd + (["--tiny"] if args.tiny else [])


def _launch(args: argparse.Namespace, out: Path, launcher: list[str], worker: str, extra: list[str],
            env: dict[str, str]) -> tuple[float, dict[str, Any]]:  # fmt: skip
    """Run this script as a ``worker`` process (under ``launcher``: the interpreter or torchrun) writing into a
    fresh ``out``; returns (wall seconds, the rank-0 worker's JSON)."""
    import shutil
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [*launcher, __file__, "--worker", worker, "--worker-out", str(out), *extra, *_base_cmd(args)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, json.loads((out / "worker_0.json").read_text())


_ALLOCATORS = {
    "glibc_default": {},
    # every allocation above 64 KiB is its own mmap, returned to the OS on free: no heap fragmentation, so the
    # peak RSS is the program's real high-water mark (slower: fresh pages are faulted in again every batch)
    "mmap_above_64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def _section_memory(args: argparse.Namespace, rec: Recorder) -> None:
    import os

    rows = []
    for alloc in args.memory_allocators.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **_ALLOCATORS[alloc]}
        peaks = {}
        # N examples; the same N repeated 4 times (4N examples, identical batch shapes: any growth is
        # accumulation); 4N distinct examples (longer prompts appear: the peak follows the longest batch)
        for label, n, rep in (("N", args.memory_n, 1), ("4N_repeated", args.memory_n, 4),
                              ("4N_distinct", 4 * args.memory_n, 1)):  # fmt: skip
            extra = ["--n-train", str(n), "--repeat-train", str(rep), "--queries", str(args.memory_queries),
                     "--threads", str(args.threads)]  # fmt: skip
            wall, w = _launch(args, args.work / f"memory_{alloc}_{label}", [sys.executable], "stream", extra, env)
            peaks[label] = w["peak_rss_mb"]
            rows.append({"allocator": alloc, "train": label, "n_train": n * rep, "queries": args.memory_queries,
                         "max_tokens": w["max_tokens"], "peak_rss_mb": w["peak_rss_mb"], "process_s": round(wall, 1),
                         "attribute_s": w["wall_s"],
                         "examples_per_s": round(n * rep / w["seconds_influence"], 3)})  # fmt: skip
            rec.update(memory=rows)
        rec.update(**{f"memory_rss_ratio_{alloc}": {k: round(v / peaks["N"], 3) for k, v in peaks.items()}})


def _section_torchrun(args: argparse.Namespace, rec: Recorder) -> None:
    import os

    from repinf_lens import InfluenceResult

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows: list[dict[str, Any]] = []
    results = {}
    for k in [int(x) for x in args.torchrun_procs.split(",")]:
        out = args.work / f"torchrun_{k}"
        extra = ["--n-train", str(args.torchrun_n_train), "--queries", str(args.torchrun_queries)]
        wall, w = _launch(args, out, [torchrun, "--standalone", f"--nproc_per_node={k}"], "dist", extra, env)
        results[k] = InfluenceResult.load(out / "result")
        row = {"procs": k, "process_s": round(wall, 1), "attribute_s": w["wall_s"],
               "seconds_influence": w["seconds_influence"],
               "examples_per_s": round(args.torchrun_n_train / w["seconds_influence"], 3),
               "seconds_per_rank": (w["distributed"] or {}).get("seconds_per_rank"),
               "peak_rss_mb_rank0": w["peak_rss_mb"]}  # fmt: skip
        if rows:
            a, b = results[rows[0]["procs"]], results[k]
            row["max_abs_diff_example_scores"] = float((a.example_scores - b.example_scores).abs().max())
            row["max_abs_diff_latent_scores"] = float((a.latent_scores - b.latent_scores).abs().max())
            row["example_scores_scale"] = float(a.example_scores.abs().max())
            row["throughput_ratio_vs_first"] = round(row["examples_per_s"] / rows[0]["examples_per_s"], 2)
        rows.append(row)
        rec.update(torchrun={"n_train": args.torchrun_n_train, "queries": args.torchrun_queries, "runs": rows})


def _section_lora(args: argparse.Namespace, rec: Recorder) -> None:
    from repinf_lens import Identity, InfluenceAttributor, MultipleChoiceTask, SplitModel, load_mcqa, load_model
    from repinf_lens._stats import spearman
    from repinf_lens.split.lora import lora_split_from_peft
    from repinf_lens.testing import random_sae

    if args.lora_adapter is None or args.lora_merged is None:
        rec.update(lora="skipped: pass --lora-adapter and --lora-merged")
        return
    model = load_model(args.lora_merged, device=args.device, n_ctx=512)
    sae = random_sae(model, args.hook, d_sae=args.d_sae, k=args.k, seed=0)
    full = SplitModel(model, args.hook, sae, task=MultipleChoiceTask.from_model(model, template="plain"))
    lora = lora_split_from_peft(full, args.lora_adapter)
    data = load_mcqa("openbookqa", "train", offline=True)
    train = [data[i] for i in range(args.lora_n_train)]
    test = load_mcqa("openbookqa", "test", offline=True)
    queries = [test[i] for i in range(args.queries)]
    out: dict[str, Any] = {"n_train": len(train), "queries": len(queries)}
    res = {}
    for name, split in (("full", full), ("lora", lora)):
        att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False,
                                  batch_size=args.batch_size, swap_chunk_size=args.swap_chunk)  # fmt: skip
        t = time.perf_counter()
        res[name] = att.attribute(queries, train)
        out[f"{name}_theta2_params"] = sum(v.numel() for v in split.downstream_params().values())
        out[f"{name}_s"] = round(time.perf_counter() - t, 2)
        rec.update(lora=out)
    a, b = res["full"].example_scores.double(), res["lora"].example_scores.double()
    k = max(1, len(train) // 10)
    out["example_spearman_per_query"] = [round(spearman(a[i], b[i]), 4) for i in range(a.shape[0])]
    out["example_pearson_per_query"] = [round(float(torch.corrcoef(torch.stack([a[i], b[i]]))[0, 1]), 4)
                                        for i in range(a.shape[0])]  # fmt: skip
    out["top10pct_overlap_per_query"] = [
        len(set(a[i].topk(k).indices.tolist()) & set(b[i].topk(k).indices.tolist())) / k for i in range(a.shape[0])
    ]
    out["sign_agreement"] = float((a.sign() == b.sign()).double().mean())
    la, lb = res["full"].latent_scores.double().flatten(), res["lora"].latent_scores.double().flatten()
    live = (la != 0) | (lb != 0)
    out["latent_pearson"] = float(torch.corrcoef(torch.stack([la[live], lb[live]]))[0, 1])
    rec.update(lora=out)


def _section_multi(args: argparse.Namespace, rec: Recorder, split: Any, queries: list, train: list) -> None:
    from repinf_lens import Identity, InfluenceAttributor
    from repinf_lens.influence import latent_influence
    from repinf_lens.influence.math import latent_influence_multi, stack_queries

    params = split.downstream_params()
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=args.batch_size,
                              swap_chunk_size=args.swap_chunk, query_chunk_size=args.query_chunk)  # fmt: skip
    s_list = att.s_test(queries)  # Identity: s_test = the query gradients
    stacked = stack_queries(s_list, params)
    bs = args.batch_size
    batches = [split.prepare(split.task.collate(train[i : i + bs])) for i in range(0, len(train), bs)]
    tokens = [int(inp.batch.attention_mask.sum()) for inp in batches]
    n, q = len(train), len(queries)
    rec.update(tokens_per_example=round(sum(tokens) / n, 1))

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
    t_seq, seq = _best(sequential, args.repeats)
    rec.update(sequential_s=round(t_seq, 3), sequential_examples_per_s=round(n / t_seq, 3))
    t_bat, bat = _best(batched, args.repeats)
    max_rel = 0.0
    for sb, bb in zip(seq, bat):
        for a, b in zip(sb, bb):
            scale = float(a.latent_scores.abs().max()) or 1.0
            max_rel = max(max_rel, float((a.latent_scores - b.latent_scores).abs().max()) / scale)
            scale = float(a.example_scores.abs().max()) or 1.0
            max_rel = max(max_rel, float((a.example_scores - b.example_scores).abs().max()) / scale)
    rec.update(batched_s=round(t_bat, 3), batched_speedup=round(t_seq / t_bat, 2),
               batched_examples_per_s=round(n / t_bat, 3), batched_pairs_per_s=round(n * q / t_bat, 3),
               batched_vs_sequential_max_rel_diff=max_rel)  # fmt: skip
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

        amp_s_list = [{k: v[i] for k, v in amp_stacked.items()} for i in range(q)]

        def amp_sequential() -> list:
            with amp_att._amp():
                return [[latent_influence(split, s, inp, params, chunk_size=args.swap_chunk) for s in amp_s_list]
                        for inp in batches]  # fmt: skip

        t_amp_seq, _ = _best(amp_sequential, args.repeats)
        t_amp, amp_out = _best(amp_batched, args.repeats)
        full_ex = torch.cat([torch.stack([li.example_scores for li in b]) for b in bat], dim=1).double()
        amp_ex = torch.cat([torch.stack([li.example_scores for li in b]) for b in amp_out], dim=1).double()
        full_lat = torch.cat([torch.stack([li.latent_scores for li in b]) for b in bat], dim=1).double()
        amp_lat = torch.cat([torch.stack([li.latent_scores for li in b]) for b in amp_out], dim=1).double()
        live = (full_lat != 0) | (amp_lat != 0)
        from repinf_lens._stats import spearman

        rec.update(
            amp_dtype=args.amp,
            amp_sequential_s=round(t_amp_seq, 3),
            amp_batched_s=round(t_amp, 3),
            amp_batched_speedup=round(t_amp_seq / t_amp, 2),
            amp_time_ratio_vs_fp32=round(t_amp / t_bat, 2),
            amp_example_pearson=float(torch.corrcoef(torch.stack([full_ex.flatten(), amp_ex.flatten()]))[0, 1]),
            amp_example_spearman=float(spearman(full_ex.flatten(), amp_ex.flatten())),
            amp_example_sign_agreement=float((full_ex.sign() == amp_ex.sign()).double().mean()),
            amp_latent_pearson=float(torch.corrcoef(torch.stack([full_lat[live], amp_lat[live]]))[0, 1]),
        )
        del amp_out
    del seq, bat
    if not args.no_memory:
        rec.update(peak_mb_one_query_swap=_peak_mb(
            lambda: [latent_influence(split, s, batches[0], params, chunk_size=args.swap_chunk) for s in s_list[:1]]
        ))  # fmt: skip
        rec.update(peak_mb_batched_swap=_peak_mb(
            lambda: latent_influence_multi(
                split, stacked, batches[0], params, chunk_size=args.swap_chunk, query_chunk_size=args.query_chunk
            )
        ))  # fmt: skip
    if not args.no_end_to_end:
        # what a user runs: Q attribute() calls of one query each (every call repeats the upstream pass, SAE
        # encoding and the primal swap) vs one attribute() call for all Q queries
        t = time.perf_counter()
        for row in queries:
            att.attribute([row], train)
        t_one = time.perf_counter() - t
        rec.update(attribute_one_query_at_a_time_s=round(t_one, 3))
        rows = []
        for qc in [int(x) for x in args.e2e_query_chunks.split(",")]:
            # one attribute() call for all Q queries; qc queries per vmapped swap (1: one swap per query, the
            # upstream pass and SAE encoding still shared by all queries)
            att.query_chunk_size = qc
            t = time.perf_counter()
            result = att.attribute(queries, train)
            t_all = time.perf_counter() - t
            rows.append({"query_chunk": qc, "attribute_s": round(t_all, 3),
                         "speedup_vs_one_at_a_time": round(t_one / t_all, 2),
                         "influence_s": result.meta["seconds_influence"],
                         "examples_per_s": round(n / max(result.meta["seconds_influence"], 1e-9), 3),
                         "pairs_per_s": round(n * q / t_all, 3)})  # fmt: skip
            rec.update(attribute_all_queries=rows)


def _section_cg(args: argparse.Namespace, rec: Recorder, split: Any, queries: list, train: list) -> None:
    from repinf_lens import CG, InfluenceAttributor
    from repinf_lens._tree import tflatten

    solver = CG(max_iter=args.cg_iters, tol=0.0, on_negative_curvature="ignore")
    n = len(train)
    cg_att = InfluenceAttributor(split, hessian=solver, use_cache=False, progress=False).fit(
        (train * (1 + args.hessian_examples // max(n, 1)))[: args.hessian_examples]
    )
    gs = [cg_att.query_gradient(r) for r in queries]
    t = time.perf_counter()
    single = [solver.solve(cg_att.hvp, g)[0] for g in gs]
    t_cg_seq = time.perf_counter() - t
    rec.update(cg_iters=args.cg_iters, cg_hessian_examples=args.hessian_examples, cg_chunk=args.cg_chunk,
               cg_sequential_s=round(t_cg_seq, 3))  # fmt: skip
    t = time.perf_counter()
    many, _ = solver.solve_many(cg_att.hvp, gs, chunk_size=args.cg_chunk)
    t_cg_bat = time.perf_counter() - t
    cg_rel = max(
        float((tflatten(a) - tflatten(b)).abs().max() / (tflatten(a).abs().max() or 1.0)) for a, b in zip(single, many)
    )
    rec.update(cg_batched_s=round(t_cg_bat, 3), cg_batched_speedup=round(t_cg_seq / t_cg_bat, 2),
               cg_batched_vs_sequential_max_rel_diff=cg_rel)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    args.swap_chunk = args.swap_chunk or None
    args.query_chunk = args.query_chunk or None
    torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args)
        return {}
    here = Path(__file__).resolve().parent
    if args.out is None:
        args.out = here / "results" / ("scale_tiny.json" if args.tiny else "scale.json")
    args.work = args.work or here.parent / "runs" / "bench" / ("scale_tiny" if args.tiny else "scale")
    args.work.mkdir(parents=True, exist_ok=True)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(sections) - {"multi", "cg", "memory", "torchrun", "lora"}
    if unknown:
        raise SystemExit(f"Unknown sections {sorted(unknown)}; choose from multi, cg, memory, torchrun, lora.")
    rec = Recorder(args.out, resume=True)
    rec.update(model="tiny" if args.tiny else (args.model or "default"), device=args.device, threads=args.threads,
               hook=args.hook if not args.tiny else "blocks.0.hook_resid_post", queries=args.queries,
               n_train=args.n_train, batch_size=args.batch_size, query_chunk=args.query_chunk,
               swap_chunk=args.swap_chunk, sections_run=sections)  # fmt: skip
    # the sections that run their own processes go first, while this process is still small (after multi it
    # holds several GB that glibc does not hand back, and a worker next to it can run the machine out of memory)
    if "memory" in sections:
        _section_memory(args, rec)
    if "torchrun" in sections:
        _section_torchrun(args, rec)
    if {"multi", "cg"} & set(sections):
        t_load = time.perf_counter()
        split, queries, train = _setup(args)
        rec.update(load_s=round(time.perf_counter() - t_load, 2), d_sae=split.d_sae,
                   n_theta2=sum(v.numel() for v in split.downstream_params().values()))  # fmt: skip
        if "multi" in sections:
            _section_multi(args, rec, split, queries, train)
        if "cg" in sections:
            _section_cg(args, rec, split, queries, train)
        del split
    if "lora" in sections:
        _section_lora(args, rec)
    return rec.data


if __name__ == "__main__":
    main(sys.argv[1:])
