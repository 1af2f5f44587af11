"""K-FAC and EK-FAC inverse-Hessian solvers on TransformerLens hook points (Kronfluence's strategies, on TL models).

Kronfluence tracks ``nn.Linear`` modules; a ``HookedTransformer`` keeps its linear maps as raw einsum parameters
(``W_Q [n_heads, d_model, d_head]``, ``W_O [n_heads, d_head, d_model]``, ``W_in [d_model, d_mlp]``, ``W_U``, ...).
:func:`factor_blocks` maps every parameter of theta2 to a curvature block, reading the input activation ``a`` and
the output gradient ``g`` of each linear map at TransformerLens modules and hook points:

==================================  ===========================================  ==================================
theta2 parameter                    input activation ``a``                       output (its gradient ``g``)
==================================  ===========================================  ==================================
``blocks.L.attn.W_Q`` (``b_Q``)     ``query_input`` of ``blocks.L.attn``         ``blocks.L.attn.hook_q``
``blocks.L.attn.W_K/_W_K`` (bias)   ``key_input`` of ``blocks.L.attn``           ``blocks.L.attn.hook_k``
``blocks.L.attn.W_V/_W_V`` (bias)   ``value_input`` of ``blocks.L.attn``         ``blocks.L.attn.hook_v``
``blocks.L.attn.W_O`` (``b_O``)     ``blocks.L.attn.hook_z`` (heads x d_head)    output of ``blocks.L.attn``
``blocks.L.mlp.W_in`` (``b_in``)    input of ``blocks.L.mlp``                    ``blocks.L.mlp.hook_pre``
gated: ``W_gate`` / ``W_in``        input of ``blocks.L.mlp``                    ``hook_pre`` / ``hook_pre_linear``
gated: ``b_in`` (added after)       the constant 1                               ``blocks.L.mlp.hook_post``
``blocks.L.mlp.W_out`` (``b_out``)  ``blocks.L.mlp.hook_post``                   output of ``blocks.L.mlp``
``unembed.W_U`` (``b_U``)           ``unembed.hook_in`` (the loss positions)     the logits theta2 keeps
==================================  ===========================================  ==================================

The inputs of the attention and MLP maps are the arguments their module is called with (a forward pre-hook),
which is the output of ``ln1`` / ``ln2`` for pre-norm models (``ln1.hook_normalized`` is the activation BEFORE the
norm's weight and bias, so it is not the input of ``W_Q``) and the raw residual for post-norm ones (OLMo 2); the
outputs are the module's own output, before any post-attention / post-MLP norm (Gemma 2). Grouped-query attention:
``_W_K`` / ``_W_V`` are maps to ``n_key_value_heads x d_head``; with ``ungroup_grouped_query_attention`` the
gradients of the repeated heads are summed onto their key/value head. ``unembed.W_U`` is the split's theta2 entry:
the task's loss columns only when the split trims it (``trim_unembed``), whose gradient is read at those columns
of the logits (through the soft cap, when the model has one). On the first Hessian batch every map is checked:
its output must equal ``a @ W (+ b)`` at the captured activations, else :class:`FactorMappingError` names it.

Biases in theta2 enter through a homogeneous coordinate (``[a, 1]``); a bias whose weight is not in theta2 is a
block with the constant input 1. Parameters that are not linear maps get a DIAGONAL block, the Fisher diagonal
``D = (1/N) sum_n (grad_theta l_n)^2`` of the same pseudo-gradients (never damping only: with a small damping an
uncurved block would dominate s_test): LayerNorm / RMSNorm weights and biases (``ln1.w``, ``ln_final.w``, ...) from
the captured ``hook_normalized`` and the gradient at the norm's output (exact per-example gradients, no extra
pass); anything else from per-example autograd (one backward per example; none in the supported architectures).
The fitted factors' metadata lists every block with its kind and rule.

Normalisation (the package's loss is the MEAN over examples of the per-example loss l_n; the solvers approximate
``(H + damping I)^-1`` of that mean): for a map ``out = W a`` seen at positions t of example n,

* ``A = (1/M) sum_{n,t} a a^T``, M = the number of (example, position) pairs it saw whose output can reach the
  loss: real tokens (``attention_mask``; at the loss positions, ``target_mask`` when the batch has one) where
  ``g_{n,t}`` is not identically zero. Kronfluence averages over every real token; with the multiple-choice loss
  at ONE position, the last block's MLP, ``W_O`` and ``W_Q`` see the loss only there, and averaging ``A`` over
  the whole prompt (where those maps' ``g`` is exactly 0) weakens K-FAC markedly (measured on tiny models:
  cosine with CG's s_test 0.30 -> 0.72 for the last MLP at damping 0.01). Positions with ``g = 0`` add nothing
  to the Fisher, so leaving them out of ``A`` is the same approximation on the positions that matter;
* ``G = (1/N) sum_n sum_t g g^T`` with ``g = d l_n / d out_{n,t}`` (pseudo-gradients), N = the number of examples;

so ``G (x) A`` approximates ``(1/N) sum_n E_y[vec(dW_n) vec(dW_n)^T]``, the Fisher (= Gauss-Newton for the
softmax cross-entropy) of the mean loss, with ``dW_n = sum_t g_t a_t^T`` the per-example gradient; it is exact when
every example has one position with the same ``a``. K-FAC preconditions the gradient ``V`` of a map (viewed as
``[out, in]``) in the Kronecker eigenbasis, ``Q_G [(Q_G^T V Q_A) / (lambda_G lambda_A^T + damping)] Q_A^T``
(``= (G (x) A + damping I)^-1 vec V``); EK-FAC replaces ``lambda_G lambda_A^T`` by
``Lambda = (1/N) sum_n (Q_G^T dW_n Q_A)^2`` (George et al. 2018), the exact diagonal of that Fisher in the
eigenbasis (it keeps its trace). Kronfluence divides G by the number of tokens and sums the loss over examples;
dividing by the number of examples instead puts every block on the scale of the Hessian CG / LiSSA / Explicit use,
so ``damping`` is the same lambda for every solver.

Pseudo-gradients: ``fisher="true"`` (default, as Kronfluence) samples the labels from the model's own distribution,
with a CPU generator seeded by ``(seed, batch index)``: :class:`~repinf_lens.task.MultipleChoiceTask` draws
``y ~ softmax(option_logits)``; :class:`~repinf_lens.task.CompletionTask` draws every target token from the
next-token distribution and scales the example's loss by ``sqrt(#targets)``, so that the expectation is the
Gauss-Newton of the per-example MEAN over target tokens; another task may provide
``sample_labels(logits, batch, generator) -> batch``. ``fisher="expected"`` takes that expectation in closed form
instead of sampling it: per example one pseudo-gradient per eigen-direction ``sqrt(e_k) v_k`` of its loss's Hessian in
the logits it reads (:func:`~repinf_lens.curvature.hvp.gauss_newton_directions`: 3 for four answer options), so G
and Lambda sum ``J^T H_n J`` exactly (the Gauss-Newton Woodbury and ``CG(gauss_newton=True)`` use), with no
sampling noise and no seed; it costs one backward per direction, and is refused for a loss over the full
vocabulary. ``fisher="empirical"`` uses the rows' own labels.

Persistence: the factors are fitted ONCE per (split fingerprint, Hessian rows, fisher, seed, batch size, shard
size, dtype) in ``factor_dir`` (default ``$REPINF_LENS_CACHE/kfac_factors/<fingerprint hash>``): a
``manifest.json`` (:func:`repinf_lens._shards.open_manifest`; a folder of other inputs is refused), the running
sums checkpointed atomically every ``shard_batches`` batches (a rerun after a kill resumes after the last finished
shard, with bitwise-equal results), then ``factors.safetensors`` (A, G, their eigendecompositions, the diagonal
blocks) and, for EK-FAC, ``lambda.safetensors``; every file carries a content sha256 and a JSON header. K-FAC and
EK-FAC share a folder (EK-FAC adds the correction pass to K-FAC's factors); later fits read the files back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._cache import cache_dir
from repinf_lens._fingerprint import state_digest
from repinf_lens._io import atomic_file, write_json_atomic
from repinf_lens._shards import (
    CONTENT_KEY,
    ManifestMismatchError,
    diff_fields,
    discard_corrupt,
    fingerprint_hash,
    open_manifest,
    read_verified,
    write_shard,
)
from repinf_lens.curvature.hvp import gauss_newton_directions
from repinf_lens.curvature.solvers import FittedSolver, HVPFn, PrepareFn, SolveInfo, register_solver
from repinf_lens.errors import RepinfLensError, SettingsError, check_choice, check_float, check_int
from repinf_lens.models.hooked import logit_softcap
from repinf_lens.split import Params, SplitInputs, SplitModel
from repinf_lens.task import CompletionTask, MultipleChoiceTask

__all__ = [
    "EKFAC",
    "KFAC",
    "FactorBlock",
    "FactorMappingError",
    "KFACFactors",
    "batch_statistics",
    "factor_blocks",
]

Tree = dict[str, Tensor]

_KIND = "repinf_lens.kfac_factors"
_FORMAT = 1
_LOGITS = "<logits>"
_NORMALISATION = (
    "A = (1/M) sum_{n,t} a a^T over the M real (example, position) pairs where the map's output gradient is not "
    "identically 0; G = (1/N) sum_n sum_t g g^T over "
    "the N examples (g = d l_n / d out_{n,t}); Lambda = (1/N) sum_n (Q_G^T dW_n Q_A)^2, dW_n = sum_t g a^T; "
    "D = (1/N) sum_n (grad l_n)^2: G (x) A approximates the Fisher of the MEAN loss over examples."
)
#: settings :meth:`KFAC.to_dict` leaves out at these values (added after s_test caches existed)
_DEFAULTS: dict[str, Any] = {"precondition_dtype": "float32", "null_space_tol": 1e-6}
_FILES = ("covariance.partial.safetensors", "lambda.partial.safetensors", "factors.safetensors", "lambda.safetensors")


class FactorMappingError(RepinfLensError, ValueError):
    """A theta2 parameter or model setting that K-FAC cannot map onto (input hook, output hook) pairs."""


# ------------------------------------------------------------------------------------------------------ blocks
@dataclass(frozen=True)
class FactorBlock:
    """One curvature block of theta2: a linear map (Kronecker factors) or a parameter with a diagonal Fisher.

    Attributes:
        name: the block's key in the factors (its weight's name; the bias's for a bias-only block; the
            parameter's for a diagonal block).
        kind: ``"kfac"`` (Kronecker-factored) or ``"diagonal"``.
        layout: how the weight maps to ``[out, in]``: ``"heads_in"`` (``[heads, in, d_head]``: W_Q/W_K/W_V),
            ``"heads_out"`` (``[heads, d_head, out]``: W_O), ``"in_out"`` (``[in, out]``: W_in, W_out, W_U),
            ``"bias_only"`` (a bias without its weight: input 1), ``"diag"``.
        weight / bias: the theta2 names in the block (``bias`` adds the homogeneous coordinate).
        model_bias: the model's bias of the map whether or not it is in theta2 (checked with the output).
        input_module / input_slot: where ``a`` is read: the module and ``"out"`` (its output) or the name of
            its call argument (``"query_input"``, ``"x"``, ...; a forward pre-hook).
        output_module: the module whose output is the map's output (:data:`_LOGITS`: the kept logits).
        positions: ``"tokens"`` (masked by ``attention_mask``) or ``"loss"`` (the loss positions).
        d_in / d_out: the map's sizes (``d_in`` without the homogeneous coordinate).
        kv_repeat: with ungrouped grouped-query attention, how many query heads share a key/value head.
        rule: diagonal blocks: ``"norm_w"`` / ``"norm_b"`` (closed form from the norm's hooks) or ``"autograd"``.
        norm_module: the norm module of a ``norm_w`` / ``norm_b`` block.
        shapes: the theta2 shapes of ``weight`` and ``bias`` (or of the diagonal parameter).
    """

    name: str
    kind: str
    layout: str
    weight: str | None = None
    bias: str | None = None
    model_bias: str | None = None
    input_module: str | None = None
    input_slot: str = "out"
    output_module: str | None = None
    positions: str = "tokens"
    d_in: int = 0
    d_out: int = 0
    kv_repeat: int = 1
    rule: str | None = None
    norm_module: str | None = None
    shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """The theta2 names this block covers."""
        if self.kind == "diagonal":
            return (self.name,)
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def a_dim(self) -> int:
        """Width of ``A``: the input (``d_in``), plus one with a bias; 1 for a bias-only block."""
        if self.layout == "bias_only":
            return 1
        return self.d_in + (1 if self.bias is not None else 0)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (the fingerprint and the factors' metadata record it)."""
        d = dataclasses.asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        return d

    def to_matrix(self, tree: Mapping[str, Tensor]) -> Tensor:
        """This block's entries of a theta2-shaped ``tree`` as ``[..., d_out, a_dim]`` (any leading dims)."""
        if self.kind != "kfac":
            raise ValueError(f"{self.name} is a diagonal block; it has no [out, in] matrix.")
        cols: list[Tensor] = []
        if self.weight is not None:
            w = tree[self.weight]
            lead = w.shape[: w.ndim - len(self.shapes[0])]
            if self.layout == "heads_in":  # [.., H, in, dh] -> [.., H*dh, in]
                cols.append(w.transpose(-1, -2).reshape(*lead, self.d_out, self.d_in))
            elif self.layout == "heads_out":  # [.., H, dh, out] -> [.., out, H*dh]
                cols.append(w.reshape(*lead, self.d_in, self.d_out).transpose(-1, -2))
            else:  # "in_out": [.., in, out] -> [.., out, in]
                cols.append(w.transpose(-1, -2))
        if self.bias is not None:
            b = tree[self.bias]
            bshape = self.shapes[-1]
            lead = b.shape[: b.ndim - len(bshape)]
            cols.append(b.reshape(*lead, self.d_out, 1))
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=-1)

    def from_matrix(self, m: Tensor) -> dict[str, Tensor]:
        """The inverse of :meth:`to_matrix`: ``[..., d_out, a_dim]`` -> this block's theta2 entries."""
        lead = m.shape[:-2]
        out: dict[str, Tensor] = {}
        if self.weight is not None:
            w = m[..., : self.d_in]
            if self.layout == "heads_in":
                h, dh = self.shapes[0][0], self.shapes[0][2]
                out[self.weight] = w.reshape(*lead, h, dh, self.d_in).transpose(-1, -2).contiguous()
            elif self.layout == "heads_out":
                out[self.weight] = w.transpose(-1, -2).reshape(*lead, *self.shapes[0]).contiguous()
            else:
                out[self.weight] = w.transpose(-1, -2).contiguous()
        if self.bias is not None:
            out[self.bias] = m[..., -1].reshape(*lead, *self.shapes[-1]).contiguous()
        return out


