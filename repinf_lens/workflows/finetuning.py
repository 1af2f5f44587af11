"""LoRA finetuning (peft) of a causal LM on a task, merged and handed back as a HookedTransformer.

Step 1 of the paper's pipeline (AdamW, lr 2e-4, batch 32, 4 epochs, max length 512; gradient accumulation
reaches the batch on small machines). Training runs on the Hugging Face model with peft; the adapter is saved,
merged into the base weights, saved as a plain HF folder and loaded through :func:`repinf_lens.load_model`'s
local-directory path, so the HookedTransformer computes exactly what the merged HF model computes.

Output folder layout (``out_dir``)::

    adapter/            the LoRA adapter (peft ``save_pretrained``)
    merged/             merged fp32 HF model + tokenizer (what ``load_model(out_dir / "merged")`` reads)
    checkpoints/step-N/ adapter + optimizer + scheduler + RNG state, for resuming (the last two are kept)
    run.json            the run's fingerprint, written when it starts: base model weights digest, data hash,
                        task config, tokenizer, FinetuneConfig (without ``checkpoint_every``)
    finetune.json       metadata: base model, adapter hash, data hash, config, accuracy before/after, timings

A folder is only ever resumed (or its finished result reused) by the identical run: a call whose fingerprint
differs from ``run.json`` raises :class:`FinetuneRunMismatchError` naming the differing fields. Checkpoints are
read with ``torch.load(weights_only=True)``: no code from a run folder is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from repinf_lens._cache import atomic_dir, fingerprint_rows
from repinf_lens._shards import diff_fields, fingerprint_hash, write_json_atomic
from repinf_lens.errors import RepinfLensError
from repinf_lens.models import (
    DEFAULT_MODEL,
    default_model_dir,
    is_default_model,
    load_model,
    merge_lora,
    merge_peft,
    resolve_device,
    save_merged,
)
from repinf_lens.task import Task, evaluate, gather_positions, require, task_config

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneRunMismatchError",
    "export_adapter",
    "finetune",
    "merge_adapter",
    "ship_finetune",
]

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """Every knob of :func:`finetune` (saved next to the results).

    ``batch_size`` is the effective batch (the paper's 32), reached by accumulating ``micro_batch_size``
    examples per forward/backward pass.
    """

    epochs: float = 4.0
    lr: float = 2e-4
    batch_size: int = 32
    micro_batch_size: int = 8
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    seed: int = 0
    checkpoint_every: int = 50
    max_train_examples: int | None = None
    lora_layers: tuple[int, ...] | None = None
    """Blocks that get LoRA (``None``: all). Upper blocks only is the CPU recipe: the backward pass stops at the
    lowest adapted block, so LoRA on the top 6 of 30 blocks trains ~4x faster per step."""
    autocast: str | None = None
    """``"bf16"``: forward and backward under ``torch.autocast`` in bfloat16 (adapter and optimizer stay fp32);
    ~1.8x faster on CPUs with AVX512-BF16/AMX. ``None``: plain fp32."""

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"FinetuneConfig autocast must be None or 'bf16', got {self.autocast!r}.")
        if self.lora_layers is not None:
            layers = tuple(int(i) for i in self.lora_layers)
            if not layers or min(layers) < 0:
                raise ValueError(f"FinetuneConfig lora_layers must be block indices >= 0, got {self.lora_layers!r}.")
            self.lora_layers = tuple(sorted(set(layers)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        for k in ("lora_layers", "autocast"):  # added later: absent at their defaults, so older runs still match
            if d[k] is None:
                del d[k]
            elif k == "lora_layers":
                d[k] = list(d[k])
        return d


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the merged HookedTransformer, its folders and the run's metadata."""

    model: Any
    out_dir: Path
    merged_dir: Path
    adapter_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def _hash_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _answer_logits(hf_model: Any, batch: Any) -> torch.Tensor:
    """Logits of an HF causal LM (peft-wrapped or not) at ``batch.answer_pos`` (``[B]`` or ``[B, P]``)."""
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    hidden = base.model(input_ids=batch.tokens, attention_mask=batch.attention_mask).last_hidden_state
    hidden = gather_positions(hidden, batch.answer_pos.to(hidden.device))  # [B, d] or [B, P, d]
    return base.lm_head(hidden)


def _base_model(model_or_name: str | os.PathLike | None) -> tuple[Path, str]:
    """The base model's local HF folder and the name recorded in the metadata."""
    if model_or_name is None or is_default_model(model_or_name):
        return default_model_dir(), DEFAULT_MODEL
    folder = Path(model_or_name)
    return folder, str(folder)


class FinetuneRunMismatchError(RepinfLensError, ValueError):
    """``out_dir`` holds a finetune run with other inputs (base model, data, task or settings)."""


_RUN_KIND = "repinf_lens.finetune"
_RUN_FILE = "run.json"
# FinetuneConfig fields that change where checkpoints land, not the trained adapter
_LOGISTICS_FIELDS = ("checkpoint_every",)
_RUN_OUTPUTS = ("finetune.json", "merged", "adapter", "checkpoints")


def _run_fingerprint(base_dir: Path, task: Task, data_hash: str, n_train: int, cfg: FinetuneConfig) -> dict[str, Any]:
    """Everything the trained adapter depends on (no paths: a moved base folder still matches)."""
    from repinf_lens._fingerprint import folder_digest, tokenizer_digest

    fp = {
        "base_model": {"weights": folder_digest(base_dir)},
        "data": {"hash": data_hash, "n_train": n_train},
        "task": type(task).__name__,
        "task_config": task_config(task),
        "tokenizer": tokenizer_digest(getattr(task, "tokenizer", None)),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in _LOGISTICS_FIELDS},
    }
    return json.loads(json.dumps(fp, default=str))


