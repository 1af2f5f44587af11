"""Build (or check) the assets shipped in ``repinf_lens/assets``: the LoRA finetune, its SAEs, the sketch index.

Every shipped file is made by the project's own code from a fresh clone; this script is the record of how.

    # 1. the finetune (about 1.5-2 h on 2 CPU cores with OMP_NUM_THREADS=2; resumable: rerun the same command)
    python benchmarks/build_assets.py finetune --run runs/ft_default_cpu
    # 2. export it into the package (fp16 adapter + provenance, test accuracy on all 500 questions measured)
    python benchmarks/build_assets.py export --run runs/ft_default_cpu
    # 3. the layer sweep on the shipped finetune (selection on validation) and the SAEs, SAELens format
    python benchmarks/build_assets.py saes --sweep-out runs/sweep_shipped
    # 4. the gradient-sketch index of all 4957 training examples for the demo's split (about 20-35 min)
    python benchmarks/build_assets.py index --work runs/index_build
    # 5. check: a rebuilt slice of the index equals the shipped one (what tests/test_shipped_assets.py does)
    python benchmarks/build_assets.py verify --n 8

Sizes: everything under ``repinf_lens/assets`` stays below 25 MB (``python benchmarks/build_assets.py size``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "repinf_lens" / "assets"
FINETUNE_ARGS = ["--template", "plain", "--lr", "1e-3", "--epochs", "4", "--lora-r", "16",
                 "--effective-batch-size", "32", "--batch-size", "8"]  # fmt: skip
SAE_REPO = "repinf-lens/smollm2-135m-openbookqa-saes"
BUDGET_MB = 25.0


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "repinf_lens", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def finetune(a: argparse.Namespace) -> None:
    _cli("finetune", "--offline", "--device", "cpu", *FINETUNE_ARGS, "--eval-split", "validation", "--out", a.run)


def export(a: argparse.Namespace) -> None:
    from repinf_lens.workflows.demo import DEFAULT_FINETUNE

    _cli("export-adapter", "--offline", "--run", a.run, "--out", str(ASSETS / "finetunes" / DEFAULT_FINETUNE),
         "--eval-split", "test")  # fmt: skip


def saes(a: argparse.Namespace) -> None:
    """Sweep layers on the shipped finetune (SAEs trained on 500 training prompts, accuracy change on 200
    validation questions), then publish the demo's layer and the sweep's choice into the package."""
    import torch

    import repinf_lens as rl
    from repinf_lens.data import load_mcqa
    from repinf_lens.saes.publish import publish_saes
    from repinf_lens.saes.sweep import layer_sweep
    from repinf_lens.saes.training import SAETrainingConfig
    from repinf_lens.workflows.demo import DEFAULT_FINETUNE, DEFAULT_SAE_ID, DEFAULT_SAE_RELEASE

    torch.manual_seed(0)
    model = rl.load_model(DEFAULT_FINETUNE, device="cpu")
    task = rl.MultipleChoiceTask(model.tokenizer, template="plain")
    train, val = load_mcqa("openbookqa", "train", offline=True), load_mcqa("openbookqa", "validation", offline=True)
    t = time.perf_counter()
    sweep = layer_sweep(
        model, task, list(train)[:500], list(val)[:200], out_dir=a.sweep_out, layers=a.layers, sizes=[(a.d_sae, a.k)],
        sae_config=SAETrainingConfig(epochs=8.0, seed=0, device="cpu"), max_train_examples=None,
        max_eval_examples=None, batch_size=16, metadata={"dataset": "openbookqa", "finetune": DEFAULT_FINETUNE},
    )  # fmt: skip
    print(f"sweep: {time.perf_counter() - t:.0f} s; selected {sweep.selected['point']}")
    by_hook = {row["hook_name"]: row for row in sweep.table}
    chosen = {DEFAULT_SAE_ID, sweep.selected["hook_name"]}
    stats = {h: {"l0": by_hook[h].get("sae_l0"), "variance_explained": by_hook[h].get("sae_explained_variance")}
             for h in chosen}  # fmt: skip
    acc = {h: {"accuracy_base": sweep.base_accuracy, "accuracy_change_no_error": by_hook[h]["accuracy_change_no_error"],
               "accuracy_change_with_error": by_hook[h]["accuracy_change_with_error"], "eval": "validation[:200]"}
           for h in chosen}  # fmt: skip
    out = ASSETS / "saes" / DEFAULT_SAE_RELEASE
    if out.exists():
        shutil.rmtree(out)
    publish_saes(
        {h: sweep.sae_path(by_hook[h]) for h in sorted(chosen)}, SAE_REPO, out_dir=out, release=DEFAULT_SAE_RELEASE,
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct", stats=stats, task_accuracy=acc, dataset="allenai/openbookqa",
        extra_metadata={"license": "apache-2.0", "base_model": f"repinf_lens shipped finetune {DEFAULT_FINETUNE}"},
    )  # fmt: skip
    (out / "sweep.json").write_text(json.dumps({"selected": sweep.selected["point"], "table": sweep.table},
                                               indent=2, default=str))  # fmt: skip
    print(f"published {sorted(chosen)} to {out}")


def _demo_split():
    from transformers import AutoTokenizer

    import repinf_lens as rl
    from repinf_lens.models import default_model_dir
    from repinf_lens.workflows.demo import DEFAULT_FINETUNE, DEFAULT_SAE_ID, DEFAULT_SAE_RELEASE

    model = rl.load_model(DEFAULT_FINETUNE, device="cpu")
    task = rl.MultipleChoiceTask(AutoTokenizer.from_pretrained(str(default_model_dir())), max_length=1024,
                                 template="plain")  # fmt: skip
    sae = rl.load_sae(DEFAULT_SAE_RELEASE, DEFAULT_SAE_ID, model=model)
    return rl.SplitModel(model, DEFAULT_SAE_ID, sae, task=task)


def index(a: argparse.Namespace) -> None:
    """Sketch all training examples for the demo's split (resumable in ``--work``), then copy the finished store
    into the package."""
    from repinf_lens.data import load_mcqa
    from repinf_lens.influence.prefilter import build_sketches, shipped_index_dir
    from repinf_lens.workflows.demo import DEFAULT_INDEX, DemoConfig

    split = _demo_split()
    train = list(load_mcqa("openbookqa", "train", offline=True))
    check = list(load_mcqa("openbookqa", "validation", offline=True))[: a.check]
    t = time.perf_counter()
    store = build_sketches(split, None, train, out_dir=a.work, dim=DemoConfig().attribution.sketch_dim, batch_size=8,
                           shard_size=1024, storage_dtype="float16", check_queries=check)  # fmt: skip
    print(f"sketches: {time.perf_counter() - t:.0f} s")
    report = store.check_report()
    print(json.dumps(report, indent=2))
    dest = shipped_index_dir(DEFAULT_INDEX)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(a.work, dest)
    (dest / "README.md").write_text(
        f"# Sketch index `{DEFAULT_INDEX}`\n\nGradient sketches (sparse JL, dim {store.dim}, float16) of all "
        f"{store.n} OpenBookQA training examples w.r.t. theta2 of the demo's split (shipped finetune, "
        "`blocks.22.hook_resid_post`, shipped SAE), built by `python benchmarks/build_assets.py index`. "
        f"Check against exact cosines on {report['queries']} validation questions: top-5 % overlap "
        f"{report['top_overlap']['0.05']:.3f}, Spearman {report['spearman']:.3f}.\n"
    )
    print(f"copied to {dest}")


def verify(a: argparse.Namespace) -> None:
    """Rebuild the first ``--n`` training examples' sketches and compare them with the shipped index."""
    import torch

    from repinf_lens.data import load_mcqa
    from repinf_lens.influence.prefilter import GradientSketcher, SketchStore, shipped_index_dir
    from repinf_lens.workflows.demo import DEFAULT_INDEX

    split = _demo_split()
    store = SketchStore.load(shipped_index_dir(DEFAULT_INDEX), verify=True)
    rows = list(load_mcqa("openbookqa", "train", offline=True))
    store.check_rows(rows)
    fresh = GradientSketcher.from_store(split, store).sketch(rows[: a.n], batch_size=8)
    shipped = store.sketches[: a.n].float()
    err = ((fresh - shipped).norm(dim=1) / shipped.norm(dim=1)).max()
    print(f"max relative error of {a.n} rebuilt sketches: {float(err):.2e}")
    if not err <= 5e-3:
        raise SystemExit("the rebuilt sketches differ from the shipped index")
    del torch


