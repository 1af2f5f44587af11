"""The main job end to end: ``repinf-lens demo`` / ``make demo``.

On the embedded default model and real OpenBookQA, fully offline, with the assets shipped in the package:

1. the base model and the shipped LoRA finetune (``load_model("smollm2-135m-openbookqa")``, trained by this
   package's ``finetune`` on all 4957 training questions) are evaluated on the first ``n_eval`` test questions;
2. the shipped TopK SAE of the finetuned model (``load_sae(release, sae_id)``) is spliced in at its hook;
3. test questions are picked by the paper's case-study protocol (wrong before finetuning, right after);
4. every one of the 4957 training examples goes through the gradient prefilter, from the shipped sketch index
   (built by :func:`repinf_lens.influence.prefilter.build_sketches` for exactly this split; rebuilt by
   ``python benchmarks/build_assets.py index``), and each question's top candidates are attributed: CG s_test,
   the derivative swap, example, latent and token scores;
5. necessity / sufficiency ablations against the baseline rankings with paired-bootstrap verdicts, the
   orthogonality table, completeness of each score (latent sum vs example score) and the top latents' most
   activating tokens;
6. one self-contained HTML report, with the time and the peak memory (RSS) of every stage.

``retrain=True`` (``--retrain``) redoes what the shipped assets hold: the finetune with the shipped recipe, the
layer sweep and the sketch index (hours on a CPU, see ``docs/results.md``). ``adapter=`` merges a LoRA adapter
trained elsewhere instead of the shipped one (then the SAE and the index are rebuilt for it, as in retrain).

Every stage writes into its own folder under ``out_dir`` and is reused by a rerun with the same settings, so a
rerun after a crash or with another report setting costs only what changed. ``out_dir/demo.json`` records the
settings, the accuracies and the time and peak RSS of every stage.

Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from repinf_lens.errors import SettingsError
from repinf_lens.influence.prefilter import shipped_index_dir, shipped_indexes
from repinf_lens.workflows.config import AttributionConfig, override

__all__ = ["DEFAULT_FINETUNE", "DEFAULT_INDEX", "DEFAULT_SAE_ID", "DEFAULT_SAE_RELEASE", "DemoConfig", "DemoResult",
           "run_demo"]  # fmt: skip

DEFAULT_FINETUNE = "smollm2-135m-openbookqa"
"""The shipped LoRA finetune of the embedded default model (``load_model(DEFAULT_FINETUNE)``)."""
DEFAULT_SAE_RELEASE = "repinf-lens-smollm2-135m-openbookqa"
"""The shipped SAE release of that finetune (``load_sae(DEFAULT_SAE_RELEASE, DEFAULT_SAE_ID)``)."""
DEFAULT_SAE_ID = "blocks.22.hook_resid_post"
"""The demo's SAE: layer 22, where the downstream part (8 blocks + the trimmed unembedding) keeps s_test cheap."""
DEFAULT_INDEX = "smollm2-135m-openbookqa-L22"
"""The shipped gradient-sketch index of all OpenBookQA training examples for the demo's split."""


def _demo_attribution() -> AttributionConfig:
    """The demo's attribution: CG with 5 iterations over 8 Hessian examples, each case-study question's 16 most
    gradient-similar training questions through the shipped index, one question at a time (memory)."""
    return AttributionConfig(
        max_iter=5, hessian_examples=8, prefilter_top_k=16, sketch_dim=512, sketches=DEFAULT_INDEX, batch_size=8,
        query_chunk_size=1, baseline=True,
    )  # fmt: skip


_RENAMED = {"cg_iters": "max_iter", "index": "sketches"}


