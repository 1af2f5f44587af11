"""LoRA recipe grid on the default model: one ``repinf-lens finetune`` process per grid point, run side by side.

Every point is the project's own CLI (``python -m repinf_lens finetune``), so a chosen point reproduces with the
command printed in the table. Points are selected on the VALIDATION split (``--eval-split validation``); the
test split is kept for the one measurement of the selected adapter.

On one GPU the processes share the card (each needs a few GB); on a CPU machine run one point at a time
(``--parallel 1``), at about 1 s per training example and epoch on one core.

Usage::

    python benchmarks/finetune_grid.py --out runs/finetune_grid --device cuda --parallel 8
    python benchmarks/finetune_grid.py --out /tmp/g --device cpu --tiny      # smoke test (16 examples)

Writes ``OUT/<point>/`` (the usual finetune folder), ``OUT/<point>.log`` and ``OUT/grid.json`` (one row per
finished point: recipe, command, validation accuracy before/after, loss at the start and end, train time).
A finished point is never rerun (``finetune`` reuses its folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (template, lr, epochs, lora_r): the paper's recipe (lr 2e-4, 4 epochs, batch 32), then higher lrs
# (the earlier CPU runs plateaued at the letter prior after 1 epoch) and the chat template.
GRID: dict[str, tuple[str, float, float, int]] = {
    "plain_lr2e-4_ep4": ("plain", 2e-4, 4, 16),
    "plain_lr5e-4_ep4": ("plain", 5e-4, 4, 16),
    "plain_lr1e-3_ep4": ("plain", 1e-3, 4, 16),
    "plain_lr2e-3_ep4": ("plain", 2e-3, 4, 16),
    "plain_lr1e-3_ep8": ("plain", 1e-3, 8, 16),
    "chat_lr2e-4_ep4": ("chat", 2e-4, 4, 16),
    "chat_lr1e-3_ep4": ("chat", 1e-3, 4, 16),
    "plain_lr5e-4_ep4_r32": ("plain", 5e-4, 4, 32),
}


def command(name: str, out: Path, device: str, tiny: bool, micro_batch: int) -> list[str]:
    template, lr, epochs, r = GRID[name]
    cmd = [sys.executable, "-m", "repinf_lens", "finetune", "--offline", "--no-progress", "--device", device]
    cmd += ["--template", template, "--lr", str(lr), "--epochs", str(epochs), "--lora-r", str(r)]
    cmd += ["--effective-batch-size", "32", "--batch-size", str(micro_batch), "--eval-split", "validation"]
    if tiny:
        cmd += ["--train-limit", "16", "--eval-limit", "8", "--epochs", "0.5"]
    return cmd + ["--out", str(out / name)]


def summarise(out: Path, name: str, cmd: list[str]) -> dict | None:
    meta_path = out / name / "finetune.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    losses = meta.get("loss_curve") or []
    k = max(1, len(losses) // 10)
    template, lr, epochs, r = GRID[name]
    return {
        "point": name,
        "template": template,
        "lr": lr,
        "epochs": epochs,
        "lora_r": r,
        "steps": meta.get("steps"),
        "val_acc_before": meta.get("accuracy_before"),
        "val_acc_after": meta.get("accuracy_after"),
        "loss_first_10pct": sum(losses[:k]) / k if losses else None,
        "loss_last_10pct": sum(losses[-k:]) / k if losses else None,
        "train_s": meta.get("timings", {}).get("train_s"),
        "adapter_sha256": meta.get("adapter_sha256"),
        "command": " ".join(["repinf-lens"] + cmd[3:]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_grid"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parallel", type=int, default=8, help="processes at once (1 on a CPU machine)")
    ap.add_argument("--points", nargs="*", default=list(GRID), help=f"subset of {list(GRID)}")
    ap.add_argument("--micro-batch", type=int, default=32, help="examples per forward/backward pass")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 16 training examples, 8 validation questions")
    args = ap.parse_args()
    unknown = [p for p in args.points if p not in GRID]
    if unknown:
        ap.error(f"unknown grid points {unknown}; valid: {list(GRID)}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, args.parallel))))
    pending = list(args.points)
    running: dict[str, tuple[subprocess.Popen, list[str], float]] = {}
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()

    def write() -> None:
        (args.out / "grid.json").write_text(json.dumps([rows[p] for p in args.points if p in rows], indent=2))

    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            cmd = command(name, args.out, args.device, args.tiny, args.micro_batch)
            log = open(args.out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cmd, time.time())
        time.sleep(2)
        for name, (proc, cmd, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            row = summarise(args.out, name, cmd)
            if row is None:
                print(f"[grid] {name} FAILED (exit {proc.returncode}); see {args.out / (name + '.log')}", flush=True)
                continue
            rows[name] = row
            write()
            print(
                f"[grid] {name}: val {row['val_acc_before']:.3f} -> {row['val_acc_after']:.3f}, loss "
                f"{row['loss_first_10pct']:.3f} -> {row['loss_last_10pct']:.3f}, {time.time() - started:.0f} s",
                flush=True,
            )
    write()
    print(f"[grid] {len(rows)}/{len(args.points)} points in {time.perf_counter() - t0:.0f} s -> {args.out}/grid.json")
    return 0 if len(rows) == len(args.points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