def size(_: argparse.Namespace) -> None:
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for sub in sorted(p for p in ASSETS.iterdir() if p.is_dir() and p.name != "__pycache__"):
        mb = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file()) / 2**20
        print(f"{sub.name:12s} {mb:6.1f} MB")
    print(f"{'total':12s} {total / 2**20:6.1f} MB (budget {BUDGET_MB} MB)")
    if total / 2**20 > BUDGET_MB:
        raise SystemExit("over budget")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("finetune", "export"):
        s = sub.add_parser(name)
        s.add_argument("--run", default="runs/ft_default_cpu")
    s = sub.add_parser("saes")
    s.add_argument("--sweep-out", default="runs/sweep_shipped")
    s.add_argument("--layers", type=int, nargs="+", default=[8, 15, 22])
    s.add_argument("--d-sae", type=int, default=1024)
    s.add_argument("--k", type=int, default=64)
    s = sub.add_parser("index")
    s.add_argument("--work", default="runs/index_build")
    s.add_argument("--check", type=int, default=8, help="validation questions whose exact cosines are stored")
    s = sub.add_parser("verify")
    s.add_argument("--n", type=int, default=8)
    sub.add_parser("size")
    a = p.parse_args()
    {"finetune": finetune, "export": export, "saes": saes, "index": index, "verify": verify, "size": size}[a.what](a)


if __name__ == "__main__":
    main()
