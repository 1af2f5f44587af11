"""Orthogonality statistics of representation spaces (paper Section 5.2, Table 3, and Appendix A.2, Table A.2).

The paper (arXiv 2605.12809) argues that the k-sparse SAE latent space is far closer to a set of independent,
near-orthogonal features than the dense activations it is computed from, which is what makes representation-level
influence well posed. Section 5.2 compares three spaces on the same tokens: "input text embeddings (text), dense
pre-latent activations (immediately before SAE insertion, Pre-Latent), and the k-sparse SAE latent space (SAE
Latent)", and summarises each "using the off-diagonal Gram statistics (mean absolute value, mean squared value, and
Frobenius norm), the fraction of near orthogonal feature pairs with correlation |rho| < 0.1, and stable rank
||A||_F^2 / ||A||_2^2".

What is compared (paper, Appendix A.2): "Let Z_hat in R^{N x d} denote minibatch latent activations after
centering each feature and normalizing columns to unit l2 norm, and let G = Z_hat^T Z_hat." So the Gram matrix is
``d x d``, between FEATURE DIMENSIONS (columns), each feature being the vector of its values over the N tokens:
``G_ij`` is the Pearson correlation of features i and j over the tokens (hence "correlation |rho|" and "feature
pairs"). This is the default here (``over="features"``, centred). The Gram between TOKENS (rows; cosine similarity
of two tokens' representation vectors, uncentred by default) is available with ``over="tokens"``.

Definitions used by :func:`orthogonality` (``m`` = number of compared vectors left after dropping zero-norm ones;
``A`` = the matrix whose rows are those vectors, centred if asked and scaled to unit l2 norm; ``G = A A^T`` is
``m x m`` with unit diagonal):

* ``gram_abs`` ("Gram Abs", "G-Abs"): ``mean_{i != j} |G_ij|``.
* ``gram_sq`` ("Gram Sq", "G-Sq"): ``mean_{i != j} G_ij^2 = ||G - I||_{F,off}^2 / (m (m - 1))``; this is exactly the
  paper's orthogonality penalty ``L_ortho`` (Appendix A.2) evaluated on these vectors.
* ``frob_norm`` ("Frob. Norm", "F-norm"): ``||G - I||_{F,off} / sqrt(m (m - 1)) = sqrt(gram_sq)``. The paper does
  not print the normalisation, but its tables satisfy ``F-norm = sqrt(G-Sq)`` in every row (Table 3:
  0.198 ~ sqrt(0.039), 0.854 ~ sqrt(0.730), 0.047 ~ sqrt(0.002)), which fixes it to this one.
* ``stable_rank`` ("Stable Rank", "SR"): ``||A||_F^2 / ||A||_2^2 = m / lambda_max(G)`` of the normalised matrix
  ``A`` (its rows have unit norm, so ``||A||_F^2 = m``); between 1 (all vectors parallel) and ``min(m, length)``
  (orthonormal). ``stable_rank_gram`` is the same ratio for ``G`` itself, ``||G||_F^2 / ||G||_2^2``, reported in
  case a reader takes ``A = G``.
* ``share_below`` ("% < 0.1", as a fraction in [0, 1]): share of the pairs ``i != j`` with ``|G_ij| < threshold``.

Vectors with zero norm (after centring) carry no direction: dead SAE latents and constant features in
``over="features"``, tokens on which no latent fires in ``over="tokens"``. They are dropped before the Gram is
formed and counted in ``n_dropped``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "SPACES",
    "collect_representations",
    "dense_autoencoder_baseline",
    "ortho_penalty_loss",
    "orthogonality",
    "orthogonality_table",
]

#: Names of the three spaces compared in paper Section 5.2 (Table 3), in the table's order.
SPACES: tuple[str, str, str] = ("token_embeddings", "pre_sae_activations", "sae_latents")

Over = Literal["features", "tokens"]

# Largest min(m, length) for which lambda_max is taken from a dense eigendecomposition (exact, a few seconds);
# above it a block subspace iteration with Rayleigh-Ritz is used (converged to ~1e-13 relative).
_EXACT_EIG_MAX = 4096
# Entries of one Gram block held at once (float64: 128 MiB).
_BLOCK_ENTRIES = 1 << 24
# A vector counts as zero when its norm after centring is at most this fraction of its norm before.
_ZERO_RTOL = 1e-12


# ---------------------------------------------------------------------------------------------------- metrics
def _subsample(acts: Tensor, max_samples: int | None, seed: int) -> Tensor:
    if max_samples is None or acts.shape[0] <= max_samples:
        return acts
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(acts.shape[0], generator=gen)[:max_samples].sort().values
    return acts[idx.to(acts.device)]


def _lambda_max(vecs: Tensor) -> float:
    """Largest eigenvalue of ``vecs @ vecs.T`` (= squared spectral norm of ``vecs``)."""
    m, length = vecs.shape
    if m == 0:
        return float("nan")
    if min(m, length) <= _EXACT_EIG_MAX:
        small = vecs @ vecs.T if m <= length else vecs.T @ vecs
        return float(torch.linalg.eigvalsh(small)[-1])
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = min(8, length)
    q = torch.randn(length, k, generator=gen, dtype=vecs.dtype).to(vecs.device)
    q, _ = torch.linalg.qr(q)
    prev = -1.0
    lam = 0.0
    for _ in range(1000):
        q, _ = torch.linalg.qr(vecs.T @ (vecs @ q))
        t = vecs @ q
        lam = float(torch.linalg.eigvalsh(t.T @ t)[-1])
        if abs(lam - prev) <= 1e-13 * lam:
            break
        prev = lam
    return lam


def orthogonality(
    acts: Float[Tensor, "n d"],
    *,
    over: Over = "features",
    center: bool | None = None,
    threshold: float = 0.1,
    max_samples: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Off-diagonal Gram statistics, near-orthogonal share and stable rank of a representation (paper Sec. 5.2).

    With the defaults this is the paper's definition (Section 5.2 and Appendix A.2): rows of ``acts`` are samples
    (tokens), columns are features; each feature (column) is centred over the samples and scaled to unit l2 norm,
    and ``G = A A^T`` with ``A = Z_hat^T`` is the ``d x d`` matrix of Pearson correlations between features. With
    ``over="tokens"`` the compared vectors are the rows instead (``G`` is the ``n x n`` matrix of cosine
    similarities between tokens; ``center=True`` then subtracts the mean token vector first). See the module
    docstring for the exact formula of every metric.

    The Gram matrix is never held whole: it is built and reduced in row blocks of at most 2^24 entries (only the
    upper triangle is computed), in float64. ``lambda_max(G)`` comes from a dense eigendecomposition of the smaller
    of ``A A^T`` and ``A^T A`` when that side is at most 4096, else from a block subspace iteration. Cost is
    ``O(m^2 L / 2)`` for ``m`` vectors of length ``L``: e.g. 16384 SAE latents over 4096 tokens is ~5e11 flops.

    Args:
        acts: ``[n, d]`` representation, one row per sample (token). Any float dtype and device.
        over: ``"features"`` (paper; compare columns) or ``"tokens"`` (compare rows).
        center: subtract the mean over the samples from every feature before normalising. ``None`` (default)
            means ``True`` for ``over="features"`` (the paper centres each feature, App. A.2) and ``False`` for
            ``over="tokens"`` (plain cosine similarity).
        threshold: a pair counts as near-orthogonal when ``|G_ij| < threshold`` (paper: 0.1).
        max_samples: if given and ``n`` is larger, keep this many rows, drawn without replacement by ``seed``
            (in their original order) before anything else.
        seed: seed of that row subsample.
        device: where to compute (default: the device of ``acts``). A GPU helps for large ``d``.

    Returns:
        ``{"gram_abs", "gram_sq", "frob_norm", "stable_rank", "stable_rank_gram", "share_below"}`` (floats; NaN when
        fewer than two vectors remain, and stable ranks NaN when none does) and the counts ``"n"`` (rows used,
        after subsampling), ``"d"`` (columns), ``"n_vectors"`` (compared vectors kept), ``"n_dropped"`` (zero-norm
        vectors dropped: dead/constant features, or all-zero tokens) and ``"n_pairs"`` (``n_vectors choose 2``).

    Raises:
        ValueError: ``acts`` is not 2-D or holds NaN/inf values, or ``over`` is unknown.
    """
    if acts.ndim != 2:
        raise ValueError(f"acts must be 2-D [n, d], got shape {tuple(acts.shape)}.")
    if over not in ("features", "tokens"):
        raise ValueError(f"over must be 'features' or 'tokens', got {over!r}.")
    if center is None:
        center = over == "features"
    x = _subsample(acts.detach(), max_samples, seed)
    x = x.to(device=device if device is not None else x.device, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("acts holds NaN or inf values.")
    n, d = x.shape

    raw_norm = (x.T if over == "features" else x).norm(dim=1)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    vecs = x.T if over == "features" else x
    norm = vecs.norm(dim=1)
    keep = norm > _ZERO_RTOL * raw_norm
    n_dropped = int((~keep).sum())
    vecs = vecs[keep] / norm[keep, None]
    m = vecs.shape[0]

    out: dict[str, float] = {}
    nan = float("nan")
    if m >= 2:
        abs_sum = sq_sum = 0.0
        below = 0
        block = max(1, min(m, _BLOCK_ENTRIES // m))
        for i0 in range(0, m, block):
            i1 = min(i0 + block, m)
            g = vecs[i0:i1] @ vecs[i0:].T  # [b, m - i0]; columns 0..b-1 are the diagonal block
            b = i1 - i0
            upper = torch.ones(b, b, dtype=torch.bool, device=g.device).triu(diagonal=1)
            diag_part = g[:, :b][upper]
            rest = g[:, b:]
            for part in (diag_part, rest):
                if part.numel():
                    a = part.abs()
                    abs_sum += float(a.sum())
                    sq_sum += float((part * part).sum())
                    below += int((a < threshold).sum())
        pairs = m * (m - 1) // 2
        gram_sq = sq_sum / pairs
        out.update(
            gram_abs=abs_sum / pairs,
            gram_sq=gram_sq,
            frob_norm=math.sqrt(gram_sq),
            share_below=below / pairs,
        )
    else:
        pairs = 0
        out.update(gram_abs=nan, gram_sq=nan, frob_norm=nan, share_below=nan)
    if m >= 1:
        lam = _lambda_max(vecs)
        fro_a = float((vecs * vecs).sum())
        out["stable_rank"] = fro_a / lam
        # ||G||_F^2 = sum of squared diagonal (1 each) + 2 * sum over pairs.
        fro_g = m + 2.0 * out["gram_sq"] * pairs if m >= 2 else 1.0
        out["stable_rank_gram"] = fro_g / lam**2
    else:
        out.update(stable_rank=nan, stable_rank_gram=nan)
    out.update(n=n, d=d, n_vectors=m, n_dropped=n_dropped, n_pairs=pairs)
    order = ("gram_abs", "gram_sq", "frob_norm", "stable_rank", "stable_rank_gram", "share_below")
    return {k: out[k] for k in (*order, "n", "d", "n_vectors", "n_dropped", "n_pairs")}


# ---------------------------------------------------------------------------------------------------- spaces
def _resolve_hook(model: Any, sae: Any, hook_name: str | None) -> str:
    if hook_name is None:
        hook_name = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
        if hook_name is None:
            raise ValueError("The SAE has no cfg.metadata.hook_name; pass hook_name= explicitly.")
    if hook_name not in model.hook_dict:
        raise ValueError(f"{hook_name!r} is not a hook point of this model.")
    if "hook_embed" not in model.hook_dict:
        raise ValueError("The model has no 'hook_embed' hook point, so its token embeddings cannot be read.")
    return hook_name


def _as_token_batch(
    model: Any,
    tokens_or_texts: str | Sequence[str] | Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    prepend_bos: bool | None,
) -> tuple[Tensor, Tensor]:
    """``(tokens [S, T], mask [S, T])`` on the CPU; texts are tokenised one by one and right-padded."""
    if isinstance(tokens_or_texts, str):
        tokens_or_texts = [tokens_or_texts]
    if isinstance(tokens_or_texts, Tensor):
        if attention_mask is not None and attention_mask.shape != tokens_or_texts.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {tuple(tokens_or_texts.shape)}."
            )
        tokens = tokens_or_texts.detach().long().cpu()
        if tokens.ndim == 1:
            tokens = tokens[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}.")
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.detach().long().cpu()
        return tokens, mask
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a token tensor; texts are padded here.")
    texts = list(tokens_or_texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("tokens_or_texts must be a string, a non-empty sequence of strings, or a token tensor.")
    kwargs = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
    seqs = [model.to_tokens(t, move_to_device=False, **kwargs)[0].cpu() for t in texts]
    pad_id = getattr(model.tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return tokens, mask


@torch.no_grad()
def collect_representations(
    model: Any,
    sae: Any,
    tokens_or_texts: str | Sequence[str] | Int[Tensor, "batch pos"],
    *,
    hook_name: str | None = None,
    batch_size: int = 8,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    max_tokens: int | None = 4096,
    exclude_bos: bool = True,
    prepend_bos: bool | None = None,
) -> dict[str, Tensor]:
    """The three representations of paper Section 5.2 on the same non-padding tokens, one row per token.

    Runs the HookedTransformer with ``run_with_cache(names_filter=[hook_name, "hook_embed"],
    stop_at_layer=layer + 1)`` and, for every kept token, stores its token embedding (output of ``hook_embed``,
    i.e. the row of ``W_E``; the paper's "input text embeddings"), the activation at the SAE's hook (the paper's
    "dense pre-latent activations (immediately before SAE insertion)", flattened to ``[d_in]``) and the SAE latents
    ``sae.encode(activation)`` (the paper's "k-sparse SAE latent space").

    Kept tokens are the positions with ``attention_mask == 1`` (texts: the real tokens, padding excluded), minus,
    with ``exclude_bos``, the first real position of each sequence when it holds the tokenizer's BOS token (the
    attention-sink token is an outlier in every space). Sequences are read in order until ``max_tokens`` tokens
    are collected; the first ``max_tokens`` are kept.

    Args:
        model: a TransformerLens ``HookedTransformer`` (must have ``hook_embed``).
        sae: an SAELens SAE for the activation at ``hook_name``.
        tokens_or_texts: a string, a list of strings (tokenised one by one with ``model.to_tokens`` and
            right-padded), or a ``[batch, pos]`` token tensor.
        hook_name: hook of the pre-SAE activation; default ``sae.cfg.metadata.hook_name``.
        batch_size: sequences per forward pass.
        attention_mask: ``[batch, pos]`` mask for a token tensor (1 = real token); default all ones. It is also
            passed to the forward pass, so left padding is handled as TransformerLens does.
        max_tokens: cap on the number of tokens collected (``None``: all).
        exclude_bos: drop a leading BOS token of every sequence.
        prepend_bos: passed to ``model.to_tokens`` for texts (``None``: the model's default).

    Returns:
        ``{"token_embeddings": [N, d_model], "pre_sae_activations": [N, d_in], "sae_latents": [N, d_sae]}``
        (float32, CPU), plus ``"tokens"`` ``[N]`` (token ids) and ``"positions"`` ``[N, 2]`` (sequence index,
        position) of the kept tokens.

    Raises:
        ValueError: unknown hook, no ``hook_embed``, a mask of the wrong shape, or no token left to collect.
    """
    hook = _resolve_hook(model, sae, hook_name)
    tokens, mask = _as_token_batch(model, tokens_or_texts, attention_mask, prepend_bos)
    keep = mask.bool().clone()
    if exclude_bos:
        bos_id = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        if bos_id is not None:
            rows = torch.nonzero(keep.any(dim=1)).flatten()
            first = keep.float().argmax(dim=1)[rows]
            is_bos = tokens[rows, first] == int(bos_id)
            keep[rows[is_bos], first[is_bos]] = False

    m = re.match(r"blocks\.(\d+)\.", hook)
    stop_at_layer = int(m.group(1)) + 1 if m else None
    names = {hook, "hook_embed"}
    device = model.cfg.device
    sae_param = next(iter(sae.parameters()))
    parts: dict[str, list[Tensor]] = {k: [] for k in (*SPACES, "tokens", "positions")}
    total = 0
    for s0 in range(0, tokens.shape[0], batch_size):
        if max_tokens is not None and total >= max_tokens:
            break
        sel = keep[s0 : s0 + batch_size]
        if not bool(sel.any()):
            continue
        width = int(mask[s0 : s0 + batch_size].bool().any(dim=0).nonzero().max()) + 1
        tok = tokens[s0 : s0 + batch_size, :width]
        sel = sel[:, :width]
        _, cache = model.run_with_cache(
            tok.to(device),
            names_filter=lambda n: n in names,
            stop_at_layer=stop_at_layer,
            attention_mask=mask[s0 : s0 + batch_size, :width].to(device),
        )
        sel_dev = sel.to(device)
        act = cache[hook][sel_dev]  # [n_b, *act_tail]
        latents = sae.encode(act.to(device=sae_param.device, dtype=sae_param.dtype))
        parts["token_embeddings"].append(cache["hook_embed"][sel_dev].float().cpu())
        parts["pre_sae_activations"].append(act.reshape(act.shape[0], -1).float().cpu())
        parts["sae_latents"].append(latents.reshape(latents.shape[0], -1).float().cpu())
        parts["tokens"].append(tok[sel])
        pos = sel.nonzero()
        pos[:, 0] += s0
        parts["positions"].append(pos)
        total += int(sel.sum())
    if total == 0:
        raise ValueError("No token to collect (all positions are padding or excluded BOS).")
    out = {k: torch.cat(v) for k, v in parts.items()}
    if max_tokens is not None:
        out = {k: v[:max_tokens] for k, v in out.items()}
    return out


def orthogonality_table(
    model: Any,
    sae: Any,
    tokens_or_texts: str | Sequence[str] | Int[Tensor, "batch pos"],
    *,
    hook_name: str | None = None,
    batch_size: int = 8,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    max_tokens: int | None = 4096,
    exclude_bos: bool = True,
    prepend_bos: bool | None = None,
    over: Over = "features",
    center: bool | None = None,
    threshold: float = 0.1,
    device: str | torch.device | None = None,
    as_dataframe: bool = False,
) -> Any:
    """Paper Table 3: orthogonality of token embeddings, pre-SAE activations and SAE latents on the same tokens.

    Collects the three spaces with :func:`collect_representations` (same non-padding tokens for all three) and
    applies :func:`orthogonality` to each (defaults: the paper's feature-correlation Gram, Sec. 5.2 / App. A.2).

    Args:
        model: a TransformerLens ``HookedTransformer``.
        sae: an SAELens SAE for the activation at ``hook_name``.
        tokens_or_texts: a string, a list of strings, or a ``[batch, pos]`` token tensor.
        hook_name: hook of the pre-SAE activation; default ``sae.cfg.metadata.hook_name``.
        batch_size: sequences per forward pass.
        attention_mask: ``[batch, pos]`` mask for a token tensor (1 = real token).
        max_tokens: number of tokens the statistics are computed on (the first ones; ``None``: all).
        exclude_bos: drop a leading BOS token of every sequence (an outlier in every space).
        prepend_bos: passed to ``model.to_tokens`` for texts.
        over: ``"features"`` (paper) or ``"tokens"``; see :func:`orthogonality`.
        center: see :func:`orthogonality` (``None``: centred for features, not for tokens).
        threshold: near-orthogonality threshold on ``|G_ij|`` (paper: 0.1).
        device: where the statistics are computed (default CPU).
        as_dataframe: return a ``pandas.DataFrame`` (pandas must be installed) instead of a list.

    Returns:
        One row per space, in the order of :data:`SPACES`: ``{"space": name, "source": where it was read, **metrics}``
        with the keys of :func:`orthogonality`; a list of dicts, or a DataFrame with ``as_dataframe=True``.
    """
    reps = collect_representations(
        model,
        sae,
        tokens_or_texts,
        hook_name=hook_name,
        batch_size=batch_size,
        attention_mask=attention_mask,
        max_tokens=max_tokens,
        exclude_bos=exclude_bos,
        prepend_bos=prepend_bos,
    )
    hook = _resolve_hook(model, sae, hook_name)
    sources = {"token_embeddings": "hook_embed", "pre_sae_activations": hook, "sae_latents": f"sae.encode({hook})"}
    rows: list[dict[str, Any]] = []
    for space in SPACES:
        metrics = orthogonality(reps[space], over=over, center=center, threshold=threshold, device=device)
        rows.append({"space": space, "source": sources[space], **metrics})
    if as_dataframe:
        import pandas as pd

        return pd.DataFrame(rows)
    return rows


# ---------------------------------------------------------------------------------------------------- dense AE
def ortho_penalty_loss(z: Float[Tensor, "batch d"], eps: float = 1e-8) -> Float[Tensor, ""]:
    """The paper's orthogonality penalty on a minibatch of codes (Appendix A.2), differentiable.

    ``Z_hat`` = ``z`` with every feature (column) centred over the minibatch and scaled to unit l2 norm,
    ``G = Z_hat^T Z_hat`` (``d x d``), and ``L_ortho = 1 / (d (d - 1)) * sum_{i != j} G_ij^2``. A column that is
    constant on the minibatch (e.g. a dead ReLU unit) is scaled by ``1 / (0 + eps)`` and so contributes 0.

    Args:
        z: ``[batch, d]`` codes, ``d >= 2``.
        eps: added to the column norms.

    Returns:
        The scalar ``L_ortho`` (the mean squared off-diagonal feature correlation).
    """
    zc = z - z.mean(dim=0, keepdim=True)
    zh = zc / (zc.norm(dim=0, keepdim=True) + eps)
    g = zh.T @ zh
    d = g.shape[0]
    off = g - torch.diag_embed(torch.diagonal(g))
    return (off * off).sum() / (d * (d - 1))


def dense_autoencoder_baseline(
    acts: Float[Tensor, "n d_in"],
    d_hidden: int,
    *,
    ortho_penalty: float = 0.0,
    activation: Literal["relu", "linear"] = "relu",
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[Callable[[Tensor], Tensor], dict[str, float]]:
    """The dense (non-sparse) autoencoder baseline of paper Appendix A.2 ("D" rows of Table A.2), small and on CPU.

    Encoder ``z = act(((x - mu) / sigma) W_enc + b_enc)`` (``act`` = ReLU, the classical SAE nonlinearity of
    paper Sec. 4.1, or identity; the paper does not say which one its dense AE used), decoder
    ``x_hat = (z W_dec + b_dec) sigma + mu``, with ``mu`` the mean activation and ``sigma`` one global scale (root
    mean square of ``x - mu`` per element). Trained with Adam on minibatches to minimise

    ``L = L_rec + ortho_penalty * L_ortho``, where ``L_rec = mean((x_hat - x)^2) / sigma^2`` (the MSE on the
    standardised activations, i.e. the fraction of variance unexplained, so that the penalty weight does not
    depend on the activations' scale) and ``L_ortho`` is the paper's penalty (:func:`ortho_penalty_loss`): the mean
    squared off-diagonal entry of the Gram of the minibatch codes after centring each feature and normalising
    columns to unit l2 norm. The paper's ``L = L_task + lambda_rec L_rec + lambda_ortho L_ortho`` also has a task
    loss (the AE sits inside the finetuned model); this standalone baseline on cached activations has none
    (``lambda_rec = 1``, ``lambda_ortho = ortho_penalty``, "OW" in Table A.2). ``ortho_penalty=0`` is "OW = --".

    Compare ``orthogonality(encoder_fn(acts))`` for ``ortho_penalty=0`` and ``> 0`` with the same ``seed``.

    Args:
        acts: ``[n, d_in]`` activations to autoencode (e.g. ``collect_representations(...)["pre_sae_activations"]``).
        d_hidden: width of the dense code (``>= 2``).
        ortho_penalty: weight of ``L_ortho``.
        activation: ``"relu"`` (default) or ``"linear"``.
        steps: optimiser steps.
        lr: Adam learning rate.
        batch_size: minibatch size (rows drawn without replacement each step).
        seed: seed of the initialisation and of the minibatch draws (no global RNG is touched).
        device: where to train (default: the device of ``acts``).

    Returns:
        ``(encoder_fn, stats)``: ``encoder_fn(x [..., d_in]) -> z [..., d_hidden]`` (no grad, float32, on ``x``'s
        device) and ``stats`` with the final ``"loss"``, ``"rec_loss"`` (fraction of variance unexplained) and
        ``"ortho_loss"`` on all of ``acts``, ``"dead_fraction"`` (hidden units never positive on ``acts``),
        ``"d_hidden"``, ``"ortho_penalty"`` and ``"steps"``.
    """
    if activation not in ("relu", "linear"):
        raise ValueError(f"activation must be 'relu' or 'linear', got {activation!r}.")
    if d_hidden < 2:
        raise ValueError("d_hidden must be >= 2 (the penalty needs feature pairs).")
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"acts must be [n >= 2, d_in], got shape {tuple(acts.shape)}.")
    dev = torch.device(device) if device is not None else acts.device
    x = acts.detach().to(device=dev, dtype=torch.float32)
    n, d_in = x.shape
    mu = x.mean(dim=0)
    sigma = float((x - mu).pow(2).mean().sqrt().clamp_min(1e-12))
    xs = (x - mu) / sigma

    gen = torch.Generator(device="cpu").manual_seed(seed)
    w_enc = (torch.randn(d_in, d_hidden, generator=gen) / math.sqrt(d_in)).to(dev).requires_grad_()
    b_enc = torch.zeros(d_hidden, device=dev, requires_grad=True)
    w_dec = (torch.randn(d_hidden, d_in, generator=gen) / math.sqrt(d_hidden)).to(dev).requires_grad_()
    b_dec = torch.zeros(d_in, device=dev, requires_grad=True)
    params = [w_enc, b_enc, w_dec, b_dec]
    opt = torch.optim.Adam(params, lr=lr)

    def encode_std(v: Tensor) -> Tensor:
        pre = v @ w_enc + b_enc
        return torch.relu(pre) if activation == "relu" else pre

    def losses(v: Tensor) -> tuple[Tensor, Tensor]:
        z = encode_std(v)
        rec = (z @ w_dec + b_dec - v).pow(2).mean()
        return rec, ortho_penalty_loss(z)

    bs = min(batch_size, n)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:bs].to(dev)
        rec, ortho = losses(xs[idx])
        loss = rec + ortho_penalty * ortho if ortho_penalty else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for p in params:
        p.requires_grad_(False)

    def encoder_fn(v: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_hidden"]:
        with torch.no_grad():
            z = encode_std((v.to(device=dev, dtype=torch.float32) - mu) / sigma)
        return z.to(v.device)

    with torch.no_grad():
        rec, ortho = losses(xs)
        dead = float((encode_std(xs) <= 0).all(dim=0).float().mean()) if activation == "relu" else 0.0
    stats = {
        "loss": float(rec + ortho_penalty * ortho),
        "rec_loss": float(rec),
        "ortho_loss": float(ortho),
        "dead_fraction": dead,
        "d_hidden": d_hidden,
        "ortho_penalty": float(ortho_penalty),
        "steps": steps,
    }
    return encoder_fn, stats
