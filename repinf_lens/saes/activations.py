"""Activations of a HookedTransformer at one or more hook points over a task's prompts (the SAEs' training data).

One forward pass (stopped after the deepest requested layer) serves every hook of a layer sweep. Only real
prompt tokens are kept: right padding is dropped via the task batch's attention mask, and the BOS token (an
outlier with a huge norm in most models) is dropped when ``exclude_bos``. Results are saved as safetensors so
the sweep and later sessions reuse them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._io import as_rows, atomic_file, write_json_atomic
from repinf_lens.split import HookNameError
from repinf_lens.task import Task, check_fits

__all__ = ["ActivationStore", "collect_activations", "hook_layer"]


def hook_layer(hook_name: str) -> int | None:
    """The block index of a ``blocks.L.*`` hook name (``None`` for hooks outside the blocks)."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


@dataclass
class ActivationStore:
    """Activations at several hooks on the same tokens, flattened over (example, position).

    ``acts[hook]`` is ``[n_tokens, d_in]`` (``hook_z`` flattened to ``n_heads * d_head``, as SAELens does);
    ``token_ids``, ``example_index`` and ``position`` say which token each row is.
    """

    acts: dict[str, Float[Tensor, "n_tokens d_in"]]
    token_ids: Int[Tensor, " n_tokens"]
    example_index: Int[Tensor, " n_tokens"]
    position: Int[Tensor, " n_tokens"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``activations.safetensors`` + ``activations.json`` into ``folder`` (atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"acts.{h}": a.contiguous() for h, a in self.acts.items()}
        tensors.update(token_ids=self.token_ids, example_index=self.example_index, position=self.position)
        with atomic_file(folder / "activations.safetensors") as tmp:  # a unique temporary file per process
            save_file(tensors, tmp)
        write_json_atomic(folder / "activations.json", self.meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ActivationStore:
        from safetensors.torch import load_file

        folder = Path(folder)
        t = load_file(str(folder / "activations.safetensors"))
        acts = {k[len("acts.") :]: v for k, v in t.items() if k.startswith("acts.")}
        meta = json.loads((folder / "activations.json").read_text())
        return cls(acts, t["token_ids"], t["example_index"], t["position"], meta)


@torch.no_grad()
def collect_activations(
    model: Any,
    task: Task,
    dataset: Any,
    hook_names: str | list[str],
    *,
    batch_size: int = 8,
    max_examples: int | None = None,
    exclude_bos: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ActivationStore:
    """Run ``model`` over the task prompts of ``dataset`` and keep the activations at ``hook_names``.

    Args:
        model: a HookedTransformer.
        task: the task that formats and tokenises the examples (its prompts are what the SAE will see).
        dataset: examples (``datasets.Dataset`` or list of dicts).
        hook_names: one hook name or several (all collected in one pass, stopped after the deepest block).
        max_examples: only the first N examples.
        exclude_bos: drop position 0 when it is the tokenizer's BOS token.
        dtype: storage dtype of the activations (on the CPU).
    """
    hooks = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not hooks:
        raise ValueError("No hook names given. Fix: pass at least one, e.g. 'blocks.14.hook_resid_post'.")
    for h in hooks:
        if h not in model.hook_dict:
            import difflib

            close = difflib.get_close_matches(h, list(model.hook_dict), n=5, cutoff=0.5)
            raise HookNameError(f"Unknown hook name {h!r}. Close valid names: {close or list(model.hook_dict)[:8]}.")
    rows = as_rows(dataset)
    if max_examples is not None:
        rows = rows[:max_examples]
    if not rows:
        raise ValueError("The dataset is empty. Fix: pass at least one example.")
    layers = [hook_layer(h) for h in hooks]
    block_layers = [layer for layer in layers if layer is not None]
    stop = None if len(block_layers) < len(layers) else max(block_layers) + 1
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    tok_l, ex_l, pos_l = [], [], []
    n_batches = (len(rows) + batch_size - 1) // batch_size
    for b in tqdm(range(n_batches), desc="activations", disable=not progress):
        part = rows[b * batch_size : (b + 1) * batch_size]
        batch = task.collate(part)
        tokens = batch.tokens.to(model.cfg.device)
        check_fits(model, tokens)
        _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop)
        keep = batch.attention_mask.bool().clone()
        if exclude_bos and bos is not None:
            keep[:, 0] &= batch.tokens[:, 0] != bos
        for h in hooks:
            a = cache[h].detach().to("cpu")
            a = a.reshape(*a.shape[:2], -1)  # hook_z: [B, T, H, d_head] -> [B, T, H * d_head]
            out[h].append(a[keep].to(dtype))
        idx = keep.nonzero()
        tok_l.append(batch.tokens[keep])
        ex_l.append(idx[:, 0] + b * batch_size)
        pos_l.append(idx[:, 1])
    meta = {
        "hooks": hooks,
        "n_examples": len(rows),
        "exclude_bos": exclude_bos,
        "model": str(getattr(model.cfg, "model_name", "unknown")),
        "context_size": int(max(int(p.max()) for p in pos_l) + 1),
    }
    return ActivationStore(
        {h: torch.cat(v) for h, v in out.items()}, torch.cat(tok_l), torch.cat(ex_l), torch.cat(pos_l), meta
    )
