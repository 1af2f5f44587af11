"""repinf_lens next to its peers, Kronfluence and dattri, on ONE setting and ONE retraining ground truth (issue 18).

Every method scores the same 64 training x 8 query pairs of the same theta2, loss and data, and every method's scores
are evaluated against the SAME retrained test losses, so each claim (LDS, time, memory) is a ratio within one run.

Setting (``benchmarks/bench_lds.py``'s): the default model (SmolLM2-135M-Instruct, offline), split at
``hook_resid_post`` of the second-to-last block, theta2 = the last block's ``mlp.W_out`` (885k parameters), the plain
template, real OpenBookQA rows, damping 1e-2. The split has no SAE: example scores and the theta2 gradients do not
depend on one when its error term is held (``bench_lds`` uses a random SAE).

Ground truth (:mod:`repinf_lens.analysis.lds`): theta2 is refit on the full training set (``theta2*``, where every
method computes its scores), then on ``--subsets`` random 50 % subsets (the subsets of ``linear_datamodeling_score``
with seed 0), each refit from ``theta2*`` with the proximal objective ``mean loss + damping/2 ||theta2 - theta2_0||^2``;
``--loo k`` adds leave-one-out refits of the first k examples. The refits run ``refit_downstream`` (L-BFGS, 200
iterations, the harness's tolerances) on :class:`CachedTail`, the same loss of ``W_out`` evaluated from cached
answer-position activations (checked against ``split.inputs_loss`` before use; ``--no-cached-tail`` reruns the
whole block per step, about 100x slower). LDS = per-query Spearman between
``-sum_{i in S} score_i`` and the retrained test-loss change, averaged over queries, with a paired bootstrap over
queries against the best method.

Methods:

* repinf_lens (TransformerLens split): Identity, CG (100 iterations, tol 1e-8), CG with exactly 20 iterations
  (matched to dattri's), K-FAC and EK-FAC (sampled true, closed-form true ``"expected"`` and empirical Fisher),
  EK-FAC-preconditioned CG (plain and block), Woodbury and Woodbury-preconditioned CG;
* Kronfluence on the Hugging Face twin (``load_hf_model``), tracking only ``model.layers[-1].mlp.down_proj`` (the same
  matrix, transposed): EK-FAC and K-FAC, true and empirical Fisher, with its token mask at the answer position (the
  only position whose down_proj output reaches the loss, so its factors are normalised as repinf_lens' and
  ``damping_factor`` is the same lambda), plus EK-FAC with Kronfluence's usual mask of every real token;
* dattri's attributors with its functional API over the flat theta2 vector (the loss is repinf_lens' split loss
  through ``torch.func``): CG (``IFAttributorCG``, 20 iterations: dattri runs every iteration, no tolerance),
  Arnoldi (``IFAttributorArnoldi``, 100 iterations, 100 eigenpairs, Hessian-vector products in rev-rev mode),
  DataInf (``IFAttributorDataInf``) and TRAK (``TRAKAttributor``, one checkpoint, 512 random dimensions).

Before any peer runs, the per-example gradients of each peer's loss w.r.t. theta2 are compared with repinf_lens'
(TL split): the HF twin's down_proj gradients (the loss Kronfluence differentiates) and dattri's vmapped gradients;
a relative residual above ``--grad-tol`` aborts the run (:class:`GradientMismatchError`).

Sign convention of every reported score: repinf_lens' (POSITIVE = proponent, ``+ g_test^T (H + lambda)^-1 g_train``).
Kronfluence's pairwise scores with the loss as measurement and dattri's inner-product attributors are the same
quantity (factor +1); TRAK's scores, built from the gradient of the correct-option margin, are positive for
proponents too (factor +1). Each factor is written to the output and checked on the data: the Pearson correlation
of every method's scores with the gradient dot products must be positive.

Peers missing from the environment are skipped with a message (install them with ``pip install -e .[peers]``).

Usage: ``python benchmarks/bench_peers.py [--out runs/bench_peers] [--subsets 16] [--loo 32]`` (``--tiny``: a
smoke test on a tiny random Llama, seconds). Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _memory import PeakRSS
from torch import Tensor

PEERS = {"kronfluence": "1.0.1", "dattri": "0.3.0"}
INSTALL_HINT = "pip install -e .[peers]"


class GradientMismatchError(RuntimeError):
    """A peer's per-example theta2 gradients differ from repinf_lens' (another loss, model or parameter)."""


# ---------------------------------------------------------------------------------------------------- utilities
def import_peer(name: str) -> Any | None:
    """Import a peer library, or print why it is skipped (and how to install it) and return ``None``."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        print(
            f"[bench_peers] {name} is not installed ({err}); its methods are skipped. Install the peers with "
            f"`{INSTALL_HINT}` ({', '.join(f'{k}=={v}' for k, v in PEERS.items())}).",
            flush=True,
        )
        return None


def peer_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


#: the process RSS cap every method runs under (``--max-rss-gb``; set by :func:`main`)
RSS_CAP: list[int | None] = [None]


def _mem() -> PeakRSS:
    return PeakRSS(cap_bytes=RSS_CAP[0])


def _timed(fn: Callable[..., Any], box: list[float]) -> Callable[..., Any]:
    """``fn`` that adds the seconds it spends to ``box[0]``."""

    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            box[0] += time.perf_counter() - t

    return wrapper


# ---------------------------------------------------------------------------------------------------- setting
@dataclass(frozen=True)
class TwinMap:
    """One matrix of theta2: its TransformerLens name, the HF twin's ``nn.Linear`` holding it, and the layouts."""

    tl: str  # e.g. "blocks.29.attn.W_Q" ([n_heads, d_model, d_head])
    hf: str  # e.g. "model.layers.29.self_attn.q_proj" (weight [n_heads * d_head, d_model])
    to_hf: Callable[[Tensor], Tensor]  # TL layout -> the HF weight
    to_tl: Callable[[Tensor], Tensor]  # the HF weight (or its gradient) -> TL layout


def twin_maps(model: Any, layer: int, which: str) -> list[TwinMap]:
    """theta2's matrices in block ``layer`` of a Llama-family model: ``"w_out"`` (the MLP's ``W_out``) or ``"block"``
    (every linear map of the block: ``W_Q``, ``W_K``, ``W_V`` (grouped-query: ``_W_K`` / ``_W_V``), ``W_O``,
    ``W_gate``, ``W_in``, ``W_out``; the norm weights and TL's zero biases have no ``nn.Linear`` a peer could
    track, so they stay out of theta2 for every method)."""
    import einops

    names = {n for n, _ in model.named_parameters()}
    pre, hf = f"blocks.{layer}.", f"model.layers.{layer}."
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)

    def t(w: Tensor) -> Tensor:
        return w.T

    def heads_in(n: int) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        return (lambda w: einops.rearrange(w, "n m h -> (n h) m"),
                lambda w: einops.rearrange(w, "(n h) m -> n m h", n=n))  # fmt: skip

    def tl_name(short: str) -> str:  # grouped-query K / V are TL's raw _W_K / _W_V
        return pre + (f"attn._{short}" if pre + f"attn._{short}" in names else f"attn.{short}")

    w_out = TwinMap(pre + "mlp.W_out", hf + "mlp.down_proj", t, t)
    if which == "w_out":
        return [w_out]
    if which != "block":
        raise ValueError(f"--theta2 must be 'w_out' or 'block', got {which!r}.")
    return [
        TwinMap(pre + "attn.W_Q", hf + "self_attn.q_proj", *heads_in(n_heads)),
        TwinMap(tl_name("W_K"), hf + "self_attn.k_proj", *heads_in(n_kv)),
        TwinMap(tl_name("W_V"), hf + "self_attn.v_proj", *heads_in(n_kv)),
        TwinMap(
            pre + "attn.W_O",
            hf + "self_attn.o_proj",
            lambda w: einops.rearrange(w, "n h m -> m (n h)"),
            lambda w: einops.rearrange(w, "m (n h) -> n h m", n=n_heads),
        ),
        TwinMap(pre + "mlp.W_gate", hf + "mlp.gate_proj", t, t),
        TwinMap(pre + "mlp.W_in", hf + "mlp.up_proj", t, t),
        w_out,
    ]


@dataclass
class Setting:
    """The model, its HF twin, the split and the rows every method shares."""

    model: Any  # HookedTransformer
    hf: Any  # the HF twin (LlamaForCausalLM)
    split: Any
    task: Any
    train: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    maps: list[TwinMap]  # theta2's matrices (TL name, HF module, layouts), in a fixed order
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def theta_names(self) -> list[str]:
        return [m.tl for m in self.maps]

    @property
    def hf_modules(self) -> list[str]:
        return [m.hf for m in self.maps]

    @property
    def theta(self) -> dict[str, Tensor]:
        params = self.split.downstream_params()
        return {n: params[n] for n in self.theta_names}

    @property
    def n_theta2(self) -> int:
        return sum(v.numel() for v in self.theta.values())

    def load_theta(self, params: dict[str, Tensor]) -> None:
        """Write theta2 into the TL model and (in the HF layout) into the HF twin."""
        self.split.load_downstream_params({n: params[n] for n in self.theta_names})
        with torch.no_grad():
            for m in self.maps:
                self.hf.get_submodule(m.hf).weight.copy_(m.to_hf(params[m.tl]))


