"""Layer sweep: train an SAE per (layer, d_sae, k), splice it in, measure the task accuracy it costs, pick a layer.

The paper's Section 5.2 / Table 2: SAEs are trained at the middle half of the layers
(``ceil(L/4) .. floor(3L/4)``) over a grid of sizes; each is inserted into the model and the change of task
accuracy is measured **without** the error term (the reconstruction alone replaces the activation) and **with**
it (``x_hat + (x - x_hat)``, which must cost nothing). The layer whose SAE costs the least accuracy inside the
middle half is selected; the best layer overall is reported too.

Output folder (``out_dir``)::

    activations/            cached training activations at every sweep hook (safetensors)
    saes/L{layer}_d{d_sae}_k{k}/   one SAELens-format SAE per point (see :func:`train_sae`)
    points.jsonl            one line per finished point (appended; a finished point is never recomputed)
    sweep.csv, sweep.json   the table and the selection
    sweep.png               accuracy change vs layer, one curve per size, with and without the error term
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._cache import fingerprint_rows
from repinf_lens._io import as_rows, write_json_atomic
from repinf_lens.models.hooked import final_logits
from repinf_lens.saes.activations import ActivationStore, collect_activations, hook_layer
from repinf_lens.saes.training import SAETrainingConfig, train_sae
from repinf_lens.task import SupportsOptionLogits, Task, check_fits, require, task_config

__all__ = ["PAPER_GRID", "SweepResult", "layer_sweep", "middle_layers", "spliced_accuracy"]

PAPER_GRID: tuple[tuple[int, int], ...] = tuple((d, k) for d in (2048, 1024, 512) for k in (256, 128, 64))
"""The paper's (d_sae, k) grid."""


