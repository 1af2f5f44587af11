"""End to end: attribute 64 test questions over their prefiltered candidates, EK-FAC vs CG, in one run (issue 18).

The demo's split (the shipped finetune, its TopK SAE at ``blocks.22.hook_resid_post``, the shipped sketch index of
all 4957 OpenBookQA training questions), ``--queries`` test questions. Per solver, timed stage by stage on one
thread:

1. prefilter: each question's ``--top-k`` most gradient-similar training questions (the shipped index);
2. fit: CG prepares its Hessian batches (``--cg-hessian`` examples, the demo's 8); EK-FAC (true Fisher) fits its
   factors on ``--fit-examples`` training questions (one-off);
3. s_test for every question (``s_test(keep=False)`` into a temporary s_test cache, ``--query-chunk`` per pass);
4. scoring: each question over its own candidates with every SAE latent's score (the derivative swap), reading its
   s_test back from the cache: what the demo's case studies do, for every question.

Also: the agreement of the two solvers per question (Spearman of the candidates' example scores; overlap of the top
``--top-latents`` latents of the best proponent) and the peak RSS of each stage.

Usage::

    python benchmarks/bench_e2e.py --threads 1 --out benchmarks/results/e2e_L22.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=16, help="prefiltered candidates per question (the demo's 16)")
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--cg-hessian", type=int, default=8)
    ap.add_argument("--fit-examples", type=int, default=64)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--query-chunk", type=int, default=8)
    ap.add_argument("--top-latents", type=int, default=10)
    ap.add_argument("--solvers", nargs="+", default=["ekfac", "cg"], choices=["ekfac", "cg"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e_L22.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    # exactly the demo's split (the shipped index was built for it: same tokenizer, max_length and template)
    from transformers import AutoTokenizer

    from repinf_lens import CG, EKFAC, InfluenceAttributor, MultipleChoiceTask, SplitModel, load_mcqa, load_model
    from repinf_lens._resources import StageMeter
    from repinf_lens._stats import spearman
    from repinf_lens.models import default_model_dir
    from repinf_lens.saes import load_sae
    from repinf_lens.workflows.attribution import prefilter_candidates
    from repinf_lens.workflows.config import AttributionConfig
    from repinf_lens.workflows.demo import DEFAULT_FINETUNE, DEFAULT_INDEX, DEFAULT_SAE_ID, DEFAULT_SAE_RELEASE

    model = load_model(DEFAULT_FINETUNE, n_ctx=1024)
    task = MultipleChoiceTask(AutoTokenizer.from_pretrained(str(default_model_dir())), max_length=1024,
                              template="plain")  # fmt: skip
    sae = load_sae(DEFAULT_SAE_RELEASE, DEFAULT_SAE_ID, model=model)
    split = SplitModel(model, sae.cfg.metadata.hook_name, sae, task=task)
    train = [dict(r) for r in load_mcqa("openbookqa", "train", offline=True)]
    queries = [dict(r) for r in load_mcqa("openbookqa", "test", offline=True)][: args.queries]
    meter = StageMeter()
    rep: dict = {
        "model": DEFAULT_FINETUNE, "sae": f"{DEFAULT_SAE_RELEASE}/{DEFAULT_SAE_ID}", "hook": split.hook_name,
        "theta2_params": split.num_downstream_params(), "d_sae": split.d_sae, "queries": len(queries),
        "top_k": args.top_k, "n_train": len(train), "damping": args.damping, "threads": args.threads,
        "latent_method": "grad_x_input", "solvers": {},
    }  # fmt: skip
    scores: dict[str, list] = {}

    def stage(name: str) -> dict:
        s = meter.stages[name]
        return {"s": round(s["seconds"], 1), "peak_rss_mb": round(s["peak_rss_mb"])}

    with meter.stage("prefilter"):
        cfg = AttributionConfig(prefilter_top_k=args.top_k, sketch_dim=512, sketches=DEFAULT_INDEX,
                                batch_size=args.batch_size)  # fmt: skip
        pf = prefilter_candidates(split, queries, train, cfg, sketch_dir="unused", progress=False)
    rep["prefilter"] = stage("prefilter")
    print("prefilter", rep["prefilter"], flush=True)
    candidates = [pf.select(train, q) for q in range(len(queries))]

    for name in args.solvers:
        with tempfile.TemporaryDirectory() as tmp:
            if name == "ekfac":
                solver = EKFAC(damping=args.damping, batch_size=args.batch_size, factor_dir=f"{tmp}/factors",
                               progress=False)  # fmt: skip
                hessian = train[: args.fit_examples]
            else:
                solver = CG(damping=args.damping, max_iter=args.cg_iters, batch_size=args.batch_size)
                hessian = train[: args.cg_hessian]
            att = InfluenceAttributor(split, hessian=solver, cache_dir=f"{tmp}/s_test", progress=False,
                                      query_chunk_size=args.query_chunk, batch_size=args.batch_size)  # fmt: skip
            with meter.stage(f"{name}_fit"):
                att.fit(hessian)
            with meter.stage(f"{name}_s_test"):
                att.s_test(queries, keep=False)
            results = []
            with meter.stage(f"{name}_scoring"):
                for q, row in enumerate(queries):
                    results.append(att.attribute([row], candidates[q]))
            out = {k: stage(f"{name}_{k}") for k in ("fit", "s_test", "scoring")}
            out["hessian_examples"] = len(hessian)
            out["s_test_per_query_s"] = round(out["s_test"]["s"] / len(queries), 2)
            out["scoring_per_question_s"] = round(out["scoring"]["s"] / len(queries), 2)
            out["total_after_prefilter_s"] = round(sum(out[k]["s"] for k in ("fit", "s_test", "scoring")), 1)
            out["total_s"] = round(out["total_after_prefilter_s"] + rep["prefilter"]["s"], 1)
            out["solver"] = solver.to_dict()
            rep["solvers"][name] = out
            print(name, out, flush=True)
            scores[name] = [(r.example_scores[0].clone(), r.latent_scores[0].clone()) for r in results]
            del att, results
    if {"ekfac", "cg"} <= set(scores):
        rho, overlap = [], []
        for (e_ek, l_ek), (e_cg, l_cg) in zip(scores["ekfac"], scores["cg"], strict=True):
            rho.append(float(spearman(e_ek.double(), e_cg.double())))
            best = int(e_cg.argmax())  # the CG ranking's top proponent: do the two agree on its latents?
            k = args.top_latents
            top_ek = set(l_ek[best].topk(k).indices.tolist())
            top_cg = set(l_cg[best].topk(k).indices.tolist())
            overlap.append(len(top_ek & top_cg) / k)
        rep["agreement"] = {
            "example_spearman_mean": round(sum(rho) / len(rho), 3),
            "example_spearman_min": round(min(rho), 3),
            f"top{args.top_latents}_latent_overlap_of_cg_top_proponent_mean": round(sum(overlap) / len(overlap), 3),
        }
        ek, cg = rep["solvers"]["ekfac"], rep["solvers"]["cg"]
        rep["speedup_total_after_prefilter"] = round(cg["total_after_prefilter_s"] / ek["total_after_prefilter_s"], 2)
        rep["speedup_s_test"] = round(cg["s_test"]["s"] / ek["s_test"]["s"], 2)
        print(json.dumps({k: rep[k] for k in ("agreement", "speedup_total_after_prefilter", "speedup_s_test")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1) + "\n")
    return rep


if __name__ == "__main__":
    main()
