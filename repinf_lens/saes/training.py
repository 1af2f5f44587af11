"""Train SAEs in SAELens format with SAELens' own trainer, on cached task activations.

Step 2 of the paper's pipeline (its Section 5.2, Appendix B.2): TopK SAEs on the finetuned model's activations
at a hook point, over the task's prompts. Any SAELens training architecture works by name (``"topk"``,
``"batchtopk"``, ``"standard"``, ``"jumprelu"``, ``"gated"``, ...): the config is built through SAELens'
registry and trained by :class:`sae_lens.SAETrainer`, fed from an :class:`ActivationStore`.

Output folder (``out_dir``)::

    cfg.json, sae_weights.safetensors   the inference SAE (``save_inference_model``), loads with
                                        ``sae_lens.SAE.load_from_disk``
    training.json                       config, statistics (L0, explained variance, dead latents), timings

A finished folder whose ``training.json`` matches the requested config and data is reused, never retrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from repinf_lens._io import atomic_dir
from repinf_lens.saes.activations import ActivationStore

__all__ = ["SAETrainingConfig", "TrainedSAE", "sae_stats", "train_sae"]


@dataclass
class SAETrainingConfig:
    """Every knob of :func:`train_sae`, saved in ``training.json``.

    ``architecture`` names a SAELens training class (its registry); ``k`` is used by TopK-style architectures,
    ``extra`` passes any other field of that architecture's training config (``l1_coefficient``,
    ``aux_loss_coefficient``, ...). ``epochs`` counts passes over the cached tokens.
    """

    architecture: str = "topk"
    d_sae: int = 2048
    k: int | None = 64
    lr: float = 1e-3
    batch_size_tokens: int = 1024
    epochs: float = 8.0
    lr_warm_up_steps: int = 0
    lr_decay_fraction: float = 0.2
    normalize_activations: str = "none"
    eval_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainedSAE:
    """What :func:`train_sae` returns: the inference SAE, its folder and its statistics."""

    sae: Any
    path: Path
    stats: dict[str, Any]
    reused: bool = False


def _data_hash(x: Tensor) -> str:
    """sha256 of ALL activations (dtype, shape, every byte): a subsample would let two activation sets that differ
    elsewhere (another model, another layer's data) reuse each other's SAE."""
    from repinf_lens._fingerprint import tensor_digest

    return "v2:" + tensor_digest(x, cache=False)[:32]


@contextlib.contextmanager
def _quiet_trainer(quiet: bool) -> Iterator[None]:
    """Hide SAELens' own training bar when ``quiet`` (it has no switch for it)."""
    from sae_lens.training import sae_trainer

    original = sae_trainer.tqdm
    if quiet:
        sae_trainer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        sae_trainer.tqdm = original


def _batches(x: Tensor, batch: int, seed: int) -> Iterator[Tensor]:
    """Endless shuffled batches of rows (a new permutation per pass, seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - batch + 1, batch):
            yield x[perm[i : i + batch]]


@torch.no_grad()
def sae_stats(sae: Any, acts: Float[Tensor, "n d_in"], *, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction statistics of ``sae`` on activations: L0, explained variance, MSE, dead latents.

    ``explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (SAELens' definition over the
    whole set); a latent is dead when it fires on none of the rows.
    """
    dev = next(sae.parameters()).device
    l0, sse, n = 0.0, 0.0, 0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    mean = acts.double().mean(0)
    sst = float(((acts.double() - mean) ** 2).sum())
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size].to(dev, torch.float32)
        z = sae.encode(x)
        x_hat = sae.decode(z)
        l0 += float((z != 0).sum())
        sse += float(((x - x_hat) ** 2).double().sum())
        fired |= (z != 0).any(0).cpu()
        n += x.shape[0]
    return {
        "l0": l0 / n,
        "explained_variance": 1.0 - sse / max(sst, 1e-30),
        "mse": sse / (n * acts.shape[1]),
        "dead_latents": int((~fired).sum()),
        "dead_fraction": float((~fired).float().mean()),
        "n_tokens": n,
    }