def _open_run(out: Path, fingerprint: dict[str, Any]) -> str:
    """Check ``out/run.json`` against ``fingerprint`` (or write it for a new run); return the fingerprint hash.

    Raises:
        FinetuneRunMismatchError: ``out`` holds another run, or finetune outputs without a ``run.json``.
    """
    path = out / _RUN_FILE
    fp_hash = fingerprint_hash(fingerprint)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("kind") == _RUN_KIND and old.get("fingerprint_hash") == fp_hash:
            return fp_hash
        diff = diff_fields(old.get("fingerprint", {}), fingerprint) or [f"(unreadable {_RUN_FILE})"]
        raise FinetuneRunMismatchError(
            f"{out} holds another finetune run: its {_RUN_FILE} differs from this call in {diff}. Resuming it "
            "would hand back that run's adapter and checkpoints under these settings. Fix: pass a new out_dir, "
            f"or delete {out} to train this run there."
        )
    found = [n for n in _RUN_OUTPUTS if (out / n).exists()]
    if found:
        raise FinetuneRunMismatchError(
            f"{out} holds finetune outputs ({found}) but no {_RUN_FILE}, so it is not known which run wrote them "
            "(an older repinf_lens, or another tool); they cannot be resumed safely. Fix: pass a new out_dir, or "
            f"delete {out} to train this run there."
        )
    write_json_atomic(path, {"kind": _RUN_KIND, "format_version": 1, "fingerprint_hash": fp_hash,
                             "fingerprint": fingerprint})  # fmt: skip
    return fp_hash


def _latest_checkpoint(folder: Path) -> Path | None:
    steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.exists() else []
    steps = [s for s in steps if (s / "state.pt").exists()]
    return steps[-1] if steps else None