def build_setting(args: argparse.Namespace) -> Setting:
    from repinf_lens import MultipleChoiceTask, SplitModel, load_mcqa, load_model
    from repinf_lens.models import load_hf_model

    need = args.n_train + args.queries
    if args.tiny:
        from repinf_lens.testing import tiny_hf_llama, toy_mcqa_rows

        folder = Path(args.workdir) / "tiny-hf"
        tiny_hf_llama(folder, seed=0, initializer_range=0.2)
        model = load_model(str(folder), n_ctx=256)
        hf, _ = load_hf_model(folder)
        rows = toy_mcqa_rows(need, seed=0)
        source = "tiny random Llama (repinf_lens.testing.tiny_hf_llama), toy rows"
    else:
        model = load_model(args.model, n_ctx=512)
        hf, _ = load_hf_model(args.model)
        data = load_mcqa("openbookqa", args.split, offline=True)
        rows = [dict(data[i]) for i in range(need)]
        source = f"openbookqa/{args.split} rows 0..{need - 1} (offline)"
    n_layers = int(model.cfg.n_layers)
    hook = f"blocks.{n_layers - 2}.hook_resid_post"
    maps = twin_maps(model, n_layers - 1, args.theta2)
    task = MultipleChoiceTask.from_model(model, template=args.template)
    pattern = "|".join(re.escape(m.tl) for m in maps)
    split = SplitModel(model, hook, None, task=task, downstream=rf"^({pattern})$")
    params = split.downstream_params()
    if sorted(params) != sorted(m.tl for m in maps):
        raise GradientMismatchError(f"theta2 is {sorted(params)}, not the matrices {[m.tl for m in maps]}.")
    for m in maps:
        w_tl, w_hf = params[m.tl], hf.get_submodule(m.hf).weight
        if tuple(w_hf.shape) != tuple(m.to_hf(w_tl).shape) or not torch.equal(w_hf.detach(), m.to_hf(w_tl)):
            raise GradientMismatchError(
                f"The HF twin's {m.hf}.weight {tuple(w_hf.shape)} is not the TL {m.tl} {tuple(w_tl.shape)} in the HF "
                "layout: the twin is another model. Fix: load both from the same folder (--model)."
            )
    for p in hf.parameters():
        p.requires_grad_(False)
    info = {
        "model": "tiny" if args.tiny else (args.model or "default (SmolLM2-135M-Instruct)"),
        "rows": source,
        "hook": hook,
        "theta2": ", ".join(m.tl for m in maps),
        "hf_module": ", ".join(m.hf for m in maps),
        "n_theta2": sum(v.numel() for v in params.values()),
        "template": args.template,
        "sae": None,
        "n_train": args.n_train,
        "queries": args.queries,
        "damping": args.damping,
    }
    return Setting(model, hf, split, task, rows[: args.n_train], rows[args.n_train :], maps, info)


# ---------------------------------------------------------------------------------------------------- ground truth
def subset_weights(n: int, n_subsets: int, fraction: float, seed: int = 0) -> Tensor:
    """The 0/1 subset masks of :func:`repinf_lens.analysis.lds.linear_datamodeling_score` (same generator)."""
    g = torch.Generator().manual_seed(seed)
    m = max(1, round(fraction * n))
    w = torch.zeros(n_subsets, n)
    for j in range(n_subsets):
        w[j, torch.randperm(n, generator=g)[:m]] = 1.0
    return w


def loo_weights(n: int, k: int) -> Tensor:
    w = torch.ones(k, n)
    w[torch.arange(k), torch.arange(k)] = 0.0
    return w


def _test_losses(split: Any, params: Any, q_inputs: Sequence[Any]) -> Tensor:
    with torch.no_grad():
        return torch.cat([split.inputs_loss(params, inp, reduction="none").double().cpu() for inp in q_inputs])


@dataclass
class TailInputs:
    """The answer-position inputs of the last block's ``W_out`` (everything else in the loss is constant in it)."""

    resid_mid: Tensor  # [B, d_model] residual after the last block's attention
    post: Tensor  # [B, d_mlp] the MLP's hidden activation (W_out's input)
    batch: Any  # the task batch, option ids re-indexed into the kept unembedding columns