def _classes() -> dict[str, tuple[type, ...]]:
    from transformer_lens.components import MLP, AbstractAttention, GatedMLP, LayerNorm, RMSNorm

    return {"attn": (AbstractAttention,), "mlp": (MLP,), "gated": (GatedMLP,), "norm": (LayerNorm, RMSNorm)}


def factor_blocks(split: SplitModel, *, max_factor_dim: int = 16384) -> list[FactorBlock]:
    """The curvature blocks of ``split``'s theta2, in theta2 order (see the module docstring for the mapping).

    Raises:
        FactorMappingError: a model setting the mapping cannot follow (per-head attention inputs, 4-bit weights),
            a hook point the model lacks, or a factor wider than ``max_factor_dim`` (a full-vocabulary ``W_U``).
    """
    model = split.model
    cfg = model.cfg
    modules = dict(model.named_modules())
    theta = split.downstream_params()
    names = list(theta)
    kinds = _classes()
    blocks: list[FactorBlock] = []
    covered: set[str] = set()
    model_params = {n for n, _ in model.named_parameters()}

    def shape(n: str | None) -> tuple[int, ...]:
        return tuple(theta[n].shape) if n is not None else ()

    def need(*mods: str) -> None:
        for m in mods:
            if m != _LOGITS and m not in modules:
                raise FactorMappingError(
                    f"K-FAC needs the module {m!r}, which this model does not have. Fix: use CG() for this "
                    "architecture, or restrict theta2 with SplitModel(..., downstream=...) to mapped parameters."
                )
            if m.rsplit(".", 1)[-1].startswith("hook_") and m not in model.hook_dict:
                raise FactorMappingError(
                    f"K-FAC reads the hook point {m!r}, which is not in model.hook_dict. Fix: use CG() for this "
                    "architecture."
                )

    def add(weight: str | None, bias_name: str | None, **kw: Any) -> None:
        bias = bias_name if bias_name in theta else None
        if weight is None and bias is None:
            return
        kw.setdefault("model_bias", bias_name if bias_name in model_params else None)
        if weight is None:
            kw.update(layout="bias_only", input_module=None)
        shapes = tuple(s for s in (shape(weight), shape(bias)) if s)
        blk = FactorBlock(name=weight or str(bias), kind="kfac", weight=weight, bias=bias, shapes=shapes, **kw)
        need(*(m for m in (blk.input_module, blk.output_module) if m is not None))
        for dim, what in ((blk.d_out, "output"), (blk.a_dim, "input")):
            if dim > max_factor_dim:
                raise FactorMappingError(
                    f"{blk.name}: its {what} factor would be {dim} x {dim} (> max_factor_dim={max_factor_dim}). "
                    + (
                        "Fix: let the split trim the unembedding to the task's loss vocabulary (trim_unembed=True "
                        "with a task whose loss_vocab() is not None), or leave unembed.W_U out of theta2."
                        if blk.output_module == _LOGITS
                        else f"Fix: pass a larger max_factor_dim (memory grows as {dim}^2), or leave {blk.name} "
                        "out of theta2 (SplitModel(..., downstream=...))."
                    )
                )
        blocks.append(blk)
        covered.update(blk.params)

    attn_seen: set[str] = set()
    mlp_seen: set[str] = set()
    for n in names:
        if n in covered:
            continue
        m = re.match(r"^(blocks\.\d+\.attn)\.(_?[Wb]_[QKVO])$", n)
        if m and isinstance(modules.get(m.group(1)), kinds["attn"]) and m.group(1) not in attn_seen:
            attn_seen.add(m.group(1))
            _attention_blocks(model, m.group(1), theta, add)
            continue
        m = re.match(r"^(blocks\.\d+\.mlp)\.([Wb]_(in|out|gate))$", n)
        if m and isinstance(modules.get(m.group(1)), kinds["mlp"] + kinds["gated"]) and m.group(1) not in mlp_seen:
            mlp_seen.add(m.group(1))
            mod = modules[m.group(1)]
            _mlp_blocks(mod, m.group(1), theta, add, gated=isinstance(mod, kinds["gated"]))
            continue
        if n in ("unembed.W_U", "unembed.b_U"):
            w = "unembed.W_U" if "unembed.W_U" in theta else None
            d_in = int(cfg.d_model)
            d_out = int(theta[n].shape[-1])
            add(w, "unembed.b_U", layout="in_out", input_module="unembed.hook_in", output_module=_LOGITS,
                positions="loss", d_in=d_in, d_out=d_out)  # fmt: skip
            continue
    for n in names:  # everything else: diagonal blocks
        if n in covered:
            continue
        mod_name, _, leaf = n.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(mod, kinds["norm"]) and leaf in ("w", "b"):
            need(f"{mod_name}.hook_normalized")
            rule = "norm_w" if leaf == "w" else "norm_b"
            blocks.append(
                FactorBlock(name=n, kind="diagonal", layout="diag", rule=rule, norm_module=mod_name, shapes=(shape(n),))
            )
        else:
            blocks.append(FactorBlock(name=n, kind="diagonal", layout="diag", rule="autograd", shapes=(shape(n),)))
        covered.add(n)
    if any(b.input_module is not None and b.input_slot != "out" and b.input_module.endswith(".attn") for b in blocks):
        if getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False):
            raise FactorMappingError(
                "The model computes separate per-head attention inputs (use_split_qkv_input / use_attn_in), so "
                "W_Q/W_K/W_V do not share one input activation per position. Fix: model.set_use_split_qkv_input("
                "False) and model.set_use_attn_in(False) before building the split, or use CG()."
            )
    if getattr(cfg, "load_in_4bit", False) and any(b.kind == "kfac" for b in blocks):
        raise FactorMappingError("K-FAC cannot read 4-bit quantised weights. Fix: load the model in float32/bfloat16.")
    order = {n: i for i, n in enumerate(names)}
    return sorted(blocks, key=lambda b: min(order[p] for p in b.params))


