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
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from repinf_lens.task import task_config

__all__ = ["SplitModel", "SplitInputs", "HookNameError", "SAECompatibilityError", "Params"]

Params = dict[str, Tensor]

_SUPPORTED_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


class HookNameError(ValueError):
    """The hook name is not a hook point of the model."""


class SAECompatibilityError(ValueError):
    """The SAE cannot be spliced at this hook (d_in, hook name or normalisation)."""


@dataclass
class SplitInputs:
    """Upstream state of a batch at the split, computed once under ``no_grad``.

    Attributes:
        latents: ``[B, T, d_sae]`` SAE latents r (the activation itself when there is no SAE).
        error: ``[B, T, d_in]`` SAE error e held constant, or ``None`` (no SAE, or ``use_error_term=False``).
        base: input of the first downstream block (the residual stream entering it).
        batch: the task batch (tokens, answer positions, labels).
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


class SplitModel:
    """A HookedTransformer split at ``hook_name``; theta2 = the parameters downstream of the hook.

    Args:
        model: the HookedTransformer (its parameters are never modified).
        hook_name: TransformerLens hook point, e.g. ``"blocks.14.hook_resid_post"`` or ``"blocks.3.hook_mlp_out"``.
            Residual-stream points run the downstream part with ``start_at_layer``; other points inside block L
            run block L from its input with a forward hook that replaces the activation.
        sae: an ``sae_lens.SAE`` with a stateless decoder (standard, topk, jumprelu, gated, ...), or ``None``
            to attribute to the raw activation's dimensions.
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
    ) -> None:
        self.model = model
        self.trim_unembed = trim_unembed
        self.hook_name = hook_name
        self.sae = sae
        self.use_error_term = use_error_term
        self._task = task
        names = sorted(model.hook_dict)
        if hook_name not in model.hook_dict:
            close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
            raise HookNameError(
                f"{hook_name!r} is not a hook point of this model. "
                + (f"Closest: {close}. " if close else "")
                + f"Valid hook points ({len(names)}): {', '.join(names)}. "
                "Fix: pass one of these names (e.g. 'blocks.14.hook_resid_post')."
            )
        m = re.match(r"blocks\.(\d+)\.(.+)$", hook_name)
        if m is None:
            raise HookNameError(
                f"{hook_name!r} is outside the transformer blocks; the split needs a hook inside blocks.L. "
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
        self._act_width = self._activation_width()
        if sae is not None:
            self._check_sae(sae)
        all_params = dict(model.named_parameters())
        structural = self._structural_downstream(all_params)
        self.param_names = self._select(downstream, all_params, structural)

    # ------------------------------------------------------------------ construction helpers
    def _check_sae(self, sae: Any) -> None:
        from repinf_lens.saes.loading import check_sae_compatibility

        sae_hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
        if sae_hook is not None and sae_hook != self.hook_name:
            raise SAECompatibilityError(
                f"The SAE was trained at {sae_hook!r} but the split is at {self.hook_name!r}. "
                f"Fix: SplitModel(model, {sae_hook!r}, sae), or set sae.cfg.metadata.hook_name if you know the "
                "activations are the same."
            )
        check_sae_compatibility(sae, self.model, self.hook_name)

    def _activation_width(self) -> int:
        with torch.no_grad():
            tokens = torch.zeros((1, 2), dtype=torch.long, device=self.model.cfg.device)
            _, cache = self.model.run_with_cache(tokens, names_filter=self.hook_name, stop_at_layer=self.layer + 1)
        act = cache[self.hook_name]
        self._act_shape_tail = tuple(act.shape[2:])
        return int(torch.tensor(act.shape[2:]).prod().item())

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
                tokens, names_filter=lambda n: n in (self.hook_name, base_name), stop_at_layer=self.layer + 1
            )
            act = cache[self.hook_name].clone()
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
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._task = task
        return new

    @property
    def d_sae(self) -> int:
        """Number of latents (the SAE's d_sae, or the activation width without an SAE)."""
        return int(self.sae.cfg.d_sae) if self.sae is not None else self._act_width

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.cfg.device)

    def unembed_columns(self) -> Tensor | None:
        """The vocabulary columns theta2's unembedding keeps (``None``: all; see ``trim_unembed``)."""
        if not self.trim_unembed or not any(n in _VOCAB_DIM for n in self.param_names):
            return None
        fn = getattr(self.task, "loss_vocab", None)
        ids = fn() if callable(fn) else None
        if ids is None:
            return None
        key = tuple(int(i) for i in ids)
        cached = self.__dict__.get("_cols")
        if cached is None or cached[0] != key:
            self._cols = (key, torch.tensor(key, dtype=torch.long, device=self.device))
        return self._cols[1]

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
        """What identifies this split for caching: model config, hook, theta2 names and a weight checksum."""
        params = self.downstream_params()
        checksum = float(sum(float(p.double().sum()) + float(p.double().square().sum()) for p in params.values()))
        sae_info = None
        if self.sae is not None:
            sae_info = {
                "cfg": {k: str(v) for k, v in self.sae.cfg.to_dict().items()},
                "w": float(self.sae.W_dec.detach().double().sum()),
            }
        return {
            "model": {k: str(v) for k, v in sorted(self.model.cfg.to_dict().items()) if k not in ("device",)},
            "hook": self.hook_name,
            "theta2": self.param_names,
            "checksum": f"{checksum:.10e}",
            "sae": sae_info,
            "use_error_term": self.use_error_term,
            "unembed_columns": None if (c := self.unembed_columns()) is None else c.tolist(),
            "task": type(self.task).__name__,
            "task_config": task_config(self.task),
        }

    # ------------------------------------------------------------------ upstream
    @torch.no_grad()
    def prepare(self, batch: Any) -> SplitInputs:
        """Run theta1 under ``no_grad``: activation, latents and (held) SAE error for a task batch."""
        from repinf_lens.task import check_fits

        batch = batch.to(self.device)
        check_fits(self.model, batch.tokens)
        names = {self.hook_name}
        base_name = f"blocks.{self.start_layer}.hook_resid_pre"
        if self.mode == "inner":
            names.add(base_name)
        _, cache = self.model.run_with_cache(
            batch.tokens, names_filter=lambda n: n in names, stop_at_layer=self.layer + 1
        )
        x = cache[self.hook_name]
        if self.sae is None:
            r = x.reshape(*x.shape[:2], -1)
            error = None
        else:
            r = self.sae.encode(x.to(self.sae.dtype))
            recon = self.sae.decode(r)
            error = (x - recon.to(x.dtype)) if self.use_error_term else None
        base = cache[base_name] if self.mode == "inner" else x
        anchor = None
        if error is not None:
            anchor = (x.detach(), recon.to(x.dtype).detach(), error.detach())
        return SplitInputs(
            latents=r.detach(), error=None if error is None else error.detach(), base=base, batch=batch, anchor=anchor
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
        if error is not None:
            if anchor is not None:
                x0, recon0, e0 = anchor
                x = x0 + (x.to(x0.dtype) - recon0) + (error - e0)
            else:
                x = x + error
        return x.to(self.model.cfg.dtype)

    def _run_downstream(self, x: Tensor, base: Tensor, answer_pos: Tensor, params: Params | None) -> Tensor:
        model = self.model
        n_layers = model.cfg.n_layers

        def body() -> Tensor:
            if self.mode == "resid":
                return model(x, start_at_layer=self.start_layer, stop_at_layer=n_layers)

            def replace(_act: Tensor, hook: Any) -> Tensor:
                return x

            with model.hooks(fwd_hooks=[(self.hook_name, replace)]):
                return model(base, start_at_layer=self.start_layer, stop_at_layer=n_layers)

        cols = self.unembed_columns() if params else None
        trimmed = {n: params[n] for n in _VOCAB_DIM if n in params} if params and cols is not None else {}
        rest = {k: v for k, v in params.items() if k not in trimmed} if params else {}

        def run() -> Tensor:
            resid = body()
            resid = resid[torch.arange(resid.shape[0], device=resid.device), answer_pos.to(resid.device)]
            h = model.ln_final(resid[:, None, :])
            logits = model.unembed(h)[:, 0, :]
            if not trimmed:
                return logits
            # theta2 holds the loss's vocabulary columns only: recompute those from it (the other columns are
            # the model's own values, constant in theta2)
            w = trimmed["unembed.W_U"] if "unembed.W_U" in trimmed else model.unembed.W_U.index_select(1, cols)
            b = trimmed["unembed.b_U"] if "unembed.b_U" in trimmed else model.unembed.b_U.index_select(0, cols)
            return logits.index_copy(1, cols, h[:, 0, :] @ w + b)

        return _call_with_params(model, rest, run) if rest else run()

    def logits(
        self,
        r: Tensor,
        batch: Any,
        params: Params | None = None,
        error: Tensor | None = None,
        base: Tensor | None = None,
        anchor: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Float[Tensor, "batch d_vocab"]:
        """Answer-position logits of the downstream computation from latents ``r``.

        ``params`` replaces theta2 (any subset of the model's parameters) when given; the result is
        differentiable in ``r``, ``error`` and ``params``. ``base`` (the downstream block's input, needed for
        mid-block hook points) is recomputed under ``no_grad`` when not given.
        """
        if base is None and self.mode == "inner":
            base = self.prepare(batch).base
        x = self.downstream_input(r, error, anchor)
        return self._run_downstream(x, base if base is not None else x, batch.answer_pos, params)

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
        """Task loss of the downstream computation from latents ``r`` (mean over the batch by default)."""
        return self.task.loss(self.logits(r, batch, params, error, base, anchor), batch, reduction=reduction)

    def inputs_loss(self, params: Params, inp: SplitInputs, reduction: str = "mean") -> Tensor:
        """``loss`` on a prepared :class:`SplitInputs` (the function curvature and influence differentiate)."""
        return self.loss(inp.latents, inp.batch, params, inp.error, inp.base, reduction=reduction, anchor=inp.anchor)

    @torch.no_grad()
    def original_logits(self, batch: Any) -> Float[Tensor, "batch d_vocab"]:
        """Answer-position logits of the unmodified model (for checking the splice)."""
        return self.task.model_logits(self.model, batch.to(self.device))


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


def _call_with_params(model: torch.nn.Module, params: Mapping[str, Tensor], fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn()`` with some of ``model``'s parameters replaced by ``params`` (``torch.func.functional_call``)."""
    return torch.func.functional_call(_Closure(model, fn), {f"model.{k}": v for k, v in params.items()}, ())