def middle_layers(n_layers: int, n_points: int | None = None) -> list[int]:
    """The middle half of the layers, ``ceil(L/4) .. floor(3L/4)``; ``n_points`` evenly spaced ones if given."""
    lo, hi = math.ceil(n_layers / 4), math.floor(3 * n_layers / 4)
    layers = list(range(lo, hi + 1))
    if n_points is None or n_points >= len(layers):
        return layers
    if n_points == 1:
        return [layers[len(layers) // 2]]
    return sorted({layers[round(i * (len(layers) - 1) / (n_points - 1))] for i in range(n_points)})


@dataclass
class SweepResult:
    """The sweep's table (one dict per point), the selected points and the output folder."""

    table: list[dict[str, Any]]
    selected: dict[str, Any]
    best_overall: dict[str, Any]
    base_accuracy: float
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)

    def sae_path(self, row: dict[str, Any] | None = None) -> Path:
        """Folder of the selected SAE (or of ``row``'s)."""
        return Path((row or self.selected)["sae_path"])


def _resid_post_layer(hook_name: str) -> int | None:
    layer = hook_layer(hook_name)
    return layer if layer is not None and hook_name == f"blocks.{layer}.hook_resid_post" else None


@torch.no_grad()
def _answer_option_logits_from(
    model: Any, task: SupportsOptionLogits, batch: Any, resid: Float[Tensor, "b t d"], start_layer: int
) -> Float[Tensor, "b n_options"]:
    """Option logits from a residual stream given at the input of block ``start_layer``."""
    if start_layer < model.cfg.n_layers:
        resid = model(resid, start_at_layer=start_layer, stop_at_layer=model.cfg.n_layers)
    resid = resid[torch.arange(resid.shape[0], device=resid.device), batch.answer_pos.to(resid.device)]
    logits = final_logits(model, resid[:, None, :])[:, 0, :]
    return task.option_logits(logits, batch)


def _splice(sae: Any, x: Tensor, use_error_term: bool) -> Tensor:
    flat = x.reshape(*x.shape[:2], -1)
    x_hat = sae.decode(sae.encode(flat))
    out = x_hat + (flat - x_hat) if use_error_term else x_hat
    return out.reshape(x.shape)


@torch.no_grad()
def spliced_accuracy(
    model: Any,
    task: Task,
    dataset: Any,
    saes: dict[str, tuple[str, Any]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` with each SAE inserted, without and with the error term, in one pass per batch.

    Args:
        saes: ``{name: (hook_name, sae)}``.

    Returns ``{"base": {"accuracy": a}, name: {"accuracy_no_error": .., "accuracy_with_error": ..,
    "max_abs_logit_diff_with_error": ..}}``. Residual-stream hooks (``blocks.L.hook_resid_post``) re-enter the
    model at block ``L + 1`` from one cached upstream pass; other hooks run the whole model with a hook.
    """
    clf: SupportsOptionLogits = require(task, "option_logits", needed_by="spliced_accuracy (option-letter accuracy)")
    rows = as_rows(dataset)
    if not rows:
        raise ValueError("The evaluation set is empty. Fix: pass at least one example.")
    hooks = sorted({h for h, _ in saes.values()})
    fast = {h for h in hooks if _resid_post_layer(h) is not None}
    stop = max((_resid_post_layer(h) or 0) for h in fast) + 1 if fast else None
    correct: dict[str, dict[str, int]] = {n: {"no_error": 0, "with_error": 0} for n in saes}
    max_diff = dict.fromkeys(saes, 0.0)
    n_base, n_total = 0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc="spliced accuracy", disable=not progress):
        batch = task.collate(rows[i : i + batch_size]).to(model.cfg.device)
        check_fits(model, batch.tokens)
        labels = batch.labels
        base = clf.option_logits(task.model_logits(model, batch), batch)
        n_base += int((base.argmax(-1) == labels).sum())
        n_total += len(labels)
        cache = {}
        if fast:
            _, cache = model.run_with_cache(batch.tokens, names_filter=sorted(fast), stop_at_layer=stop)
        for name, (hook, sae) in saes.items():
            for variant, use_err in (("no_error", False), ("with_error", True)):
                layer = _resid_post_layer(hook)
                if layer is not None:
                    x = _splice(sae, cache[hook], use_err)
                    logits = _answer_option_logits_from(model, clf, batch, x, layer + 1)
                else:

                    def hook_fn(act: Tensor, hook: Any, _sae: Any = sae, _e: bool = use_err) -> Tensor:
                        return _splice(_sae, act, _e)

                    with model.hooks(fwd_hooks=[(hook, hook_fn)]):
                        full = task.model_logits(model, batch)
                    logits = clf.option_logits(full, batch)
                correct[name][variant] += int((logits.argmax(-1) == labels).sum())
                if use_err:
                    max_diff[name] = max(max_diff[name], float((logits - base).abs().max()))
    out: dict[str, dict[str, float]] = {"base": {"accuracy": n_base / n_total}}
    for name in saes:
        out[name] = {
            "accuracy_no_error": correct[name]["no_error"] / n_total,
            "accuracy_with_error": correct[name]["with_error"] / n_total,
            "max_abs_logit_diff_with_error": max_diff[name],
        }
    return out


def _read_points(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            done[rec["point"]] = rec
    return done


def layer_sweep(
    model: Any,
    task: Task,
    train: Any,
    eval_dataset: Any,
    *,
    out_dir: str | os.PathLike,
    layers: Sequence[int] | None = None,
    n_layers: int | None = 5,
    sizes: Sequence[tuple[int, int]] = ((2048, 64), (512, 64)),
    hook_template: str = "blocks.{layer}.hook_resid_post",
    sae_config: SAETrainingConfig | None = None,
    max_train_examples: int | None = 1000,
    max_eval_examples: int | None = 200,
    batch_size: int = 8,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train an SAE per (layer, size), measure the accuracy each costs when inserted, and select a layer.

    Args:
        model: the (finetuned) HookedTransformer.
        task: the task whose prompts the SAEs are trained on and whose accuracy is measured.
        train: examples whose prompt activations train the SAEs (first ``max_train_examples``).
        eval_dataset: examples for the accuracy change (first ``max_eval_examples``).
        layers: explicit layers; default ``n_layers`` evenly spaced ones in the middle half (all when ``None``).
        sizes: ``(d_sae, k)`` pairs (the paper's full grid is :data:`PAPER_GRID`).
        hook_template: hook name per layer.
        sae_config: base :class:`SAETrainingConfig`; ``d_sae`` and ``k`` are set per point.
        metadata: extra SAE metadata (adapter hash, dataset name, ...).

    Selection: inside the middle half, the point with the highest accuracy without the error term (ties:
    higher explained variance). Resumable: finished points are read from ``points.jsonl`` and trained SAEs
    from their folders.
    """
    require(task, "option_logits", needed_by="layer_sweep (the accuracy each SAE costs)")  # before any training
    L = int(model.cfg.n_layers)
    mid = middle_layers(L)
    chosen = list(layers) if layers is not None else middle_layers(L, n_layers)
    if not chosen or not sizes:
        raise ValueError("The sweep needs at least one layer and one (d_sae, k) size.")
    bad = [layer for layer in chosen if not 0 <= layer < L]
    if bad:
        raise ValueError(f"Layers {bad} are out of range for a model with {L} layers (0..{L - 1}).")
    hooks = {layer: hook_template.format(layer=layer) for layer in chosen}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows = as_rows(train)[:max_train_examples] if max_train_examples else as_rows(train)
    eval_rows = as_rows(eval_dataset)[:max_eval_examples] if max_eval_examples else as_rows(eval_dataset)
    base_cfg = sae_config or SAETrainingConfig()
    fingerprint = {
        "train": fingerprint_rows(train_rows),
        "eval": fingerprint_rows(eval_rows),
        "task": task_config(task),
        "model": str(getattr(model.cfg, "model_name", "")),
        "sae_config": {k: v for k, v in asdict(base_cfg).items() if k not in ("d_sae", "k")},
    }
    points_path = out / "points.jsonl"
    fp_path = out / "sweep_fingerprint.json"
    if fp_path.exists() and json.loads(fp_path.read_text()) != fingerprint:
        raise ValueError(
            f"{out} holds a sweep with other data, task or SAE settings. Fix: use another out_dir or delete it."
        )
    write_json_atomic(fp_path, fingerprint)
    done = _read_points(points_path)

    def point_name(layer: int, d: int, k: int) -> str:
        return f"L{layer}_d{d}_k{k}"

    todo = [(layer, d, k) for layer in chosen for d, k in sizes if point_name(layer, d, k) not in done]
    t0 = time.perf_counter()
    if todo:
        act_dir = out / "activations"
        need = sorted({hooks[layer] for layer, _, _ in todo}, key=lambda h: hook_layer(h) or 0)
        store = None
        if (act_dir / "activations.json").exists():
            cached = ActivationStore.load(act_dir)
            if set(need) <= set(cached.acts) and cached.meta.get("train_hash") == fingerprint["train"]:
                store = cached
        if store is None:
            store = collect_activations(model, task, train_rows, need, batch_size=batch_size, progress=progress)
            store.meta["train_hash"] = fingerprint["train"]
            store.save(act_dir)
        for layer in sorted({layer for layer, _, _ in todo}):
            trained = {}
            for _, d, k in (p for p in todo if p[0] == layer):
                cfg = SAETrainingConfig(**{**asdict(base_cfg), "d_sae": d, "k": k})
                name = point_name(layer, d, k)
                trained[name] = (
                    (d, k),
                    train_sae(
                        store,
                        hooks[layer],
                        out_dir=out / "saes" / name,
                        config=cfg,
                        metadata=metadata,
                        progress=progress,
                    ),
                )
            acc = spliced_accuracy(
                model,
                task,
                eval_rows,
                {name: (hooks[layer], t.sae) for name, (_, t) in trained.items()},
                batch_size=batch_size,
                progress=progress,
            )
            base_acc = acc["base"]["accuracy"]
            for name, ((d, k), t) in trained.items():
                rec = {
                    "point": name,
                    "layer": layer,
                    "hook_name": hooks[layer],
                    "d_sae": d,
                    "k": k,
                    "in_middle_half": layer in mid,
                    "base_accuracy": base_acc,
                    **acc[name],
                    "accuracy_change_no_error": acc[name]["accuracy_no_error"] - base_acc,
                    "accuracy_change_with_error": acc[name]["accuracy_with_error"] - base_acc,
                    **{f"sae_{key}": v for key, v in t.stats.items()},
                    "sae_path": str(t.path),
                    "n_eval": len(eval_rows),
                }
                with points_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                done[name] = rec
    table = [done[point_name(layer, d, k)] for layer in chosen for d, k in sizes]
    return _finish(table, out, time.perf_counter() - t0)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda r: (r["accuracy_no_error"], r.get("sae_explained_variance", 0.0)))


def _finish(table: list[dict[str, Any]], out: Path, seconds: float) -> SweepResult:
    """Select, write sweep.csv/json and the plot."""
    import csv

    middle = [r for r in table if r["in_middle_half"]] or table
    selected, best = _best(middle), _best(table)
    base = table[0]["base_accuracy"]
    cols = list(table[0])
    with (out / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)
    summary = {
        "base_accuracy": base,
        "selected": selected,
        "best_overall": best,
        "table": table,
        "seconds_this_run": round(seconds, 1),
    }
    write_json_atomic(out / "sweep.json", summary)
    files = {"csv": out / "sweep.csv", "json": out / "sweep.json"}
    plot = _plot(table, out / "sweep.png")
    if plot is not None:
        files["plot"] = plot
    return SweepResult(table, selected, best, base, out, files)


def _plot(table: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = sorted({(r["d_sae"], r["k"]) for r in table}, reverse=True)
    for d, k in sizes:
        rows = sorted((r for r in table if (r["d_sae"], r["k"]) == (d, k)), key=lambda r: r["layer"])
        xs = [r["layer"] for r in rows]
        (line,) = ax.plot(xs, [100 * r["accuracy_change_no_error"] for r in rows], "o-", label=f"d={d}, k={k}")
        ax.plot(xs, [100 * r["accuracy_change_with_error"] for r in rows], "x--", color=line.get_color(), alpha=0.6)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy change (points)")
    ax.set_title("SAE inserted: without error term (solid), with (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
