"""SplitModel: a HookedTransformer cut at a hook point, optionally with an SAE spliced in.

theta1 (everything upstream of the hook) is frozen and run under ``no_grad``; theta2 (the parameters the hooked
activation feeds, by default) is what curvature and influence differentiate. The activation ``x`` at the hook is
encoded into SAE latents ``r = encode(x)``, and the downstream computation starts from
``decode(r) + e`` with the SAE error ``e = x - decode(encode(x))`` held constant (``use_error_term=True``), so
the spliced model reproduces the original logits exactly; ``use_error_term=False`` drops ``e`` (the paper's
setting, which changes the model's outputs slightly).

Everything downstream is a function of explicit tensors (latents, error, parameters dict), so it composes with
``torch.func.grad``, ``jvp`` and ``vmap``.

Sign convention of the influence scores built on this split: POSITIVE = proponent (up-weighting the training
example lowers the test loss).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from repinf_lens.errors import RepinfLensError, check_finite
from repinf_lens.models.hooked import (
    attached_saes,
    final_norm,
    hook_firing_order,
    is_transcoder,
    logit_softcap,
    sae_hooks,
)
from repinf_lens.split.compat import (
    HookNameError,
    SAECompatibilityError,
    activation_shape,
    check_sae_compatibility,
)
from repinf_lens.task import check_batch, gather_positions, task_config

__all__ = ["Params", "SplitConfigError", "SplitInputs", "SplitModel"]

Params = dict[str, Tensor]


class SplitConfigError(RepinfLensError, ValueError):
    """The model and task cannot be split as asked (no tokenizer, token ids outside the vocabulary, ...)."""


@dataclass
class SplitInputs:
    """Upstream state of a batch at the split, computed once under ``no_grad``.

    Attributes:
        latents: ``[B, T, d_sae]`` SAE latents r (the activation itself when there is no SAE).
        error: ``[B, T, d_in]`` SAE error e held constant, or ``None`` (no SAE, or ``use_error_term=False``).
        base: input of the first downstream block (the residual stream entering it).
        batch: the task batch (a :class:`~repinf_lens.task.TaskBatch`: tokens, the positions the loss reads, ...).
        anchor: ``(x, decode(r), e)`` at the prepared latents. With it the downstream input is computed as
            ``x + (decode(r') - decode(r)) + (e' - e)``: the same function of ``r'`` and ``e'`` as
            ``decode(r') + e'`` (same derivatives), but exactly ``x`` at ``r' = r, e' = e``, so the spliced model
            reproduces the original logits bit for bit instead of up to float rounding.
    """

    latents: Float[Tensor, "batch pos d_sae"]
    error: Tensor | None
    base: Tensor
    batch: Any
    anchor: tuple[Tensor, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def slice(self, start: int, stop: int) -> SplitInputs:
        """Examples ``start:stop`` (latents, error, base, batch and anchor sliced alike)."""
        import dataclasses

        sl = slice(start, stop)
        kw = {}
        for f in dataclasses.fields(self.batch):
            v = getattr(self.batch, f.name)
            kw[f.name] = v[sl] if isinstance(v, (Tensor, list)) else v
        return SplitInputs(
            latents=self.latents[sl],
            error=None if self.error is None else self.error[sl],
            base=self.base[sl],
            batch=type(self.batch)(**kw),
            anchor=None if self.anchor is None else (self.anchor[0][sl], self.anchor[1][sl], self.anchor[2][sl]),
        )


class SplitModel:
    """A HookedTransformer split at ``hook_name``; theta2 = the parameters downstream of the hook.

    Args:
        model: the HookedTransformer (its parameters are never modified).
        hook_name: TransformerLens hook point, e.g. ``"blocks.14.hook_resid_post"`` or ``"blocks.3.hook_mlp_out"``.
            Residual-stream points run the downstream part with ``start_at_layer``; other points inside block L
            run block L from its input with a forward hook that replaces the activation.
        sae: an ``sae_lens.SAE`` with a stateless decoder (standard, topk, jumprelu, gated, ...), a transcoder
            (``Transcoder`` / ``SkipTranscoder``: latents read at its ``hook_name``, the decode written at its
            ``hook_name_out`` = :attr:`out_hook`, theta2 = what that hook feeds), or ``None`` to attribute to the
            raw activation's dimensions. On a ``HookedSAETransformer``, SAEs attached with ``add_sae`` upstream
            are part of the frozen computation and those downstream stay in the model with their error terms held
            constant; one attached at the split hook is refused (``model.reset_saes()``).
        downstream: theta2. ``None`` = every parameter the activation feeds; a list of parameter names; a regex
            (matched with ``re.search``); or a callable ``(name, param) -> bool``.
        use_error_term: hold the SAE error constant in the downstream input (exact reconstruction of the logits).
        task: the task whose loss :meth:`loss` computes (default: ``MultipleChoiceTask.from_model(model)``).
        trim_unembed: when the task's loss reads only some vocabulary columns (``task.loss_vocab()``, e.g. the
            option letters), theta2's ``unembed.W_U`` / ``unembed.b_U`` are those columns only
            (``[d_model, n]`` / ``[n]``, in ``loss_vocab`` order). Exact: the other columns have zero gradient,
            Hessian rows and s_test entries. It halves theta2 below late hooks of a 49k-token vocabulary (53M ->
            25M parameters at ``blocks.22`` of SmolLM2-135M), and with it the memory of s_test, CG and
            sketches. ``False`` keeps the full matrices.
        prune: compute only what the loss reads, in :meth:`loss` and everything differentiated through it.
            (1) After the last block's attention (``blocks.{n_layers-1}.hook_resid_mid``, :attr:`prune_hook`) no
            layer mixes positions, so the last MLP, the final norm and the unembedding run at the loss positions
            (``batch.answer_pos``) only; applies when the split hook fires before that point. (2) The
            unembedding computes only the vocabulary columns the loss reads (:meth:`loss_columns`; the others
            are NaN in the loss's logits, so a task that reads a column it did not declare gets a non-finite
            loss, not a wrong one); :meth:`logits` still returns every column. Exact; it saves most of the last
            block's MLP and the d_model x d_vocab unembedding with its transposes. ``False`` computes everything.

    Sign convention of scores computed on a split: POSITIVE = proponent (up-weighting the training example
    lowers the test loss).
    """

    def __init__(
        self,
        model: HookedTransformer,
        hook_name: str,
        sae: Any | None = None,
        *,
        downstream: None | Iterable[str] | str | Callable[[str, Tensor], bool] = None,
        use_error_term: bool = True,
        task: Any | None = None,
        trim_unembed: bool = True,
        prune: bool = True,
    ) -> None:
        self.model = model
        self._prune = prune
        self.trim_unembed = trim_unembed
        self.sae = sae
        self.use_error_term = use_error_term
        self._task = task
        hook_in = hook_out = hook_name
        if sae is not None and is_transcoder(sae):
            t_in, t_out = sae_hooks(sae)
            if hook_name not in (t_in, t_out):
                raise SAECompatibilityError(
                    f"The transcoder reads {t_in!r} and writes {t_out!r}, but the split is at {hook_name!r}. "
                    f"Fix: SplitModel(model, {t_in!r}, transcoder)."
                )
            hook_in, hook_out = str(t_in), str(t_out)
        #: the hook the latents are read at (the SAE's ``hook_name``; a transcoder's input hook)
        self.hook_name = hook_in
        #: the hook whose activation the splice replaces (= ``hook_name``, except a transcoder's output hook)
        self.out_hook = hook_out
        attached = attached_saes(model)
        self._check_attached_at_split(attached)
        for h in dict.fromkeys((hook_in, hook_out)):
            self._check_hook_exists(h)
        m = re.match(r"blocks\.(\d+)\.(.+)$", hook_out)
        if m is None or not re.match(r"blocks\.(\d+)\.", hook_in):
            raise HookNameError(
                f"{hook_out!r} is outside the transformer blocks; the split needs a hook inside blocks.L. "
                f"Fix: use 'blocks.0.hook_resid_pre' instead of the embedding hooks."
            )
        self.layer = int(m.group(1))
        point = m.group(2)
        if point == "hook_resid_pre":
            self.start_layer, self.mode = self.layer, "resid"
        elif point == "hook_resid_post":
            self.start_layer, self.mode = self.layer + 1, "resid"
        else:
            self.start_layer, self.mode = self.layer, "inner"
        if getattr(model.cfg, "positional_embedding_type", "standard") == "shortformer":
            raise NotImplementedError("Shortformer positional embeddings are not supported by SplitModel.")
        if task is None and getattr(model, "tokenizer", None) is None:
            raise SplitConfigError(
                "The model has no tokenizer, so SplitModel cannot build its default MultipleChoiceTask. "
                "Fix: model.set_tokenizer(tokenizer) (a Hugging Face tokenizer), or pass task= a Task whose "
                "collate() tokenises the examples itself."
            )
        order = hook_firing_order(model)
        for h in dict.fromkeys((hook_in, hook_out)):
            self._check_hook_fires(h, order)
        if order.index(hook_in) > order.index(hook_out):
            raise SAECompatibilityError(
                f"The transcoder reads {hook_in!r}, which runs AFTER the hook it writes, {hook_out!r}. "
                "Fix: check sae.cfg.metadata.hook_name / hook_name_out."
            )
        self.downstream_saes = self._check_attached_order(attached, order)
        # after the last attention layer nothing mixes positions, so the downstream function computes the rest
        # (the last MLP, final norm, unembedding) at the loss positions only: exact, and ~T times less of it
        last_mid = f"blocks.{model.cfg.n_layers - 1}.hook_resid_mid"
        before = last_mid in order and order.index(hook_out) < order.index(last_mid)
        self._prunable_at = last_mid if before else None
        self._act_width = self._activation_width()
        if sae is not None:
            self._check_sae(sae)
        check_finite(
            "A model weight",
            {n: p for n, p in model.named_parameters()},
            where="(found when building the split)",
            fix="load an undamaged checkpoint; a NaN upstream weight would give finite but wrong scores "
            "(TransformerLens zeroes NaN attention patterns), so repinf_lens refuses it.",
        )
        all_params: Params = dict(model.named_parameters())
        structural = self._structural_downstream(all_params)
        self.param_names = self._select(downstream, all_params, structural)
        self._check_task_vocab()

    # ------------------------------------------------------------------ construction helpers
    def _check_hook_exists(self, hook: str) -> None:
        if hook in self.model.hook_dict:
            return
        names = sorted(self.model.hook_dict)
        close = difflib.get_close_matches(hook, names, n=5, cutoff=0.6)
        raise HookNameError(
            f"{hook!r} is not a hook point of this model. "
            + (f"Closest: {close}. " if close else "")
            + f"Valid hook points ({len(names)}): {', '.join(names)}. "
            "Fix: pass one of these names (e.g. 'blocks.14.hook_resid_post')."
        )

    def _check_hook_fires(self, hook: str, order: list[str]) -> None:
        if hook in order:
            return
        hints = {
            "hook_mlp_in": "model.set_use_hook_mlp_in(True)",
            "hook_attn_in": "model.set_use_attn_in(True)",
            "hook_q_input": "model.set_use_split_qkv_input(True)",
            "hook_k_input": "model.set_use_split_qkv_input(True)",
            "hook_v_input": "model.set_use_split_qkv_input(True)",
            "hook_result": "model.set_use_attn_result(True)",
            "hook_resid_mid": "a hook that exists with parallel attention, e.g. hook_attn_out or hook_mlp_out",
        }
        hint = next((v for k, v in hints.items() if hook.endswith(k)), None)
        raise HookNameError(
            f"{hook!r} is a hook point of this model but never fires in its forward pass (its activation is not "
            "computed with this model's settings), so nothing could be spliced there. "
            + (f"Fix: {hint}." if hint else "Fix: choose a hook that fires, e.g. 'blocks.L.hook_resid_post'.")
        )

    def _check_attached_at_split(self, attached: list[Any]) -> None:
        for a in attached:
            if {a.hook_in, a.hook_out} & {self.hook_name, self.out_hook}:
                raise SAECompatibilityError(
                    f"An {a.describe()} is attached to this HookedSAETransformer (model.add_sae) at the split's hook "
                    f"{self.hook_name!r}; SplitModel splices its own SAE there. Fix: sae = "
                    f"model.acts_to_saes[{a.hook_in!r}]; model.reset_saes(); SplitModel(model, {a.hook_in!r}, sae)."
                )

    def _check_attached_order(self, attached: list[Any], order: list[str]) -> list[Any]:
        """Attached SAEs downstream of the split (upstream ones are part of theta1's frozen computation)."""
        split_pos = order.index(self.out_hook)

        def pos(hook: str) -> int:
            hits = [i for i, n in enumerate(order) if n == hook or n.startswith(hook + ".")]
            return hits[0] if hits else -1

        downstream = []
        for a in attached:
            p_in, p_out = pos(a.hook_in), pos(a.hook_out)
            if p_out < split_pos:
                continue
            if p_in <= split_pos:
                raise SAECompatibilityError(
                    f"An attached {a.describe()} reads upstream of the split at {self.out_hook!r} and writes "
                    "downstream of it, so the downstream function cannot recompute it. Fix: model.reset_saes() (or "
                    "detach that transcoder with model.reset_saes([...])) before building the split."
                )
            if a.exclude_special_tokens is not False:
                raise SAECompatibilityError(
                    f"An attached {a.describe()} downstream of the split uses exclude_special_tokens, which needs "
                    "the token ids inside the forward pass; the split runs the downstream part from activations. "
                    "Fix: model.add_sae(sae, use_error_term=..., exclude_special_tokens=False), or model.reset_saes()."
                )
            downstream.append(a)
        return downstream

    def _check_task_vocab(self) -> None:
        fn = getattr(self.task, "loss_vocab", None)
        ids = fn() if callable(fn) else None
        d_vocab = int(self.model.cfg.d_vocab_out if getattr(self.model.cfg, "d_vocab_out", -1) > 0 else -1)
        if d_vocab <= 0:
            d_vocab = int(self.model.cfg.d_vocab)
        bad = [int(i) for i in (ids or []) if not 0 <= int(i) < d_vocab]
        if bad:
            raise SplitConfigError(
                f"The task's loss reads token ids {bad[:10]} but the model's unembedding has only d_vocab={d_vocab} "
                "columns: the tokenizer does not belong to this model. Fix: build the task from model.tokenizer "
                "(MultipleChoiceTask.from_model(model)) or load the tokenizer that matches the model."
            )
        self._loss_cols = None if ids is None else _placement(ids, d_vocab, self.device)

    def _check_sae(self, sae: Any) -> None:
        sae_hook = sae_hooks(sae)[0]
        if sae_hook is not None and sae_hook != self.hook_name:
            raise SAECompatibilityError(
                f"The SAE was trained at {sae_hook!r} but the split is at {self.hook_name!r}. "
                f"Fix: SplitModel(model, {sae_hook!r}, sae), or set sae.cfg.metadata.hook_name if you know the "
                "activations are the same."
            )
        check_sae_compatibility(sae, self.model, self.hook_name)

    def _activation_width(self) -> int:
        """Width of the spliced activation; refuses activations that are not ``[batch, pos, ...]``-shaped."""
        shapes = {}
        for n_tok in (3, 5):
            shapes[n_tok] = tuple(activation_shape(self.model, self.out_hook, n_tok))
        a, b = shapes[3], shapes[5]
        if a[1] != 3 or b[1] != 5 or a[2:] != b[2:]:
            raise HookNameError(
                f"The activation at {self.out_hook!r} has shape {list(a)} for 1 prompt of 3 tokens and {list(b)} for "
                "5 tokens: it is not indexed [batch, pos, ...] (attention patterns and scores are [batch, head, "
                "query_pos, key_pos]), so it has no per-token latents to splice. Fix: split at a position-indexed "
                "hook such as 'blocks.L.attn.hook_z', 'blocks.L.hook_attn_out' or 'blocks.L.hook_resid_post'."
            )
        self._act_shape_tail = a[2:]
        return int(torch.tensor(a[2:]).prod().item()) if a[2:] else 1

    def _structural_downstream(self, all_params: Params) -> set[str]:
        """Parameters the hooked activation feeds, found by taint-tracking one small forward pass.

        A parameter is downstream when some operation combines it (or a view of it) with a tensor computed
        from the activation. Parameters that only reach the output through other paths (e.g. the attention of
        the same block for ``hook_mlp_out``, which enters through the residual connection) are upstream.
        """
        cfg = self.model.cfg
        tokens = torch.zeros((1, 3), dtype=torch.long, device=cfg.device)
        base_name = f"blocks.{self.start_layer}.hook_resid_pre"
        with torch.no_grad():
            _, cache = self.model.run_with_cache(
                tokens, names_filter=lambda n: n in (self.out_hook, base_name), stop_at_layer=self.layer + 1
            )
            act = cache[self.out_hook].clone()
            base = cache[base_name] if self.mode == "inner" else act
            tracker = _TaintTracker(act, all_params)
            with tracker:
                self._run_downstream(act, base, torch.tensor([2], device=cfg.device), None)
        return tracker.used

    def _select(self, downstream: Any, all_params: Params, structural: set[str]) -> list[str]:
        order = [n for n in all_params]
        if downstream is None:
            chosen = [n for n in order if n in structural]
        elif isinstance(downstream, str):
            pat = re.compile(downstream)
            chosen = [n for n in order if pat.search(n)]
        elif callable(downstream):
            chosen = [n for n in order if downstream(n, all_params[n])]
        else:
            wanted = list(downstream)
            unknown = [n for n in wanted if n not in all_params]
            if unknown:
                raise ValueError(
                    f"Unknown parameter names {unknown}. Fix: choose from model.named_parameters(), e.g. {order[-3:]}."
                )
            chosen = [n for n in order if n in set(wanted)]
        upstream = [n for n in chosen if n not in structural]
        if upstream:
            raise ValueError(
                f"Parameters {upstream[:5]}{'...' if len(upstream) > 5 else ''} are not downstream of "
                f"{self.hook_name!r} (the activation does not feed them, so their gradient does not depend on the "
                "latents). Fix: choose theta2 among split.structural_downstream names."
            )
        if not chosen:
            raise ValueError(f"theta2 selection {downstream!r} matched no downstream parameter of {self.hook_name!r}.")
        self.structural_downstream = [n for n in order if n in structural]
        return chosen

    # ------------------------------------------------------------------ properties
    @property
    def task(self) -> Any:
        if self._task is None:
            from repinf_lens.task import MultipleChoiceTask

            self._task = MultipleChoiceTask.from_model(self.model)
        return self._task

    def with_task(self, task: Any) -> SplitModel:
        """A shallow copy of this split that computes ``task``'s loss."""
        new = self._shallow_copy(_task=task)
        new._check_task_vocab()
        return new

    def _shallow_copy(self, **changes: Any) -> SplitModel:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__, **changes)
        return new

    @property
    def prune_hook(self) -> str | None:
        """The hook after which the downstream function runs at the loss positions only (``prune``):
        the last block's ``hook_resid_mid``, or ``None`` when the split hook fires after it or pruning is off."""
        return self._prunable_at if self._prune else None

    def with_prune(self, prune: bool) -> SplitModel:
        """A shallow copy of this split with ``prune`` set (e.g. ``False`` for token-wise curvature statistics,
        which count every position's activation, as K-FAC / EK-FAC and Kronfluence do)."""
        return self._shallow_copy(_prune=bool(prune))

    @property
    def act_shape(self) -> tuple[int, ...]:
        """Shape of the spliced activation after ``[batch, pos]`` (``(d_model,)``, ``(n_heads, d_head)``, ...)."""
        return tuple(self._act_shape_tail)

    @property
    def d_sae(self) -> int:
        """Number of latents (the SAE's d_sae, or the activation width without an SAE)."""
        return int(self.sae.cfg.d_sae) if self.sae is not None else self._act_width

    @property
    def device(self) -> torch.device:
        return torch.device(cast(str, self.model.cfg.device))  # HookedTransformerConfig sets it in __post_init__

    def unembed_columns(self) -> Tensor | None:
        """The vocabulary columns theta2's unembedding keeps (``None``: all; see ``trim_unembed``)."""
        if not self.trim_unembed or not any(n in _VOCAB_DIM for n in self.param_names):
            return None
        return self.loss_columns()

    def downstream_params(self) -> Params:
        """theta2 as a dict ``name -> detached tensor`` (the keys of every theta2-shaped vector).

        Views of the model's parameters, except a trimmed unembedding (``trim_unembed``), which is a copy of
        the kept columns; write values back with :meth:`load_downstream_params`.
        """
        named = dict(self.model.named_parameters())
        cols = self.unembed_columns()
        out: Params = {}
        for n in self.param_names:
            v = named[n].detach()
            out[n] = v.index_select(_VOCAB_DIM[n], cols) if cols is not None and n in _VOCAB_DIM else v
        return out

    @torch.no_grad()
    def load_downstream_params(self, params: Params) -> None:
        """Write theta2 values (:meth:`downstream_params` layout) into the model's parameters, in place."""
        named = dict(self.model.named_parameters())
        cols = self.unembed_columns()
        want = {k: v.shape for k, v in self.downstream_params().items()}
        bad = {n: (tuple(v.shape), tuple(want[n]) if n in want else None) for n, v in params.items()
               if n not in want or v.shape != want[n]}  # fmt: skip
        if bad:
            raise ValueError(
                f"load_downstream_params got values that are not theta2 entries of the right shape: {bad} "
                "(given shape, theta2 shape). Fix: pass a dict laid out like split.downstream_params()."
            )
        for n, v in params.items():
            if cols is not None and n in _VOCAB_DIM:
                named[n].index_copy_(_VOCAB_DIM[n], cols, v.to(named[n].dtype))
            else:
                named[n].copy_(v)

    def num_downstream_params(self) -> int:
        return sum(p.numel() for p in self.downstream_params().values())

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this split for caching (see :func:`repinf_lens._fingerprint.split_fingerprint`)."""
        from repinf_lens._fingerprint import split_fingerprint

        return split_fingerprint(self, task_config=task_config)

    # ------------------------------------------------------------------ upstream
    @torch.no_grad()
    def prepare(self, batch: Any) -> SplitInputs:
        """Run theta1 under ``no_grad``: activation, latents and (held) SAE error for a task batch.

        For a transcoder the latents are read at its input hook and the error is the true activation at its output
        hook minus the decoded latents (a skip transcoder's ``W_skip x`` term is part of that held error).
        """
        check_batch(batch, self._task)
        batch = batch.to(self.device)
        self.check_tokens(batch.tokens)
        x_in, y, base = self._upstream(batch.tokens)
        if self.sae is None:
            r = y.reshape(*y.shape[:2], -1)
            error = recon = None
        else:
            r = self.sae.encode(x_in.to(self.sae.dtype))
            recon = self.sae.decode(r).to(y.dtype)
            error = (y - recon) if self.use_error_term else None
        check_finite(
            "The SAE latents" if self.sae is not None else "The activation",
            {self.hook_name: r, "error": error},
            where=f"at {self.hook_name!r} for examples {list(getattr(batch, 'ids', []))[:8]}",
            fix="check the SAE's weights and the model's dtype (an overflow in float16/bfloat16; try float32).",
        )
        anchor = None
        if error is not None and recon is not None:  # (recon is set whenever error is)
            anchor = (y.detach(), recon.detach(), error.detach())
        return SplitInputs(
            latents=r.detach(), error=None if error is None else error.detach(), base=base, batch=batch, anchor=anchor
        )

    def _upstream(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(activation at hook_name, activation at out_hook, input of the first downstream block)``."""
        names = {self.hook_name, self.out_hook}
        base_name = f"blocks.{self.start_layer}.hook_resid_pre"
        if self.mode == "inner":
            names.add(base_name)
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=self.layer + 1)
        y = cache[self.out_hook]
        base = cache[base_name] if self.mode == "inner" else y
        return cache[self.hook_name], y, base

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> Float[Tensor, "batch pos d_sae"]:
        """SAE latents of right-padded token ids (the activation itself without an SAE), as :meth:`prepare`."""
        tokens = tokens.to(self.device)
        self.check_tokens(tokens)
        x_in, y, _ = self._upstream(tokens)
        if self.sae is None:
            return y.reshape(*y.shape[:2], -1)
        return self.sae.encode(x_in.to(self.sae.dtype))

    def check_tokens(self, tokens: Tensor) -> None:
        """Refuse token ids outside the embedding (``>= d_vocab`` or negative) and prompts longer than n_ctx."""
        from repinf_lens.task import check_fits

        check_fits(self.model, tokens)
        d_vocab = int(self.model.cfg.d_vocab)
        if tokens.numel() and (int(tokens.max()) >= d_vocab or int(tokens.min()) < 0):
            bad = sorted({int(t) for t in tokens.flatten() if not 0 <= int(t) < d_vocab})
            raise SplitConfigError(
                f"The batch has token ids {bad[:10]} outside the model's vocabulary (d_vocab={d_vocab}): the task's "
                "tokenizer does not belong to this model. Fix: build the task from model.tokenizer."
            )

    def latents(self, batch: Any) -> tuple[Float[Tensor, "batch pos d_sae"], Tensor | None]:
        """``(r, error)`` for a task batch (computed under ``no_grad``)."""
        inp = self.prepare(batch)
        return inp.latents, inp.error

    # ------------------------------------------------------------------ downstream (differentiable)
    def downstream_input(
        self, r: Tensor, error: Tensor | None = None, anchor: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> Tensor:
        """``decode(r) + error`` (or ``r`` reshaped to the activation without an SAE).

        With ``anchor = (x, decode(r0), e0)`` (see :class:`SplitInputs`) the same function is evaluated as
        ``x + (decode(r) - decode(r0)) + (error - e0)``, exact at the prepared point.
        """
        if self.sae is None:
            x = r.reshape(*r.shape[:2], *self._act_shape_tail)
        else:
            x = self.sae.decode(r)
            if x.shape[2:] != self._act_shape_tail:  # a transcoder's flat d_out at a [.., n_heads, d_head] hook
                x = x.reshape(*x.shape[:2], *self._act_shape_tail)
        if error is not None:
            if anchor is not None:
                x0, recon0, e0 = anchor
                x = x0 + (x.to(x0.dtype) - recon0) + (error - e0)
            else:
                x = x + error
        return x.to(self.model.cfg.dtype)

    def loss_columns(self) -> Tensor | None:
        """The vocabulary columns the task's loss reads (``task.loss_vocab()``, in its order; ``None``: all)."""
        # built when the task is set (outside any torch.func transform: a tensor cached from inside one escapes it)
        cached = self.__dict__.get("_loss_cols")
        return None if cached is None else cached[1]

    def _run_downstream(
        self, x: Tensor, base: Tensor, answer_pos: Tensor, params: Params | None, loss_only: bool = False
    ) -> Tensor:
        model = self.model
        n_layers = model.cfg.n_layers
        # SAELens computes an attached SAE's error term under no_grad, which forward-mode AD ignores: detach it, so
        # that it is the constant SAELens means it to be for every differentiation (jvp, grad, their compositions)
        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (f"{a.hook_out}.hook_sae_error", _detach) for a in self.downstream_saes if a.use_error_term
        ]
        prune_at = self.prune_hook  # fires whenever set: the split hook fires before it, in the last block's input
        if prune_at is not None:

            def prune(act: Tensor, hook: Any) -> Tensor:
                out = gather_positions(act, answer_pos)
                return out[:, None, :] if out.ndim == 2 else out  # [B, 1 or P, d_model]

            hooks.append((prune_at, prune))

        def body() -> Tensor:
            if self.mode == "resid":
                with model.hooks(fwd_hooks=hooks):
                    return model(x, start_at_layer=self.start_layer, stop_at_layer=n_layers)

            def replace(_act: Tensor, hook: Any) -> Tensor:
                return x

            with model.hooks(fwd_hooks=[(self.out_hook, replace), *hooks]):
                return model(base, start_at_layer=self.start_layer, stop_at_layer=n_layers)

        cols = self.unembed_columns() if params else None
        trimmed = {n: params[n] for n in _VOCAB_DIM if n in params} if params and cols is not None else {}
        rest = {k: v for k, v in params.items() if k not in trimmed} if params else {}
        placement = self.__dict__.get("_loss_cols") if loss_only and self._prune else None

        def run() -> Tensor:
            # the positions the loss reads: answer_pos [B] -> [B, d_model], [B, P] -> [B, P, d_model]
            out = body()
            if prune_at is not None:  # already at the loss positions: [B, 1, d_model] or [B, P, d_model]
                resid = out[:, 0, :] if answer_pos.ndim == 1 else out
            else:
                resid = gather_positions(out, answer_pos)
            one = resid.ndim == 2
            # every step HookedTransformer.forward applies after the last block (repinf_lens.models.hooked.final_logits)
            h = final_norm(model, resid[:, None, :] if one else resid)
            h = h[:, 0, :] if one else h
            if placement is not None:
                read_ = placement[1].to(h.device)
                # the loss reads these columns only: compute them alone (a d_model x n product instead of the
                # d_model x d_vocab unembedding and its transposes); the others are NaN, so that a task reading
                # a column it did not declare in loss_vocab() gets a non-finite loss, never a silent wrong one
                w = trimmed["unembed.W_U"] if "unembed.W_U" in trimmed else model.unembed.W_U.index_select(1, read_)
                b = trimmed["unembed.b_U"] if "unembed.b_U" in trimmed else model.unembed.b_U.index_select(0, read_)
                kept = logit_softcap(model, h @ w + b)
                # placed by a one-hot product (exact; index_copy into a fresh tensor trips functorch's levels)
                place, unread = (t.to(device=kept.device, dtype=kept.dtype) for t in placement[2:])
                return kept @ place + unread
            logits = logit_softcap(model, model.unembed(h[:, None, :] if one else h))
            logits = logits[:, 0, :] if one else logits
            if not trimmed or cols is None:  # (cols is set whenever trimmed is non-empty)
                return logits
            # theta2 holds the loss's vocabulary columns only: recompute those from it (the other columns are
            # the model's own values, constant in theta2)
            w = trimmed["unembed.W_U"] if "unembed.W_U" in trimmed else model.unembed.W_U.index_select(1, cols)
            b = trimmed["unembed.b_U"] if "unembed.b_U" in trimmed else model.unembed.b_U.index_select(0, cols)
            kept = logit_softcap(model, h @ w + b)
            return logits.index_copy(logits.ndim - 1, cols, kept)

        return _call_with_params(model, rest, run) if rest else run()

    def logits(
        self,
        r: Tensor,
        batch: Any,
        params: Params | None = None,
        error: Tensor | None = None,
        base: Tensor | None = None,
        anchor: tuple[Tensor, Tensor, Tensor] | None = None,
        loss_only: bool = False,
    ) -> Tensor:
        """Logits at the loss positions ``batch.answer_pos`` of the downstream computation from latents ``r``.

        ``[B, d_vocab]`` for ``answer_pos [B]`` (one position per example), ``[B, P, d_vocab]`` for ``[B, P]``.

        ``params`` replaces theta2 (any subset of the model's parameters) when given; the result is
        differentiable in ``r``, ``error`` and ``params``. ``base`` (the downstream block's input, needed for
        mid-block hook points) is recomputed under ``no_grad`` when not given. ``loss_only``: compute only the
        columns the task's loss reads (:meth:`loss_columns`; what :meth:`loss` uses), the others are NaN.
        """
        if base is None and self.mode == "inner":
            base = self.prepare(batch).base
        x = self.downstream_input(r, error, anchor)
        return self._run_downstream(x, base if base is not None else x, batch.answer_pos, params, loss_only)

    def loss(
        self,
        r: Tensor,
        batch: Any,
        params: Params | None = None,
        error: Tensor | None = None,
        base: Tensor | None = None,
        reduction: str = "mean",
        anchor: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Task loss of the downstream computation from latents ``r`` (mean over the batch by default); only the
        vocabulary columns the loss reads (:meth:`loss_columns`) are unembedded."""
        logits = self.logits(r, batch, params, error, base, anchor, loss_only=True)
        return self.task.loss(logits, batch, reduction=reduction)

    def inputs_loss(self, params: Params, inp: SplitInputs, reduction: str = "mean") -> Tensor:
        """``loss`` on a prepared :class:`SplitInputs` (the function curvature and influence differentiate)."""
        return self.loss(inp.latents, inp.batch, params, inp.error, inp.base, reduction=reduction, anchor=inp.anchor)

    @torch.no_grad()
    def original_logits(self, batch: Any) -> Tensor:
        """Loss-position logits of the unmodified model (for checking the splice; shaped as :meth:`logits`)."""
        return self.task.model_logits(self.model, batch.to(self.device))


def _detach(act: Tensor, hook: Any) -> Tensor:
    return act.detach()


class _TaintTracker(torch.overrides.TorchFunctionMode):
    """Records which parameters are combined with tensors derived from a given activation."""

    def __init__(self, source: Tensor, params: Params) -> None:
        super().__init__()
        self._keep: list[Any] = [source]
        self._tainted = {id(source)}
        self._views: dict[int, set[str]] = {id(p): {n} for n, p in params.items()}
        self._keep.extend(params.values())
        self.used: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in _flat_tensors((args, kwargs))]
        outs = _flat_tensors(out)
        if not ins or not outs:
            return out
        if any(id(t) in self._tainted for t in ins):
            for t in ins:
                self.used |= self._views.get(id(t), set())
            self._tainted.update(id(o) for o in outs)
            self._keep.extend(outs)
        elif all(id(t) in self._views for t in ins):
            names = set().union(*(self._views[id(t)] for t in ins))
            for o in outs:
                self._views[id(o)] = names
            self._keep.extend(outs)
        return out


def _flat_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


class _Closure(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, fn: Callable[[], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self) -> Tensor:
        return self._fn()


_VOCAB_DIM = {"unembed.W_U": 1, "unembed.b_U": 0}
"""theta2 entries with a vocabulary dimension (trimmed to the task's loss vocabulary, see ``trim_unembed``)."""


def _placement(ids: Any, d_vocab: int, device: torch.device) -> tuple[tuple[int, ...], Tensor, Tensor, Tensor]:
    """``(ids, ids tensor, one-hot [n, d_vocab], 0 at ids / NaN elsewhere [d_vocab])`` for loss-only logits."""
    key = tuple(int(i) for i in ids)
    ids_t = torch.tensor(key, dtype=torch.long, device=device)
    place = torch.zeros((len(key), d_vocab), device=device)
    place[torch.arange(len(key), device=device), ids_t] = 1.0
    unread = torch.full((d_vocab,), float("nan"), device=device)
    unread[ids_t] = 0.0
    return key, ids_t, place, unread


def _call_with_params(model: torch.nn.Module, params: Mapping[str, Tensor], fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn()`` with some of ``model``'s parameters replaced by ``params`` (``torch.func.functional_call``)."""
    return torch.func.functional_call(_Closure(model, fn), {f"model.{k}": v for k, v in params.items()}, ())