@dataclass
class DemoConfig:
    """Sizes of the demo's stages. :meth:`quick` is the ``--quick`` preset; the defaults are the full demo.

    ``finetune`` / ``sae_release`` / ``sae_id`` / ``index``: the shipped assets used unless ``retrain``.
    ``retrain``: redo the finetune (``finetune_*`` fields: the shipped recipe), the layer sweep over ``layers``
    (default: the upper two of three evenly spaced middle-half layers) and the sketch index.
    ``adapter``: a peft LoRA adapter folder trained elsewhere, merged instead of the shipped finetune.
    ``n_train``: how many training examples are attributed (``None``: all, through the prefilter).
    ``attribution``: the :class:`~repinf_lens.workflows.config.AttributionConfig` of the attribution stage (the
    same knobs as ``repinf-lens attribute``; its ``batch_size`` is every stage's). Its ``sketches`` (the shipped
    index by default) is used only for the shipped assets and all training questions; otherwise the sketches are
    built. :meth:`quick`, :meth:`build` and :meth:`from_file` also take its fields flat (``max_iter=2``).
    """

    dataset: str = "openbookqa"
    template: str = "plain"
    n_eval: int = 200
    finetune: str = DEFAULT_FINETUNE
    sae_release: str = DEFAULT_SAE_RELEASE
    sae_id: str = DEFAULT_SAE_ID
    retrain: bool = False
    adapter: str | None = None
    n_train: int | None = None
    finetune_epochs: float = 4.0
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 32
    finetune_micro_batch_size: int = 8
    lora_r: int = 16
    layers: tuple[int, ...] | None = None
    n_layers_swept: int = 2
    d_sae: int = 1024
    k: int = 64
    n_sae_prompts: int = 500
    sae_epochs: float = 8.0
    n_queries: int = 3
    attribution: AttributionConfig = field(default_factory=_demo_attribution)
    rankings: tuple[str, ...] = ("influence_eq16", "influence", "activation", "frequency", "random")
    ks: tuple[int, ...] = (10, 25, 50, 100, 200)
    n_boot: int = 1000
    ortho_tokens: int = 2048
    seed: int = 0

    @classmethod
    def build(cls, base: DemoConfig | None = None, **values: Any) -> DemoConfig:
        """``base`` (default: the full demo) with ``values`` replaced; a field of :class:`AttributionConfig`
        given flat (``max_iter=2``) or as ``attribution={...}`` replaces that field of ``attribution``.

        Raises:
            SettingsError: an unknown name (a renamed one, ``cg_iters`` / ``index``, says its new name).
        """
        base = base or cls()
        own = {f.name for f in dataclasses.fields(cls)}
        att_names = {f.name for f in dataclasses.fields(AttributionConfig)}
        renamed = {k: v for k, v in _RENAMED.items() if k in values}
        if renamed:
            raise SettingsError(
                f"Demo settings {sorted(renamed)} were renamed. Fix: use "
                + ", ".join(f"{k} -> {v}" for k, v in renamed.items()) + " (fields of the AttributionConfig)."
            )  # fmt: skip
        unknown = sorted(set(values) - own - att_names)
        if unknown:
            raise SettingsError(
                f"Unknown demo settings {unknown}. Fix: use fields of DemoConfig {sorted(own)} or of "
                f"AttributionConfig {sorted(att_names)}."
            )
        att = values.pop("attribution", None)
        att_values = dict(att) if isinstance(att, Mapping) else {}
        att_values.update({k: values.pop(k) for k in list(values) if k in att_names and k not in own})
        new_att = att if isinstance(att, AttributionConfig) else base.attribution
        for key in ("layers", "ks", "rankings"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return dataclasses.replace(base, attribution=override(new_att, att_values, what="attribution settings"),
                                   **values)  # fmt: skip

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The ``--quick`` preset (about 90 s on 2 CPU cores), with ``overrides`` as in :meth:`build`."""
        preset = cls.build(
            n_eval=60, n_queries=2, ks=(10, 50), n_boot=200, ortho_tokens=1024,
            rankings=("influence_eq16", "influence", "random"), prefilter_top_k=8, max_iter=2, hessian_examples=4,
        )  # fmt: skip
        return cls.build(preset, **overrides)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, quick: bool = False) -> DemoConfig:
        """Read a JSON or YAML file of field overrides (on the quick preset when ``quick``)."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, Mapping):
            raise SettingsError(f"{path} holds a {type(values).__name__}, not a mapping of demo settings.")
        try:
            return cls.quick(**values) if quick else cls.build(**values)
        except SettingsError as err:
            raise SettingsError(f"In {path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and its summary (the content of ``demo.json``)."""

    out_dir: Path
    report: Path
    summary: dict[str, Any] = field(default_factory=dict)


def _completeness_rows(result: Any, k: int = 5) -> list[dict[str, Any]]:
    """Per query, its top-``k`` proponents: example score, latent sum, P(0) (every latent off, error and decoder
    bias kept), the error term, and completeness = latent sum / (score - P(0)) (1 for integrated gradients)."""
    rows = []
    diag = result.diagnostics
    for q, qid in enumerate(result.query_ids):
        top = result.top_examples(q, k)
        for rank, idx, ex_id, score in zip(top["rank"], top["index"], top["id"], top["score"], strict=True):
            lat = float(diag["latent_sum"][q, int(idx)]) if "latent_sum" in diag else float("nan")
            err = float(diag["error_term"][q, int(idx)]) if "error_term" in diag else 0.0
            p0 = float(diag["baseline"][q, int(idx)]) if "baseline" in diag else float("nan")
            rows.append(
                {
                    "query": qid, "rank": int(rank), "example": ex_id, "example score": float(score),
                    "latent sum": lat, "P(0): all latents off": p0, "error term": err,
                    "latent sum / (score - P(0))": lat / (float(score) - p0) if float(score) != p0 else float("nan"),
                    "P(0) / score": p0 / float(score) if score else float("nan"),
                }
            )  # fmt: skip
    return rows


def _verdict_rows(df: Any, ks: tuple[int, ...], n_boot: int, seed: int, reference: str) -> list[dict[str, Any]]:
    """The paired-bootstrap verdicts of ``reference`` (the first ranking) against each other ranking (one row per
    mode, metric, baseline and k)."""
    from repinf_lens.analysis.faithfulness import compare_rankings

    comp = compare_rankings(df, reference=reference, n_boot=n_boot, seed=seed)
    keep = comp[comp["error_term"] & comp["k"].isin(list(ks))]
    cols = ("mode", "metric", "k", "baseline", "reference_mean", "baseline_mean", "ci_low", "ci_high", "verdict")
    return [{c: r[c] for c in cols} for r in keep.to_dict(orient="records")]


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
        out_dir: output folder (``eval_*.json``, ``attribution/``, ``ablation/``, ``report.html``, ``demo.json``,
            ``manifest.json``; with ``retrain`` also ``finetune/``, ``sweep/``).
        config: :class:`DemoConfig` (default: the full demo; ``DemoConfig.quick()`` for the quick one).
        model: ``None`` for the embedded default base model, or a local HF folder (then the shipped assets do
            not apply: pass ``retrain=True`` or an ``adapter``).
        train, test: MCQA rows to use instead of ``config.dataset``'s train / test splits (then the shipped
            index does not apply and the sketches are built).
        offline: never try the Hugging Face hub for data (the default; the embedded data are real). The shipped
            assets always use the embedded copy they were built from.
        device: ``cpu``, ``cuda`` ... (default: cuda when available).
        log: where the one-line stage summaries go.

    Raises:
        SettingsError: the shipped assets cannot serve these settings (another base model, dataset or template
            without ``retrain``/``adapter``), before any work is done.
    """
    from transformers import AutoTokenizer

    from repinf_lens._io import write_json_atomic, write_manifest
    from repinf_lens._resources import StageMeter
    from repinf_lens.analysis.case_studies import (
        cached_predictions,
        prediction_record,
        select_queries,
        top_activating_tokens,
    )
    from repinf_lens.analysis.orthogonality import orthogonality_table
    from repinf_lens.data import load_mcqa
    from repinf_lens.influence.attributor import as_rows
    from repinf_lens.models import default_model_dir, is_default_model, load_model, resolve_device
    from repinf_lens.saes.loading import load_sae
    from repinf_lens.split import SplitModel
    from repinf_lens.task import MultipleChoiceTask
    from repinf_lens.workflows.ablation import run_ablation
    from repinf_lens.workflows.attribution import run_attribution
    from repinf_lens.workflows.report import make_report

    cfg = config or DemoConfig()
    cfg.attribution.require_latents("run_demo")
    bs = cfg.attribution.batch_size
    rebuild = cfg.retrain or cfg.adapter is not None
    if not rebuild:
        problems = []
        if model is not None and not is_default_model(model):
            problems.append(f"model={str(model)!r} is not the embedded default the shipped finetune was trained on")
        if cfg.dataset != "openbookqa" or cfg.template != "plain":
            problems.append(f"dataset/template {cfg.dataset}/{cfg.template} differ from the shipped openbookqa/plain")
        if problems:
            raise SettingsError(
                "The demo's shipped finetune, SAE and index do not fit these settings: " + "; ".join(problems)
                + ". Fix: pass --retrain (DemoConfig(retrain=True)) to train them for your settings, or --adapter DIR."
            )  # fmt: skip
        offline = True  # the shipped finetune, SAE and index were built from the embedded copy of the data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    meter = StageMeter()
    t_start = time.perf_counter()

    def done(name: str) -> None:
        s = meter.stages[name]
        log(f"[demo] {name}: {s['seconds']:.1f} s, peak RSS {s['peak_rss_mb'] / 1024:.1f} GB")

    with meter.stage("data"):
        train_rows = as_rows(train if train is not None else load_mcqa(cfg.dataset, "train", offline=offline),
                             "train")  # fmt: skip
        test_rows = as_rows(test if test is not None else load_mcqa(cfg.dataset, "test", offline=offline), "test")
        attributed = train_rows if cfg.n_train is None else train_rows[: cfg.n_train]
        eval_rows = test_rows[: cfg.n_eval]
        base_dir = default_model_dir() if model is None or is_default_model(model) else Path(model)
        task = MultipleChoiceTask(AutoTokenizer.from_pretrained(str(base_dir)), max_length=n_ctx,
                                  template=cfg.template)  # fmt: skip
        key = {"model": str(base_dir), "template": cfg.template, "ids": [str(r["id"]) for r in eval_rows]}
    done("data")

    # 1. zero-shot accuracy (per question, for the case-study choice)
    with meter.stage("zero_shot_eval"):
        before = cached_predictions(
            out / "eval_base.json", key,
            lambda: prediction_record(load_model(base_dir, device=dev, n_ctx=n_ctx), task, eval_rows,
                                      batch_size=bs, progress=progress),
        )  # fmt: skip
    done("zero_shot_eval")

    # 2. the finetuned model: the shipped adapter (merged once, cached), an adapter given, or a new finetune
    provenance: dict[str, Any] = {}
    with meter.stage("finetuned_model"):
        if cfg.adapter is not None:
            from repinf_lens.workflows.finetuning import merge_adapter

            tl_model = merge_adapter(model, cfg.adapter, out / "adapter_merge", device=dev, n_ctx=n_ctx)
            adapter_sha = json.loads((out / "adapter_merge" / "merge.json").read_text())["adapter_sha256"]
            ft_name = f"LoRA adapter {cfg.adapter}"
        elif cfg.retrain:
            from repinf_lens.workflows.finetuning import finetune

            ft = finetune(
                model, task, train_rows, out_dir=out / "finetune", device=dev, n_ctx=n_ctx, progress=progress,
                epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.finetune_batch_size,
                micro_batch_size=cfg.finetune_micro_batch_size, lora_r=cfg.lora_r, seed=cfg.seed,
            )  # fmt: skip
            tl_model, adapter_sha = ft.model, ft.metadata["adapter_sha256"]
            ft_name = f"LoRA retrained here ({len(train_rows)} examples, {cfg.finetune_epochs:g} epochs)"
        else:
            from repinf_lens.models import shipped_finetune_dir

            folder = shipped_finetune_dir(cfg.finetune)
            provenance = json.loads((folder / "provenance.json").read_text())
            tl_model = load_model(cfg.finetune, device=dev, n_ctx=n_ctx)
            adapter_sha = provenance["adapter_sha256"]
            ft_name = f"shipped LoRA {cfg.finetune!r}"
    done("finetuned_model")
    with meter.stage("finetuned_eval"):
        after = cached_predictions(
            out / "eval_finetuned.json", {**key, "adapter_sha256": adapter_sha},
            lambda: prediction_record(tl_model, task, eval_rows, batch_size=bs, progress=progress),
        )  # fmt: skip
    done("finetuned_eval")
    log(
        f"[demo] accuracy on {len(eval_rows)} {cfg.dataset} test questions: "
        f"{100 * before['accuracy']:.1f} % zero-shot -> {100 * after['accuracy']:.1f} % after LoRA"
    )

    # 3. the SAE: the shipped one, or a layer sweep on the finetuned model
    sweep = None
    with meter.stage("sae"):
        if rebuild:
            from repinf_lens.saes.sweep import layer_sweep, middle_layers
            from repinf_lens.saes.training import SAETrainingConfig

            n_layers = int(tl_model.cfg.n_layers)
            layers = list(cfg.layers) if cfg.layers is not None else middle_layers(n_layers, 3)[-cfg.n_layers_swept :]
            sweep = layer_sweep(
                tl_model, task, train_rows[: cfg.n_sae_prompts], eval_rows, out_dir=out / "sweep", layers=layers,
                sizes=[(cfg.d_sae, cfg.k)],
                sae_config=SAETrainingConfig(epochs=cfg.sae_epochs, seed=cfg.seed, device=str(dev)),
                max_train_examples=None, max_eval_examples=None, batch_size=bs,
                metadata={"dataset": cfg.dataset, "adapter_sha256": adapter_sha}, progress=progress,
            )  # fmt: skip
            sae = load_sae(sweep.sae_path(), model=tl_model, device=dev)
            sae_name = f"{sweep.selected['point']} (sweep)"
        else:
            sae = load_sae(cfg.sae_release, cfg.sae_id, model=tl_model, device=dev)
            sae_name = f"{cfg.sae_release}/{cfg.sae_id}"
        split = SplitModel(tl_model, sae.cfg.metadata.hook_name, sae, task=task)
    done("sae")
    log(f"[demo] SAE {sae_name} at {split.hook_name}")

    # 4. influence of the training examples (all of them through the prefilter) on the case-study questions
    picked, why = select_queries(before["ids"], before["correct"], after["correct"], cfg.n_queries)
    queries = [eval_rows[i] for i in picked]
    att_cfg = cfg.attribution
    top_k = att_cfg.prefilter_top_k
    index = att_cfg.sketches if not rebuild and train is None and cfg.n_train is None else None
    if index is not None and index in shipped_indexes() and not (shipped_index_dir(index) / "manifest.json").exists():
        log(f"[demo] the shipped index {index!r} is missing from this installation: building the sketches")
        index = None
    att_cfg = override(
        att_cfg,
        {"sketches": index, "prefilter_top_k": top_k if top_k is not None and top_k < len(attributed) else None},
    )
    with meter.stage("attribution"):
        result, candidates = run_attribution(
            split, queries, attributed, out_dir=out / "attribution", config=att_cfg, progress=progress,
        )  # fmt: skip
    done("attribution")

    # 5. necessity / sufficiency ablations against the baseline rankings, with paired-bootstrap verdicts
    with meter.stage("ablation"):
        ks = tuple(k for k in cfg.ks if k <= split.d_sae) or (split.d_sae,)
        df, agg, abl_files = run_ablation(
            split, queries, result, out_dir=out / "ablation", rankings=list(cfg.rankings), ks=ks, train=candidates,
            n_boot=cfg.n_boot, seed=cfg.seed, progress=progress,
        )  # fmt: skip
        verdicts = _verdict_rows(df, ks, cfg.n_boot, cfg.seed, reference=cfg.rankings[0])
    done("ablation")

    # 6. orthogonality of token embeddings, pre-SAE activations and SAE latents (paper Table 3)
    with meter.stage("orthogonality"):
        batch = task.collate(train_rows[: cfg.n_sae_prompts])
        ortho = orthogonality_table(
            tl_model, sae, batch.tokens, attention_mask=batch.attention_mask, max_tokens=cfg.ortho_tokens,
            batch_size=bs, hook_name=split.hook_name,
        )  # fmt: skip
    done("orthogonality")

    # 7. the report
    with meter.stage("report"):
        pos = {qid: i for i, qid in enumerate(before["ids"])}
        preds_before = {str(q["id"]): before["predictions"][pos[str(q["id"])]] for q in queries}
        accuracy = [
            {"model": "zero-shot (base)", "accuracy": before["accuracy"], "n_questions": len(eval_rows)},
            {"model": ft_name, "accuracy": after["accuracy"], "n_questions": len(eval_rows)},
        ]
        shipped_test = provenance.get("test") or {}
        if shipped_test:
            accuracy.append({"model": "shipped LoRA, measured at export (provenance.json)",
                             "accuracy": shipped_test.get("accuracy_after"), "n_questions": shipped_test.get("n"),
                             "zero-shot": shipped_test.get("accuracy_before")})  # fmt: skip
        picks = [{"query": str(q["id"]), "why chosen": w} for q, w in zip(queries, why, strict=True)]
        latent_tokens: dict[str, list[dict[str, Any]]] = {}
        for q, qid in enumerate(result.query_ids):
            lat = [int(j) for j in result.top_latents(q, 5)["latent"]]
            acts = top_activating_tokens(split, candidates, lat, k=3, batch_size=bs)
            latent_tokens[qid] = [
                {"latent": j, "top-activating tokens among the candidates":
                 " | ".join(f"{a['context']} ({a['activation']:.2f}, {a['id']})" for a in acts[j]) or "(never fires)"}
                for j in lat
            ]  # fmt: skip
        completeness = _completeness_rows(result)
        ortho_cols = ("space", "gram_abs", "gram_sq", "share_below", "stable_rank", "n_vectors")
        ortho_rows = [{c: r.get(c) for c in ortho_cols if c in r} for r in ortho]
        tables: dict[str, Any] = {"Accuracy": accuracy, "Test questions shown": picks}
        for qid, rows in latent_tokens.items():
            tables[f"What the top latents of {qid} respond to"] = rows
        tables["Completeness: latent sum vs example score (top 5 proponents per question)"] = completeness
        tables[
            f"Ablation verdicts: {cfg.rankings[0]} vs each other ranking (paired bootstrap over the questions, error "
            "term held; influence_eq16 = most negative mean IFR first, the end the answer rests on: docs/method.md)"
        ] = verdicts
        if sweep is not None:
            sweep_cols = ("point", "hook_name", "sae_explained_variance", "sae_l0", "accuracy_change_no_error",
                          "accuracy_change_with_error")  # fmt: skip
            tables["Layer sweep"] = [{c: row.get(c) for c in sweep_cols} for row in sweep.table]
        tables["Orthogonality (paper Table 3)"] = ortho_rows
        tables["Time and peak memory per stage"] = meter.rows()
        report = make_report(
            out / "report.html", split=split, queries=queries, result=result, train=candidates,
            predictions_before=preds_before, ablation_plot=abl_files.get("plot"),
            sweep_plot=None if sweep is None else sweep.files.get("plot"), tables=tables, max_queries=cfg.n_queries,
            title="repinf_lens demo: which training examples, latents and tokens",
        )  # fmt: skip
    done("report")
    total = round(time.perf_counter() - t_start, 1)
    timings = {f"{k}_s": v["seconds"] for k, v in meter.stages.items()} | {"total_s": total}
    summary = {
        "config": cfg.to_dict(),
        "model": str(base_dir),
        "finetuned": ft_name,
        "device": str(dev),
        "accuracy_zero_shot": before["accuracy"],
        "accuracy_finetuned": after["accuracy"],
        "n_eval": len(eval_rows),
        "sae": sae_name,
        "hook_name": split.hook_name,
        "queries": picks,
        "n_train": len(attributed),
        "n_candidates": len(candidates),
        "prefilter_index": index,
        "orthogonality": ortho,
        "completeness": completeness,
        "verdicts": verdicts,
        "ablation_rows": len(agg),
        "stages": meter.stages,
        "peak_rss_mb": meter.peak_rss_mb,
        "timings": timings,
        "report": str(report),
    }
    write_json_atomic(out / "demo.json", summary)
    write_manifest(out, "demo", cfg.to_dict(), timings=timings, stages=meter.stages, report=str(report))
    log(f"[demo] report: {report}  ({total:.0f} s in all, peak RSS {meter.peak_rss_mb / 1024:.1f} GB)")
    return DemoResult(out, report, summary)
