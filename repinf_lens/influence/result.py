"""InfluenceResult: scores of training examples, SAE latents and tokens for a set of test queries.

Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test query's loss).
On disk (``save``/``load``): ``result.json`` (ids, metadata), ``scores.safetensors`` (dense scores and
diagnostics), ``tokens.safetensors`` (token ids and sparse token-level latent scores).
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from repinf_lens._io import atomic_dir
from repinf_lens.errors import CorruptFileError, NonFiniteError, RepinfLensError, SettingsError, check_int

__all__ = ["InfluenceResult", "SplitMismatchError", "check_split_matches", "recorded_split_fingerprint"]

_FORMAT_VERSION = 1
_SIGN = "positive = proponent (up-weighting the training example lowers the test loss)"


@dataclass
class InfluenceResult:
    """Influence of N training examples on Q test queries, per example, per SAE latent and per token.

    Attributes:
        example_scores: ``[Q, N]`` g_test^T (H + lambda I)^-1 g_train (POSITIVE = proponent).
        latent_scores: ``[Q, N, d_sae]`` the paper's IFR: per latent, summed over positions (POSITIVE = the
            latent carries proponent influence): r x grad_r P(r), P(r) = <G(r), s_test>, for the default
            gradient x input; r x int_0^1 grad_r P(a r) da for integrated gradients (``meta["latent_method"]``,
            :attr:`latent_method`).
        query_ids, train_ids: the examples' ids.
        train_tokens: list of N 1-D token-id tensors (the prompts, without padding).
        query_tokens: list of Q 1-D token-id tensors.
        token_indices: per query, ``[3, nnz]`` (example, position, latent) of non-zero token-level scores.
        token_values: per query, ``[nnz]`` the token-level scores.
        diagnostics: ``[Q, N]`` tensors: ``latent_sum`` (sum of latent scores), ``error_term`` (gradient x input
            share through the held SAE error, at the full point r, for both methods), ``bias_term`` (the same
            through the decoder bias), ``baseline`` (P(0): the score with all latents off, SAE error and decoder
            bias kept; :attr:`baseline_scores`; absent from results saved before it existed, NaN where it was not
            computed).
        meta: how the result was produced (hook, solver, theta2 size, timings, ...).
    """

    example_scores: Float[Tensor, "q n"]
    latent_scores: Float[Tensor, "q n d_sae"]
    query_ids: list[str]
    train_ids: list[str]
    train_tokens: list[Tensor] = field(default_factory=list)
    query_tokens: list[Tensor] = field(default_factory=list)
    token_indices: list[Tensor] = field(default_factory=list)
    token_values: list[Tensor] = field(default_factory=list)
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    @property
    def n_queries(self) -> int:
        return int(self.example_scores.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.example_scores.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.latent_scores.shape[-1])

    @property
    def baseline_scores(self) -> Float[Tensor, "q n"] | None:
        """``[Q, N]`` P(0) per pair (all latents off, SAE error and decoder bias kept; POSITIVE = proponent), or
        ``None`` for a result saved before it was recorded."""
        return self.diagnostics.get("baseline")

    @property
    def latent_method(self) -> dict[str, Any]:
        """How the latent scores were computed: ``{"method": "grad_x_input"}`` (also for results that do not
        record it) or ``{"method": "ig", "steps": m, "rule": "graded" | "gauss" | "midpoint"}``."""
        rec = self.meta.get("latent_method") if isinstance(self.meta, dict) else None
        return dict(rec) if isinstance(rec, dict) else {"method": "grad_x_input"}

    @property
    def has_latent_scores(self) -> bool:
        """False for a result computed with ``latent_method="none"`` (example scores only)."""
        return self.latent_method.get("method") != "none"

    def _need_latents(self, what: str) -> None:
        if not self.has_latent_scores:
            raise SettingsError(
                f"{what} needs latent scores, but this result holds example scores only (it was computed with "
                "latent_method='none'). Fix: recompute it with InfluenceAttributor(..., latent_method='grad_x_input') "
                "(or 'ig'); example_scores and top_examples work as they are."
            )

    def _query_index(self, q: int) -> int:
        if not isinstance(q, numbers.Integral) or isinstance(q, bool) or not -self.n_queries <= q < self.n_queries:
            raise SettingsError(
                f"Query index {q!r} is out of range: this result has {self.n_queries} queries {self.query_ids[:5]}"
                f"{'...' if self.n_queries > 5 else ''}. Fix: pass 0 <= q < {self.n_queries} "
                "(result.query_ids.index(query_id) finds one by id)."
            )
        return int(q)

    def _finite(self, scores: Tensor, q: int, what: str) -> Tensor:
        """``scores`` (``[N]`` or ``[N, d_sae]`` of query ``q``), or NonFiniteError naming the query and examples."""
        bad = ~torch.isfinite(scores)
        if bad.ndim > 1:
            bad = bad.any(-1)
        if bool(bad.any()):
            idx = bad.nonzero().squeeze(1).tolist()
            ids = [self.train_ids[i] if i < len(self.train_ids) else str(i) for i in idx[:10]]
            more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
            raise NonFiniteError(
                f"The {what} of query {self.query_ids[q]!r} are NaN/inf for {len(idx)} training example(s): "
                f"{ids}{more}; they cannot be ranked. Fix: recompute the attribution (check those examples, the "
                "model weights and the SAE for NaN/inf; with float16/bfloat16 try float32)."
            )
        return scores

    # ------------------------------------------------------------------ queries
    def token_latent_scores(self, q: int, i: int, tokenizer: Any = None) -> tuple[Tensor, list[int], list[str] | None]:
        """Token-level latent scores of training example ``i`` for query ``q``.

        Returns ``(scores, token_ids, token_strings)`` where ``scores`` is a sparse COO tensor ``[T, d_sae]``
        (only active latents stored) and ``token_strings`` is ``None`` without a tokenizer.
        """
        self._need_latents("token_latent_scores")
        if not self.token_indices:
            raise ValueError("This result has no token-level scores (computed with store_token_scores=False).")
        idx, val = self.token_indices[q], self.token_values[q]
        keep = idx[0] == i
        tokens = self.train_tokens[i].tolist()
        sparse = torch.sparse_coo_tensor(idx[1:, keep], val[keep], size=(len(tokens), self.d_sae)).coalesce()
        tok = tokenizer or self.tokenizer
        strs = [tok.decode([t]) for t in tokens] if tok is not None else None
        return sparse, tokens, strs

    def token_scores(self, q: int, i: int) -> Float[Tensor, " pos"]:
        """Per-token influence of example ``i`` on query ``q``: token-level latent scores summed over latents."""
        sparse, tokens, _ = self.token_latent_scores(q, i)
        return torch.sparse.sum(sparse, dim=1).to_dense() if sparse._nnz() else torch.zeros(len(tokens))

    def top_examples(self, q: int, k: int = 10, *, opponents: bool = False) -> Any:
        """The k most influential training examples for query ``q`` as a DataFrame (rank, index, id, score).

        Proponents (largest POSITIVE scores) by default; ``opponents=True`` gives the most negative.
        """
        import pandas as pd

        check_int("top_examples k", k, minimum=1)
        q = self._query_index(q)
        scores = self._finite(self.example_scores[q], q, "example scores")
        k = min(k, scores.numel())
        vals, idx = torch.topk(-scores if opponents else scores, k)
        vals = -vals if opponents else vals
        return pd.DataFrame(
            {
                "rank": range(1, k + 1),
                "index": idx.tolist(),
                "id": [self.train_ids[i] for i in idx.tolist()],
                "score": vals.tolist(),
            }
        )

    def latent_ranking(self, q: int) -> Float[Tensor, " d_sae"]:
        """s_k = mean over training examples of IFR[i, k] (the paper's latent ranking score) for query ``q``."""
        self._need_latents("latent_ranking")
        q = self._query_index(q)
        return self._finite(self.latent_scores[q], q, "latent scores").mean(0)

    def top_latents(self, q: int, k: int = 10, *, by: str = "influence_eq16") -> Any:
        """The k top latents of query ``q`` by their mean IFR over the training examples (DataFrame).

        ``by`` names the order (the rankings of :mod:`repinf_lens.analysis.rankings`):

        * ``"influence_eq16"`` (default): most NEGATIVE mean IFR first (the sign of the paper's Eq. 16). The
          latents that carry the examples towards their labels have negative IFR (docs/method.md derives it);
          removing these from the test input hurts its answer most (the necessity verdicts).
        * ``"influence"``: largest mean IFR first (the paper's text sign: the latents that raise the train-test
          gradient alignment).
        * ``"influence_abs"``: largest ``|mean IFR|`` first.

        Columns: rank, latent, score (the signed mean IFR over training examples; POSITIVE raises the example's
        proponent score), frac_active (share of training examples in which the latent has a non-zero score).
        """
        import pandas as pd

        check_int("top_latents k", k, minimum=1)
        self._need_latents("top_latents")
        orders = {"influence_eq16": -1.0, "influence": 1.0, "influence_abs": 0.0}
        if by not in orders:
            raise ValueError(f"top_latents by={by!r} is not an order. Fix: one of {sorted(orders)}.")
        q = self._query_index(q)
        s = self.latent_ranking(q)
        k = min(k, s.numel())
        key = s.abs() if orders[by] == 0.0 else orders[by] * s
        idx = torch.topk(key, k).indices
        vals = s[idx]
        frac = (self.latent_scores[q][:, idx] != 0).float().mean(0)
        return pd.DataFrame(
            {"rank": range(1, k + 1), "latent": idx.tolist(), "score": vals.tolist(), "frac_active": frac.tolist()}
        )

    def completeness(self) -> dict[str, Tensor]:
        """How completely the latent scores account for each pair's example score; ``[Q, N]`` tensors.

        With P(r) = ``example_score`` and P(0) = ``baseline`` (all latents off, SAE error and decoder bias kept):

        * ``latent_sum``: the sum of the pair's latent scores; ``example_score``: P(r); ``baseline``: P(0) (NaN
          for results saved before P(0) was recorded, or computed with ``baseline=False``);
        * ``completeness`` = latent_sum / (P(r) - P(0)): 1 up to the quadrature error for integrated gradients
          (``residual`` = P(r) - P(0) - latent_sum -> 0), a first-order estimate for gradient x input;
        * ``baseline_share`` = P(0) / P(r): how much of the score is there with every latent off;
        * ``ratio`` = latent_sum / P(r) and ``error_share`` = error_term / P(r) (the gradient x input share of
          the held SAE error), as before. A zero denominator gives NaN for the new ratios (0 stays 0 in ``ratio``).

        Sign convention: POSITIVE = proponent, for every score here. The method: :attr:`latent_method`.
        """
        self._need_latents("completeness")
        score = self.example_scores
        nan = torch.full_like(score, float("nan"))
        latent_sum = self.diagnostics.get("latent_sum", self.latent_scores.sum(-1))
        base = self.diagnostics.get("baseline", nan)

        def div(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(b != 0, a / b.where(b != 0, torch.ones_like(b)), nan)

        denom = score.where(score.abs() > 0, torch.ones_like(score))
        out = {
            "latent_sum": latent_sum,
            "example_score": score,
            "baseline": base,
            "completeness": div(latent_sum, score - base),
            "baseline_share": div(base, score),
            "residual": score - base - latent_sum,
            "ratio": latent_sum / denom,
        }
        if "error_term" in self.diagnostics:
            out["error_share"] = self.diagnostics["error_term"] / denom
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result to ``directory`` atomically (a temporary folder renamed at the end)."""
        out = Path(directory)
        with atomic_dir(out) as tmp:
            scores = {
                "example_scores": self.example_scores.contiguous(),
                "latent_scores": self.latent_scores.contiguous(),
            }
            scores.update({f"diag_{k}": v.contiguous() for k, v in self.diagnostics.items()})
            save_file(scores, str(tmp / "scores.safetensors"))
            toks: dict[str, Tensor] = {}
            for i, t in enumerate(self.train_tokens):
                toks[f"train_{i}"] = t.contiguous()
            for q, t in enumerate(self.query_tokens):
                toks[f"query_{q}"] = t.contiguous()
            for q, (ix, v) in enumerate(zip(self.token_indices, self.token_values)):
                toks[f"tokidx_{q}"] = ix.contiguous()
                toks[f"tokval_{q}"] = v.contiguous()
            save_file(toks or {"empty": torch.zeros(0)}, str(tmp / "tokens.safetensors"))
            (tmp / "result.json").write_text(
                json.dumps(
                    {
                        "format_version": _FORMAT_VERSION,
                        "sign_convention": _SIGN,
                        "query_ids": self.query_ids,
                        "train_ids": self.train_ids,
                        "n_train_tokens": len(self.train_tokens),
                        "n_query_tokens": len(self.query_tokens),
                        "has_token_scores": bool(self.token_indices),
                        "meta": self.meta,
                    },
                    indent=2,
                    default=str,
                )
            )
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, tokenizer: Any = None) -> InfluenceResult:
        """Read a result written by :meth:`save`."""
        d = Path(directory)
        if not (d / "result.json").exists():
            raise FileNotFoundError(
                f"{d} holds no InfluenceResult (no result.json). Fix: pass the folder given to result.save()."
            )
        info = _read(d / "result.json", lambda f: json.loads(f.read_text()))
        scores = _read(d / "scores.safetensors", lambda f: load_file(str(f)))
        toks = _read(d / "tokens.safetensors", lambda f: load_file(str(f)))
        nq = len(info["query_ids"])
        return cls(
            example_scores=scores["example_scores"],
            latent_scores=scores["latent_scores"],
            query_ids=info["query_ids"],
            train_ids=info["train_ids"],
            train_tokens=[toks[f"train_{i}"] for i in range(info["n_train_tokens"])],
            query_tokens=[toks[f"query_{q}"] for q in range(info["n_query_tokens"])],
            token_indices=[toks[f"tokidx_{q}"] for q in range(nq)] if info["has_token_scores"] else [],
            token_values=[toks[f"tokval_{q}"] for q in range(nq)] if info["has_token_scores"] else [],
            diagnostics={k[5:]: v for k, v in scores.items() if k.startswith("diag_")},
            meta=info["meta"],
            tokenizer=tokenizer,
        )


def _read(path: Path, read: Any) -> Any:
    """``read(path)``; a missing file raises FileNotFoundError and an unparsable one CorruptFileError, naming it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the InfluenceResult in {path.parent} is incomplete. Fix: rerun the attribution "
            "(streamed runs resume from their finished shards)."
        )
    try:
        return read(path)
    except (ValueError, SafetensorError) as err:  # JSONDecodeError, UnicodeDecodeError, a truncated file
        reason = " ".join(str(err).split())
        raise CorruptFileError(
            f"{path} is corrupt or truncated ({type(err).__name__}: {reason}). Fix: rerun the attribution that "
            "wrote it (delete the folder first if it was copied incompletely).",
            path,
        ) from err


# ---------------------------------------------------------------------------------------------- provenance
class SplitMismatchError(RepinfLensError, ValueError):
    """A stored attribution was computed with another model, SAE or hook than the split it is used with."""


# what identifies the model, SAE and hook in a split fingerprint (repinf_lens._fingerprint.split_fingerprint);
# the task, theta2 selection and error-term setting may legitimately differ between attribution and analysis
_IDENTITY = ("model", "model_weights", "tokenizer", "hook", "out_hook", "sae", "attached_saes", "lora_adapted",
             "lora_state")  # fmt: skip
# the context length changes no score of a prompt that fits (it only sizes the attention mask and rotary tables)
_IGNORED = ("model.n_ctx",)


def recorded_split_fingerprint(result: InfluenceResult, directory: str | os.PathLike | None = None) -> dict | None:
    """The split fingerprint an attribution was computed with: ``result.meta["split_fingerprint"]``, else the
    ``split`` entry of the streaming ``manifest.json`` in ``directory``; ``None`` when neither records one."""
    fp = result.meta.get("split_fingerprint") if isinstance(result.meta, dict) else None
    if fp is None and directory is not None:
        path = Path(directory) / "manifest.json"
        if path.is_file():
            try:
                fp = json.loads(path.read_text()).get("fingerprint", {}).get("split")
            except (ValueError, AttributeError):
                fp = None
    return fp if isinstance(fp, dict) else None


def check_split_matches(result: InfluenceResult, split: Any, *, directory: str | os.PathLike | None = None) -> None:
    """Refuse to use ``result`` with a split of another model, SAE or hook than the one it was computed with.

    Compares the recorded split fingerprint (:func:`recorded_split_fingerprint`) with ``split.fingerprint()`` on
    the model (config and a digest of all weights), tokenizer, hook(s), SAE (config and all tensors) and LoRA
    factors. A result that records no fingerprint is checked on its hook and SAE config only.

    Raises:
        SplitMismatchError: they differ; the message names the differing fields.
    """
    from repinf_lens._shards import diff_fields

    where = f" in {directory}" if directory is not None else ""
    now = json.loads(json.dumps(split.fingerprint(), default=str))
    old = recorded_split_fingerprint(result, directory)
    if old is None:
        meta = result.meta if isinstance(result.meta, dict) else {}
        fields = []
        if meta.get("hook_name") not in (None, split.hook_name):
            fields.append(f"hook ({meta.get('hook_name')!r} then, {split.hook_name!r} now)")
        sae_now = None if split.sae is None else json.loads(json.dumps(split.sae.cfg.to_dict(), default=str))
        if "sae" in meta and diff_fields(meta.get("sae"), sae_now):
            fields.append("sae.cfg")
        if fields:
            raise SplitMismatchError(
                f"The attribution{where} was computed with another split: it differs in {', '.join(fields)}. "
                "Fix: pass the --model, --sae, --sae-id and --hook the attribution was run with, or rerun the "
                "attribution for this model and SAE."
            )
        return
    diff = diff_fields({k: old.get(k) for k in _IDENTITY}, {k: now.get(k) for k in _IDENTITY})
    diff = [f for f in diff if f not in _IGNORED]
    if not diff:
        return
    shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
    hooks = ""
    if old.get("hook") != now.get("hook"):
        hooks = f" (hook {old.get('hook')!r} then, {now.get('hook')!r} now)"
    older = ""
    if old.get("fingerprint_version") != now.get("fingerprint_version"):
        older = " It was recorded by an older repinf_lens, whose fingerprint did not cover all weights."
    raise SplitMismatchError(
        f"The attribution{where} was computed with another model, SAE or hook than this split: it differs in "
        f"{shown}{hooks}.{older} Its scores would be read against the wrong model. Fix: pass the --model, --sae, "
        "--sae-id and --hook the attribution was run with, or rerun the attribution for this model and SAE."
    )