def finetune(
    model_or_name: str | os.PathLike | None,
    task: Task,
    train: Any,
    *,
    out_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    eval_dataset: Any | None = None,
    device: str | torch.device | None = None,
    n_ctx: int = 1024,
    progress: bool = True,
    resume: bool = True,
    **overrides: Any,
) -> FinetuneResult:
    """LoRA-finetune ``model_or_name`` on ``train`` with ``task``'s loss; merge and return a HookedTransformer.

    Args:
        model_or_name: ``None`` for the embedded default, or a local HF folder.
        task: the task (its tokenizer must be the model's); the loss is ``task.loss`` at the answer position.
        train: training examples (a ``datasets.Dataset`` or list of dicts).
        out_dir: output folder (see the module docstring for its layout). A finished run is reused.
        config: :class:`FinetuneConfig`; keyword ``overrides`` replace single fields (``epochs=1``).
        eval_dataset: evaluated with :func:`repinf_lens.evaluate` before and after (the gain is reported).
        resume: continue from the newest checkpoint in ``out_dir/checkpoints``.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(config) if config is not None else FinetuneConfig()  # never mutate the caller's
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"Unknown finetune option {k!r}. Valid: {sorted(cfg.to_dict())}.")
        setattr(cfg, k, v)
    cfg.__post_init__()  # the overrides pass the same checks as the constructor's arguments
    out = Path(out_dir)
    merged_dir, adapter_dir, ckpt_dir = out / "merged", out / "adapter", out / "checkpoints"
    meta_path = out / "finetune.json"
    dev = resolve_device(device)
    rows = [dict(r) for r in train]
    if not rows:
        raise ValueError("The training set is empty. Fix: pass at least one example.")
    if cfg.max_train_examples is not None:
        rows = rows[: cfg.max_train_examples]
    enc = require(task, "encode", needed_by="finetune's max_length filter")
    too_long = [r.get("id") for r in rows if len(enc.encode(r)) > cfg.max_length]
    if too_long:
        warnings.warn(
            f"Skipping {len(too_long)} training examples longer than max_length={cfg.max_length} tokens "
            f"(first ids: {too_long[:5]}). Raise max_length to keep them.",
            stacklevel=2,
        )
        rows = [r for r in rows if r.get("id") not in set(too_long)]
    data_hash = fingerprint_rows(rows)
    base_dir, base_name = _base_model(model_or_name)
    run_fp = _run_fingerprint(base_dir, task, data_hash, len(rows), cfg)
    run_hash = _open_run(out, run_fp)  # refuses a folder that holds another run, before any work

    eval_hash = None if eval_dataset is None else fingerprint_rows([dict(r) for r in eval_dataset])
    if meta_path.exists() and (merged_dir / "config.json").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("run_fingerprint_hash") == run_hash:
            merged = load_model(merged_dir, device=dev, n_ctx=n_ctx)
            if eval_dataset is not None and meta.get("eval_hash") != eval_hash:
                # the same run, asked about other evaluation data: measure it instead of returning stale numbers
                base_model = load_model(base_dir, device=dev, n_ctx=n_ctx)
                meta["accuracy_before"] = evaluate(base_model, task, eval_dataset, progress=progress)
                meta["accuracy_after"] = evaluate(merged, task, eval_dataset, progress=progress)
                meta["n_eval"], meta["eval_hash"] = len(eval_dataset), eval_hash
                write_json_atomic(meta_path, meta)
            return FinetuneResult(merged, out, merged_dir, adapter_dir, meta)

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    timings: dict[str, float] = {}
    acc_before = None
    if eval_dataset is not None:
        t = time.perf_counter()
        acc_before = evaluate(load_model(base_dir, device=dev, n_ctx=n_ctx), task, eval_dataset, progress=progress)
        timings["eval_before_s"] = round(time.perf_counter() - t, 1)

    hf = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(dev)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
        layers_to_transform=None if cfg.lora_layers is None else list(cfg.lora_layers),
    )
    n_blocks = int(hf.config.num_hidden_layers)
    if cfg.lora_layers is not None and max(cfg.lora_layers) >= n_blocks:
        raise ValueError(f"lora_layers {list(cfg.lora_layers)} names a block >= {n_blocks}, the model's block count. "
                         f"Fix: pick blocks in 0..{n_blocks - 1}.")  # fmt: skip
    model: PeftModel = get_peft_model(hf, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accum = max(1, cfg.batch_size // cfg.micro_batch_size)
    steps_per_epoch = math.ceil(len(rows) / (cfg.micro_batch_size * accum))
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(cfg.warmup_ratio * total_steps)

    def lr_lambda(s: int) -> float:  # linear warm-up, then linear decay to 0
        if s < warmup:
            return (s + 1) / warmup
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    step = 0
    losses: list[float] = []
    latest = _latest_checkpoint(ckpt_dir) if resume else None
    if latest is not None:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(dev), latest, is_trainable=True
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        state = _load_state(latest / "state.pt")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)  # (its constructor resets the lr)
        opt.load_state_dict(state["optimizer"])  # restores the lr of the step being resumed
        sched.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])

    def order_for_epoch(epoch: int) -> list[int]:
        g = random.Random(cfg.seed + epoch)
        idx = list(range(len(rows)))
        g.shuffle(idx)
        return idx

    model.train()
    t_train = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="finetune", disable=not progress)
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        order = order_for_epoch(epoch)
        start = within * cfg.micro_batch_size * accum
        chunk = order[start : start + cfg.micro_batch_size * accum]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(0, len(chunk), cfg.micro_batch_size):
            part = [rows[i] for i in chunk[m : m + cfg.micro_batch_size]]
            batch = task.collate(part).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
                logits = _answer_logits(model, batch)
            loss = task.loss(logits.float(), batch) * (len(part) / len(chunk))
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}")
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            _save_checkpoint(model, opt, sched, step, losses, ckpt_dir)
    bar.close()
    timings["train_s"] = round(time.perf_counter() - t_train, 1)

    model.eval()
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    save_merged(merge_peft(model), base_dir, merged_dir)
    tl_model = load_model(merged_dir, device=dev, n_ctx=n_ctx)
    acc_after = None
    if eval_dataset is not None:
        t = time.perf_counter()
        acc_after = evaluate(tl_model, task, eval_dataset, progress=progress)
        timings["eval_after_s"] = round(time.perf_counter() - t, 1)
    meta = {
        "base_model": base_name,
        "base_model_weights": run_fp["base_model"]["weights"],
        "run_fingerprint_hash": run_hash,
        "adapter_sha256": _hash_folder(adapter_dir),
        "data_hash": data_hash,
        "n_train": len(rows),
        "config": cfg.to_dict(),
        "task": type(task).__name__,
        "task_config": task_config(task),
        "steps": total_steps,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "n_eval": None if eval_dataset is None else len(eval_dataset),
        "eval_hash": eval_hash,
        "timings": timings,
    }
    write_json_atomic(meta_path, meta)
    return FinetuneResult(tl_model, out, merged_dir, adapter_dir, meta)


def _load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` with ``weights_only=True`` (tensors, numbers, lists, dicts: never code)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # pickle.UnpicklingError for anything beyond plain data, or a damaged file
        raise RuntimeError(
            f"Cannot load the checkpoint state {path} safely ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "It holds something other than the plain tensors and numbers repinf_lens writes (or is damaged); it "
            "is not unpickled, since unpickling a file can run arbitrary code. Fix: delete that checkpoint folder "
            f"({path.parent}) to resume from an earlier one, or delete the run folder to start again."
        ) from e


def export_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    provenance: dict[str, Any],
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a shippable copy of a peft LoRA adapter: its tensors in ``dtype`` (fp16 by default) safetensors, its
    config with a portable base-model name, and ``provenance.json`` (``provenance`` plus the adapter's sha256).

    The result is what ``repinf_lens/assets/finetunes/<name>`` holds and what :func:`repinf_lens.load_model`
    merges: ``load_model(out_dir)`` (or the shipped name) checks the sha256 before merging.
    """
    import hashlib

    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    cfg = json.loads((src / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if base and Path(base).expanduser().resolve() == default_model_dir().resolve():
        cfg["base_model_name_or_path"] = DEFAULT_MODEL  # not this machine's cache path
    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        digest = hashlib.sha256((tmp / "adapter_model.safetensors").read_bytes()).hexdigest()
        record = {**provenance, "adapter_sha256": digest, "adapter_dtype": str(dtype).removeprefix("torch."),
                  "n_adapter_params": int(sum(v.numel() for v in tensors.values()))}  # fmt: skip
        (tmp / "provenance.json").write_text(json.dumps(record, indent=2, default=str))
    return out


def _command_of(meta: dict[str, Any]) -> str:
    """The ``repinf-lens finetune`` command line of a run, rebuilt from its recorded recipe."""
    c, t = meta.get("config") or {}, meta.get("task_config") or {}
    parts = ["repinf-lens finetune --offline", f"--template {t.get('template', 'chat')}", f"--lr {c.get('lr')}",
             f"--epochs {c.get('epochs')}", f"--lora-r {c.get('lora_r')}",
             f"--effective-batch-size {c.get('batch_size')}", f"--batch-size {c.get('micro_batch_size')}",
             f"--seed {c.get('seed')}"]  # fmt: skip
    if c.get("max_train_examples"):
        parts.append(f"--train-limit {c['max_train_examples']}")
    return " ".join(parts)


def ship_finetune(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: Task,
    eval_dataset: Any,
    *,
    eval_name: str = "test",
    slice_size: int = 100,
    command: str | None = None,
    dataset: str | None = None,
    device: str | torch.device | None = None,
    n_ctx: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a finished :func:`finetune` run as a shippable adapter (:func:`export_adapter`) with its provenance.

    The provenance records the base model (name, ``model.safetensors`` sha256), the data (hash, size), the recipe
    (``FinetuneConfig``, task settings, seed), ``command``, the run's validation accuracies and timings, the
    code version, and, measured here on the EXPORTED (fp16) adapter merged into the base: the accuracy on all of
    ``eval_dataset`` before and after, and the predictions on its first ``slice_size`` questions (what the
    shipped-model test checks).
    """
    import subprocess

    from repinf_lens._version import __version__
    from repinf_lens.models import file_sha256
    from repinf_lens.task import predict

    run = Path(run_dir)
    meta = json.loads((run / "finetune.json").read_text())
    base_dir, base_name = _base_model(None if meta.get("base_model") == DEFAULT_MODEL else meta.get("base_model"))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    prov: dict[str, Any] = {
        "base_model": base_name,
        "base_model_sha256": file_sha256(base_dir / "model.safetensors"),
        "data": {"hash": meta.get("data_hash"), "n_train": meta.get("n_train")},
        "recipe": meta.get("config"),
        "task": meta.get("task"),
        "task_config": meta.get("task_config"),
        "finetune_command": meta.get("command") or _command_of(meta),
        "export_command": command,
        "steps": meta.get("steps"),
        "final_loss": meta.get("final_loss"),
        "validation": {
            "accuracy_before": meta.get("accuracy_before"),
            "accuracy_after": meta.get("accuracy_after"),
            "n": meta.get("n_eval"),
        },
        "timings": meta.get("timings"),
        "code": {"repinf_lens": __version__, "git_commit": commit},
    }
    if dataset is not None:  # which load_mcqa dataset ``eval_name`` (and the slice) is a split of
        prov["dataset"] = dataset
    out = export_adapter(run / "adapter", out_dir, provenance=prov)
    rows = [dict(r) for r in eval_dataset]
    base_pred, labels = predict(load_model(base_dir, device=device, n_ctx=n_ctx), task, rows, progress=progress)
    shipped = load_model(out, device=device, n_ctx=n_ctx)
    pred, _ = predict(shipped, task, rows, progress=progress)
    n = min(slice_size, len(rows))
    prov_path = out / "provenance.json"
    record = json.loads(prov_path.read_text())
    record[eval_name] = {
        "n": len(rows),
        "accuracy_before": float((base_pred == labels).float().mean()),
        "accuracy_after": float((pred == labels).float().mean()),
        "slice": {
            "n": n,
            "ids": [str(r.get("id")) for r in rows[:n]],
            "predictions": pred[:n].tolist(),
            "accuracy": float((pred[:n] == labels[:n]).float().mean()),
        },
    }
    write_json_atomic(prov_path, record)
    return record


def merge_adapter(
    model_or_name: str | os.PathLike | None,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    n_ctx: int = 1024,
) -> Any:
    """Merge a peft LoRA adapter trained elsewhere (another machine, a GPU) into its base model; load it.

    The adapter folder is what :func:`finetune` writes to ``out_dir/adapter`` (or any peft ``save_pretrained``
    folder for the same base model). The merged fp32 HF model is saved to ``out_dir/merged`` (atomically; an
    existing one is reused when ``out_dir/merge.json`` records the same adapter hash) and returned as a
    HookedTransformer through :func:`repinf_lens.load_model`, exactly as :func:`finetune` does after training.

    Args:
        model_or_name: ``None`` for the embedded default, or the local HF folder the adapter was trained on.
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        out_dir: output folder; ``merged/`` and ``merge.json`` (base model, adapter hash) are written there.
    """

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{adapter} is not a peft adapter folder (no adapter_config.json). Fix: pass the `adapter/` folder "
            "that `finetune` (or peft's save_pretrained) wrote."
        )
    out = Path(out_dir)
    merged_dir, meta_path = out / "merged", out / "merge.json"
    base_dir, base_name = _base_model(model_or_name)
    from repinf_lens._fingerprint import folder_digest

    meta = {"base_model": base_name, "base_model_weights": folder_digest(base_dir), "adapter_dir": str(adapter),
            "adapter_sha256": _hash_folder(adapter)}  # fmt: skip
    dev = resolve_device(device)
    if meta_path.exists() and (merged_dir / "config.json").exists():
        old = json.loads(meta_path.read_text())
        if (
            old.get("adapter_sha256") == meta["adapter_sha256"]
            and old.get("base_model_weights") == meta["base_model_weights"]
        ):
            return load_model(merged_dir, device=dev, n_ctx=n_ctx)
    out.mkdir(parents=True, exist_ok=True)
    merge_lora(base_dir, adapter, merged_dir)
    write_json_atomic(meta_path, meta)
    return load_model(merged_dir, device=dev, n_ctx=n_ctx)


def _save_checkpoint(model: Any, opt: Any, sched: Any, step: int, losses: list[float], folder: Path) -> None:
    """Write ``step-N`` atomically and keep the two newest checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder / f"step-{step}") as tmp:
        model.save_pretrained(tmp)
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "losses": losses,
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, tmp / "state.pt")
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