def _attention_blocks(model: Any, pre: str, theta: Params, add: Any) -> None:
    cfg = model.cfg
    attn = dict(model.named_modules())[pre]
    n_heads, d_head, d_model = int(cfg.n_heads), int(cfg.d_head), int(cfg.d_model)
    grouped = hasattr(attn, "_W_K")
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads) if grouped else n_heads
    ungroup = grouped and bool(getattr(cfg, "ungroup_grouped_query_attention", False))
    for letter, slot in (("Q", "query_input"), ("K", "key_input"), ("V", "value_input")):
        kv = letter != "Q" and grouped
        w, b = (f"{pre}._W_{letter}", f"{pre}._b_{letter}") if kv else (f"{pre}.W_{letter}", f"{pre}.b_{letter}")
        heads = n_kv if kv else n_heads
        add(w if w in theta else None, b, layout="heads_in", input_module=pre, input_slot=slot,
            output_module=f"{pre}.hook_{letter.lower()}", d_in=d_model, d_out=heads * d_head,
            kv_repeat=(n_heads // n_kv) if (kv and ungroup) else 1)  # fmt: skip
    w_o = f"{pre}.W_O"
    add(w_o if w_o in theta else None, f"{pre}.b_O", layout="heads_out", input_module=f"{pre}.hook_z",
        output_module=pre, d_in=n_heads * d_head, d_out=d_model)  # fmt: skip


def _mlp_blocks(mlp: Any, pre: str, theta: Params, add: Any, *, gated: bool) -> None:
    d_model, d_mlp = int(mlp.cfg.d_model), int(mlp.d_mlp)
    if gated:
        for w, hook in (("W_gate", "hook_pre"), ("W_in", "hook_pre_linear")):
            name = f"{pre}.{w}"
            if name in theta:
                add(name, None, layout="in_out", input_module=pre, input_slot="x", output_module=f"{pre}.{hook}",
                    d_in=d_model, d_out=d_mlp, model_bias=None)  # fmt: skip
        # b_in is added AFTER act(pre) * pre_linear: a bias of its own, output hook_post
        add(None, f"{pre}.b_in", layout="bias_only", output_module=f"{pre}.hook_post", d_in=0, d_out=d_mlp)
    else:
        w_in = f"{pre}.W_in"
        add(w_in if w_in in theta else None, f"{pre}.b_in", layout="in_out", input_module=pre, input_slot="x",
            output_module=f"{pre}.hook_pre", d_in=d_model, d_out=d_mlp)  # fmt: skip
    w_out = f"{pre}.W_out"
    add(w_out if w_out in theta else None, f"{pre}.b_out", layout="in_out", input_module=f"{pre}.hook_post",
        output_module=pre, d_in=d_mlp, d_out=d_model)  # fmt: skip


# ------------------------------------------------------------------------------------------------ pseudo-labels
def _batch_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of Hessian batch ``index``: the same labels in every pass, run and resume."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))


def _pseudo_batch(task: Any, logits: Tensor, batch: Any, fisher: str, gen: torch.Generator) -> tuple[Any, Tensor]:
    """``(batch with the labels the pseudo-gradients use, per-example loss scale [B])``."""
    ones = torch.ones(len(batch), dtype=logits.dtype, device=logits.device)
    if fisher == "empirical":
        return batch, ones
    if isinstance(task, MultipleChoiceTask):
        if task.full_vocab:
            raise SettingsError(
                "fisher='true' samples the answer among the options, but this MultipleChoiceTask's loss is over the "
                "full vocabulary (full_vocab=True). Fix: fisher='empirical', or MultipleChoiceTask(full_vocab=False)."
            )
        probs = torch.softmax(task.option_logits(logits.detach(), batch).double(), -1).cpu()
        y = torch.multinomial(probs, 1, generator=gen)[:, 0]
        return dataclasses.replace(batch, labels=y.to(batch.labels.device)), ones
    if isinstance(task, CompletionTask):
        lg = task.answer_logits(logits.detach(), batch).double()
        b, p, v = lg.shape
        y = torch.multinomial(torch.softmax(lg, -1).cpu().reshape(b * p, v), 1, generator=gen).view(b, p)
        mask = batch.target_mask.to(y.device)
        target = torch.where(mask, y, batch.target_ids.cpu()).to(batch.target_ids.device)
        scale = mask.sum(1).to(logits.dtype).sqrt().to(logits.device)
        return dataclasses.replace(batch, target_ids=target), scale
    sample = getattr(task, "sample_labels", None)
    if callable(sample):
        return sample(logits.detach(), batch, gen), ones
    raise SettingsError(
        f"fisher='true' samples labels from the model, and there is no rule for {type(task).__name__}. Fix: "
        "fisher='empirical' (the rows' labels), or give the task a sample_labels(logits, batch, generator) method "
        "that returns a batch whose labels are drawn from the model's predictive distribution."
    )


# ------------------------------------------------------------------------------------------------------ capture
@dataclass
class _Captured:
    """What one forward/backward of a Hessian batch read: activations, output gradients, per-example grads."""

    records: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # (module, slot) -> activation
    outputs: dict[str, Tensor] = field(default_factory=dict)  # module -> output (checks)
    grads: dict[str, Tensor] = field(default_factory=dict)  # module -> d pseudo-loss / d output
    per_example: dict[str, Tensor] = field(default_factory=dict)  # autograd diagonal params -> [S * B, ...]
    n_examples: int = 0
    #: pseudo-gradients per example: 1, or (``fisher="expected"``) one per direction of its loss's Hessian in the
    #: logits, stacked slot-major along the batch dim of ``grads`` / ``per_example`` (``[S * B, ...]``, row
    #: ``s * B + n``; an example with fewer directions has zeros in its last slots); ``records`` stay ``[B, ...]``
    n_slots: int = 1


def _capture(
    split: SplitModel, blocks: Sequence[FactorBlock], inp: SplitInputs, *, fisher: str, gen: torch.Generator,
    keep_outputs: bool,
) -> _Captured:  # fmt: skip
    model = split.model
    modules = dict(model.named_modules())
    reads: set[tuple[str, str]] = set()
    probed: set[str] = set()
    for b in blocks:
        if b.kind == "kfac":
            if b.input_module is not None:
                reads.add((b.input_module, b.input_slot))
            if b.output_module is not None:
                probed.add(b.output_module)
        elif b.rule in ("norm_w", "norm_b"):
            reads.add((f"{b.norm_module}.hook_normalized", "out"))
            probed.add(str(b.norm_module))
    probed.discard(_LOGITS)
    cap = _Captured(n_examples=len(inp))
    probes: dict[str, Tensor] = {}
    handles = []

    def out_hook(name: str) -> Any:
        def fn(_mod: Any, _args: Any, out: Tensor) -> Tensor | None:
            if (name, "out") in reads and (name, "out") not in cap.records:
                cap.records[(name, "out")] = out.detach()
            if name not in probed:
                return None
            if keep_outputs and name not in cap.outputs:
                cap.outputs[name] = out.detach()
            p = probes.get(name)
            if p is None or p.shape != out.shape:
                p = probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + p

        return fn

    def pre_hook(name: str, slots: list[str]) -> Any:
        def fn(_mod: Any, args: tuple, kwargs: dict) -> None:
            order = {"query_input": 0, "key_input": 1, "value_input": 2, "x": 0}
            for slot in slots:
                if (name, slot) in cap.records:
                    continue
                val = kwargs.get(slot)
                if val is None and len(args) > order.get(slot, 0):
                    val = args[order.get(slot, 0)]
                if isinstance(val, Tensor):
                    cap.records[(name, slot)] = val.detach()

        return fn

    for name in sorted({m for m, s in reads if s == "out"} | probed):
        handles.append(modules[name].register_forward_hook(out_hook(name)))
    pre_slots: dict[str, list[str]] = {}
    for m, s in sorted(reads):
        if s != "out":
            pre_slots.setdefault(m, []).append(s)
    for name, slots in pre_slots.items():
        handles.append(modules[name].register_forward_pre_hook(pre_hook(name, slots), with_kwargs=True))

    params = split.downstream_params()
    leaves = [b.name for b in blocks if b.rule == "autograd"]
    for n in leaves:
        params[n] = params[n].detach().clone().requires_grad_(True)
    unembed = next((b for b in blocks if b.output_module == _LOGITS), None)
    try:
        with torch.enable_grad():
            logits = split.logits(inp.latents, inp.batch, params, inp.error, inp.base, inp.anchor)
            z_probe = None
            cols = split.unembed_columns()
            if unembed is not None:
                if cols is None:
                    cols = torch.arange(logits.shape[-1], device=logits.device)
                kept = logits.index_select(logits.ndim - 1, cols)
                cap.outputs[_LOGITS] = kept.detach()
                z_probe = torch.zeros_like(kept, requires_grad=True)
                logits = logits.index_add(logits.ndim - 1, cols, z_probe)
            keys = list(probes)
            wrt = [probes[k] for k in keys] + ([z_probe] if z_probe is not None else [])
            # per slot s: the pseudo-loss whose gradient is the pseudo-gradient (one per example, or per direction)
            if fisher == "expected":
                cots = _expected_cotangents(split, params, inp, logits)
                slot_losses = [(logits * cots[j]).flatten(1).sum(1) for j in range(len(cots))]
            else:
                batch2, scale = _pseudo_batch(split.task, logits, inp.batch, fisher, gen)
                slot_losses = [split.task.loss(logits, batch2, reduction="none") * scale.to(logits.dtype)]
            cap.n_slots = len(slot_losses)
            n_ex = len(inp)
            got_slots: list[list[Tensor | None]] = []
            for j, per in enumerate(slot_losses):
                last = j == len(slot_losses) - 1 and not leaves
                got_slots.append(list(torch.autograd.grad(per.sum(), wrt, retain_graph=not last, allow_unused=True))
                                 if wrt else [])  # fmt: skip
            for i, (k, t) in enumerate(zip([*keys, _LOGITS], wrt)):
                parts = [torch.zeros_like(t) if (gk := got[i]) is None else gk.detach() for got in got_slots]
                cap.grads[k] = parts[0] if len(parts) == 1 else torch.cat(parts)
            for n in leaves:
                cap.per_example[n] = torch.zeros((cap.n_slots * n_ex, *params[n].shape), dtype=params[n].dtype)
            for j, per in enumerate(slot_losses if leaves else ()):
                for i in range(n_ex):
                    last = j == len(slot_losses) - 1 and i == n_ex - 1
                    gi = torch.autograd.grad(per[i], [params[n] for n in leaves], retain_graph=not last,
                                             allow_unused=True)  # fmt: skip
                    for n, g in zip(leaves, gi):
                        if g is not None:
                            cap.per_example[n][j * n_ex + i] = g.detach().cpu()
    finally:
        for h in handles:
            h.remove()
    # the activation AT the split point is the spliced one (our hook ran before the split's replacement)
    at_split = (split.out_hook, "out")
    if at_split in cap.records:
        cap.records[at_split] = split.downstream_input(inp.latents, inp.error, inp.anchor).detach()
    missing = sorted({f"{m} ({s})" for m, s in reads if (m, s) not in cap.records} | (probed - set(cap.grads)))
    if missing:
        raise FactorMappingError(
            f"The hooks {missing} did not fire in the downstream pass, so K-FAC cannot read those maps' inputs or "
            "output gradients. Fix: use CG() for this architecture, or leave those parameters out of theta2."
        )
    if unembed is not None and cap.grads.get(_LOGITS) is not None:
        cap_ = getattr(split.model.cfg, "output_logits_soft_cap", None)
        if cap_ is not None and float(cap_) > 0:  # the map's output is the logit BEFORE the soft cap
            z = _tile(cap.outputs[_LOGITS], cap.n_slots)
            cap.grads[_LOGITS] = cap.grads[_LOGITS] * (1 - (z / float(cap_)) ** 2)
    return cap


def _expected_cotangents(split: SplitModel, params: Params, inp: SplitInputs, logits: Tensor) -> Tensor:
    """``[S, B, *logits.shape[1:]]``: slot ``s`` holds each example's ``s``-th direction ``sqrt(e_k) v_k`` of its
    loss's Hessian in the logits (:func:`~repinf_lens.curvature.hvp.gauss_newton_directions`; zeros where it has
    fewer), so that ``sum_s g_s g_s^T`` over the slots' pseudo-gradients is the example's Gauss-Newton ``J^T H J``:
    the true Fisher in closed form."""
    index, cots = gauss_newton_directions(
        split, params, inp, logits=logits.detach(), who="K-FAC / EK-FAC fisher='expected'",
        fix="fisher='empirical' (the rows' labels) or fisher='true' (sampled labels)",
    )  # fmt: skip
    b = len(inp)
    counts = torch.bincount(index, minlength=b)
    # the directions come example by example, in order: a row's slot is its rank among its example's rows
    slot = torch.arange(len(index)) - (torch.cumsum(counts, 0) - counts)[index]
    out = logits.new_zeros((max(int(counts.max()) if b else 0, 1), *logits.shape))
    out[slot.to(out.device), index.to(out.device)] = cots.to(out)
    return out


def _tile(x: Tensor, n_slots: int) -> Tensor:
    """``[B, ...] -> [S * B, ...]``: an example's activations, once per pseudo-gradient slot (slot-major)."""
    return x if n_slots == 1 else x.repeat(n_slots, *([1] * (x.ndim - 1)))


def _positions(x: Tensor, n: int) -> Tensor:
    """``[B, T, width]`` from ``[B, width]`` (one loss position) or ``[B, T, ...]``."""
    if x.ndim == 2:
        return x[:, None, :]
    return x.reshape(n, x.shape[1], -1)


def _mask(block: FactorBlock, batch: Any, n_pos: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[B, n_pos]``: the real tokens, or the loss positions for maps that see only those: the unembedding, and
    every map after the last block's attention when the split prunes (``SplitModel(prune=True)``), whose
    activations then hold the loss positions alone (``n_pos`` differs from the prompt length)."""
    if block.positions == "tokens" and batch.attention_mask.shape[1] == n_pos:
        m = batch.attention_mask
    else:
        m = getattr(batch, "target_mask", None)
        if m is None or m.ndim != 2 or m.shape[1] != n_pos:
            m = torch.ones(len(batch), n_pos)
    return m.to(device=device, dtype=dtype)


def _block_ag(block: FactorBlock, cap: _Captured, batch: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(a [B, T, a_dim] with the homogeneous 1, g [S * B, T, d_out] masked, mask [B, T])`` of a K-FAC block (S:
    the pseudo-gradient slots, ``cap.n_slots``)."""
    n = cap.n_examples
    g = _positions(cap.grads[str(block.output_module)], n * cap.n_slots).to(dtype)
    if block.kv_repeat > 1:  # ungrouped GQA: the repeated heads' gradients belong to their key/value head
        g = _sum_repeats(g, block)
    if block.layout == "bias_only":
        a = torch.ones(n, g.shape[1], 1, dtype=dtype, device=g.device)
    else:
        a = _positions(cap.records[(str(block.input_module), block.input_slot)], n).to(dtype)
        if block.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    mask = _mask(block, batch, g.shape[1], g.device, dtype)
    return a, g * _tile(mask, cap.n_slots)[..., None], mask


def _sum_repeats(g: Tensor, block: FactorBlock) -> Tensor:
    """``[B, T, n_heads * d_head] -> [B, T, n_kv * d_head]``: heads are repeated kv-major (``repeat_interleave``)."""
    b, t, _ = g.shape
    d_head = (block.shapes[0] if block.weight is not None else block.shapes[-1])[-1]
    n_kv = block.d_out // d_head
    return g.reshape(b, t, n_kv, block.kv_repeat, d_head).sum(3).reshape(b, t, n_kv * d_head)


def batch_statistics(
    split: SplitModel,
    blocks: Sequence[FactorBlock],
    inp: SplitInputs,
    *,
    stage: str,
    fisher: str,
    generator: torch.Generator,
    eigen: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    check: bool = False,
) -> dict[str, Tensor]:
    """The SUMS one Hessian batch adds to the factors (what a fit accumulates; divided by the counts at the end).

    ``stage="covariance"``: ``"{block}/A_sum"``, ``"{block}/G_sum"``, ``"{block}/n_pos"`` for K-FAC blocks,
    ``"{block}/D_sum"`` for diagonal blocks, and ``"n_examples"``. ``stage="lambda"`` (needs ``eigen``: the
    ``"{block}/QA"`` / ``"{block}/QG"`` eigenvectors): ``"{block}/L_sum"`` and ``"n_examples"``. ``check``
    verifies, on this batch, that every map's output equals ``a @ W (+ b)`` (:class:`FactorMappingError`).
    """
    cap = _capture(split, blocks, inp, fisher=fisher, gen=generator, keep_outputs=check)
    if check:
        _check_maps(split, blocks, cap)
    out: dict[str, Tensor] = {"n_examples": torch.tensor(float(cap.n_examples), dtype=torch.float64)}
    for b in blocks:
        if b.kind == "kfac":
            a, g, mask = _block_ag(b, cap, inp.batch, dtype)
            if stage == "covariance":
                # A averages over the positions whose output can reach the loss (g not identically 0 in some slot)
                live = (g.abs().amax(-1) > 0).view(cap.n_slots, *mask.shape).any(0)
                mask = mask * live.to(mask.dtype)
                am = (a * mask[..., None]).flatten(0, 1)
                gf = g.flatten(0, 1)
                out[f"{b.name}/A_sum"] = am.T @ am
                out[f"{b.name}/G_sum"] = gf.T @ gf
                out[f"{b.name}/n_pos"] = mask.sum().to(torch.float64).reshape(())
            else:
                if eigen is None:
                    raise ValueError("batch_statistics(stage='lambda') needs the eigenvectors (eigen=...).")
                qa, qg = eigen[f"{b.name}/QA"].to(dtype), eigen[f"{b.name}/QG"].to(dtype)
                # Q_G^T dW_{n,s} Q_A per example and slot (rows s * B + n of g), summed over both
                rot = torch.einsum("bto,bti->boi", g @ qg, _tile(a @ qa, cap.n_slots))
                out[f"{b.name}/L_sum"] = rot.square().sum(0)
        elif stage == "covariance":
            out[f"{b.name}/D_sum"] = _diag_per_example(b, cap).to(dtype).square().sum(0)
    return out


def _diag_per_example(block: FactorBlock, cap: _Captured) -> Tensor:
    """Per-example (and slot) gradients ``[S * B, *shape]`` of a diagonal block's parameter."""
    if block.rule == "autograd":
        return cap.per_example[block.name]
    rows = cap.n_examples * cap.n_slots
    g = cap.grads[str(block.norm_module)]
    if block.rule == "norm_b":
        return g.reshape(rows, -1, g.shape[-1]).sum(1)
    normed = _tile(cap.records[(f"{block.norm_module}.hook_normalized", "out")], cap.n_slots)
    return (g * normed).reshape(rows, -1, g.shape[-1]).sum(1)


def _check_maps(split: SplitModel, blocks: Sequence[FactorBlock], cap: _Captured) -> None:
    """Raise :class:`FactorMappingError` unless each map's captured output is ``a @ W (+ b)``."""
    named = dict(split.model.named_parameters())
    theta = split.downstream_params()
    for b in blocks:
        if b.kind != "kfac" or b.weight is None:
            continue
        a = _positions(cap.records[(str(b.input_module), b.input_slot)], cap.n_examples).double()
        w = b.to_matrix(theta).double()[..., : b.d_in]
        pred = a @ w.T
        if b.model_bias is not None:
            bias = theta[b.model_bias] if b.model_bias in theta else named[b.model_bias]
            if b.output_module == _LOGITS and b.model_bias not in theta:
                cols = split.unembed_columns()
                bias = bias.index_select(0, cols) if cols is not None else bias
            pred = pred + bias.detach().double().reshape(-1)
        if b.output_module == _LOGITS:
            pred = logit_softcap(split.model, pred)
        got = _positions(cap.outputs[str(b.output_module)], cap.n_examples).double()
        if b.kv_repeat > 1:
            n, t, _ = pred.shape
            dh = b.shapes[0][-1]
            pred = pred.reshape(n, t, -1, dh).repeat_interleave(b.kv_repeat, dim=2).reshape(n, t, -1)
        scale = float(got.abs().max()) or 1.0
        err = float((pred - got).abs().max()) / scale if pred.shape == got.shape else math.inf
        tol = 1e-3 if split.model.cfg.dtype in (torch.float32, torch.float64) else 3e-2
        if not err <= tol:
            raise FactorMappingError(
                f"{b.name}: the output read at {b.output_module!r} is not input @ weight (+ bias) of the input read at "
                f"{b.input_module!r} ({b.input_slot}) (relative error {err:.2e}, shapes {tuple(pred.shape)} vs "
                f"{tuple(got.shape)}): this architecture computes the map differently from what K-FAC assumes. "
                "Fix: use CG() for this model, or leave this parameter out of theta2."
            )
    for b in blocks:
        if b.rule not in ("norm_w", "norm_b"):
            continue
        mod = dict(split.model.named_modules())[str(b.norm_module)]
        normed = cap.records[(f"{b.norm_module}.hook_normalized", "out")].double()
        pred = normed * mod.w.detach().double() + (mod.b.detach().double() if hasattr(mod, "b") else 0.0)
        got = cap.outputs[str(b.norm_module)].double()
        scale = float(got.abs().max()) or 1.0
        if not float((pred - got).abs().max()) / scale <= 1e-3:
            raise FactorMappingError(
                f"{b.name}: the output of {b.norm_module!r} is not hook_normalized * w (+ b), so its per-example "
                "gradient cannot be read from the hooks. Fix: use CG() for this model."
            )


# ------------------------------------------------------------------------------------------------------ factors
@dataclass
class KFACFactors:
    """Fitted factors: ``tensors`` keyed ``"{block}/{A,G,QA,lA,QG,lG,L,D}"``, the blocks, metadata, identity.

    ``fingerprint`` is the hash of everything they were fitted from (:class:`KFAC` puts it in the s_test cache
    key); ``meta`` is the JSON header of ``factors.safetensors`` (blocks, normalisation, counts, fisher, ...).
    """

    blocks: list[FactorBlock]
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    fingerprint: str
    folder: Path | None = None
    #: per (block, damping, ekfac, null_tol): the kept eigenvectors and scales (:meth:`_reduced_block`)
    _reduced: dict[tuple, tuple[Tensor, Tensor, Tensor] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def has_lambda(self) -> bool:
        """Whether the EK-FAC eigenvalue corrections are present."""
        return all(f"{b.name}/L" in self.tensors for b in self.blocks if b.kind == "kfac")

    def to(self, device: torch.device | str) -> KFACFactors:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})

    def precondition(
        self,
        g: Mapping[str, Tensor],
        *,
        damping: float,
        ekfac: bool,
        dtype: torch.dtype | None = None,
        null_tol: float = 0.0,
    ) -> dict[str, Tensor]:
        """``(F + damping I)^-1 g`` blockwise, for ``g`` with any leading dims (a stack of queries).

        K-FAC blocks: ``Q_G [(Q_G^T V Q_A) / (lambda_G lambda_A^T + damping)] Q_A^T``; EK-FAC: divided by
        ``Lambda + damping`` instead; diagonal blocks: ``g / (D + damping)``. ``dtype``: the dtype of the four
        rotation products (default: the factors'); ``torch.bfloat16`` ran them 2-3x faster on AMD EPYCs with
        AVX512-BF16 (slower on an Intel Xeon: it depends on the CPU) and is usual on GPUs (Kronfluence's
        ``precondition_dtype``); the division stays in the factors' dtype.

        ``null_tol`` > 0: the eigenvectors of ``G`` (rows) / ``A`` (columns) along which every curvature entry
        (``lambda_G lambda_A^T`` or ``Lambda``) is at most ``null_tol * damping`` are not rotated onto: there the
        result is ``V / damping`` (each such entry of the preconditioner differs from that by a relative
        ``null_tol`` at most), ``V / damping + Q_G' [(Q_G'^T V Q_A') * (1 / (curv' + damping) - 1 / damping)]
        Q_A'^T`` with the kept columns ``'``. The factors of a map that saw fewer (example, position) pairs than its
        width (after the last attention layer the pruned split's maps see only the loss positions) have such a
        null space, and the rotations shrink with it. The kept rotations run in the factors' dtype whatever
        ``dtype`` says (their ``1 / damping`` term scales rounding by ``curv / damping``: in bfloat16 that makes the
        preconditioner indefinite; measured LDS 0.54-0.59 instead of 0.689 on the peer benchmark), and only where
        that scaled rounding stays below 1e-3 (``eps * max(curv) / damping``); elsewhere the full rotation runs.
        """
        self.check_keys(g)
        out: dict[str, Tensor] = {}
        for b in self.blocks:
            out.update(self.precondition_block(b, g, damping=damping, ekfac=ekfac, dtype=dtype, null_tol=null_tol))
        return {k: out[k] for k in g}

    def kept_ranks(self, *, damping: float, ekfac: bool, null_tol: float) -> dict[str, tuple[int, int, int, int]]:
        """Per factored block: ``(kept G eigenvectors, out dim, kept A eigenvectors, in dim)`` under ``null_tol``."""
        out: dict[str, tuple[int, int, int, int]] = {}
        for b in self.blocks:
            if b.kind == "diagonal":
                continue
            dg, da = self.tensors[f"{b.name}/QG"].shape[0], self.tensors[f"{b.name}/QA"].shape[0]
            red = self._reduced_block(b, damping=damping, ekfac=ekfac, null_tol=null_tol)
            out[b.name] = (dg, dg, da, da) if red is None else (red[0].shape[1], dg, red[1].shape[1], da)
        return out

    def _reduced_block(
        self, b: FactorBlock, *, damping: float, ekfac: bool, null_tol: float, max_cost: float = 0.8
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(Q_G', Q_A', 1 / (curv' + damping) - 1 / damping)`` of the kept eigenvectors (the factors' dtype), or
        None to rotate fully (``null_tol`` 0, rotations that would not shrink, or rounding that ``1 / damping``
        would scale above 1e-3). ``max_cost``: take the reduced rotations only below this fraction of the full
        rotations' multiply-adds (lower when the full rotations run in bfloat16, about 2.3x faster per product)."""
        if null_tol <= 0:
            return None
        key = (b.name, float(damping), bool(ekfac), float(null_tol), float(max_cost))
        if key not in self._reduced:
            t = self.tensors
            qa, qg = t[f"{b.name}/QA"], t[f"{b.name}/QG"]
            curv = t[f"{b.name}/L"] if ekfac else t[f"{b.name}/lG"][:, None] * t[f"{b.name}/lA"][None, :]
            big = curv > null_tol * damping
            kg, ka = big.any(1).nonzero().squeeze(1), big.any(0).nonzero().squeeze(1)
            dg, da = qg.shape[0], qa.shape[0]
            full = dg * da * (dg + da)
            reduced = min(dg * da * len(ka) + len(kg) * dg * len(ka), dg * da * len(kg) + len(kg) * da * len(ka))
            hit: tuple[Tensor, Tensor, Tensor] | None = None
            scaled_rounding = torch.finfo(curv.dtype).eps * float(curv.max()) / damping
            if reduced < max_cost * full and scaled_rounding <= 1e-3:
                scale = 1.0 / (curv[kg][:, ka] + damping) - 1.0 / damping
                hit = (qg[:, kg].contiguous(), qa[:, ka].contiguous(), scale.contiguous())
            self._reduced[key] = hit
        return self._reduced[key]

    @staticmethod
    def _weight_layout_ok(b: FactorBlock, w: Tensor, scale: Tensor) -> bool:
        """Whether :func:`_reduced_in_out` applies: an ``[in, out]`` weight without a bias in theta2, in the
        factors' dtype."""
        return b.layout == "in_out" and b.bias is None and b.weight == b.name and w.dtype == scale.dtype

    def _max_cost(self, b: FactorBlock, dtype: torch.dtype | None) -> float:
        """:meth:`_reduced_block`'s ``max_cost`` for rotations in ``dtype`` (lower where they run in bfloat16)."""
        return 0.4 if dtype is not None and dtype != self.tensors[f"{b.name}/QA"].dtype else 0.8

    def per_vector(
        self, b: FactorBlock, w: Tensor, *, damping: float, ekfac: bool, null_tol: float,
        dtype: torch.dtype | None = None,
    ) -> bool:  # fmt: skip
        """Whether :meth:`precondition_block` (same arguments) takes ``b`` one vector at a time as cheaply as
        stacked: the reduced rotations in the weight's own layout (:func:`_reduced_in_out`), so stacking the queries
        first would only copy them."""
        if b.kind != "kfac":
            return False
        red = self._reduced_block(b, damping=damping, ekfac=ekfac, null_tol=null_tol, max_cost=self._max_cost(b, dtype))
        return red is not None and self._weight_layout_ok(b, w, red[2])

    def check_keys(self, g: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``g`` holds exactly the theta2 entries the factors were fitted for."""
        shapes = {p: s for b in self.blocks for p, s in zip(b.params, b.shapes)}
        bad = sorted(set(g) ^ set(shapes)) + sorted(
            k for k in set(g) & set(shapes) if tuple(g[k].shape[g[k].ndim - len(shapes[k]) :]) != shapes[k]
        )
        if bad:
            raise ValueError(
                f"The factors do not match the theta2 entries {bad[:5]} (missing, extra or of another shape): they "
                "were fitted for another split. Fix: call attributor.fit(rows) (solver.fit_factors(split, task, "
                "rows)) for this split."
            )

    def precondition_block(
        self,
        b: FactorBlock,
        g: Mapping[str, Tensor],
        *,
        damping: float,
        ekfac: bool,
        dtype: torch.dtype | None = None,
        null_tol: float = 0.0,
    ) -> dict[str, Tensor]:
        """:meth:`precondition` of one block: its entries of ``g`` (any leading dims) -> theirs of the result."""
        t = self.tensors
        if b.kind == "diagonal":
            v = g[b.name]
            return {b.name: (v.to(t[f"{b.name}/D"].dtype) / (t[f"{b.name}/D"] + damping)).to(v.dtype)}
        ref = g[b.params[0]]
        red = self._reduced_block(b, damping=damping, ekfac=ekfac, null_tol=null_tol, max_cost=self._max_cost(b, dtype))
        if red is not None:
            qg_r, qa_r, scale = red
            if self._weight_layout_ok(b, ref, scale):
                return {b.name: _reduced_in_out(ref, qg_r, qa_r, scale, damping)}
            m = b.to_matrix(g).to(scale.dtype)
            # the cheaper order of Q_G'^T V Q_A' (and the same order back)
            (dg, rg), (da, ra) = qg_r.shape, qa_r.shape
            g_first = rg * dg * da + rg * da * ra <= dg * da * ra + rg * dg * ra
            rot = ((qg_r.T @ m) @ qa_r) if g_first else (qg_r.T @ (m @ qa_r))
            inner = rot * scale
            back = (qg_r @ (inner @ qa_r.T)) if g_first else ((qg_r @ inner) @ qa_r.T)
            return b.from_matrix(back.add_(m, alpha=1.0 / damping).to(ref.dtype))
        qa, qg = t[f"{b.name}/QA"], t[f"{b.name}/QG"]
        fdt = qa.dtype
        if dtype is not None and dtype != fdt:
            qa, qg = qa.to(dtype), qg.to(dtype)
        m = b.to_matrix(g).to(qa.dtype)
        rot = (qg.T @ m @ qa).to(fdt)
        del m
        if ekfac:
            den = t[f"{b.name}/L"] + damping
        else:
            den = t[f"{b.name}/lG"][:, None] * t[f"{b.name}/lA"][None, :] + damping
        back = qg @ (rot / den).to(qa.dtype) @ qa.T
        return b.from_matrix(back.to(ref.dtype))


def _reduced_in_out(v: Tensor, qg: Tensor, qa: Tensor, scale: Tensor, damping: float) -> Tensor:
    """The reduced rotations of :meth:`KFACFactors.precondition_block` in an ``[in, out]`` weight's own layout.

    For ``V`` ``[..., in, out]`` (the map's ``[out, in]`` matrix transposed): ``V / damping + Q_A' [(Q_A'^T V Q_G')
    * scale^T] Q_G'^T``, the transpose of ``M / damping + Q_G' [(Q_G'^T M Q_A') * scale] Q_A'^T`` with ``M = V^T``.
    Per leading index two GEMMs over ``V`` (the second adds ``V / damping`` as its ``beta`` term), so ``V`` is
    read twice and the result written once, without transposed copies; the rest is ``[in or out, rank]``-sized.
    """
    flat = v.reshape(-1, *v.shape[-2:])
    out = torch.empty(flat.shape, dtype=v.dtype, device=v.device)
    s_t = scale.T
    for i in range(flat.shape[0]):
        vi = flat[i]
        if qg.shape[1] <= qa.shape[1]:  # (the cheaper order: the big products carry the smaller rank)
            inner = (qa.T @ (vi @ qg)) * s_t  # [ra, rg]
            torch.addmm(vi, qa @ inner, qg.T, beta=1.0 / damping, out=out[i])
        else:
            inner = ((qa.T @ vi) @ qg) * s_t
            torch.addmm(vi, qa, inner @ qg.T, beta=1.0 / damping, out=out[i])
    return out.reshape(v.shape)


def _write_tensors(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], fingerprint: str) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(cpu, tmp, metadata={"meta": json.dumps(meta, default=str), "fingerprint": fingerprint,
                                      CONTENT_KEY: state_digest(cpu, cache=False)})  # fmt: skip


def _read_tensors(path: Path, fingerprint: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The tensors and JSON header of a factors file of this fingerprint (``None``: absent, other, damaged)."""
    if not path.exists():
        return None
    header, tensors, problem = read_verified(path)
    if problem is not None:
        discard_corrupt(path, problem)
        return None
    if header.get("fingerprint") != fingerprint or tensors is None:
        return None
    return tensors, json.loads(header.get("meta", "{}"))


# ------------------------------------------------------------------------------------------------------ solvers
@dataclass
class KFAC(FittedSolver):
    """K-FAC (Martens & Grosse 2015; Kronfluence's ``"kfac"``) on TransformerLens hook points.

    ``s = (G (x) A + damping I)^-1 g`` per linear map of theta2 (a diagonal Fisher for the other parameters), with
    the factors fitted once by :meth:`fit_factors` (what ``InfluenceAttributor.fit`` calls) and kept on disk. See
    the module docstring for the mapping, the normalisation, the pseudo-labels and the folder layout.

    Args:
        damping: lambda, added to the curvature of the MEAN loss (the same lambda as CG's).
        batch_size: Hessian examples per forward/backward pass (the generic ``batch_size`` knob).
        fisher: ``"true"`` (labels sampled from the model, the Gauss-Newton in expectation), ``"expected"`` (that
            expectation in closed form: every direction of each example's loss Hessian in the logits, no sampling),
            or ``"empirical"`` (the rows' own labels).
        seed: seeds the sampled labels (one generator per Hessian batch).
        factor_dir: the folder of the fitted factors (``None``: ``$REPINF_LENS_CACHE/kfac_factors/<hash>``).
        shard_batches: batches between two checkpoints of the running sums (the unit of resumption).
        factor_dtype: ``"float32"`` or ``"float64"``: the dtype the factors are accumulated, stored and applied
            in (eigendecompositions always in float64).
        precondition_dtype: ``"float32"`` (default: the factors' dtype) or ``"bfloat16"``: the dtype of the
            rotations into and out of the Kronecker eigenbasis in :meth:`solve` (Kronfluence's
            ``precondition_dtype``). bfloat16 ran them 2-3x faster on the AMD EPYCs (AVX512-BF16) of the first
            benchmarks, but 1.6x SLOWER than float32 on an Intel Xeon of a later run: measure on your CPU; about
            3 significant digits (``benchmarks/bench_curvature_cost.py`` measures both); part of the s_test cache
            key, not of the factors' fingerprint (the same factors serve both).
        null_space_tol: eigen-directions of a map's factors along which the curvature is at most this times
            ``damping`` are applied as ``1 / damping`` without rotating onto them (relative error at most this;
            exact where the fit data never reached, e.g. the maps after the last attention layer, which see only
            the loss positions: their rotations shrink from the map's width to the number of fitted examples).
            0 rotates fully. Not part of the s_test cache key at the default.
        max_factor_dim: refuse factors wider than this (memory grows with its square).
        overwrite: replace a ``factor_dir`` fitted on other inputs instead of raising.
        progress: show tqdm bars while fitting.
        gauss_newton: always True (K-FAC approximates the Gauss-Newton / Fisher; False is refused).
    """

    name: ClassVar[str] = "kfac"
    config_knobs: ClassVar[Mapping[str, str]] = {"damping": "damping", "batch_size": "batch_size"}
    #: whether :meth:`solve` applies the EK-FAC eigenvalue corrections
    corrected: ClassVar[bool] = False
    gauss_newton: bool = True
    fisher: str = "true"
    seed: int = 0
    factor_dir: str | None = None
    shard_batches: int = 16
    factor_dtype: str = "float32"
    precondition_dtype: str = "float32"
    null_space_tol: float = 1e-6
    max_factor_dim: int = 16384
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        if self.gauss_newton is not True:
            raise SettingsError(
                f"{cls} approximates the Gauss-Newton (Fisher) curvature; it has no exact-Hessian mode "
                f"(gauss_newton={self.gauss_newton!r}). Fix: leave gauss_newton=True (the default), or use CG() for "
                "the exact Hessian."
            )
        check_choice(f"{cls} fisher", self.fisher, ("true", "expected", "empirical"))
        check_int(f"{cls} seed", self.seed, minimum=0)
        check_int(f"{cls} shard_batches", self.shard_batches, minimum=1, why="batches between checkpoints")
        check_int(f"{cls} max_factor_dim", self.max_factor_dim, minimum=1)
        check_choice(f"{cls} factor_dtype", self.factor_dtype, ("float32", "float64"))
        check_choice(f"{cls} precondition_dtype", self.precondition_dtype, ("float32", "bfloat16"))
        check_float(f"{cls} null_space_tol", self.null_space_tol, minimum=0.0, maximum=1e-2)
        self.factors: KFACFactors | None = None
        self.fit_info: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        """The settings; ``precondition_dtype`` and ``null_space_tol`` only when they are not the defaults, so
        s_test cache keys and run manifests written before they existed stay valid."""
        d = super().to_dict()
        for k in ("precondition_dtype", "null_space_tol"):
            if d.get(k) == _DEFAULTS[k]:
                d.pop(k)
        return d

    def _rotation_dtype(self) -> torch.dtype | None:
        return None if self.precondition_dtype == "float32" else getattr(torch, self.precondition_dtype)

    def cache_identity(self) -> dict[str, Any]:
        """The settings that change s_test plus the fitted factors' fingerprint (not the folder's path)."""
        d = self.to_dict()
        for k in ("factor_dir", "overwrite", "progress"):
            d.pop(k, None)
        d["factors"] = None if self.factors is None else self.factors.fingerprint
        return d

    # ------------------------------------------------------------------ fitting
    def fingerprint(self, split: SplitModel, rows: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, Any]:
        """Everything the factors depend on: the split, the rows, the pseudo-labels and the accumulation order."""
        blocks = factor_blocks(split, max_factor_dim=self.max_factor_dim)
        return self.fit_fingerprint(
            split, rows, batch_size, format_version=_FORMAT, fisher=self.fisher,
            seed=self.seed if self.fisher == "true" else None, shard_batches=self.shard_batches,
            factor_dtype=self.factor_dtype, blocks=[b.describe() for b in blocks],
        )  # fmt: skip

    def fit_factors(
        self, split: Any, task: Any, rows: Sequence[Mapping[str, Any]], *, batch_size: int | None = None,
        progress: bool = True, prepare: PrepareFn | None = None,
    ) -> None:  # fmt: skip
        """Fit (or read back) the factors of ``split``'s theta2 on ``rows``; then :meth:`solve` uses them.

        Streams ``rows`` in batches of ``batch_size`` (default: the solver's): the upstream part runs per batch
        and pass (``prepare(rows)``, default ``split.prepare(task.collate(rows))``; ``InfluenceAttributor.fit``
        passes one that keeps the prepared inputs, so EK-FAC's second pass and the later scoring of the same rows
        reuse the first pass's) and the downstream part once per batch and pass (K-FAC: one pass; EK-FAC: a
        second, correction pass). ``self.fit_info`` records what was computed and what was reused.

        Raises:
            ManifestMismatchError: ``factor_dir`` holds factors fitted on other inputs (and not ``overwrite``).
            FactorMappingError: theta2 holds something K-FAC cannot map.
        """
        check_int(f"{type(self).__name__}.fit_factors batch_size", batch_size, minimum=1, allow_none=True)
        if task is not None and task is not split.task:
            split = split.with_task(task)
        # the covariances average over the positions whose output gradient is not 0 (the module docstring); after
        # the last block's attention those are the loss positions alone, the only ones a pruned split computes
        # there (SplitModel(prune=True)), so the fit runs pruned: the same factors, that part at one position
        rows = list(rows)
        if not rows:
            raise ValueError("fit_factors got no Hessian rows. Fix: pass the examples whose mean loss defines H.")
        bs = int(batch_size or self.batch_size)
        show = progress and self.progress
        blocks = factor_blocks(split, max_factor_dim=self.max_factor_dim)
        fp = self.fingerprint(split, rows, bs)
        fp_hash = fingerprint_hash(fp)
        folder = Path(self.factor_dir) if self.factor_dir else cache_dir("kfac_factors", fp_hash[:24])
        folder.mkdir(parents=True, exist_ok=True)
        manifest = self._open_folder(folder, fp)
        dtype = getattr(torch, self.factor_dtype)
        batches = [(lo, min(len(rows), lo + bs)) for lo in range(0, len(rows), bs)]
        info: dict[str, Any] = {"folder": str(folder), "fingerprint": fp_hash, "n_batches": len(batches)}
        meta_base = {
            "fingerprint": fp_hash,
            "fisher": self.fisher,
            "seed": self.seed,
            "normalisation": _NORMALISATION,
            "blocks": [b.describe() for b in blocks],
            "diagonal": {b.name: b.rule for b in blocks if b.kind == "diagonal"},
            "n_rows": len(rows),
            "batch_size": bs,
            "factor_dtype": self.factor_dtype,
        }
        loaded = _read_tensors(folder / "factors.safetensors", fp_hash)
        if loaded is None:
            sums = self._run_stage(
                "covariance", split, blocks, rows, batches, folder, fp_hash, dtype, None, manifest, info, show, prepare
            )
            tensors, counts = _reduce_covariances(blocks, sums, dtype)
            meta = {**meta_base, **counts}
            _write_tensors(folder / "factors.safetensors", tensors, meta, fp_hash)
            (folder / "covariance.partial.safetensors").unlink(missing_ok=True)
            info["covariance"] = info.pop("stage_covariance")
        else:
            tensors, meta = loaded
            info["covariance"] = "loaded"
            (folder / "covariance.partial.safetensors").unlink(missing_ok=True)  # a kill between write and unlink
        if self.corrected:
            eig_hash = state_digest({k: v for k, v in tensors.items() if k.endswith(("/QA", "/QG"))}, cache=False)
            lam_fp = f"{fp_hash}:lambda:{eig_hash[:24]}"
            lam = _read_tensors(folder / "lambda.safetensors", lam_fp)
            if lam is None:
                eigen = {k: v.to(split.device) for k, v in tensors.items() if k.endswith(("/QA", "/QG"))}
                sums = self._run_stage(
                    "lambda", split, blocks, rows, batches, folder, lam_fp, dtype, eigen, manifest, info, show, prepare
                )
                n = float(sums["n_examples"])
                lam_t = {f"{b.name}/L": (sums[f"{b.name}/L_sum"] / n).to(dtype) for b in blocks if b.kind == "kfac"}
                _write_tensors(folder / "lambda.safetensors", lam_t, {**meta_base, "n_examples": n}, lam_fp)
                (folder / "lambda.partial.safetensors").unlink(missing_ok=True)
                info["lambda"] = info.pop("stage_lambda")
            else:
                lam_t = lam[0]
                info["lambda"] = "loaded"
                (folder / "lambda.partial.safetensors").unlink(missing_ok=True)
            tensors = {**tensors, **lam_t}
        manifest["complete"] = sorted({*manifest.get("complete", []), "ekfac" if self.corrected else "kfac"})
        write_json_atomic(folder / "manifest.json", manifest)
        self.factors = KFACFactors(blocks=blocks, tensors=tensors, meta=meta, fingerprint=fp_hash, folder=folder).to(
            split.device
        )
        self.fit_info = info

    def _open_folder(self, folder: Path, fp: dict[str, Any]) -> dict[str, Any]:
        path = folder / "manifest.json"
        if path.exists() and not self.overwrite:
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = {}
            if old.get("kind") != _KIND or old.get("fingerprint_hash") != fingerprint_hash(fp):
                fields = diff_fields(old.get("fingerprint", {}), fp)
                more = " ..." if len(fields) > 8 else ""
                raise ManifestMismatchError(
                    f"{folder} holds K-FAC factors fitted on other inputs (their fingerprint differs in "
                    f"{', '.join(fields[:8]) or 'its kind'}{more}); preconditioning with them would use the curvature "
                    f"of another split or other Hessian rows. Fix: {type(self).__name__}(factor_dir=None) (one folder "
                    "per fingerprint under $REPINF_LENS_CACHE/kfac_factors), another factor_dir, or overwrite=True "
                    "to discard them."
                )
        return open_manifest(
            folder, kind=_KIND, fingerprint=fp, overwrite=self.overwrite, owned=_FILES,
            extra={"normalisation": _NORMALISATION, "stages": {}, "complete": []},
        )  # fmt: skip

    def _run_stage(
        self, stage: str, split: SplitModel, blocks: list[FactorBlock], rows: list[Mapping[str, Any]],
        batches: list[tuple[int, int]], folder: Path, stage_fp: str, dtype: torch.dtype,
        eigen: Mapping[str, Tensor] | None, manifest: dict[str, Any], info: dict[str, Any], show: bool,
        prepare: PrepareFn | None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Accumulate one pass over the batches, checkpointing the running sums every ``shard_batches`` batches."""
        partial = folder / f"{stage}.partial.safetensors"
        n_shards = -(-len(batches) // self.shard_batches)
        sums: dict[str, Tensor] = {}
        done = 0
        if partial.exists():
            header, tensors, problem = read_verified(partial)
            if problem is not None:
                discard_corrupt(partial, problem)
            elif header.get("fingerprint") == stage_fp and tensors is not None:
                sums = {k: v.to(split.device) for k, v in tensors.items()}
                done = int(header.get("stop", "0"))
        computed: list[int] = []
        task = split.task
        desc = "K-FAC covariances" if stage == "covariance" else "EK-FAC eigenvalue correction"
        first = done * self.shard_batches
        with tqdm(total=len(batches), initial=first, desc=desc, disable=not show) as bar:
            for k in range(done, n_shards):
                shard_sums: dict[str, Tensor] = {}
                for bi in range(k * self.shard_batches, min(len(batches), (k + 1) * self.shard_batches)):
                    lo, hi = batches[bi]
                    inp = prepare(rows[lo:hi]) if prepare is not None else split.prepare(task.collate(rows[lo:hi]))
                    stats = batch_statistics(
                        split, blocks, inp, stage=stage, fisher=self.fisher, generator=_batch_generator(self.seed, bi),
                        eigen=eigen, dtype=dtype, check=(bi == 0 and stage == "covariance"),
                    )  # fmt: skip
                    for key, v in stats.items():
                        v = v.detach().to(split.device)
                        shard_sums[key] = shard_sums[key] + v if key in shard_sums else v
                    bar.update(1)
                for key, v in shard_sums.items():
                    sums[key] = sums[key] + v if key in sums else v
                computed.append(k)
                write_shard(partial, sums, fingerprint=stage_fp, start=0, stop=k + 1)
                manifest.setdefault("stages", {})[stage] = {"shards_done": k + 1, "n_shards": n_shards}
                write_json_atomic(folder / "manifest.json", manifest)
        info[f"stage_{stage}"] = {"resumed": list(range(done)), "computed": computed, "n_shards": n_shards}
        return sums

    # ------------------------------------------------------------------ solving
    def _fitted(self) -> KFACFactors:
        if self.factors is None:
            raise RuntimeError(
                f"{type(self).__name__} has no factors. Fix: call attributor.fit(hessian_rows) (or "
                "solver.fit_factors(split, task, rows)) first."
            )
        if self.corrected and not self.factors.has_lambda:
            raise RuntimeError("EKFAC has factors without eigenvalue corrections. Fix: call fit_factors again.")
        return self.factors

    def solve(self, hvp_fn: HVPFn, g: Tree) -> tuple[Tree, SolveInfo]:
        """``(F + damping I)^-1 g`` with the fitted factors (``hvp_fn`` is not used)."""
        s = self._fitted().precondition(g, damping=self.damping, ekfac=self.corrected, dtype=self._rotation_dtype(),
                                        null_tol=self.null_space_tol)  # fmt: skip
        return self._checked(s), SolveInfo(iterations=1, converged=True)

    def solve_many(
        self, hvp_fn: HVPFn, gs: list[Tree], *, chunk_size: int | None = None
    ) -> tuple[list[Tree], list[SolveInfo]]:
        """Precondition every query's gradient in ONE batched pass (stacked along a leading dim)."""
        if not gs:
            return [], []
        factors = self._fitted()
        for g in gs:
            factors.check_keys(g)
        # block by block: only one block's entries are stacked at a time, so the peak is the queries' gradients,
        # their results and one block's temporaries (not a stacked copy of every gradient besides)
        per: list[dict[str, Tensor]] = [{} for _ in gs]
        null_tol = self.null_space_tol
        for b in factors.blocks:
            w = gs[0][b.params[0]]
            if factors.per_vector(b, w, damping=self.damping, ekfac=self.corrected, null_tol=null_tol,
                                  dtype=self._rotation_dtype()):  # fmt: skip
                for q, g in enumerate(gs):  # (as cheap one at a time: no stacked copy)
                    per[q].update(self._precondition_block(factors, b, {k: g[k] for k in b.params}))
                continue
            sub = {k: torch.stack([g[k] for g in gs]) for k in b.params}
            res = self._precondition_block(factors, b, sub)
            del sub
            for q in range(len(gs)):
                per[q].update({k: v[q] for k, v in res.items()})
        outs = [self._checked({k: per[i][k] for k in gs[0]}, query=i) for i in range(len(gs))]
        return outs, [SolveInfo(iterations=1, converged=True) for _ in gs]

    def _precondition_block(self, factors: KFACFactors, b: FactorBlock, sub: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return factors.precondition_block(
            b, sub, damping=self.damping, ekfac=self.corrected, dtype=self._rotation_dtype(),
            null_tol=self.null_space_tol,
        )  # fmt: skip

    def solve_stacked(self, block: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`solve_many` of vectors already stacked along a leading dim (``[m, *shape]`` per theta2 entry,
        block CG's layout): the same preconditioning, without unstacking and restacking them."""
        factors = self._fitted()
        factors.check_keys(block)
        out: dict[str, Tensor] = {}
        for b in factors.blocks:
            out.update(self._precondition_block(factors, b, {k: block[k] for k in b.params}))
        return self._checked(out)


@dataclass
class EKFAC(KFAC):
    """EK-FAC (George et al. 2018; Kronfluence's default ``"ekfac"``): K-FAC's eigenbases with corrected eigenvalues.

    Same settings and folder as :class:`KFAC`; :meth:`fit_factors` adds a second pass over the Hessian rows that
    computes ``Lambda = (1/N) sum_n (Q_G^T dW_n Q_A)^2`` per linear map (the exact diagonal of the Fisher in the
    Kronecker eigenbasis), and :meth:`solve` divides by ``Lambda + damping`` in that eigenbasis.
    """

    name: ClassVar[str] = "ekfac"
    corrected: ClassVar[bool] = True


def _reduce_covariances(
    blocks: Sequence[FactorBlock], sums: Mapping[str, Tensor], dtype: torch.dtype
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Sums -> ``A``, ``G`` (normalised as the module docstring says), their eigendecompositions, ``D``."""
    n = float(sums["n_examples"])
    out: dict[str, Tensor] = {}
    n_pos: dict[str, float] = {}
    for b in blocks:
        if b.kind == "diagonal":
            out[f"{b.name}/D"] = (sums[f"{b.name}/D_sum"] / n).to(dtype)
            continue
        m = float(sums[f"{b.name}/n_pos"])
        n_pos[b.name] = m
        for key, count in (("A", max(m, 1.0)), ("G", n)):
            c = sums[f"{b.name}/{key}_sum"].double() / count
            c = 0.5 * (c + c.T)
            lam, q = torch.linalg.eigh(c)
            out[f"{b.name}/{key}"] = c.to(dtype)
            out[f"{b.name}/Q{key}"] = q.to(dtype).contiguous()
            out[f"{b.name}/l{key}"] = lam.clamp_min(0.0).to(dtype)  # PSD: round-off negatives to 0
    return out, {"n_examples": n, "n_positions": n_pos}


register_solver("kfac", KFAC)
register_solver("ekfac", EKFAC)
