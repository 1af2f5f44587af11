"""The main job end to end: ``repinf-lens demo`` / ``make demo``.

On the embedded default model and real OpenBookQA, fully offline: zero-shot evaluation -> a short LoRA finetune
-> an SAE per candidate layer and the layer choice (:func:`repinf_lens.saes.layer_sweep`) -> influence of the
finetuning examples and their SAE latents on a few test questions (gradient prefilter, CG s_test, derivative
swap) -> necessity / sufficiency ablations against the baseline rankings -> orthogonality table -> one
self-contained HTML report.

Every stage writes into its own folder under ``out_dir`` and is reused by a rerun with the same settings (the
finetune, the SAEs, the sketches, the attribution shards and the ablation tables are all cached), so a rerun
after a crash or with another report setting costs only what changed. ``out_dir/demo.json`` records the
settings, the accuracies and the time of every stage.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass
class DemoConfig:
    """Sizes of the demo's stages. :meth:`quick` is the ``--quick`` preset; the defaults are the full demo.

    Layers default to the upper two of three evenly spaced middle-half layers (15 and 22 on the 30-layer
    default; the upper one in quick mode): fewer parameters downstream of the hook make CG cheaper.

    ``adapter``: a peft LoRA adapter folder trained elsewhere (e.g. by ``benchmarks/finetune_grid.py`` on a GPU;
    the short CPU finetune stays on the letter-prior plateau). It replaces the finetune stage: it is merged into
    the model and the first ``n_finetune`` training examples are still the ones attributed.
    """

    dataset: str = "openbookqa"
    template: str = "plain"
    n_eval: int = 100
    n_finetune: int = 320
    finetune_epochs: float = 1.0
    finetune_lr: float = 4e-4
    finetune_batch_size: int = 16
    finetune_micro_batch_size: int = 8
    lora_r: int = 16
    adapter: str | None = None
    layers: tuple[int, ...] | None = None
    n_layers_swept: int = 2
    d_sae: int = 1024
    k: int = 64
    n_sae_prompts: int = 400
    sae_epochs: float = 8.0
    n_queries: int = 3
    prefilter_top_k: int | None = 32
    solver: str = "cg"
    damping: float = 1e-3
    cg_iters: int = 6
    hessian_examples: int = 8
    batch_size: int = 8
    ks: tuple[int, ...] = (10, 25, 50, 100, 200)
    n_boot: int = 1000
    ortho_tokens: int = 2048
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The ``--quick`` preset (a few minutes on 2 CPU cores)."""
        base = dict(
            n_eval=20, n_finetune=32, n_layers_swept=1, d_sae=512, k=32, n_sae_prompts=256, sae_epochs=8.0,
            n_queries=2, prefilter_top_k=12, cg_iters=3, hessian_examples=4, ks=(10, 50),
            n_boot=200, ortho_tokens=1024,
        )  # fmt: skip
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, quick: bool = False) -> DemoConfig:
        """Read a JSON or YAML file of field overrides (on the quick preset when ``quick``)."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown demo settings {unknown} in {path}. Valid: {sorted(names)}.")
        for key in ("layers", "ks"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls.quick(**values) if quick else cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and its summary (the content of ``demo.json``)."""

    out_dir: Path
    report: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    config: DemoConfig | None = None,
    *,
    model: str | os.PathLike | None = None,
    train: Any = None,
    test: Any = None,
    offline: bool | None = True,
    device: str | torch.device | None = None,
    n_ctx: int = 1024,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline and write ``out_dir/report.html``; reruns reuse every finished stage.

    Args:
        out_dir: output folder (``finetune/``, ``sweep/``, ``attribution/``, ``ablation/``, ``report.html``,
            ``demo.json``, ``manifest.json``).
        config: :class:`DemoConfig` (default: the full demo; ``DemoConfig.quick()`` for the quick one).
        model: ``None`` for the embedded default, or a local HF folder.
        train, test: MCQA rows to use instead of ``config.dataset``'s train / test splits.
        offline: never try the Hugging Face hub for data (the default; the embedded data are real).
        device: ``cpu``, ``cuda`` ... (default: cuda when available).
        log: where the one-line stage summaries go.
    """
    from transformers import AutoTokenizer

    from repinf_lens.analysis.case_studies import cached_predictions, prediction_record, select_queries
    from repinf_lens.analysis.orthogonality import orthogonality_table
    from repinf_lens.data import load_mcqa
    from repinf_lens.finetuning import finetune, merge_adapter
    from repinf_lens.influence.attributor import as_rows
    from repinf_lens.models import default_model_dir, is_default_model, load_model, resolve_device
    from repinf_lens.pipeline import AttributionConfig, make_report, run_ablation, run_attribution, write_manifest
    from repinf_lens.saes.loading import load_sae
    from repinf_lens.saes.sweep import layer_sweep, middle_layers
    from repinf_lens.split import SplitModel
    from repinf_lens.task import MultipleChoiceTask

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[demo] {name}: {timings[name]:.1f} s")

    train_rows = as_rows(train if train is not None else load_mcqa(cfg.dataset, "train", offline=offline), "train")
    test_rows = as_rows(test if test is not None else load_mcqa(cfg.dataset, "test", offline=offline), "test")
    ft_rows = train_rows[: cfg.n_finetune]
    eval_rows = test_rows[: cfg.n_eval]
    base_dir = default_model_dir() if is_default_model(model) else Path(model)  # type: ignore[arg-type]
    task = MultipleChoiceTask(AutoTokenizer.from_pretrained(str(base_dir)), max_length=n_ctx, template=cfg.template)
    key = {"model": str(base_dir), "template": cfg.template, "ids": [str(r["id"]) for r in eval_rows]}

    # 1. zero-shot accuracy (per question, for the case-study choice)
    t = time.perf_counter()
    before = cached_predictions(
        out / "eval_base.json",
        key,
        lambda: prediction_record(
            load_model(base_dir, device=dev, n_ctx=n_ctx), task, eval_rows, batch_size=cfg.batch_size,
            progress=progress,
        ),
    )  # fmt: skip
    stage("zero_shot_eval_s", t)

    # 2. a short LoRA finetune (reused when finished with the same data and settings), or an adapter trained
    #    elsewhere (config.adapter, e.g. benchmarks/finetune_grid.py on a GPU), merged
    t = time.perf_counter()
    if cfg.adapter is not None:
        tl_model = merge_adapter(model, cfg.adapter, out / "adapter_merge", device=dev, n_ctx=n_ctx)
        adapter_sha = json.loads((out / "adapter_merge" / "merge.json").read_text())["adapter_sha256"]
    else:
        ft = finetune(
            model, task, ft_rows, out_dir=out / "finetune", device=dev, n_ctx=n_ctx, progress=progress,
            epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.finetune_batch_size,
            micro_batch_size=cfg.finetune_micro_batch_size, lora_r=cfg.lora_r, seed=cfg.seed,
        )  # fmt: skip
        tl_model, adapter_sha = ft.model, ft.metadata["adapter_sha256"]
    stage("finetune_s", t)
    t = time.perf_counter()
    after = cached_predictions(
        out / "eval_finetuned.json",
        {**key, "adapter_sha256": adapter_sha},
        lambda: prediction_record(tl_model, task, eval_rows, batch_size=cfg.batch_size, progress=progress),
    )
    stage("finetuned_eval_s", t)
    log(
        f"[demo] accuracy on {len(eval_rows)} {cfg.dataset} test questions: "
        f"{100 * before['accuracy']:.1f} % zero-shot -> {100 * after['accuracy']:.1f} % after LoRA"
    )

    # 3. SAEs at candidate layers of the finetuned model, and the layer choice
    t = time.perf_counter()
    n_layers = int(tl_model.cfg.n_layers)
    layers = list(cfg.layers) if cfg.layers is not None else middle_layers(n_layers, 3)[-cfg.n_layers_swept :]
    from repinf_lens.saes.training import SAETrainingConfig

    sweep = layer_sweep(
        tl_model, task, train_rows[: cfg.n_sae_prompts], eval_rows, out_dir=out / "sweep", layers=layers,
        sizes=[(cfg.d_sae, cfg.k)], sae_config=SAETrainingConfig(epochs=cfg.sae_epochs, seed=cfg.seed, device=str(dev)),
        max_train_examples=None, max_eval_examples=None, batch_size=cfg.batch_size,
        metadata={"dataset": cfg.dataset, "adapter_sha256": adapter_sha}, progress=progress,
    )  # fmt: skip
    stage("sae_sweep_s", t)
    sel = sweep.selected
    log(f"[demo] selected SAE {sel['point']} at {sel['hook_name']}")
    sae = load_sae(sweep.sae_path(), model=tl_model, device=dev)
    split = SplitModel(tl_model, sel["hook_name"], sae, task=task)

    # 4. influence of the finetuning examples on a few test questions
    picked, why = select_queries(before["ids"], before["correct"], after["correct"], cfg.n_queries)
    queries = [eval_rows[i] for i in picked]
    t = time.perf_counter()
    att_cfg = AttributionConfig(
        solver=cfg.solver, damping=cfg.damping, max_iter=cfg.cg_iters, hessian_examples=cfg.hessian_examples,
        prefilter_top_k=cfg.prefilter_top_k if cfg.prefilter_top_k and cfg.prefilter_top_k < len(ft_rows) else None,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    result, candidates = run_attribution(
        split, queries, ft_rows, out_dir=out / "attribution", config=att_cfg, progress=progress
    )
    stage("attribution_s", t)

    # 5. necessity / sufficiency ablations against the baseline rankings
    t = time.perf_counter()
    ks = tuple(k for k in cfg.ks if k <= split.d_sae) or (split.d_sae,)
    _, agg, abl_files = run_ablation(
        split, queries, result, out_dir=out / "ablation", ks=ks, train=candidates, n_boot=cfg.n_boot, seed=cfg.seed,
        progress=progress,
    )  # fmt: skip
    stage("ablation_s", t)

    # 6. orthogonality of token embeddings, pre-SAE activations and SAE latents (paper Table 3)
    t = time.perf_counter()
    batch = task.collate(train_rows[: cfg.n_sae_prompts])
    ortho = orthogonality_table(
        tl_model, sae, batch.tokens, attention_mask=batch.attention_mask, max_tokens=cfg.ortho_tokens,
        batch_size=cfg.batch_size, hook_name=split.hook_name,
    )  # fmt: skip
    stage("orthogonality_s", t)

    # 7. the report
    t = time.perf_counter()
    pos = {qid: i for i, qid in enumerate(before["ids"])}
    preds_before = {str(q["id"]): before["predictions"][pos[str(q["id"])]] for q in queries}
    accuracy = [
        {"model": "zero-shot", "accuracy": before["accuracy"], "n_questions": len(eval_rows)},
        {
            "model": f"LoRA adapter {cfg.adapter}" if cfg.adapter else f"LoRA ({len(ft_rows)} examples)",
            "accuracy": after["accuracy"],
            "n_questions": len(eval_rows),
        },
    ]
    sweep_cols = ("point", "hook_name", "sae_explained_variance", "sae_l0", "accuracy_change_no_error",
                  "accuracy_change_with_error")  # fmt: skip
    sweep_rows = [{c: row.get(c) for c in sweep_cols} for row in sweep.table]
    picks = [{"query": str(q["id"]), "why chosen": w} for q, w in zip(queries, why, strict=True)]
    ortho_cols = ("space", "gram_abs", "gram_sq", "share_below", "stable_rank", "n_vectors")
    ortho_rows = [{c: r.get(c) for c in ortho_cols if c in r} for r in ortho]
    report = make_report(
        out / "report.html", split=split, queries=queries, result=result, train=candidates,
        predictions_before=preds_before, ablation_plot=abl_files.get("plot"), sweep_plot=sweep.files.get("plot"),
        tables={"Accuracy": accuracy, "Test questions shown": picks, "Layer sweep": sweep_rows,
                "Orthogonality (paper Table 3)": ortho_rows,
                "Timings (seconds)": [dict(timings)]},
        max_queries=cfg.n_queries, title="repinf_lens demo: which training examples, latents and tokens",
    )  # fmt: skip
    stage("report_s", t)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    summary = {
        "config": cfg.to_dict(),
        "model": str(base_dir),
        "device": str(dev),
        "accuracy_zero_shot": before["accuracy"],
        "accuracy_finetuned": after["accuracy"],
        "n_eval": len(eval_rows),
        "selected_sae": sel["point"],
        "hook_name": split.hook_name,
        "queries": picks,
        "n_candidates": len(candidates),
        "orthogonality": ortho,
        "ablation_rows": len(agg),
        "timings": timings,
        "report": str(report),
    }
    from repinf_lens._shards import write_json_atomic

    write_json_atomic(out / "demo.json", summary)
    write_manifest(out, "demo", cfg.to_dict(), timings=timings, report=str(report))
    log(f"[demo] report: {report}  ({timings['total_s']:.0f} s in all)")
    return DemoResult(out, report, summary)
