"""Every published number, re-runnable from a fresh clone: ``make reproduce`` lists them, ``make reproduce
RUN=<name>`` runs one (``python benchmarks/reproduce.py --list`` / ``python benchmarks/reproduce.py <name>``).

Each entry names the table it produces (a section of ``docs/results.md``), its command(s), and the approximate
run time measured on the 2-core CPU machines this project is built on. The commands use only what a clone holds:
the embedded base model and data, and the shipped finetune / SAEs / sketch index in ``repinf_lens/assets``.
Outputs go to ``runs/<name>`` (``runs/`` is git-ignored). ``--dry-run`` prints the commands without running.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FT = "smollm2-135m-openbookqa"
SAE = "--sae repinf-lens-smollm2-135m-openbookqa --sae-id blocks.22.hook_resid_post"
INDEX = "--sketches smollm2-135m-openbookqa-L22"  # the shipped sketch index of all 4957 training examples
RL = "repinf-lens"


@dataclass(frozen=True)
class Entry:
    name: str
    table: str  # the docs/results.md section it fills
    minutes: float  # approximate wall time on 2 CPU cores (other core idle unless noted)
    commands: tuple[str, ...]
    gpu: bool = False


ENTRIES: tuple[Entry, ...] = (
    Entry("demo", "make demo", 10, ("make demo",)),
    Entry("demo-quick", "make demo", 3, ("make demo DEMO_ARGS=--quick",)),
    Entry(
        "zero-shot",
        "Zero-shot baseline",
        4,
        (f"{RL} evaluate --offline --template plain --split test --out runs/zero-shot.json",),
    ),
    Entry(
        "finetuned-accuracy",
        "LoRA finetuning",
        4,
        (f"{RL} evaluate --offline --model {FT} --template plain --split test --out runs/finetuned-accuracy.json",),
    ),
    Entry(
        "finetune",
        "LoRA finetuning",
        110,
        (
            "python benchmarks/build_assets.py finetune --run runs/ft_default_cpu",
            "python benchmarks/build_assets.py export --run runs/ft_default_cpu",
        ),
    ),
    Entry(
        "medqa",
        "MedQA",
        110,
        (
            # the MedQA LoRA is not shipped (the assets' 25 MB budget): trained here, resumable, reused once finished
            f"{RL} finetune --offline --template plain --dataset medqa --train-split train --eval-split test "
            "--lr 0.001 --epochs 3 --lora-r 16 --lora-layers 24-29 --autocast bf16 --checkpoint-every 10 "
            "--effective-batch-size 32 --batch-size 8 --seed 0 --out runs/ft_medqa_cpu",
            f"{RL} demo --offline --config benchmarks/configs/demo_medqa.yaml --out runs/demo_medqa",
        ),
    ),
    Entry(
        "finetune-grid-gpu",
        "LoRA finetuning",
        10,
        ("python benchmarks/finetune_grid.py --out runs/grid --device cuda --parallel 8",),
        gpu=True,
    ),
    Entry(
        "sweep-finetuned",
        "SAE layer sweeps",
        12,
        ("python benchmarks/build_assets.py saes --sweep-out runs/sweep_shipped",),
    ),
    Entry(
        "sweep-base",
        "SAE layer sweeps",
        11,
        (
            f"{RL} sweep --offline --template plain --layers 8 15 22 --sizes 2048x64 512x64 --train-limit 500 "
            "--eval-limit 100 --batch-size 16 --out runs/sweep_base",
        ),
    ),
    Entry(
        "index",
        "Scale",
        35,
        (
            "python benchmarks/build_assets.py index --work runs/index_build",
            "python benchmarks/build_assets.py verify --n 8",
        ),
    ),
    Entry(
        "orthogonality-finetuned",
        "Analysis",
        1,
        (
            f"{RL} orthogonality --offline --model {FT} --template plain {SAE} --limit 200 --max-tokens 4096 "
            "--batch-size 16 --out runs/orthogonality_shipped_L22.json",
        ),
    ),
    Entry(
        "orthogonality-base",
        "Analysis",
        2,
        (
            f"{RL} sweep --offline --template plain --layers 8 --sizes 2048x64 --train-limit 500 --eval-limit 100 "
            "--batch-size 16 --out runs/sweep_base_L8",
            f"{RL} orthogonality --offline --template plain --sae runs/sweep_base_L8/saes/L8_d2048_k64 --limit 200 "
            "--max-tokens 4096 --batch-size 16 --out runs/orthogonality_base_L8.json",
        ),
    ),
    Entry(
        "case-studies",
        "Analysis",
        6,
        (
            f"{RL} case-studies --offline --model {FT} --template plain {SAE} --eval-limit 200 {INDEX} "
            "--prefilter-top-k 8 --solver cg --max-iter 5 --hessian-examples 4 --batch-size 8 --query-chunk-size 1 "
            "--n-cases 3 --out runs/case_studies_shipped_L22",
        ),
    ),
    Entry(
        "faithfulness",
        "Analysis",
        60,
        (
            f"{RL} faithfulness --offline --model {FT} --template plain {SAE} --query-limit 100 {INDEX} "
            "--prefilter-top-k 8 --solver cg --max-iter 5 --hessian-examples 4 --batch-size 8 --query-chunk-size 1 "
            "--rankings influence influence_eq16 influence_abs activation frequency random grad_x_act "
            "--out runs/faithfulness_shipped_L22",
        ),
    ),
    Entry(
        "faithfulness-L15",
        "Analysis",
        45,
        (
            f"{RL} faithfulness --offline --model {FT} --template plain --sae repinf-lens-smollm2-135m-openbookqa "
            "--sae-id blocks.15.hook_resid_post --query-limit 100 --train-limit 500 --prefilter-top-k 8 --solver cg "
            "--max-iter 5 --hessian-examples 4 --batch-size 8 --query-chunk-size 1 --rankings influence "
            "influence_eq16 influence_abs activation frequency random grad_x_act --out runs/faithfulness_shipped_L15",
        ),
    ),
    Entry(
        "sign-check",
        "Analysis",
        1,
        (
            "python benchmarks/faithfulness_sign_check.py --folder runs/faithfulness_shipped_L22 "
            f"--model {FT} --sae repinf_lens/assets/saes/repinf-lens-smollm2-135m-openbookqa/blocks.22.hook_resid_post",
        ),
    ),
    Entry(
        "sign-retraining",
        "Analysis",
        30,
        (
            f"python benchmarks/sign_by_retraining.py --model {FT} --n-train 64 --queries 8 --m 5 --threads 1 "
            "--max-iter 50 --out runs/sign_by_retraining",
        ),
    ),
    Entry(
        "completeness",
        "Analysis",
        30,
        ("python benchmarks/completeness.py --out runs/completeness_L22",),
    ),
    Entry(
        "lds",
        "Analysis",
        25,
        (
            f"python benchmarks/bench_lds.py --model {FT} --n-train 64 --queries 8 --subsets 16 --loo 6 "
            "--solvers cg identity --threads 1 --out runs/lds_shipped.json",
        ),
    ),
    Entry(
        "verdicts-L15",
        "Analysis",
        1,
        ("python benchmarks/verdict_tables.py --folder runs/faithfulness_shipped_L15 --out docs/verdicts_L15.md",),
    ),
    Entry(
        "verdicts-L22",
        "Analysis",
        1,
        ("python benchmarks/verdict_tables.py --folder runs/faithfulness_shipped_L22 --out docs/verdicts_L22.md",),
    ),
    Entry(
        "bench-peers",
        "Peers",
        31,
        (
            # kronfluence declares torchvision (which pins its own torch): install the peers without dependencies
            "pip install --no-deps kronfluence==1.0.1 dattri==0.3.0 einconv opt-einsum",
            "python benchmarks/bench_peers.py --threads 1 --out runs/bench_peers",
        ),
    ),
    Entry(
        "bench-pcg-iterations",
        "Peers",
        16,  # ~7 min for the peer benchmark's retraining ground truth (resumed when bench-peers already wrote it)
        (
            "python benchmarks/bench_peers.py --threads 1 --no-progress --out runs/bench_peers "
            "--only 'repinf identity'",
            "python benchmarks/bench_pcg_iterations.py --truth runs/bench_peers/ground_truth.partial.safetensors",
        ),
    ),
    Entry(
        "bench-peers-block",
        "Peers",
        80,  # ~60 min of retraining (checkpointed: a rerun resumes after the last finished refit), ~17 of methods
        (
            "pip install --no-deps kronfluence==1.0.1 dattri==0.3.0 einconv opt-einsum",
            "python benchmarks/bench_peers.py --theta2 block --loo 0 --threads 1 --max-rss-gb 12 --grad-tol 3e-4 "
            "--no-progress "
            "--out runs/bench_peers_block --only 'repinf identity' 'repinf woodbury' 'repinf pcg5 woodbury' "
            "'repinf pcg20 ekfac (emp)' 'repinf cg20 (fixed)' 'repinf ekfac (true)' 'repinf kfac (true)' "
            "'kronfluence kfac' dattri",
        ),
    ),
    Entry(
        "faithfulness-ekfac-vs-cg",
        "Analysis",
        25,
        (
            f"{RL} faithfulness --offline --model {FT} --template plain {SAE} --query-limit 20 {INDEX} "
            "--prefilter-top-k 8 --solver cg --max-iter 5 --hessian-examples 4 --batch-size 8 --query-chunk-size 1 "
            "--rankings influence_eq16 influence activation random --out runs/faithfulness_cg20_L22",
            f"{RL} faithfulness --offline --model {FT} --template plain {SAE} --query-limit 20 {INDEX} "
            "--prefilter-top-k 8 --solver ekfac --hessian-examples 64 --batch-size 8 --query-chunk-size 8 "
            "--rankings influence_eq16 influence activation random --out runs/faithfulness_ekfac_L22",
            "python benchmarks/curvature_verdicts.py --a runs/faithfulness_ekfac_L22 --a-label ekfac "
            "--b runs/faithfulness_cg20_L22 --b-label cg --out docs/verdicts_ekfac_vs_cg_L22.md",
        ),
    ),
    Entry(
        "lds-block29",
        "Peers",
        110,
        (
            "python benchmarks/bench_lds.py --n-train 64 --queries 8 --subsets 16 --loo 0 --downstream "
            "'^blocks\\.29\\.' --solvers cg identity kfac ekfac kfac-emp ekfac-emp pcg10 pcg20 --threads 1 "
            "--out runs/lds_block29.json",
        ),
    ),
    Entry(
        "faithfulness-ig",
        "Analysis",
        25,
        (
            f"{RL} faithfulness --offline --model {FT} --template plain {SAE} --query-limit 20 {INDEX} "
            "--prefilter-top-k 8 --solver cg --max-iter 5 --hessian-examples 4 --batch-size 8 --query-chunk-size 1 "
            "--latent-method ig --ig-steps 16 --rankings influence_eq16 influence influence_abs activation random "
            "grad_x_act --out runs/faithfulness_ig_L22",
            "python benchmarks/ig_verdicts.py --gxi runs/faithfulness_shipped_L22 --ig runs/faithfulness_ig_L22 "
            "--out docs/verdicts_ig_L22.md",
        ),
    ),
    Entry(
        "bench-curvature-cost",
        "Engine performance",
        16,
        (
            "python benchmarks/bench_curvature_cost.py --hook blocks.22.hook_resid_post --queries 64 --cg-queries 8 "
            "--cg-full --threads 1 --out benchmarks/results/curvature_cost_L22.json",
        ),
    ),
    Entry(
        "bench-e2e-L22",
        "Scale",
        35,
        ("python benchmarks/bench_e2e.py --queries 64 --top-k 16 --threads 1 --out benchmarks/results/e2e_L22.json",),
    ),
    Entry(
        "bench-curvature-cost-L8",
        "Engine performance",
        25,
        (
            "python benchmarks/bench_curvature_cost.py --hook blocks.8.hook_resid_post --queries 64 --stream "
            "--query-chunk 1 --fit-examples 64 --threads 1 --out benchmarks/results/curvature_cost_L8_stream.json",
        ),
    ),
    Entry(
        "bench-hvp-L8",
        "Engine performance",
        10,
        (
            "python benchmarks/bench_hvp.py --hook blocks.8.hook_resid_post --hessian-examples 4 --batch-size 4 "
            "--queries 4 --cg-iters 2 --reps 1 --modes prepared --threads 1 --out benchmarks/results/hvp_L8.json",
        ),
    ),
    Entry(
        "bench-hvp",
        "Engine performance",
        4,
        (
            "python benchmarks/bench_hvp.py --hook blocks.22.hook_resid_post --threads 1 "
            "--out benchmarks/results/hvp_L22.json",
        ),
    ),
    Entry(
        "bench-prune",
        "Engine performance",
        6,
        ("python benchmarks/bench_prune.py --reps 3 --threads 1 --out benchmarks/results/prune.json",),
    ),
    Entry("bench-prefilter", "Scale", 45, ("python benchmarks/bench_prefilter.py --threads 1",)),
    Entry(
        "bench-scale",
        "Scale",
        15,
        (
            "python benchmarks/bench_scale.py --threads 1 --amp bf16 --sections multi",
            "python benchmarks/bench_scale.py --threads 1 --sections cg",
        ),
    ),
    Entry("bench-engine", "Engine performance", 20, ("python benchmarks/bench_engine.py",)),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="the entry to run")
    p.add_argument("--list", action="store_true", help="list every entry with its table and time")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    by_name = {e.name: e for e in ENTRIES}
    if a.list or a.name is None:
        print(f"{'name':26s} {'~min':>5s}  {'docs/results.md section':24s} command")
        for e in ENTRIES:
            gpu = " (GPU)" if e.gpu else ""
            print(f"{e.name:26s} {e.minutes:5.0f}  {e.table:24s} {e.commands[0]}{gpu}")
            for c in e.commands[1:]:
                print(f"{'':58s} {c}")
        return 0
    if a.name not in by_name:
        import difflib

        close = difflib.get_close_matches(a.name, list(by_name), n=3)
        print(f"Unknown entry {a.name!r}.{' Did you mean ' + ', '.join(close) + '?' if close else ''} "
              "Fix: python benchmarks/reproduce.py --list", file=sys.stderr)  # fmt: skip
        return 2
    entry = by_name[a.name]
    (ROOT / "runs").mkdir(exist_ok=True)
    for cmd in entry.commands:
        print(f"$ {cmd}", flush=True)
        if not a.dry_run:
            parts = shlex.split(cmd)
            if parts[0] == RL:
                parts = [sys.executable, "-m", "repinf_lens", *parts[1:]]
            elif parts[0] == "python":
                parts[0] = sys.executable
            elif parts[0] == "pip":
                parts = [sys.executable, "-m", "pip", *parts[1:]]
            subprocess.run(parts, check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
