"""Which end of the influence ranking is necessary? A diagnostic on a finished `repinf-lens faithfulness` folder.

For every question of the folder, re-runs the necessity ablation (error term held) with the stored
per-question InfluenceResult, for: the paper's ranking (signed mean IFR, descending), ``influence_eq16`` (its
negation: the sign of the paper's Eq. 16, most negative first), |mean IFR|, and gradient x activation on the test
input. Prints the mean change of the correct
option's logit and NLL, and the flip rate, per ranking and k; writes ``OUT/sign_check.csv``.

Usage::

    python benchmarks/faithfulness_sign_check.py --folder runs/faithfulness_ft_L22 \\
        --model runs/ft_plain_gpu/merged --sae runs/sweep_ft/saes/L22_d2048_k64 [--limit 50]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, required=True, help="output folder of `repinf-lens faithfulness`")
    ap.add_argument("--model", required=True)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--template", default="plain")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100, 200])
    args = ap.parse_args()

    import pandas as pd

    from repinf_lens import InfluenceResult, SplitModel, load_mcqa, load_model, load_sae
    from repinf_lens.analysis.ablation import necessity_sufficiency
    from repinf_lens.analysis.rankings import InfluenceRanking
    from repinf_lens.saes.loading import sae_hook_name
    from repinf_lens.task import MultipleChoiceTask

    settings = json.loads((args.folder / "settings.json").read_text())
    model = load_model(args.model, n_ctx=1024)
    sae = load_sae(args.sae, model=model)
    task = MultipleChoiceTask.from_model(model, template=args.template)
    split = SplitModel(model, sae_hook_name(sae), sae, task=task)
    test = {str(r["id"]): dict(r) for r in load_mcqa("openbookqa", "test", offline=True)}
    qids = settings["queries"][: args.limit]
    signed = InfluenceRanking()
    rankings = {
        "influence (paper)": signed,
        "influence_eq16 (negated)": "influence_eq16",
        "influence |abs|": InfluenceRanking(absolute=True),
        "grad_x_act": "grad_x_act",
    }
    frames = []
    for i, qid in enumerate(qids):
        res = InfluenceResult.load(args.folder / "results" / f"{i:05d}")
        df = necessity_sufficiency(split, split.task, [test[qid]], rankings, ks=args.ks, use_error_term=True,
                                   modes=("necessity",), result=res, n_boot=10, progress=False)  # fmt: skip
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(args.folder / "sign_check.csv", index=False)
    cols = [c for c in ("delta_logit", "delta_nll", "flip") if c in df.columns]
    print(f"{len(qids)} questions, necessity with the error term held; mean per ranking and k")
    print(df.groupby(["ranking", "k"])[cols].mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
