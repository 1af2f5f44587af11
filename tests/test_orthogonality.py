"""Orthogonality statistics of paper Section 5.2 / Appendix A.2 (repinf_lens.analysis)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from repinf_lens.analysis import (
    SPACES,
    collect_representations,
    dense_autoencoder_baseline,
    ortho_penalty_loss,
    orthogonality,
    orthogonality_table,
)

# the function ``orthogonality`` shadows its module's name in the package namespace
ortho_mod = importlib.import_module("repinf_lens.analysis.orthogonality")

METRICS = ("gram_abs", "gram_sq", "frob_norm", "stable_rank", "stable_rank_gram", "share_below")
TEXTS = [
    "<|im_start|>user\nWhich object conducts electricity? A penny.<|im_end|>",
    "Short one.",
    "A somewhat longer sentence about plants, sunlight and the water cycle in spring.",
    "Ice is water that is frozen.",
]
HOOK = "blocks.0.hook_resid_post"


def naive(acts: np.ndarray, *, over: str, center: bool, threshold: float = 0.1) -> dict[str, float]:
    """Direct numpy version of the paper's definitions (full Gram, explicit off-diagonal mask, SVD)."""
    x = np.asarray(acts, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    v = x.T if over == "features" else x
    v = v[np.linalg.norm(v, axis=1) > 0]
    a = v / np.linalg.norm(v, axis=1, keepdims=True)
    g = a @ a.T
    m = g.shape[0]
    off = g[~np.eye(m, dtype=bool)]
    spec = np.linalg.norm(a, 2) ** 2
    return {
        "gram_abs": np.abs(off).mean(),
        "gram_sq": (off**2).mean(),
        "frob_norm": np.linalg.norm(g - np.eye(m)) / math.sqrt(m * (m - 1)),
        "stable_rank": np.linalg.norm(a, "fro") ** 2 / spec,
        "stable_rank_gram": np.linalg.norm(g, "fro") ** 2 / np.linalg.norm(g, 2) ** 2,
        "share_below": (np.abs(off) < threshold).mean(),
    }


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("kind", ["identity", "random_orthogonal"])
def test_orthonormal_vectors_are_perfectly_orthogonal(kind):
    n = 24
    q = torch.eye(n, dtype=torch.float64) if kind == "identity" else random_orthogonal(n)
    for over, acts in (("tokens", q), ("features", q.T)):
        r = orthogonality(acts, over=over, center=False)
        assert r["gram_abs"] == pytest.approx(0.0, abs=1e-12)
        assert r["gram_sq"] == pytest.approx(0.0, abs=1e-12)
        assert r["frob_norm"] == pytest.approx(0.0, abs=1e-6)
        assert r["share_below"] == 1.0
        assert r["stable_rank"] == pytest.approx(n, rel=1e-10)
        assert r["stable_rank_gram"] == pytest.approx(n, rel=1e-10)
        assert (r["n_vectors"], r["n_dropped"], r["n_pairs"]) == (n, 0, n * (n - 1) // 2)


def test_copies_of_one_vector_are_fully_entangled():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(16, generator=gen, dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, -3.0, 0.5, 7.0, -1.0], dtype=torch.float64)
    rows = scales[:, None] * v[None]  # 6 (anti)parallel copies
    r = orthogonality(rows, over="tokens")
    assert r["gram_abs"] == pytest.approx(1.0, abs=1e-12)
    assert r["gram_sq"] == pytest.approx(1.0, abs=1e-12)
    assert r["frob_norm"] == pytest.approx(1.0, abs=1e-12)
    assert r["share_below"] == 0.0
    assert r["stable_rank"] == pytest.approx(1.0, rel=1e-10)
    # Paper mode: 6 features that are affine copies of one feature over 16 tokens: correlation +-1.
    feats = v[:, None] * scales[None] + torch.arange(6, dtype=torch.float64)[None]
    r = orthogonality(feats)
    assert r["gram_abs"] == pytest.approx(1.0, abs=1e-12)
    assert r["share_below"] == 0.0
    assert r["stable_rank"] == pytest.approx(1.0, rel=1e-10)


def test_gaussian_mean_squared_correlation_matches_theory():
    gen = torch.Generator().manual_seed(2)
    # Cosine of two independent Gaussian vectors in R^d: E[cos^2] = 1/d.
    d = 64
    r = orthogonality(torch.randn(400, d, generator=gen), over="tokens")
    assert r["gram_sq"] == pytest.approx(1 / d, rel=0.05)
    # Pearson correlation of two independent features over N samples: E[rho^2] = 1/(N-1).
    n = 2000
    r = orthogonality(torch.randn(n, 60, generator=gen))
    assert r["gram_sq"] == pytest.approx(1 / (n - 1), rel=0.1)
    assert r["frob_norm"] == pytest.approx(math.sqrt(r["gram_sq"]), rel=1e-12)
    assert r["share_below"] == 1.0  # |rho| ~ 0.022 << 0.1


@pytest.mark.parametrize("over", ["features", "tokens"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_metrics_equal_naive_numpy(over, center, small_blocks, monkeypatch):
    if small_blocks:  # many row blocks, and lambda_max from the subspace iteration instead of eigvalsh
        monkeypatch.setattr(ortho_mod, "_BLOCK_ENTRIES", 500)
        monkeypatch.setattr(ortho_mod, "_EXACT_EIG_MAX", 4)
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(70, 30)) @ rng.normal(size=(30, 30)) + rng.normal(size=30) * 3
    r = orthogonality(torch.from_numpy(acts), over=over, center=center, threshold=0.3)
    ref = naive(acts, over=over, center=center, threshold=0.3)
    for k in METRICS:
        assert r[k] == pytest.approx(ref[k], rel=1e-10, abs=1e-12), k
    assert (r["n"], r["d"]) == (70, 30)
    assert r["n_vectors"] == (30 if over == "features" else 70)


def test_zero_norm_vectors_are_dropped_and_counted():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    # tokens: all-zero rows (no latent fires) are dropped
    with_zeros = torch.cat([base[:10], torch.zeros(3, 12, dtype=torch.float64), base[10:]])
    r, ref = orthogonality(with_zeros, over="tokens"), orthogonality(base, over="tokens")
    assert (r["n"], r["n_vectors"], r["n_dropped"]) == (43, 40, 3)
    for k in METRICS:
        assert r[k] == pytest.approx(ref[k], rel=1e-12), k
    # features: dead (all-zero) and constant columns have no direction after centring
    cols = torch.cat([base, torch.zeros(40, 2, dtype=torch.float64), torch.full((40, 1), 5.0, dtype=torch.float64)], 1)
    r, ref = orthogonality(cols), orthogonality(base)
    assert (r["d"], r["n_vectors"], r["n_dropped"]) == (15, 12, 3)
    for k in METRICS:
        assert r[k] == pytest.approx(ref[k], rel=1e-12), k
    # uncentred, the constant column is a real direction; only the two zero columns go
    assert orthogonality(cols, center=False)["n_dropped"] == 2


def test_degenerate_inputs():
    one = orthogonality(torch.randn(5, 1), over="features")
    assert one["n_vectors"] == 1 and math.isnan(one["gram_abs"]) and one["stable_rank"] == pytest.approx(1.0)
    none = orthogonality(torch.zeros(4, 3), over="tokens")
    assert none["n_dropped"] == 4 and math.isnan(none["stable_rank"])
    with pytest.raises(ValueError):
        orthogonality(torch.randn(3, 4, 5))
    with pytest.raises(ValueError):
        orthogonality(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        orthogonality(torch.randn(3, 4), over="rows")  # type: ignore[arg-type]


def test_max_samples_subsamples_rows_deterministically():
    x = torch.randn(500, 20, generator=torch.Generator().manual_seed(5))
    a = orthogonality(x, max_samples=100, seed=7)
    b = orthogonality(x, max_samples=100, seed=7)
    c = orthogonality(x, max_samples=100, seed=8)
    assert a == b and a["n"] == 100
    assert a["gram_abs"] != c["gram_abs"]
    assert orthogonality(x, max_samples=1000) == orthogonality(x)


def test_ortho_penalty_is_gram_sq_of_the_paper():
    z = torch.randn(200, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64) @ torch.randn(
        16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    assert float(ortho_penalty_loss(z)) == pytest.approx(orthogonality(z)["gram_sq"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ model spaces
@pytest.fixture(scope="module")
def sae(tiny):
    from repinf_lens.testing import random_sae

    return random_sae(tiny, HOOK, d_sae=64, k=8)


def independent_spaces(model, sae) -> dict[str, torch.Tensor]:
    """Each text run alone (no padding, full forward), BOS at position 0 dropped by hand."""
    emb, acts, toks = [], [], []
    bos = model.tokenizer.bos_token_id
    for text in TEXTS:
        tokens = model.to_tokens(text)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (HOOK, "hook_embed"))
        start = 1 if int(tokens[0, 0]) == bos else 0
        emb.append(cache["hook_embed"][0, start:])
        acts.append(cache[HOOK][0, start:])
        toks.append(tokens[0, start:])
    acts_t = torch.cat(acts)
    with torch.no_grad():
        latents = sae.encode(acts_t)
    return {"token_embeddings": torch.cat(emb), "pre_sae_activations": acts_t, "sae_latents": latents, "t": toks}


def test_table_three_spaces_on_the_same_tokens(tiny, sae):
    rows = orthogonality_table(tiny, sae, TEXTS, batch_size=3)
    assert [r["space"] for r in rows] == list(SPACES)
    ref = independent_spaces(tiny, sae)
    n_tokens = sum(len(t) for t in ref["t"])
    assert n_tokens == sum(len(tiny.to_tokens(t)[0]) for t in TEXTS) - 1  # only TEXTS[0] starts with BOS
    assert {r["n"] for r in rows} == {n_tokens}
    assert [r["d"] for r in rows] == [32, 32, 64]
    assert rows[1]["source"] == HOOK
    for row in rows:
        expect = orthogonality(ref[row["space"]])
        for k in METRICS:
            assert row[k] == pytest.approx(expect[k], rel=1e-5, abs=1e-7), (row["space"], k)
    # the embeddings are the W_E rows of the kept tokens
    assert torch.equal(collect_representations(tiny, sae, TEXTS)["tokens"], torch.cat(ref["t"]))


def test_table_token_tensor_with_mask_and_caps(tiny, sae):
    texts = collect_representations(tiny, sae, TEXTS)
    seqs = [tiny.to_tokens(t)[0] for t in TEXTS]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = s, 1
    reps = collect_representations(tiny, sae, tokens, attention_mask=mask, batch_size=2)
    for k in (*SPACES, "tokens", "positions"):
        assert torch.allclose(reps[k].float(), texts[k].float(), atol=1e-5), k
    assert torch.equal(reps["token_embeddings"], tiny.W_E[reps["tokens"]].detach())
    # left padding: the mask also goes to the forward pass (positions and attention ignore the pads)
    left, lmask = torch.zeros_like(tokens), torch.zeros_like(mask)
    for i, s in enumerate(seqs):
        left[i, width - len(s) :], lmask[i, width - len(s) :] = s, 1
    lreps = collect_representations(tiny, sae, left, attention_mask=lmask)
    for k in (*SPACES, "tokens"):
        assert torch.allclose(lreps[k].float(), texts[k].float(), atol=1e-5), k
    capped = collect_representations(tiny, sae, tokens, attention_mask=mask, max_tokens=20)
    assert capped["sae_latents"].shape[0] == 20
    assert torch.equal(capped["positions"], texts["positions"][:20])
    with_bos = collect_representations(tiny, sae, TEXTS, exclude_bos=False)
    assert with_bos["tokens"].shape[0] == texts["tokens"].shape[0] + 1
    frame = orthogonality_table(tiny, sae, tokens, attention_mask=mask, as_dataframe=True, over="tokens")
    assert list(frame["space"]) == list(SPACES) and set(frame["n"]) == {texts["tokens"].shape[0]}
    with pytest.raises(ValueError):
        orthogonality_table(tiny, sae, TEXTS, hook_name="blocks.9.hook_resid_post")


# ------------------------------------------------------------------------------------------------ dense AE
def test_dense_autoencoder_ortho_penalty_decorrelates_codes():
    gen = torch.Generator().manual_seed(8)
    acts = torch.randn(1024, 6, generator=gen) @ torch.randn(6, 16, generator=gen) + 0.3 * torch.randn(
        1024, 16, generator=gen
    )
    enc0, st0 = dense_autoencoder_baseline(acts, 24, ortho_penalty=0.0, steps=200, seed=0)
    enc1, st1 = dense_autoencoder_baseline(acts, 24, ortho_penalty=10.0, steps=200, seed=0)
    z0, z1 = enc0(acts), enc1(acts)
    assert z0.shape == z1.shape == (1024, 24)
    r0, r1 = orthogonality(z0), orthogonality(z1)
    assert r1["gram_abs"] < 0.9 * r0["gram_abs"]
    assert r1["gram_sq"] < r0["gram_sq"]
    assert st1["ortho_loss"] == pytest.approx(r1["gram_sq"], rel=1e-3)
    assert st0["rec_loss"] < 0.5 and st0["ortho_penalty"] == 0.0 and st1["loss"] > st1["rec_loss"]
    # same seed, same result; the linear variant works too
    enc0b, _ = dense_autoencoder_baseline(acts, 24, ortho_penalty=0.0, steps=200, seed=0)
    assert torch.equal(enc0b(acts), z0)
    enc_lin, st_lin = dense_autoencoder_baseline(acts, 8, activation="linear", steps=50)
    assert enc_lin(acts[:3]).shape == (3, 8) and st_lin["dead_fraction"] == 0.0