class CachedTail:
    """``split.inputs_loss`` for theta2 = the last block's ``W_out``, from answer-position tensors cached once.

    The multiple-choice loss reads one position, where ``resid_post = resid_mid + post @ W_out + b_out`` is followed
    only by the final norm, the option letters' unembedding columns and the soft cap: the same function of
    ``W_out`` as the split's (which reruns the whole block, 50-100x slower on CPU). :meth:`verify` checks it
    against ``split.inputs_loss``; the retraining uses it in :func:`repinf_lens.analysis.lds.refit_downstream` (as
    its ``split`` argument: the harness only calls ``inputs_loss``).
    """

    def __init__(self, s: Setting) -> None:
        from repinf_lens.models.hooked import final_norm, logit_softcap

        self.s, self._norm, self._cap = s, final_norm, logit_softcap
        model, layer = s.model, int(s.model.cfg.n_layers) - 1
        if s.theta_names != [f"blocks.{layer}.mlp.W_out"]:
            raise ValueError(f"CachedTail is the loss of the last W_out alone, not of {s.theta_names}.")
        self.name = s.theta_names[0]
        self.hooks = (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.mlp.hook_post")
        self.b_out = model.blocks[layer].mlp.b_out.detach()
        self.cols = torch.tensor(sorted(set(s.task.letter_ids)), dtype=torch.long)
        self.w_u = model.unembed.W_U.detach()[:, self.cols]
        self.b_u = model.unembed.b_U.detach()[self.cols]
        self._index = {int(c): i for i, c in enumerate(self.cols)}

    def tail_inputs(self, inp: Any) -> TailInputs:
        """Run the split once (hooks at the last block) and keep the answer position."""
        seen: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> None:
            seen[hook.name] = act.detach()

        with torch.no_grad(), self.s.model.hooks(fwd_hooks=[(h, keep) for h in self.hooks]):
            self.s.split.logits(inp.latents, inp.batch, None, inp.error, inp.base, inp.anchor)
        rows = torch.arange(len(inp.batch))
        pos = inp.batch.answer_pos
        opt = inp.batch.option_ids
        remap = torch.tensor([[self._index.get(int(o), -1) if o >= 0 else -1 for o in r] for r in opt.tolist()])
        batch = dataclasses.replace(inp.batch, option_ids=remap.to(opt.dtype))
        seq = inp.batch.tokens.shape[1]

        def at_answer(act: Tensor) -> Tensor:  # after the last resid_mid the split runs at the answer only
            return act[rows, pos] if act.shape[1] == seq else act[:, 0]

        return TailInputs(at_answer(seen[self.hooks[0]]), at_answer(seen[self.hooks[1]]), batch)

    def inputs_loss(self, params: dict[str, Tensor], inp: TailInputs, reduction: str = "mean") -> Tensor:
        resid = inp.resid_mid + inp.post @ params[self.name] + self.b_out
        h = self._norm(self.s.model, resid[:, None, :])[:, 0]
        logits = self._cap(self.s.model, h @ self.w_u + self.b_u)
        return self.s.task.loss(logits, inp.batch, reduction=reduction)

    def verify(self, inputs: Sequence[Any], tails: Sequence[TailInputs], tol: float) -> dict[str, Any]:
        """Losses and gradients vs ``split.inputs_loss`` at theta2 and at a perturbed theta2; raise above ``tol``."""
        name = self.name
        w0 = self.s.split.downstream_params()[name]
        g = torch.Generator().manual_seed(0)
        out: dict[str, Any] = {}
        for tag, w in (("theta2_0", w0), ("perturbed", w0 + 0.1 * w0.std() * torch.randn(w0.shape, generator=g))):
            p = {name: w}
            ref_l = torch.cat([self.s.split.inputs_loss(p, i, reduction="none").detach() for i in inputs])
            new_l = torch.cat([self.inputs_loss(p, t, reduction="none").detach() for t in tails])
            ref_g = torch.func.grad(lambda q: sum(self.s.split.inputs_loss(q, i, reduction="sum") for i in inputs))(p)
            new_g = torch.func.grad(lambda q: sum(self.inputs_loss(q, t, reduction="sum") for t in tails))(p)
            out[tag] = {
                "max_abs_loss_diff": float((new_l - ref_l).abs().max()),
                "grad_rel_diff": float((new_g[name] - ref_g[name]).detach().norm() / ref_g[name].detach().norm()),
            }
        print(f"[bench_peers] cached-tail retraining loss vs split.inputs_loss: {out}", flush=True)
        worst = max(max(v["max_abs_loss_diff"], v["grad_rel_diff"]) for v in out.values())
        if not worst <= tol:
            raise GradientMismatchError(
                f"The cached answer-position loss used for retraining differs from split.inputs_loss ({out}); "
                "the refits would not minimise the harness's objective. Fix: --no-cached-tail."
            )
        return out


def retrain(s: Setting, weights: dict[str, Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """Refit theta2 on the full data (loaded into both models), then on every mask; test-loss changes per kind.

    Every refit is :func:`repinf_lens.analysis.lds.refit_downstream` (L-BFGS, the proximal objective, ``max_iter``,
    its tolerances) on the training batches; with the cached tail (default) its loss is :class:`CachedTail`'s
    (verified equal to the split's). The test losses are always the split's own. The refits run on
    ``--truth-threads`` (default ``--threads``).
    """
    from tqdm.auto import tqdm

    from repinf_lens.analysis.lds import refit_downstream

    bs = args.batch_size
    split, task = s.split, s.task
    inputs = [split.prepare(task.collate(s.train[i : i + bs])) for i in range(0, len(s.train), bs)]
    q_inputs = [split.prepare(task.collate([r])) for r in s.queries]
    theta0 = {k: v.detach().clone() for k, v in split.downstream_params().items()}
    out: dict[str, Any] = {}
    objective: Any = split
    fit_inputs: list[Any] = inputs
    use_tail = args.cached_tail and args.theta2 == "w_out"  # (the whole block: the split's own loss)
    if use_tail:
        objective = CachedTail(s)
        fit_inputs = [objective.tail_inputs(i) for i in inputs]
        out["cached_tail_check"] = objective.verify(inputs, fit_inputs, args.grad_tol)
    kw = dict(damping=args.damping, max_iter=args.max_iter)
    ckpt = TruthCheckpoint(args.out / "ground_truth.partial.safetensors", s, weights, args, theta0, use_tail)
    torch.set_num_threads(args.truth_threads or args.threads)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        full = ckpt.full
        if full is None:
            full = refit_downstream(objective, fit_inputs, torch.ones(len(s.train)), theta0, theta0, **kw)
            ckpt.save_full(full, time.perf_counter() - t0, time.process_time() - c0)
        out["full_refit_s"], out["full_refit_cpu_s"] = ckpt.seconds("full")
        s.load_theta(full)
        base = _test_losses(split, full, q_inputs)
        out["base_test_loss"] = base.tolist()
        out["objective"] = "CachedTail (answer-position W_out loss)" if use_tail else "split.inputs_loss"
        if ckpt.resumed:
            out["resumed_from_checkpoint"] = ckpt.resumed
        for kind, w in weights.items():
            actual = ckpt.done(kind)
            with tqdm(total=len(w), initial=len(actual), desc=f"{kind} retraining", disable=not args.progress) as bar:
                for row in w[len(actual) :]:
                    t, c = time.perf_counter(), time.process_time()
                    p = refit_downstream(objective, fit_inputs, row, full, theta0, **kw)
                    actual.append(_test_losses(split, p, q_inputs) - base)
                    ckpt.save_refit(kind, actual, time.perf_counter() - t, time.process_time() - c)
                    bar.update(1)
            secs, cpu = ckpt.seconds(kind)
            out[kind] = {"actual": torch.stack(actual, 1), "seconds": secs, "cpu_s": cpu}
    finally:
        torch.set_num_threads(args.threads)
    out["threads"] = ckpt.threads_used
    return out


class TruthCheckpoint:
    """The retraining's finished work (theta2*, then each refit's test-loss changes), written after every refit.

    One safetensors file (atomic, with the sha256 of its tensors) whose header holds the fingerprint of everything
    the refits depend on (setting, rows, masks, theta2 at the start, L-BFGS settings). A rerun with the same
    fingerprint resumes after the last finished refit (the retraining of the whole last block takes about 75 min on
    one thread); another fingerprint, or a corrupt file, starts over (the file is replaced).
    """

    def __init__(
        self, path: Path, s: Setting, weights: dict[str, Tensor], args: argparse.Namespace,
        theta0: dict[str, Tensor], use_tail: bool,
    ) -> None:  # fmt: skip
        from repinf_lens._fingerprint import state_digest
        from repinf_lens._shards import fingerprint_hash, read_verified

        self.path = path
        fp = {
            "setting": {k: v for k, v in s.info.items()},
            "rows": [r.get("id") for r in s.train + s.queries],
            "weights": state_digest({k: v.contiguous() for k, v in weights.items()}, cache=False),
            "theta0": state_digest({k: v.contiguous() for k, v in theta0.items()}, cache=False),
            "max_iter": args.max_iter,
            "batch_size": args.batch_size,
            "objective": "cached_tail" if use_tail else "split",
        }  # (not the thread count: it changes the refits' float rounding only; the counts used are recorded)
        self.fingerprint = fingerprint_hash(json.loads(json.dumps(fp, default=str)))
        self.tensors: dict[str, Tensor] = {}
        self.meta: dict[str, Any] = {}
        self.resumed: dict[str, int] = {}
        if path.exists():
            header, tensors, problem = read_verified(path)
            got = header.get("fingerprint")
            legacy: dict[str, int] = {}
            if got != self.fingerprint:  # the earlier format put the thread count in the fingerprint: accept any
                legacy = {fingerprint_hash(json.loads(json.dumps({**fp, "threads": t}, default=str))): t
                          for t in range(1, 257)}  # fmt: skip
            if problem is None and (got == self.fingerprint or got in legacy) and tensors is not None:
                self.tensors, self.meta = tensors, json.loads(header.get("bench_peers", "{}"))
                if got in legacy:  # every refit of that file ran with its one thread count
                    self.meta.setdefault("threads_used", [legacy[got]])
                self.resumed = {k: int(v.shape[1]) for k, v in tensors.items() if k.startswith("actual/")}
                if "full/" + s.theta_names[0] in tensors:
                    self.resumed["full"] = 1
                print(f"[bench_peers] retraining resumes from {path}: {self.resumed}", flush=True)
            else:
                why = problem or "another setting (its fingerprint differs)"
                print(f"[bench_peers] ignoring {path} ({why}); the retraining starts over", flush=True)

    @property
    def full(self) -> dict[str, Tensor] | None:
        full = {k[len("full/") :]: v for k, v in self.tensors.items() if k.startswith("full/")}
        return full or None

    def done(self, kind: str) -> list[Tensor]:
        t = self.tensors.get(f"actual/{kind}")
        return [] if t is None else list(t.double().unbind(1))

    def seconds(self, kind: str) -> tuple[float, float]:
        wall, cpu = self.meta.get(kind, (0.0, 0.0))
        return round(wall, 1), round(cpu, 1)

    def _add_seconds(self, kind: str, wall: float, cpu: float) -> None:
        w0, c0 = self.meta.get(kind, (0.0, 0.0))
        self.meta[kind] = (w0 + wall, c0 + cpu)
        self.meta["threads_used"] = sorted(set(self.meta.get("threads_used", [])) | {torch.get_num_threads()})

    @property
    def threads_used(self) -> list[int]:
        """The thread counts the refits ran with (several when a resumed run used another ``--truth-threads``)."""
        return list(self.meta.get("threads_used", []))

    def _write(self) -> None:
        from safetensors.torch import save_file

        from repinf_lens._fingerprint import state_digest
        from repinf_lens._io import atomic_file
        from repinf_lens._shards import CONTENT_KEY

        cpu = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        with atomic_file(self.path) as tmp:
            save_file(cpu, tmp, metadata={"fingerprint": self.fingerprint, "bench_peers": json.dumps(self.meta),
                                          CONTENT_KEY: state_digest(cpu, cache=False)})  # fmt: skip

    def save_full(self, full: dict[str, Tensor], wall: float, cpu: float) -> None:
        self.tensors.update({f"full/{k}": v for k, v in full.items()})
        self._add_seconds("full", wall, cpu)
        self._write()

    def save_refit(self, kind: str, actual: list[Tensor], wall: float, cpu: float) -> None:
        self.tensors[f"actual/{kind}"] = torch.stack(actual, 1)
        self._add_seconds(kind, wall, cpu)
        self._write()


# ---------------------------------------------------------------------------------------------------- gradients
def repinf_example_grads(s: Setting, rows: Sequence[dict[str, Any]], bs: int) -> Tensor:
    """``[N, n_theta2]`` per-example gradients of repinf_lens' split loss (TL layouts, flat, in ``s.maps`` order)."""
    from repinf_lens.curvature.hvp import loss_grad

    params = s.split.downstream_params()
    out = []
    for lo in range(0, len(rows), bs):
        inp = s.split.prepare(s.task.collate(rows[lo : lo + bs]))
        for i in range(len(inp)):
            g = loss_grad(s.split, params, inp.slice(i, i + 1))
            out.append(torch.cat([g[n].detach().flatten() for n in s.theta_names]))
    return torch.stack(out)


class HFTwinLoss:
    """repinf_lens' multiple-choice loss on the HF twin: the option letters' cross-entropy at the answer position.

    ``batch`` is a dict from :func:`hf_collate` (``input_ids``, ``attention_mask``, ``answer_pos``, ``labels``,
    ``option_ids``, ``answer_mask``). Only the answer position goes through ``lm_head``.
    """

    def __init__(self, task: Any) -> None:
        self.task = task

    def mcqa_batch(self, batch: dict[str, Tensor], labels: Tensor | None = None) -> Any:
        from repinf_lens.task.mcqa import MCQABatch

        return MCQABatch(
            tokens=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            answer_pos=batch["answer_pos"],
            labels=batch["labels"] if labels is None else labels,
            option_ids=batch["option_ids"],
        )

    def logits(self, batch: dict[str, Tensor], model: Any) -> Tensor:
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        h = out.last_hidden_state[torch.arange(len(batch["answer_pos"])), batch["answer_pos"]]
        return model.lm_head(h)

    def losses(self, batch: dict[str, Tensor], model: Any, *, sample: bool = False) -> Tensor:
        """Per-example losses; ``sample``: labels drawn from the model's option distribution (true Fisher)."""
        logits = self.logits(batch, model)
        labels = None
        if sample:
            with torch.no_grad():
                opt = self.task.option_logits(logits.detach(), self.mcqa_batch(batch))
                labels = torch.multinomial(torch.softmax(opt.double(), -1), 1)[:, 0]
        mb = self.mcqa_batch(batch, labels)
        return self.task.loss(logits, mb, reduction="none")


def hf_items(task: Any, rows: Sequence[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """One unpadded item per row, tokenised by repinf_lens' task (the token ids both models see)."""
    items = []
    for r in rows:
        b = task.collate([r])
        n = int(b.attention_mask[0].sum())
        items.append(
            {
                "input_ids": b.tokens[0, :n],
                "answer_pos": b.answer_pos[0],
                "labels": b.labels[0],
                "option_ids": b.option_ids[0],
            }
        )
    return items


def hf_collate(items: Sequence[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad a list of :func:`hf_items` entries into a batch (``answer_mask``: 1 at the answer position)."""
    width = max(len(it["input_ids"]) for it in items)
    k = max(len(it["option_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    opt = torch.full((len(items), k), -1, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = it["input_ids"]
        mask[i, :n] = 1
        opt[i, : len(it["option_ids"])] = it["option_ids"]
    pos = torch.stack([it["answer_pos"] for it in items])
    answer_mask = torch.zeros_like(mask)
    answer_mask[torch.arange(len(items)), pos] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "answer_pos": pos,
        "labels": torch.stack([it["labels"] for it in items]),
        "option_ids": opt,
        "answer_mask": answer_mask,
    }


def hf_example_grads(s: Setting, rows: Sequence[dict[str, Any]], bs: int) -> tuple[Tensor, Tensor]:
    """``([N, n_theta2], [N])``: the HF twin's per-example gradients of theta2's modules (in TL layouts, flat, in
    ``s.maps`` order) and losses."""
    loss = HFTwinLoss(s.task)
    ws = [s.hf.get_submodule(m.hf).weight for m in s.maps]
    items = hf_items(s.task, rows)
    grads, losses = [], []
    for w in ws:
        w.requires_grad_(True)
    try:
        for lo in range(0, len(items), bs):
            per = loss.losses(hf_collate(items[lo : lo + bs], s.task.pad_id), s.hf)
            for i in range(len(per)):
                gs = torch.autograd.grad(per[i], ws, retain_graph=i + 1 < len(per))
                grads.append(torch.cat([m.to_tl(g).detach().flatten() for m, g in zip(s.maps, gs, strict=True)]))
            losses.append(per.detach())
    finally:
        for w in ws:
            w.requires_grad_(False)
    return torch.stack(grads), torch.cat(losses)


def compare_grads(ref: Tensor, other: Tensor, tol: float, what: str) -> dict[str, Any]:
    """Per-example residuals of ``other`` vs ``ref`` (rows = examples); raise :class:`GradientMismatchError` above tol.

    The criterion is ``||other_i - ref_i|| / max(||ref_i||, median_j ||ref_j||)``: the relative residual, except that
    an example whose gradient is far below the typical one (a nearly fitted training example at theta2*, where
    float rounding of the logits dominates its tiny gradient) is measured against the typical gradient norm. The
    plain per-example relative residuals and the Frobenius one are reported as well.
    """
    if other.shape != ref.shape:
        raise GradientMismatchError(f"{what}: gradient shape {tuple(other.shape)} != repinf_lens' {tuple(ref.shape)}.")
    norms = ref.norm(dim=1)
    diff = (other - ref).norm(dim=1)
    rel = diff / norms.clamp_min(1e-30)
    scaled = diff / torch.maximum(norms, norms.median()).clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(other, ref, dim=1)
    res = {
        "what": what,
        "n_examples": int(ref.shape[0]),
        "max_scaled_residual": float(scaled.max()),
        "max_rel_residual": float(rel.max()),
        "median_rel_residual": float(rel.median()),
        "frobenius_rel_residual": float((other - ref).norm() / ref.norm()),
        "min_cosine": float(cos.min()),
        "grad_norm_min_median": [float(norms.min()), float(norms.median())],
        "tol": tol,
    }
    print(f"[bench_peers] gradient check, {what}: max residual {res['max_scaled_residual']:.2e} (per-example relative: "
          f"max {res['max_rel_residual']:.2e}, median {res['median_rel_residual']:.2e}; Frobenius "
          f"{res['frobenius_rel_residual']:.2e}; tol {tol:g})", flush=True)  # fmt: skip
    if not res["max_scaled_residual"] <= tol:
        worst = int(scaled.argmax())
        raise GradientMismatchError(
            f"{what}: per-example theta2 gradients differ from repinf_lens' (TL split): residual "
            f"{res['max_scaled_residual']:.3e} at example {worst} > tol {tol:g} (relative {float(rel[worst]):.3e}, "
            f"min cosine {res['min_cosine']:.6f}). The peer would not score the same function, so its numbers would "
            "not be comparable; aborting. Fix: check that both models hold the same weights (theta2 loaded into "
            "both), the same tokens and the same loss; --grad-tol only if the residual is float rounding."
        )
    return res


def gradient_checks(
    s: Setting,
    train: Sequence[dict[str, Any]],
    queries: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    kronfluence: bool,
    dattri: bool,
) -> tuple[list[dict[str, Any]], Tensor, Tensor, DattriData | None]:
    """Each peer's per-example theta2 gradients vs repinf_lens' on ``train + queries`` at the current theta2.

    Returns ``(checks, repinf gradients [N, n_theta2], repinf losses [N], dattri's data tensors or None)``.
    """
    rows = [*train, *queries]
    bs = args.batch_size
    ref = repinf_example_grads(s, rows, bs)
    params = s.split.downstream_params()
    with torch.no_grad():
        losses = torch.cat(
            [s.split.inputs_loss(params, s.split.prepare(s.task.collate(rows[i : i + bs])), reduction="none")
             for i in range(0, len(rows), bs)]
        )  # fmt: skip
    checks = []
    if kronfluence:
        g_hf, l_hf = hf_example_grads(s, rows, bs)
        c = compare_grads(ref, g_hf, args.grad_tol, f"HF twin {', '.join(m.hf.rsplit('.', 1)[-1] for m in s.maps)} "
                          "(the loss Kronfluence differentiates)")  # fmt: skip
        c["max_abs_loss_diff"] = float((l_hf - losses).abs().max())
        checks.append(c)
        del g_hf
    dd = None
    if dattri:
        dd = dattri_data(s, bs, train, queries)
        checks.append(compare_grads(ref, dattri_grads(s, dd), args.grad_tol, "dattri vmapped loss gradients"))
    return checks, ref, losses, dd


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class MethodRun:
    name: str
    library: str
    scores: Tensor  # [Q, N], repinf_lens' sign convention
    sign_factor: float
    raw_convention: str
    fit_s: float
    s_test_s: float | None
    scoring_s: float | None
    peak_rss_mb: float | None
    settings: dict[str, Any]
    notes: str = ""
    cpu_s: float | None = None  # process CPU time of the whole method (robust to other jobs on the machine)


def run_repinf(
    s: Setting, name: str, solver: Any, args: argparse.Namespace, hvp_mode: str = "prepared",
    latent_method: str = "none",
) -> MethodRun:  # fmt: skip
    """One repinf_lens row. ``latent_method="none"`` (the default here): example scores only, one forward JVP per
    training batch, what every peer computes; ``"grad_x_input"``: the swap, with every hook dimension's share."""
    from repinf_lens import InfluenceAttributor

    with _mem() as mem:
        att = InfluenceAttributor(
            s.split, s.task, hessian=solver, batch_size=args.batch_size, use_cache=False,
            store_token_scores=False, progress=False, hvp_mode=hvp_mode, latent_method=latent_method,
        )  # fmt: skip
        t = time.perf_counter()
        if solver.needs_hessian:
            att.fit(s.train)
        fit = time.perf_counter() - t
        res = att.attribute(s.queries, s.train)
    scores = res.example_scores.double()
    infos = res.meta.get("solve_infos") or []
    its = [i.get("iterations") for i in infos if isinstance(i, dict)]
    settings = {k: v for k, v in solver.to_dict().items() if k not in ("factor_dir", "progress", "overwrite")}
    return MethodRun(
        name, "repinf_lens", scores, 1.0, "+ g_test^T (H + lambda)^-1 g_train (positive = proponent)", fit,
        res.meta["seconds_s_test"], res.meta["seconds_influence"], mem.peak_mb,
        {**settings, "solve_iterations": its, "hvp_mode": hvp_mode, "latent_method": latent_method,
         "reused_upstream_batches": res.meta.get("reused_upstream_batches")},
        ("example scores only (one forward JVP per training batch)" if latent_method == "none"
         else "scoring also computes the per-dimension (latent) scores of the activation at the hook (the swap)")
        + ("; the upstream part (blocks below the hook) ran once, in fit: scoring reused its inputs"
           if res.meta.get("reused_upstream_batches") else ""),
    )  # fmt: skip


def repinf_methods(s: Setting, args: argparse.Namespace, workdir: Path) -> dict[str, Callable[[], MethodRun]]:
    from repinf_lens.curvature import CG, EKFAC, KFAC, Identity, Woodbury

    d = args.damping
    bs = args.batch_size
    cg_fixed = args.dattri_cg_iters  # exactly dattri's iteration count (tol 0: no early stop)

    def factored(cls: Any, fisher: str, rotations: str = "float32", full: bool = False) -> Any:
        """``full``: rotate onto every eigenvector (``null_space_tol=0``; the default skips the factors' null
        space)."""
        folder = tempfile.mkdtemp(prefix=f"{cls.name}-{fisher}-", dir=workdir)  # fresh: the fit is timed
        extra = {"null_space_tol": 0.0} if full else {}
        return cls(damping=d, batch_size=bs, fisher=fisher, factor_dir=folder, progress=False,
                   precondition_dtype=rotations, **extra)  # fmt: skip

    def pcg(
        it: int, rotations: str = "float32", latent_method: str = "none", full: bool = False, block: bool = False,
        fisher: str = "empirical",
    ) -> tuple[str, Callable[[], MethodRun]]:  # fmt: skip
        name = f"repinf {'block-' if block else ''}pcg{it} ekfac ({'emp' if fisher == 'empirical' else fisher}"
        name += (", bf16 rotations" if rotations != "float32" else "") + (", full rotations" if full else "") + ")"
        name += ", with latent scores" if latent_method != "none" else ""
        pre = factored(EKFAC, fisher, rotations, full)
        return name, lambda: run_repinf(
            s, name, CG(damping=d, max_iter=it, tol=0.0, batch_size=bs, preconditioner=pre, block=block), args,
            latent_method=latent_method,
        )  # fmt: skip

    def wood_pcg(it: int) -> tuple[str, Callable[[], MethodRun]]:
        """CG on the exact damped Hessian preconditioned by the exact damped Gauss-Newton's inverse."""
        name = f"repinf pcg{it} woodbury (true)"
        pre = Woodbury(damping=d, batch_size=bs, fisher="true", progress=False)
        return name, lambda: run_repinf(
            s, name, CG(damping=d, max_iter=it, tol=0.0, batch_size=bs, preconditioner=pre), args
        )

    return {
        "repinf identity": lambda: run_repinf(s, "repinf identity", Identity(damping=d), args),
        f"repinf cg{args.cg_iters}": lambda: run_repinf(
            s, f"repinf cg{args.cg_iters}", CG(damping=d, max_iter=args.cg_iters, tol=1e-8, batch_size=bs), args
        ),
        f"repinf cg{args.dattri_cg_iters} (fixed)": lambda: run_repinf(
            s,
            f"repinf cg{args.dattri_cg_iters} (fixed)",
            CG(damping=d, max_iter=cg_fixed, tol=0.0, batch_size=bs),
            args,
        ),
        f"repinf cg{args.dattri_cg_iters} (fixed, recomputed HVPs)": lambda: run_repinf(
            s,
            f"repinf cg{args.dattri_cg_iters} (fixed, recomputed HVPs)",
            CG(damping=d, max_iter=cg_fixed, tol=0.0, batch_size=bs),
            args,
            hvp_mode="recompute",
        ),
        **dict(
            [pcg(it) for it in (2, 3, 5, 10, 12, 15, 20)]
            + [pcg(it, block=True) for it in (5, 8, 10)]  # (block CG: the 8 queries share one search space)
            + [pcg(5, "bfloat16")]  # (where the null-space shortcut applies its rotations stay float32)
            + [pcg(20, full=True), pcg(15, "bfloat16", full=True), pcg(20, "bfloat16", full=True)]
            + [pcg(10, latent_method="grad_x_input")]
            + [pcg(it, fisher="expected") for it in (5, 10, 15, 20)]
        ),
        "repinf woodbury (true)": lambda: run_repinf(
            s, "repinf woodbury (true)", Woodbury(damping=d, batch_size=bs, fisher="true", progress=False), args
        ),
        "repinf woodbury (emp)": lambda: run_repinf(
            s, "repinf woodbury (emp)", Woodbury(damping=d, batch_size=bs, fisher="empirical", progress=False), args
        ),
        **dict(wood_pcg(it) for it in (2, 3, 5)),
        "repinf kfac (true)": lambda: run_repinf(s, "repinf kfac (true)", factored(KFAC, "true"), args),
        "repinf ekfac (true)": lambda: run_repinf(s, "repinf ekfac (true)", factored(EKFAC, "true"), args),
        "repinf kfac (expected)": lambda: run_repinf(s, "repinf kfac (expected)", factored(KFAC, "expected"), args),
        "repinf ekfac (expected)": lambda: run_repinf(s, "repinf ekfac (expected)", factored(EKFAC, "expected"), args),
        "repinf kfac (emp)": lambda: run_repinf(s, "repinf kfac (emp)", factored(KFAC, "empirical"), args),
        "repinf ekfac (emp)": lambda: run_repinf(s, "repinf ekfac (emp)", factored(EKFAC, "empirical"), args),
        "repinf ekfac (emp, full rotations)": lambda: run_repinf(
            s, "repinf ekfac (emp, full rotations)", factored(EKFAC, "empirical", full=True), args
        ),
    }


def kronfluence_task(task: Any, modules: Sequence[str], mask: str) -> Any:
    """A Kronfluence ``Task`` whose loss is repinf_lens' multiple-choice loss (summed) and tracks only ``modules``."""
    from kronfluence.task import Task

    loss = HFTwinLoss(task)

    class MCQATask(Task):
        def __init__(self) -> None:
            self.mask = mask
            self.marks: list[tuple[str, float]] = []

        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Tensor:
            self.marks.append(("train", time.perf_counter()))
            return loss.losses(batch, model, sample=sample).sum()

        def compute_measurement(self, batch: Any, model: Any) -> Tensor:
            self.marks.append(("measurement", time.perf_counter()))
            return loss.losses(batch, model).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return list(modules)

        def get_attention_mask(self, batch: Any) -> Tensor:
            return batch["answer_mask"] if self.mask == "answer" else batch["attention_mask"]

    return MCQATask()


def kronfluence_methods(
    s: Setting, args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, Callable[[], MethodRun]], Callable[[], None]]:
    """The Kronfluence variants, and a function that drops the (wrapped) HF twin once they ran."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    class ItemDataset(torch.utils.data.Dataset):
        def __init__(self, items: list[dict[str, Tensor]]) -> None:
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return self.items[i]

    train_ds = ItemDataset(hf_items(s.task, s.train))
    query_ds = ItemDataset(hf_items(s.task, s.queries))
    ktask = kronfluence_task(s.task, s.hf_modules, "answer")
    state: dict[str, Any] = {}

    def run(strategy: str, fisher: str, mask: str) -> MethodRun:
        name = f"kronfluence {strategy} ({'emp' if fisher == 'empirical' else 'true'}" + (
            ", all tokens)" if mask == "all" else ")"
        )
        if "model" not in state:  # wrap down_proj once (after the gradient check ran on the plain twin)
            state["model"] = prepare_model(s.hf, ktask)
        ktask.mask = mask
        tag = f"{strategy}-{fisher}-{mask}"
        torch.manual_seed(args.seed)  # the sampled labels of the true Fisher
        with _mem() as mem:
            analyzer = Analyzer(
                analysis_name=tag, model=state["model"], task=ktask, cpu=True, log_level=logging.WARNING,
                disable_tqdm=True, output_dir=str(workdir / "kronfluence"),
            )  # fmt: skip
            analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=partial(hf_collate, pad_id=s.task.pad_id)))
            fargs = FactorArguments(
                strategy=strategy, use_empirical_fisher=fisher == "empirical",
                activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32,
                eigendecomposition_dtype=torch.float64, lambda_dtype=torch.float32,
            )  # fmt: skip
            t = time.perf_counter()
            analyzer.fit_all_factors(
                factors_name=tag, dataset=train_ds, per_device_batch_size=args.batch_size, factor_args=fargs,
                overwrite_output_dir=True,
            )  # fmt: skip
            fit = time.perf_counter() - t
            ktask.marks.clear()
            t = time.perf_counter()
            analyzer.compute_pairwise_scores(
                scores_name=tag, factors_name=tag, query_dataset=query_ds, train_dataset=train_ds,
                per_device_query_batch_size=len(query_ds), per_device_train_batch_size=args.batch_size,
                score_args=ScoreArguments(damping_factor=args.damping), overwrite_output_dir=True,
            )  # fmt: skip
            total = time.perf_counter() - t
            scores = analyzer.load_pairwise_scores(scores_name=tag)["all_modules"].double()
        # query gradients and their preconditioning run inside compute_pairwise_scores: from the first query
        # measurement to the first training loss after it (then the training gradients and dot products)
        first_m = next((x for k, x in ktask.marks if k == "measurement"), None)
        first_t = next((x for k, x in ktask.marks if k == "train" and first_m is not None and x > first_m), None)
        s_test = (first_t - first_m) if first_m is not None and first_t is not None else None
        return MethodRun(
            name, "kronfluence", scores, 1.0,
            "pairwise score = preconditioned query gradient . training gradient, measurement = the query loss "
            "(+ g_test^T (F + lambda)^-1 g_train; positive = proponent)",
            fit, s_test, None if s_test is None else total - s_test, mem.peak_mb,
            {"strategy": strategy, "use_empirical_fisher": fisher == "empirical", "token_mask": mask,
             "damping_factor": args.damping, "per_device_batch_size": args.batch_size},
            "runs the whole HF twin (every layer) on each pass"
            + ("; A and G averaged over every real token (Kronfluence's usual mask)" if mask == "all" else
               "; token mask = the answer position (repinf_lens' normalisation)"),
        )  # fmt: skip

    out = {}
    for strategy, fisher, mask in [
        ("ekfac", "true", "answer"), ("kfac", "true", "answer"), ("ekfac", "empirical", "answer"),
        ("kfac", "empirical", "answer"), ("ekfac", "true", "all"),
    ]:  # fmt: skip
        key = f"kronfluence {strategy} ({'emp' if fisher == 'empirical' else 'true'}" + (
            ", all tokens)" if mask == "all" else ")"
        )
        out[key] = partial(run, strategy, fisher, mask)

    def release() -> None:
        import gc

        state.clear()
        s.hf = None
        gc.collect()

    return out, release


@dataclass
class DattriData:
    """Per-example tensors for dattri's loaders: activation at the hook (padded), answer position, label, options."""

    train: tuple[Tensor, ...]
    queries: tuple[Tensor, ...]


def dattri_data(
    s: Setting, bs: int, train: Sequence[dict[str, Any]] | None = None, queries: Sequence[dict[str, Any]] | None = None
) -> DattriData:
    def build(rows: Sequence[dict[str, Any]]) -> tuple[Tensor, ...]:
        inps = [s.split.prepare(s.task.collate(rows[i : i + bs])) for i in range(0, len(rows), bs)]
        width = max(i.latents.shape[1] for i in inps)
        x = torch.cat([torch.nn.functional.pad(i.latents, (0, 0, 0, width - i.latents.shape[1])) for i in inps])
        k = max(i.batch.option_ids.shape[1] for i in inps)
        opt = torch.cat([torch.nn.functional.pad(i.batch.option_ids, (0, k - i.batch.option_ids.shape[1]), value=-1)
                         for i in inps])  # fmt: skip
        pos = torch.cat([i.batch.answer_pos for i in inps])
        lab = torch.cat([i.batch.labels for i in inps])
        return x.detach(), pos, lab, opt

    return DattriData(build(s.train if train is None else train), build(s.queries if queries is None else queries))


def dattri_functions(s: Setting) -> tuple[Any, Callable, Callable, Callable]:
    """``(theta module, loss, margin, correct probability)``: functions of ``{"w0": ..., "w1": ...}`` (theta2's
    matrices in ``s.maps`` order) and one data tuple.

    The data tuple holds a batch (``x [B, T, d]``) or one example (``x [T, d]``, TRAK's per-example vmap); the loss
    is the MEAN of repinf_lens' split loss over the batch (so its Hessian is the one repinf_lens' solvers invert).
    """
    from repinf_lens.task.mcqa import MCQABatch

    split, task, names = s.split, s.task, s.theta_names

    class Theta(torch.nn.Module):
        def __init__(self, theta: dict[str, Tensor]) -> None:
            super().__init__()
            for i, n in enumerate(names):  # (parameter names cannot hold dots: w0, w1, ... in theta2's order)
                self.register_parameter(f"w{i}", torch.nn.Parameter(theta[n].detach().clone()))

    def option_logp(params: dict[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        x, pos, lab, opt = data
        if x.ndim == 2:  # one example (TRAK vmaps over examples without a batch dim)
            x, pos, lab, opt = x[None], pos[None], lab[None], opt[None]
        b = MCQABatch(
            tokens=torch.zeros(x.shape[:2], dtype=torch.long), attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
            answer_pos=pos, labels=lab, option_ids=opt,
        )  # fmt: skip
        logits = split.logits(x, b, {n: params[f"w{i}"] for i, n in enumerate(names)})
        return task.option_logits(logits, b).log_softmax(-1).gather(1, lab[:, None])[:, 0], b, logits

    def loss(params: dict[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        _, b, logits = option_logp(params, data)
        return task.loss(logits, b)

    def margin(params: dict[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        logp = option_logp(params, data)[0]
        return (logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-7))).sum()

    def prob(params: dict[str, Tensor], data: Sequence[Tensor]) -> Tensor:
        return option_logp(params, data)[0].exp().sum()

    return Theta(s.theta), loss, margin, prob


def dattri_methods(
    s: Setting, args: argparse.Namespace, dd: DattriData, train_grad_sq: Tensor, train_losses: Tensor
) -> dict[str, Callable[[], MethodRun]]:
    from dattri.algorithm import IFAttributorArnoldi, IFAttributorCG, IFAttributorDataInf, TRAKAttributor
    from dattri.func.projection import arnoldi_project
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    theta, loss_fn, margin_fn, prob_fn = dattri_functions(s)
    n, q = len(s.train), len(s.queries)
    # ONE training batch: dattri's CG / Arnoldi invert the Hessian of the loss on each training batch (and sum over
    # batches), which is the Hessian of the mean loss only when the batch is the whole training set
    train_loader = DataLoader(TensorDataset(*dd.train), batch_size=n, shuffle=False)
    query_loader = DataLoader(TensorDataset(*dd.queries), batch_size=q, shuffle=False)

    def new_task(fn: Callable) -> Any:
        return AttributionTask(loss_func=fn, model=theta, checkpoints=theta.state_dict())

    class ArnoldiRevRev(IFAttributorArnoldi):
        """dattri's Arnoldi attributor with rev-rev Hessian-vector products (its cache() hard-codes rev-fwd,
        5-6x slower through this model on CPU); everything else is the class's own code."""

        def cache(self, full_train_dataloader: Any) -> None:
            self.full_train_dataloader = full_train_dataloader
            self.arnoldi_projectors = []
            data = tuple(next(iter(full_train_dataloader)))
            for i in range(len(self.task.get_checkpoints())):
                func = partial(self.task.get_loss_func(ckpt_idx=i), **{self.task.loss_func_data_key: data})
                params, _ = self.task.get_param(i)
                self.arnoldi_projectors.append(
                    arnoldi_project(
                        feature_dim=len(params), func=func, x=params, proj_dim=self.proj_dim, max_iter=self.max_iter,
                        norm_constant=self.norm_constant, tol=self.tol, mode="rev-rev",
                        regularization=self.regularization, seed=self.seed, device=self.device,
                    )
                )  # fmt: skip

    def run_inner_product(
        name: str, make: Callable[[Any], Any], settings: dict[str, Any], notes: str, loader: Any = None
    ) -> MethodRun:
        # under no_grad: the torch.func transforms inside dattri ignore it, but without it every dattri result is
        # attached to an outer autograd graph through the theta2 parameter (requires_grad), so CG and Arnoldi
        # keep each iteration's Hessian-vector-product graph alive (18 GB on the default model before this)
        with _mem() as mem, torch.no_grad():
            att = make(new_task(loss_fn))
            t = time.perf_counter()
            att.cache(train_loader)
            fit = time.perf_counter() - t
            box = [0.0]
            att.generate_test_rep = _timed(att.generate_test_rep, box)
            att.transform_test_rep = _timed(att.transform_test_rep, box)
            t = time.perf_counter()
            raw = att.attribute(train_loader, query_loader if loader is None else loader)  # [N, Q]
            total = time.perf_counter() - t
        return MethodRun(
            name, "dattri", raw.T.double(), 1.0,
            "attribute() = training gradient . transformed test gradient = + g_train^T (H + lambda)^-1 g_test "
            "(positive = proponent)",
            fit, box[0], total - box[0], mem.peak_mb, settings, notes,
        )  # fmt: skip

    d = args.damping
    # TRAK's ridge: relative to the mean squared norm of a projected, scaled margin gradient. The margin
    # log(p / (1 - p)) has gradient -grad(loss) / (1 - p), dattri divides gradients by sqrt(n_theta2) and
    # projects with N(0, 1) entries, so E ||x_i||^2 = proj_dim ||grad loss_i||^2 / ((1 - p_i)^2 n_theta2)
    p_train = torch.exp(-train_losses)
    mean_sq = float((train_grad_sq / (1 - p_train).clamp_min(1e-6) ** 2).mean())
    trak_reg = args.trak_reg_rel * args.trak_proj_dim * mean_sq / s.n_theta2

    def run_trak() -> MethodRun:
        with _mem() as mem, torch.no_grad():  # (see run_inner_product)
            att = TRAKAttributor(
                new_task(margin_fn), correct_probability_func=prob_fn, device="cpu", regularization=trak_reg,
                projector_kwargs={"proj_dim": args.trak_proj_dim, "proj_max_batch_size": 32, "proj_seed": args.seed,
                                  "device": "cpu"},
            )  # fmt: skip
            t = time.perf_counter()
            att.cache(train_loader)
            fit = time.perf_counter() - t
            t = time.perf_counter()
            raw = att.attribute(query_loader)  # [N, Q]
            query = time.perf_counter() - t
        return MethodRun(
            "dattri trak", "dattri", raw.T.double(), 1.0,
            "phi_test^T (Phi^T Phi + ridge)^-1 phi_train * (1 - p_train) with phi = gradient of the correct-option "
            "margin log(p / (1 - p)) (positive = raises the test margin = proponent)",
            fit, query, None, mem.peak_mb,
            {"proj_dim": args.trak_proj_dim, "proj_type": "normal", "checkpoints": 1, "regularization": trak_reg,
             "regularization_rel": args.trak_reg_rel},
            "fit = training features (gradients, projection) and the kernel solve; s_test = the query features and the "
            "final product (scoring is inside it)",
        )  # fmt: skip

    it = args.dattri_cg_iters
    return {
        f"dattri cg{it}": lambda: run_inner_product(
            f"dattri cg{it}",
            lambda task: IFAttributorCG(task, device="cpu", max_iter=it, mode="rev-rev", regularization=d),
            {"max_iter": it, "mode": "rev-rev", "regularization": d, "query_batch_size": 1},
            "runs all max_iter iterations (dattri's CG has no tolerance); one query per CG (a batch of queries is "
            "vmapped through every Hessian-vector product: the same result, 8x the memory)",
            DataLoader(TensorDataset(*dd.queries), batch_size=1, shuffle=False),
        ),
        "dattri arnoldi": lambda: run_inner_product(
            "dattri arnoldi",
            lambda task: ArnoldiRevRev(
                task, device="cpu", proj_dim=args.arnoldi_proj_dim, max_iter=args.arnoldi_iters, regularization=d
            ),
            {"proj_dim": args.arnoldi_proj_dim, "max_iter": args.arnoldi_iters, "regularization": d, "mode": "rev-rev"},
            "fit = the Arnoldi iteration on the Hessian of the mean training loss",
        ),
        "dattri datainf": lambda: run_inner_product(
            "dattri datainf",
            lambda task: IFAttributorDataInf(task, device="cpu", regularization=d),
            {"regularization": d, "fim_estimate_data_ratio": 1.0},
            "fit = the training gradients (DataInf's empirical-Fisher swap needs them all)",
        ),
        "dattri trak": run_trak,
    }


def dattri_grads(s: Setting, dd: DattriData) -> Tensor:
    """The per-example gradients dattri's attributors use (``generate_train_rep``, vmapped), train then queries."""
    from dattri.algorithm import IFAttributorCG
    from dattri.task import AttributionTask

    theta, loss_fn, _, _ = dattri_functions(s)
    att = IFAttributorCG(AttributionTask(loss_func=loss_fn, model=theta, checkpoints=theta.state_dict()))
    with torch.no_grad():  # (as the methods run: torch.func's gradients ignore it)
        return torch.cat([att.generate_train_rep(0, tuple(t.unsqueeze(0) for t in part)).detach()
                          for part in (dd.train, dd.queries)])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- metrics
def per_query_spearman(kind: str, scores: Tensor, weights: Tensor, actual: Tensor) -> list[float]:
    from repinf_lens.analysis.lds import spearman

    if kind == "lds":
        predicted = -(scores @ weights.double().T)  # POSITIVE = proponent: more proponents -> lower loss
    else:
        predicted = scores[:, : weights.shape[0]] / scores.shape[1]  # removing a proponent raises the loss
    return [spearman(predicted[i], actual[i]) for i in range(actual.shape[0])]


def _nanmean(xs: Sequence[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return float(sum(v) / len(v)) if v else float("nan")


def best_method(lds_mean: Mapping[str, float]) -> str | None:
    """The method of the highest mean LDS (NaN counts as the lowest), None when there is none."""
    return max(lds_mean, key=lambda k: -math.inf if math.isnan(lds_mean[k]) else lds_mean[k], default=None)


def paired_bootstrap(per_query: dict[str, list[float]], best: str, n_boot: int, seed: int) -> dict[str, dict]:
    """Bootstrap over queries of ``mean_q (LDS_m - LDS_best)``: mean, 95 % interval, P(resampled diff >= 0)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.tensor(per_query[best], dtype=torch.double)
    out = {}
    for m, vals in per_query.items():
        d = torch.tensor(vals, dtype=torch.double) - ref
        d = d[~torch.isnan(d)]
        if len(d) == 0:
            out[m] = {"diff": float("nan"), "ci95": [float("nan")] * 2, "p_ge_best": float("nan")}
            continue
        idx = torch.randint(0, len(d), (n_boot, len(d)), generator=g)
        boot = d[idx].mean(1)
        out[m] = {
            "diff": float(d.mean()),
            "ci95": [float(boot.quantile(0.025)), float(boot.quantile(0.975))],
            "p_ge_best": float((boot >= 0).double().mean()),
        }
    return out


def score_agreement(a: Tensor, b: Tensor) -> float:
    """Mean over queries of the Spearman correlation between two methods' training-example scores."""
    from repinf_lens.analysis.lds import spearman

    return _nanmean([spearman(a[i], b[i]) for i in range(a.shape[0])])


def pearson_all(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# ---------------------------------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    rows = res["methods"]
    has_loo = any(r.get("loo_spearman") is not None for r in rows)
    head = ["method", "LDS (mean over queries)", "diff vs best [95% CI]", "P(>= best)"]
    head += ["LOO"] if has_loo else []
    head += ["fit s", "s_test s", "scoring s", "total s", "CPU s", "peak extra RSS MB", "Spearman vs repinf CG"]
    head += ["sign check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r["bootstrap_vs_best"]
        cells = [
            f"{r['method']}" + (" **(best)**" if r["method"] == res["best"] else ""),
            _fmt(r["lds_spearman"]),
            f"{_fmt(b['diff'], '+.3f')} [{_fmt(b['ci95'][0], '+.3f')}, {_fmt(b['ci95'][1], '+.3f')}]",
            _fmt(b["p_ge_best"], ".2f"),
        ]
        cells += [_fmt(r.get("loo_spearman"))] if has_loo else []
        cells += [
            _fmt(r["fit_s"], ".1f"), _fmt(r["s_test_s"], ".1f"), _fmt(r["scoring_s"], ".1f"), _fmt(r["total_s"], ".1f"),
            _fmt(r["cpu_s"], ".1f"), _fmt(r["peak_rss_mb"], ".0f"), _fmt(r["spearman_vs_repinf_cg"]),
            f"{'ok' if r['sign_check_pearson_vs_gradient_dot'] > 0 else 'FAILED'} "
            f"({r['sign_check_pearson_vs_gradient_dot']:+.2f})",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    st = res["setting"]
    gt = res["ground_truth"]
    ver = res["versions"]
    parts = [
        f"# repinf_lens vs Kronfluence and dattri ({st['model']})",
        "",
        f"theta2 = `{st['theta2']}` ({st['n_theta2']} parameters; Kronfluence: `{st['hf_module']}` of the HF twin), "
        f"hook `{st['hook']}`, {st['n_train']} training examples x {st['queries']} queries ({st['rows']}), "
        f"template `{st['template']}`, damping {st['damping']}. Ground truth: {gt['lds']['n_subsets']} random "
        f"{gt['lds']['fraction']:.0%} subsets refit from theta2* (retraining {gt['lds']['seconds']} s, full refit "
        f"{gt['full_refit_s']} s)"
        + (
            f", leave-one-out of the first {gt['loo']['n_remove']} examples ({gt['loo']['seconds']} s)"
            if "loo" in gt
            else ""
        )
        + f"; objective minimised by refit_downstream (L-BFGS, {gt['lds']['max_iter']} iterations): {gt['objective']}"
        + (
            f" (train loss at theta2*: mean {gt['train_loss_at_theta_star']['mean']:.3f})"
            if "train_loss_at_theta_star" in gt
            else ""
        )
        + f". Paired bootstrap over queries ({res['n_boot']} resamples) against the best method. Threads: "
        f"{res['threads']}; whole run {res['total_s']} s wall, {res['total_cpu_s']} s CPU.",
        "",
        f"Versions: repinf_lens {ver['repinf_lens']}, kronfluence {ver['kronfluence']}, dattri {ver['dattri']}, "
        f"torch {ver['torch']}.",
        "",
        "Sign: every score is in repinf_lens' convention (positive = proponent); the factor applied to each "
        "method's raw scores is " + ", ".join(f"{r['method']}: {r['sign_factor']:+g}" for r in rows) + ".",
        "",
        "Gradient checks (per-example theta2 gradients vs repinf_lens' TL split): "
        + "; ".join(
            f"{c['what']}: max residual {c['max_scaled_residual']:.1e} (per-example relative: max "
            f"{c['max_rel_residual']:.1e}, median {c['median_rel_residual']:.1e}; Frobenius "
            f"{c['frobenius_rel_residual']:.1e})"
            for c in res["gradient_checks"]
        )
        + ".",
        "",
        *lines,
        "",
        "Times (wall seconds; CPU s = the method's process CPU time, robust to other jobs on the machine): fit = "
        "curvature (factors, Arnoldi iteration, cached training gradients / TRAK features); s_test = query gradients "
        "and their inverse-curvature products; scoring = training gradients and dot products (repinf_lens: "
        "one forward JVP of the training losses along each s_test, example scores only, except the row 'with "
        "latent scores', which runs the swap for every hook dimension's share; Kronfluence: split at its first "
        "training loss after the query pass). peak extra RSS = peak resident memory above the level at the "
        "method's start. "
        "Spearman vs repinf CG = mean over queries of the rank correlation of the 64 training scores with repinf "
        "CG's. sign check = Pearson correlation of the scores with the gradient dot products g_test . g_train.",
    ]
    if res.get("skipped"):
        parts += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items())]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random HF Llama and toy rows (smoke test, seconds)")
    p.add_argument(
        "--theta2",
        choices=("w_out", "block"),
        default="w_out",
        help="theta2: the last block's mlp.W_out (default) or all its linear maps (q/k/v/o, gate/up/down)",
    )
    p.add_argument("--model", default=None, help="local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--split", default="train", help="OpenBookQA split the rows come from")
    p.add_argument("--template", default="plain")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default 64; tiny 10)")
    p.add_argument("--queries", type=int, default=None, help="test queries (default 8; tiny 3)")
    p.add_argument("--subsets", type=int, default=None, help="LDS subsets (default 16; tiny 5)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--loo", type=int, default=None, help="leave-one-out refits of the first k examples (default 32)")
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--max-iter", type=int, default=None, help="L-BFGS iterations per refit (default 200; tiny 50)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default 16; tiny 4)")
    p.add_argument("--cg-iters", type=int, default=None, help="repinf CG iterations (tol 1e-8; default 100)")
    p.add_argument("--dattri-cg-iters", type=int, default=None, help="dattri CG iterations (default 20)")
    p.add_argument("--arnoldi-iters", type=int, default=None, help="dattri Arnoldi iterations (default 100)")
    p.add_argument("--arnoldi-proj-dim", type=int, default=None, help="dattri Arnoldi eigenpairs (default 100)")
    p.add_argument("--trak-proj-dim", type=int, default=None, help="TRAK random dimensions (default 512)")
    p.add_argument("--trak-reg-rel", type=float, default=1e-3, help="TRAK ridge / mean squared feature norm")
    p.add_argument("--grad-tol", type=float, default=1e-4, help="max relative residual of the gradient checks")
    p.add_argument(
        "--no-cached-tail",
        dest="cached_tail",
        action="store_false",
        help="retrain with split.inputs_loss itself (the whole last block per step) instead of CachedTail",
    )
    p.add_argument("--precheck", type=int, default=8, help="examples of the gradient check before retraining")
    p.add_argument("--only", nargs="*", default=None, help="run only methods whose name contains one of these")
    p.add_argument("--n-boot", type=int, default=10000)
    p.add_argument("--max-rss-gb", type=float, default=5.0, help="stop a method whose process RSS exceeds this (GiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--truth-threads",
        type=int,
        default=None,
        help="threads of the retraining only (default --threads); every method still runs on --threads",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--keep-workdir", action="store_true", help="keep the fitted factors and peer outputs")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="merge these results.json (parts of one benchmark, one retraining checkpoint) into --out; runs nothing",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench_peers"))
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "n_train": (64, 10), "queries": (8, 3), "subsets": (16, 5), "loo": (32, 4), "max_iter": (200, 50),
        "batch_size": (16, 4), "cg_iters": (100, 30), "dattri_cg_iters": (20, 10), "arnoldi_iters": (100, 20),
        "arnoldi_proj_dim": (100, 8), "trak_proj_dim": (512, 64),
    }  # fmt: skip
    for k, (full, small) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, small if tiny else full)
    return args


def merge_results(paths: Sequence[Path], out: Path, *, n_boot: int, seed: int) -> dict[str, Any]:
    """One table from runs that split the methods between processes over ONE retraining ground truth.

    Each ``results.json`` must hold the same setting and the same retrained losses (the refits of one checkpoint:
    copy ``ground_truth.partial.safetensors`` into every ``--out``); the per-query LDS / LOO values are kept, the
    best method and every paired bootstrap against it are recomputed over the union, and ``merged_from`` records
    each part's command and wall time (the parts ran side by side, one core each).
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for p, r in zip(paths[1:], parts[1:]):
        for key in ("setting", "versions"):
            if r[key] != first[key]:
                raise ValueError(f"{p}: another {key} than {paths[0]} ({r[key]} vs {first[key]}): not one benchmark.")
        for kind in ("lds", "loo"):
            a, b = first["ground_truth"].get(kind), r["ground_truth"].get(kind)
            if (a is None) != (b is None) or (
                a is not None and (a["actual"], a.get("weights")) != (b["actual"], b.get("weights"))
            ):
                raise ValueError(
                    f"{p}: its {kind} ground truth differs from {paths[0]}'s. Fix: run every part from one retraining "
                    "checkpoint (copy ground_truth.partial.safetensors into each --out)."
                )  # fmt: skip
    rows = [m for r in parts for m in r["methods"]]
    names = [m["method"] for m in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"a method ran in two parts: {sorted({n for n in names if names.count(n) > 1})}.")
    lds_pq = {m["method"]: m["lds_per_query"] for m in rows}
    lds_mean = {k: _nanmean(v) for k, v in lds_pq.items()}
    best = best_method(lds_mean)
    boot = paired_bootstrap(lds_pq, best, n_boot, seed)
    cg = next((m for m in rows if m["method"] == f"repinf cg{first['args']['cg_iters']}"), None)
    for m in rows:
        m["bootstrap_vs_best"] = boot[m["method"]]
        if cg is not None:
            m["spearman_vs_repinf_cg"] = score_agreement(torch.tensor(m["scores"]), torch.tensor(cg["scores"]))
    skipped = {k: v for r in parts for k, v in r["skipped"].items() if k not in names}
    res = {
        **first,
        "complete": all(r["complete"] for r in parts),
        "command": None,
        "merged_from": [
            {"path": str(p), "command": r["command"], "total_s": r["total_s"]} for p, r in zip(paths, parts)
        ],
        "best": best,
        "n_boot": n_boot,
        "methods": rows,
        "skipped": skipped,
        "peak_rss_process_mb": max(r["peak_rss_process_mb"] for r in parts),
        "total_s": max(r["total_s"] for r in parts),
        "total_cpu_s": round(sum(r["total_cpu_s"] for r in parts), 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(markdown(res))
    print(f"[bench_peers] merged {len(parts)} parts ({len(rows)} methods): {out / 'results.json'}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge_results(args.merge, args.out, n_boot=args.n_boot, seed=args.seed)
    torch.set_num_threads(args.threads)
    RSS_CAP[0] = int(args.max_rss_gb * 2**30) if args.max_rss_gb > 0 else None
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))
    args.workdir = str(workdir)
    try:
        return _main(args, workdir, t_start)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _main(args: argparse.Namespace, workdir: Path, t_start: float) -> dict[str, Any]:
    import repinf_lens

    torch.manual_seed(args.seed)
    kf = import_peer("kronfluence")
    da = import_peer("dattri")
    skipped: dict[str, str] = {}
    for name, mod in (("kronfluence", kf), ("dattri", da)):
        if mod is None:
            skipped[name] = f"not installed ({INSTALL_HINT})"

    def log(msg: str) -> None:
        print(f"[bench_peers {time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    s = build_setting(args)
    log(f"setting: {s.info['model']}, theta2 {s.info['theta2']} ({s.info['n_theta2']} parameters)")

    # a quick gradient check at the starting theta2 first, so a mismatch aborts before the long retraining
    pre = None
    if args.precheck > 0 and (kf is not None or da is not None):
        k = min(args.precheck, len(s.train))
        pre, *_ = gradient_checks(s, s.train[:k], s.queries[:1], args, kf is not None, da is not None)
        log(f"pre-check at theta2_0 on {k + 1} examples passed")
    # ground truth: theta2* (loaded into both models), then the subset / LOO refits
    weights = {"lds": subset_weights(len(s.train), args.subsets, args.fraction, seed=0)}
    if args.loo > 0:
        weights["loo"] = loo_weights(len(s.train), min(args.loo, len(s.train)))
    gt = retrain(s, weights, args)
    log(f"retraining done (full refit {gt['full_refit_s']} s, LDS {gt['lds']['seconds']} s)")

    # gradient checks at theta2* (where every method scores), before any peer runs
    checks, ref, ref_losses, dd = gradient_checks(s, s.train, s.queries, args, kf is not None, da is not None)
    log("gradient checks passed")
    n = len(s.train)
    train_losses = ref_losses[:n].double()
    gt["train_loss_at_theta_star"] = {"mean": float(train_losses.mean()), "max": float(train_losses.max())}
    grad_dot = ref[n:].double() @ ref[:n].double().T  # [Q, N] g_test . g_train (the sign reference)

    train_grad_sq = ref[:n].double().norm(dim=1) ** 2  # (TRAK's ridge scale)
    del ref
    # (group, name, run) in order; the HF twin is released after the last Kronfluence method
    plan: list[tuple[str, str, Callable[[], MethodRun]]] = []
    plan += [("repinf_lens", k, v) for k, v in repinf_methods(s, args, workdir).items()]
    release_hf: Callable[[], None] = lambda: None  # noqa: E731
    if kf is not None:
        kf_methods, release_hf = kronfluence_methods(s, args, workdir)
        plan += [("kronfluence", k, v) for k, v in kf_methods.items()]
    if da is not None and dd is not None:
        plan += [("dattri", k, v) for k, v in dattri_methods(s, args, dd, train_grad_sq, train_losses).items()]
    if args.only:
        plan = [p for p in plan if any(o in p[1] for o in args.only)]
    last_kf = max((i for i, p in enumerate(plan) if p[0] == "kronfluence"), default=-1)
    runs: list[MethodRun] = []

    def finish(complete: bool) -> dict[str, Any]:
        """Metrics of the methods run so far; results.json / results.md (rewritten after every method)."""
        # metrics against the same retrained losses
        lds_pq = {r.name: per_query_spearman("lds", r.scores, weights["lds"], gt["lds"]["actual"]) for r in runs}
        lds_mean = {k: _nanmean(v) for k, v in lds_pq.items()}
        best = best_method(lds_mean)
        boot = paired_bootstrap(lds_pq, best, args.n_boot, args.seed) if best is not None else {}
        loo_pq = (
            {r.name: per_query_spearman("loo", r.scores, weights["loo"], gt["loo"]["actual"]) for r in runs}
            if "loo" in weights
            else {}
        )
        cg_ref = next((r.scores for r in runs if r.name == f"repinf cg{args.cg_iters}"), None)
        rows_out = []
        for r in runs:
            rows_out.append(
                {
                    "method": r.name,
                    "library": r.library,
                    "lds_spearman": lds_mean[r.name],
                    "lds_per_query": lds_pq[r.name],
                    "bootstrap_vs_best": boot[r.name],
                    "loo_spearman": _nanmean(loo_pq[r.name]) if loo_pq else None,
                    "loo_per_query": loo_pq.get(r.name),
                    "fit_s": round(r.fit_s, 2),
                    "s_test_s": None if r.s_test_s is None else round(r.s_test_s, 2),
                    "scoring_s": None if r.scoring_s is None else round(r.scoring_s, 2),
                    "total_s": round(r.fit_s + (r.s_test_s or 0.0) + (r.scoring_s or 0.0), 2),
                    "cpu_s": None if r.cpu_s is None else round(r.cpu_s, 2),
                    "peak_rss_mb": r.peak_rss_mb,
                    "sign_factor": r.sign_factor,
                    "raw_convention": r.raw_convention,
                    "sign_check_pearson_vs_gradient_dot": pearson_all(r.scores, grad_dot),
                    "spearman_vs_repinf_cg": None if cg_ref is None else score_agreement(r.scores, cg_ref),
                    "settings": r.settings,
                    "notes": r.notes,
                    "scores": r.scores.tolist(),
                }
            )
        for row in rows_out:
            if row["sign_check_pearson_vs_gradient_dot"] <= 0:
                print(f"[bench_peers] WARNING: {row['method']}'s scores anti-correlate with the gradient dot products "
                      f"({row['sign_check_pearson_vs_gradient_dot']:+.3f}): check its sign convention.")  # fmt: skip
        keep = (
            "objective",
            "cached_tail_check",
            "full_refit_s",
            "full_refit_cpu_s",
            "base_test_loss",
            "train_loss_at_theta_star",
            "resumed_from_checkpoint",
            "threads",
        )
        gt_out: dict[str, Any] = {k: gt[k] for k in keep if k in gt}
        gt_out["lds"] = {"n_subsets": args.subsets, "fraction": args.fraction, "seconds": gt["lds"]["seconds"],
                         "cpu_s": gt["lds"]["cpu_s"],
                         "actual": gt["lds"]["actual"].tolist(), "weights": weights["lds"].tolist(),
                         "max_iter": args.max_iter}  # fmt: skip
        if "loo" in weights:
            gt_out["loo"] = {"n_remove": int(weights["loo"].shape[0]), "seconds": gt["loo"]["seconds"],
                             "cpu_s": gt["loo"]["cpu_s"],
                             "actual": gt["loo"]["actual"].tolist()}  # fmt: skip
        res = {
            "complete": complete,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv_is_cli() else None,
            "setting": s.info,
            "versions": {
                "repinf_lens": getattr(repinf_lens, "__version__", None),
                "kronfluence": getattr(kf, "__version__", None) if kf is not None else None,
                "dattri": peer_version("dattri") if da is not None else None,  # dattri 0.3.0 has no __version__
                "torch": torch.__version__,
            },
            "sign_convention": "POSITIVE = proponent (+ g_test^T (H + lambda)^-1 g_train); each method's raw scores "
            "times its sign_factor; sign_check_pearson_vs_gradient_dot > 0 confirms it on the data",
            "gradient_checks": checks,
            "gradient_precheck_theta0": pre,
            "ground_truth": gt_out,
            "best": best,
            "n_boot": args.n_boot,
            "threads": args.threads,
            "methods": rows_out,
            "skipped": skipped,
            "peak_rss_process_mb": _maxrss_mb(),
            "total_s": round(time.perf_counter() - t_start, 1),
            "total_cpu_s": round(time.process_time(), 1),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "workdir"},
        }
        (args.out / "results.json").write_text(json.dumps(res, indent=2))
        md = markdown(res)
        (args.out / "results.md").write_text(md)
        if complete:
            print(md)
            log(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}")
        return res

    for i, (_, name, fn) in enumerate(plan):
        if i == last_kf + 1 and last_kf >= 0:
            release_hf()  # (the twin is 0.5 GB; dattri and the metrics no longer need it)
        log(f"{name} ...")
        c0 = time.process_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                r = fn()
            r.cpu_s = time.process_time() - c0
        except GradientMismatchError:
            raise
        except Exception as err:  # one method failing (MemoryCapExceeded included) must not hide the others' numbers
            import gc

            gc.collect()
            skipped[name] = f"failed: {type(err).__name__}: {err}"
            log(f"{name} FAILED: {type(err).__name__}: {err}")
            continue
        r.scores = r.scores * r.sign_factor
        if not torch.isfinite(r.scores).all():
            skipped[name] = "non-finite scores"
            log(f"{name}: non-finite scores, dropped")
            continue
        runs.append(r)
        total = r.fit_s + (r.s_test_s or 0.0) + (r.scoring_s or 0.0)
        log(f"{name}: fit {r.fit_s:.1f} s, s_test {_fmt(r.s_test_s, '.1f')} s, scoring {_fmt(r.scoring_s, '.1f')} s "
            f"(total {total:.1f} s, CPU {r.cpu_s:.1f} s), peak extra RSS {_fmt(r.peak_rss_mb, '.0f')} MB")  # fmt: skip
        finish(False)  # (a crash later keeps what ran)

    return finish(True)


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == Path(__file__).name


def _maxrss_mb() -> float | None:
    with contextlib.suppress(ImportError):
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