def train_sae(
    activations: ActivationStore | Float[Tensor, "n d_in"],
    hook_name: str,
    *,
    out_dir: str | os.PathLike,
    config: SAETrainingConfig | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> TrainedSAE:
    """Train one SAE on the activations at ``hook_name`` with SAELens' ``SAETrainer``; save it in SAELens format.

    Args:
        activations: an :class:`ActivationStore` (``activations.acts[hook_name]`` is used) or a tensor.
        hook_name: the hook the SAE reads and writes (stored in ``cfg.metadata.hook_name``).
        out_dir: where the SAE is written (see the module docstring); reused when already trained.
        config: :class:`SAETrainingConfig`; keyword ``overrides`` replace single fields (``d_sae=512``).
        metadata: extra SAE metadata (model name, adapter hash, dataset, ...) stored in ``cfg.json``.
        progress: show SAELens' training bar.

    The last ``eval_fraction`` of tokens (by example, so no prompt is split) is held out for the statistics.
    """
    from sae_lens import SAE, SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.saes.sae import SAEMetadata

    cfg = dataclasses.replace(config) if config is not None else SAETrainingConfig()  # never mutate the caller's
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"Unknown SAE training option {key!r}. Valid: {sorted(cfg.to_dict())}.")
        setattr(cfg, key, value)
    if cfg.architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"Unknown SAE architecture {cfg.architecture!r}. Fix: use one of SAELens' training architectures: "
            f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}."
        )
    if isinstance(activations, ActivationStore):
        if hook_name not in activations.acts:
            raise KeyError(f"No activations for {hook_name!r}; the store has {sorted(activations.acts)}.")
        x = activations.acts[hook_name]
        ex = activations.example_index
        store_meta = activations.meta
    else:
        x, ex, store_meta = activations, torch.arange(activations.shape[0]), {}
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected activations of shape [n_tokens, d_in] with n_tokens > 0, got {tuple(x.shape)}.")
    n_ex = int(ex.max()) + 1
    cut = n_ex - max(1, int(round(cfg.eval_fraction * n_ex))) if n_ex > 1 and cfg.eval_fraction > 0 else n_ex
    train_x, eval_x = x[ex < cut], x[ex >= cut]
    if eval_x.shape[0] == 0:
        eval_x = train_x
    if train_x.shape[0] < cfg.batch_size_tokens:
        raise ValueError(
            f"Only {train_x.shape[0]} training tokens for batches of {cfg.batch_size_tokens}. "
            "Fix: collect activations on more examples or lower batch_size_tokens."
        )

    out = Path(out_dir)
    fingerprint = {"config": cfg.to_dict(), "hook_name": hook_name, "data": _data_hash(x)}
    record_path = out / "training.json"
    if record_path.exists() and (out / "cfg.json").exists():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fingerprint:
            sae = SAE.load_from_disk(str(out), device=cfg.device)
            return TrainedSAE(sae, out, record["stats"], reused=True)

    sae_cls, cfg_cls = SAE_TRAINING_CLASS_REGISTRY[cfg.architecture]
    meta = SAEMetadata(
        hook_name=hook_name,
        model_name=store_meta.get("model"),
        context_size=store_meta.get("context_size"),
        prepend_bos=None,
        **(metadata or {}),
    )
    sae_kwargs: dict[str, Any] = dict(
        d_in=int(x.shape[1]),
        d_sae=cfg.d_sae,
        dtype="float32",
        device=cfg.device,
        normalize_activations=cfg.normalize_activations,
        metadata=meta,
        **cfg.extra,
    )
    if hook_name.endswith("hook_z"):
        sae_kwargs["reshape_activations"] = "hook_z"
    if cfg.k is not None and "k" in {f.name for f in cfg_cls.__dataclass_fields__.values()}:
        sae_kwargs["k"] = cfg.k
    torch.manual_seed(cfg.seed)
    sae = sae_cls(cfg_cls(**sae_kwargs))
    total = int(cfg.epochs * train_x.shape[0]) // cfg.batch_size_tokens * cfg.batch_size_tokens
    steps = total // cfg.batch_size_tokens
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=cfg.batch_size_tokens,
        lr=cfg.lr,
        lr_end=0.0 if cfg.lr_decay_fraction > 0 else None,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(cfg.lr_decay_fraction * steps),
        device=cfg.device,
        dead_feature_window=max(1, steps // 4),
        feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=min(100, steps),
    )
    provider = (b.to(cfg.device) for b in _batches(train_x, cfg.batch_size_tokens, cfg.seed))
    t0 = time.perf_counter()
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    with _quiet_trainer(not progress):
        trained = trainer.fit()
    train_s = time.perf_counter() - t0

    with atomic_dir(out) as tmp:
        trained.save_inference_model(tmp)
        inference = SAE.load_from_disk(str(tmp), device=cfg.device)
        stats = sae_stats(inference, eval_x)
        stats.update(train_s=round(train_s, 1), steps=steps, n_train_tokens=int(train_x.shape[0]))
        record = {"fingerprint": fingerprint, "stats": stats, "hook_name": hook_name, "activations": store_meta}
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
    sae = SAE.load_from_disk(str(out), device=cfg.device)
    return TrainedSAE(sae, out, stats)
