"""Where the demo's memory goes: peak RSS of the attribution stage (s_test by CG + scoring) per split layer and
number of queries solved in lockstep, each setting in its own process (so no allocator cache carries over).

The pre-shipped-assets demo peaked at 20.4 GB: it split at L15 (its sweep's pick) and solved its 3 questions'
s_test together (``query_chunk_size`` 8 >= 3). One HVP holds about 17 theta2-sized buffers (autograd's
weight-shaped intermediates), and a lockstep solve holds them per query. This measures exactly that stage:

    python benchmarks/demo_memory.py --threads 1     # ~6 min; writes benchmarks/results/demo_memory.json

Each row: base model, a random TopK SAE (d_sae 1024, k 64) at ``blocks.<L>.hook_resid_post``, 8 Hessian
examples, CG with ``--cg-iters`` iterations (the memory of one iteration is the memory of all), 3 test
questions, 4 training examples scored.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(layer: int, chunk: int, cg_iters: int) -> dict:
    import torch

    import repinf_lens as rl
    from repinf_lens._resources import StageMeter, current_rss_mb
    from repinf_lens.curvature.solvers import CG
    from repinf_lens.influence.attributor import InfluenceAttributor
    from repinf_lens.testing import random_sae

    torch.manual_seed(0)
    model = rl.load_model(device="cpu")
    task = rl.MultipleChoiceTask.from_model(model, template="plain")
    hook = f"blocks.{layer}.hook_resid_post"
    split = rl.SplitModel(model, hook, random_sae(model, hook, d_sae=1024, k=64), task=task)
    train = [dict(r) for r in rl.load_mcqa("openbookqa", "train", offline=True)][:8]
    test = [dict(r) for r in rl.load_mcqa("openbookqa", "test", offline=True)][:3]
    base = current_rss_mb()
    meter = StageMeter()
    with meter.stage("attribution"):
        att = InfluenceAttributor(split, task, hessian=CG(damping=1e-3, max_iter=cg_iters, batch_size=8),
                                  query_chunk_size=chunk, progress=False)  # fmt: skip
        att.fit(train)
        att.attribute(test, train[:4])
    n_theta2 = sum(v.numel() for v in split.downstream_params().values())
    s = meter.stages["attribution"]
    return {"layer": layer, "query_chunk_size": chunk, "theta2_params": n_theta2, "model_loaded_rss_mb": base,
            "attribution_peak_rss_mb": s["peak_rss_mb"], "seconds": s["seconds"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cg-iters", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=["15:3", "15:1", "22:3", "22:1"], help="LAYER:QUERY_CHUNK")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_memory.json")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.one is not None:
        layer, chunk = (int(x) for x in a.one.split(":"))
        print(json.dumps(one(layer, chunk, a.cg_iters)))
        return
    rows = []
    for setting in a.settings:
        cmd = [sys.executable, __file__, "--one", setting, "--threads", str(a.threads), "--cg-iters", str(a.cg_iters)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    from repinf_lens._io import write_json_atomic

    write_json_atomic(a.out, {"command": "python benchmarks/demo_memory.py " + " ".join(argv or sys.argv[1:]),
                              "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
