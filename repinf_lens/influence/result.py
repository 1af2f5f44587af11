"""InfluenceResult: scores of training examples, SAE latents and tokens for a set of test queries.

Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test query's loss).
On disk (``save``/``load``): ``result.json`` (ids, metadata), ``scores.safetensors`` (dense scores and
diagnostics), ``tokens.safetensors`` (token ids and sparse token-level latent scores).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from repinf_lens._cache import atomic_dir

__all__ = ["InfluenceResult"]

_FORMAT_VERSION = 1
_SIGN = "positive = proponent (up-weighting the training example lowers the test loss)"


@dataclass
class InfluenceResult:
    """Influence of N training examples on Q test queries, per example, per SAE latent and per token.

    Attributes:
        example_scores: ``[Q, N]`` g_test^T (H + lambda I)^-1 g_train (POSITIVE = proponent).
        latent_scores: ``[Q, N, d_sae]`` the paper's IFR: per latent, r x grad_r <G(r), s_test>, summed over
            positions (POSITIVE = the latent carries proponent influence).
        query_ids, train_ids: the examples' ids.
        train_tokens: list of N 1-D token-id tensors (the prompts, without padding).
        query_tokens: list of Q 1-D token-id tensors.
        token_indices: per query, ``[3, nnz]`` (example, position, latent) of non-zero token-level scores.
        token_values: per query, ``[nnz]`` the token-level scores.
        diagnostics: ``[Q, N]`` tensors: ``latent_sum`` (sum of latent scores), ``error_term`` (share through
            the held SAE error), ``bias_term`` (share through the decoder bias).
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

    # ------------------------------------------------------------------ queries
    def token_latent_scores(self, q: int, i: int, tokenizer: Any = None) -> tuple[Tensor, list[int], list[str] | None]:
        """Token-level latent scores of training example ``i`` for query ``q``.

        Returns ``(scores, token_ids, token_strings)`` where ``scores`` is a sparse COO tensor ``[T, d_sae]``
        (only active latents stored) and ``token_strings`` is ``None`` without a tokenizer.
        """
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

        scores = self.example_scores[q]
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
        return self.latent_scores[q].mean(0)

    def top_latents(self, q: int, k: int = 10) -> Any:
        """The k latents with the largest mean influence over the training examples (DataFrame).

        Columns: rank, latent, score (mean IFR over training examples), frac_active (share of training
        examples in which the latent has a non-zero score).
        """
        import pandas as pd

        s = self.latent_ranking(q)
        k = min(k, s.numel())
        vals, idx = torch.topk(s, k)
        frac = (self.latent_scores[q][:, idx] != 0).float().mean(0)
        return pd.DataFrame(
            {"rank": range(1, k + 1), "latent": idx.tolist(), "score": vals.tolist(), "frac_active": frac.tolist()}
        )

    def completeness(self) -> dict[str, Tensor]:
        """Per pair: ``ratio`` = latent_sum / example_score, and ``error_share`` = error_term / example_score."""
        denom = self.example_scores.where(self.example_scores.abs() > 0, torch.ones_like(self.example_scores))
        out = {"ratio": self.diagnostics.get("latent_sum", torch.zeros_like(denom)) / denom}
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
        info = json.loads((d / "result.json").read_text())
        scores = load_file(str(d / "scores.safetensors"))
        toks = load_file(str(d / "tokens.safetensors"))
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
