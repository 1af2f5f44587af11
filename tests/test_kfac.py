"""K-FAC / EK-FAC on TransformerLens hook points: exactness, normalisation, persistence, the attributor, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

import repinf_lens.curvature.kfac as kfac_mod
from repinf_lens import InfluenceAttributor, SplitModel
from repinf_lens._shards import ManifestMismatchError
from repinf_lens.curvature import CG, EKFAC, KFAC, FactorMappingError, build_solver, factor_blocks, solver_from_dict
from repinf_lens.errors import SettingsError
from repinf_lens.split import SplitInputs
from repinf_lens.task import CompletionTask, MultipleChoiceTask, mcqa_to_completion
from repinf_lens.testing import random_sae, tiny_model, tiny_tokenizer, toy_mcqa_rows

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))


def ln_split(dtype=torch.float64, **kw):
    """GPT-2-like: LayerNorm, separate W_K/W_V, an MLP with b_in; theta2 = block 1 + ln_final + trimmed W_U."""
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=dtype)
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), **kw)


def llama_split(dtype=torch.float64, *, ungroup=False, softcap=0.0):
    """Llama-like: RMSNorm, rotary, grouped-query attention (2 KV heads of 4), gated MLP; optional logit soft cap."""
    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=24, n_ctx=256, d_vocab=len(tok), act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4, gated_mlp=True,
        n_key_value_heads=2, ungroup_grouped_query_attention=ungroup, output_logits_soft_cap=softcap,
        default_prepend_bos=False, tokenizer_prepends_bos=False, dtype=dtype, seed=0, device="cpu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = HookedTransformer(cfg, tok, move_to_device=True, default_padding_side="right").eval()
    with torch.no_grad():  # non-trivial norm weights and biases (they start at 1 and 0)
        for n, p in model.named_parameters():
            if n.endswith((".w", "b_in", "b_Q", "_b_K", "_b_V", "b_O", "b_out")):
                p.add_(0.1 * torch.randn_like(p))
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4))


def per_example_grads(split, rows):
    """theta2 gradients of each example's loss, independently of the hooks (torch.func.grad on one example)."""
    params = split.downstream_params()
    inp = split.prepare(split.task.collate(rows))
    out = []
    for i in range(len(rows)):
        one: SplitInputs = inp.slice(i, i + 1)
        grads = torch.func.grad(lambda p, one=one: split.inputs_loss(p, one))(params)
        out.append({k: v.detach() for k, v in grads.items()})
    return out


def flat(tree, keys):
    return torch.cat([tree[k].reshape(-1) for k in keys])


def rand_like_theta(split, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in split.downstream_params().items()}


# ----------------------------------------------------------------------------------------------------- mapping
def test_blocks_cover_theta2_and_map_the_tl_parameters():
    split = llama_split()
    blocks = {b.name: b for b in factor_blocks(split)}
    assert sorted(p for b in blocks.values() for p in b.params) == sorted(split.param_names)
    k = blocks["blocks.1.attn._W_K"]  # GQA: its own head count, with its bias
    assert (k.d_in, k.d_out, k.bias, k.output_module) == (16, 2 * 4, "blocks.1.attn._b_K", "blocks.1.attn.hook_k")
    assert blocks["blocks.1.mlp.W_gate"].output_module == "blocks.1.mlp.hook_pre"
    assert blocks["blocks.1.mlp.W_in"].output_module == "blocks.1.mlp.hook_pre_linear"
    b_in = blocks["blocks.1.mlp.b_in"]  # added after act(pre) * pre_linear: a bias of its own at hook_post
    assert (b_in.layout, b_in.a_dim, b_in.output_module) == ("bias_only", 1, "blocks.1.mlp.hook_post")
    assert blocks["unembed.W_U"].d_out == len(split.task.loss_vocab())  # the trimmed columns
    assert blocks["blocks.1.ln1.w"].rule == "norm_w" and blocks["ln_final.w"].kind == "diagonal"
    for b in blocks.values():  # the [out, in] view and back is the identity
        if b.kind == "kfac":
            t = rand_like_theta(split)
            back = b.from_matrix(b.to_matrix(t))
            assert all(torch.equal(back[p], t[p]) for p in b.params)


def test_unmappable_settings_are_refused_with_a_fix():
    with pytest.raises(FactorMappingError, match=r"input factor.*Fix:|output factor.*Fix: let the split trim"):
        factor_blocks(ln_split(trim_unembed=False), max_factor_dim=64)
    split = ln_split()
    split.model.set_use_split_qkv_input(True)
    try:
        with pytest.raises(FactorMappingError, match=r"per-head attention inputs.*Fix: model.set_use_split_qkv"):
            factor_blocks(split)
    finally:
        split.model.set_use_split_qkv_input(False)
    with pytest.raises(Exception, match="no exact-Hessian mode.*Fix:"):
        KFAC(gauss_newton=False)


# -------------------------------------------------------------------------------------------------- exactness
def test_kfac_equals_the_dense_kronecker_inverse_of_its_own_factors():
    split = ln_split()
    rows = toy_mcqa_rows(10, seed=1)
    solver = KFAC(damping=0.05, batch_size=4, factor_dtype="float64", progress=False)
    solver.fit_factors(split, split.task, rows)
    g = rand_like_theta(split)
    s, _ = solver.solve(None, g)
    t = solver.factors.tensors
    for b in solver.factors.blocks:
        if b.kind == "diagonal":
            torch.testing.assert_close(s[b.name], g[b.name] / (t[f"{b.name}/D"] + 0.05), rtol=1e-10, atol=0)
            continue
        eye = torch.eye(b.d_out * b.a_dim, dtype=torch.float64)
        dense = torch.kron(t[f"{b.name}/G"], t[f"{b.name}/A"]) + 0.05 * eye
        want = torch.linalg.solve(dense, b.to_matrix(g).reshape(-1))
        got = b.to_matrix(s).reshape(-1)
        assert float((got - want).norm() / want.norm()) < 1e-5, b.name
    many, _ = solver.solve_many(None, [g, rand_like_theta(split, 1)])  # one batched pass = the single solves
    assert all(torch.allclose(many[0][k], s[k], rtol=1e-12, atol=0) for k in s)


def completion_split():
    """CompletionTask: several loss positions per example (target_mask), the full (tiny) vocabulary in W_U."""
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64, chat=False)
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), task=CompletionTask(model.tokenizer))


def completion_rows(n, seed):
    return mcqa_to_completion(toy_mcqa_rows(n, seed=seed), target="letter_text")


@pytest.mark.parametrize("make", [ln_split, lambda: llama_split(softcap=5.0), lambda: llama_split(ungroup=True),
                                  completion_split],
                         ids=["layernorm-gpt2", "rms-gqa-gated-softcap", "gqa-ungrouped", "completion"])  # fmt: skip
def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_eigenbasis(make):
    """Lambda = (1/N) sum_n (Q_G^T dW_n Q_A)^2 with dW_n the per-example gradient from torch.func (not the hooks):
    the hook mapping, the homogeneous biases, GQA, the loss positions and the 1/N normalisation, for every linear
    map of theta2; the diagonal blocks are the exact Fisher diagonal."""
    split = make()
    rows = toy_mcqa_rows(7, seed=2) if isinstance(split.task, MultipleChoiceTask) else completion_rows(7, 2)
    solver = EKFAC(damping=1e-3, batch_size=3, fisher="empirical", factor_dtype="float64", progress=False)
    solver.fit_factors(split, split.task, rows)
    grads = per_example_grads(split, rows)
    t = solver.factors.tensors
    for b in solver.factors.blocks:
        if b.kind == "diagonal":
            want = torch.stack([gr[b.name] for gr in grads]).square().mean(0)
            torch.testing.assert_close(t[f"{b.name}/D"], want, rtol=1e-8, atol=1e-14)
            continue
        qa, qg = t[f"{b.name}/QA"], t[f"{b.name}/QG"]
        want = torch.stack([(qg.T @ b.to_matrix(gr) @ qa).square() for gr in grads]).mean(0)
        torch.testing.assert_close(t[f"{b.name}/L"], want, rtol=1e-7, atol=1e-12 * float(want.max()))
        trace = sum(float(b.to_matrix(gr).square().sum()) for gr in grads) / len(rows)  # EK-FAC keeps tr(F)
        assert float(t[f"{b.name}/L"].sum()) == pytest.approx(trace, rel=1e-9)


def test_kfac_and_ekfac_are_the_exact_inverse_where_the_factorisation_is_exact():
    """theta2 = the trimmed W_U and b_U, one loss position, every row the same prompt (answers differ): the
    per-example gradients are g_n (x) a with one a, so F = G (x) A exactly; both solvers must equal the dense
    (F_emp + damping I)^-1 g, F_emp built from per-example gradients computed with torch.func."""
    split, rows = one_prompt_unembed_split()
    grads = torch.stack([flat(gr, split.param_names) for gr in per_example_grads(split, rows)])
    assert_kfac_and_ekfac_invert(split, rows, grads.T @ grads / len(rows), "empirical")


def one_prompt_unembed_split():
    """theta2 = the trimmed W_U and b_U of a tiny model, and 6 rows of one prompt (answers 0-3, 0, 1)."""
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), downstream=r"^unembed\.")
    base = toy_mcqa_rows(1, seed=3)[0]
    return split, [{**base, "id": f"r{i}", "answer": i % 4} for i in range(6)]


def assert_kfac_and_ekfac_invert(split, rows, curvature, fisher):
    """KFAC and EKFAC with ``fisher``, fitted on ``rows``, must apply the dense ``(curvature + 0.01 I)^-1``."""
    keys = split.param_names
    g = rand_like_theta(split, 4)
    want = torch.linalg.solve(curvature + 0.01 * torch.eye(len(curvature), dtype=torch.float64), flat(g, keys))
    for cls in (KFAC, EKFAC):
        solver = cls(damping=0.01, batch_size=4, fisher=fisher, factor_dtype="float64", progress=False)
        solver.fit_factors(split, split.task, rows)
        got = flat(solver.solve(None, g)[0], keys)
        assert float((got - want).norm() / want.norm()) < 1e-8, cls.name
    return solver


@pytest.mark.parametrize("make", [ln_split, lambda: llama_split(softcap=5.0), lambda: llama_split(ungroup=True)],
                         ids=["layernorm-gpt2", "rms-gqa-gated-softcap", "gqa-ungrouped"])  # fmt: skip
def test_the_expected_fisher_is_the_label_expectation_of_the_empirical_statistics(make):
    """fisher="expected" (one pseudo-gradient per eigen-direction of each example's loss Hessian in the logits) must
    give what enumerating every answer label y does: sum_n sum_y p_n(y) * (example n's statistics with label y),
    with p_n the model's option distribution. The enumeration never forms a Hessian, so this checks the directions,
    their slots, the tiling of the activations and the soft cap against E_y[g g^T] itself; for every map's G and
    EK-FAC correction, the norms' diagonal blocks, and A (which must not depend on the labels)."""
    split = make()
    rows = toy_mcqa_rows(5, seed=11)
    blocks = kfac_mod.factor_blocks(split)
    gen = torch.Generator().manual_seed(0)
    eigen = {}
    for b in blocks:
        if b.kind == "kfac":
            for key, dim in (("QA", b.a_dim), ("QG", b.d_out)):
                eigen[f"{b.name}/{key}"] = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]

    def stats(rows_, fisher, stage):
        inp = split.prepare(split.task.collate(rows_))
        return kfac_mod.batch_statistics(split, blocks, inp, stage=stage, fisher=fisher, generator=gen, eigen=eigen,
                                         dtype=torch.float64)  # fmt: skip

    for stage in ("covariance", "lambda"):
        got = stats(rows, "expected", stage)
        want: dict[str, torch.Tensor] = {}
        for row in rows:
            batch = split.task.collate([row])
            inp = split.prepare(batch)
            with torch.no_grad():
                z = split.logits(inp.latents, batch, None, inp.error, inp.base, inp.anchor)
                p = torch.softmax(split.task.option_logits(z, batch), -1)[0]
            for y in range(len(row["choices"])):
                for k, v in stats([{**row, "answer": y}], "empirical", stage).items():
                    same = k.endswith(("/A_sum", "/n_pos")) or k == "n_examples"  # (not label-dependent)
                    w = 1.0 / len(row["choices"]) if same else float(p[y])
                    want[k] = want[k] + w * v if k in want else w * v
        assert set(got) == set(want)
        for k in got:
            scale = float(want[k].abs().max()) or 1.0
            assert float((got[k] - want[k]).abs().max()) / scale < 1e-9, (stage, k)


def test_expected_kfac_and_ekfac_are_the_exact_gauss_newton_inverse_where_the_factorisation_is_exact():
    """theta2 = the trimmed W_U and b_U at one loss position, every row the same prompt: each example's Gauss-Newton
    J^T H J is G (x) A with one A, so both solvers with fisher="expected" must equal the dense
    (GN + damping I)^-1 g, with GN = mean_n J_n^T H_n J_n built from torch.func's jacrev (J) and hessian (H)."""
    split, rows = one_prompt_unembed_split()
    keys = split.param_names
    params = split.downstream_params()
    inp = split.prepare(split.task.collate(rows))
    cols = split.loss_columns()
    gn = torch.zeros(sum(params[k].numel() for k in keys), sum(params[k].numel() for k in keys), dtype=torch.float64)
    for i in range(len(rows)):
        one = inp.slice(i, i + 1)

        def read(p, one=one):
            return split.logits(one.latents, one.batch, p, one.error, one.base, one.anchor)[0].index_select(-1, cols)

        jac = torch.func.jacrev(read)(params)
        j = torch.cat([jac[k].reshape(len(cols), -1) for k in keys], dim=1)
        z = read(params).detach()
        full = split.logits(one.latents, one.batch, params, one.error, one.base, one.anchor).detach()

        def loss_of(r, full=full, one=one):
            return split.task.loss(full.index_copy(-1, cols, r[None]), one.batch)

        gn += j.T @ torch.func.hessian(loss_of)(z) @ j / len(rows)
    solver = assert_kfac_and_ekfac_invert(split, rows, gn, "expected")
    assert solver.fingerprint(split, rows, 4)["seed"] is None  # (no sampling: no seed in the factors' identity)


def test_the_expected_fisher_of_a_loss_over_the_full_vocabulary_is_refused_with_a_fix():
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64)
    task = MultipleChoiceTask.from_model(model, full_vocab=True)
    split = SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4), task=task)
    with pytest.raises(SettingsError, match="fisher='expected'.*Fix: fisher='empirical'"):
        EKFAC(fisher="expected", progress=False).fit_factors(split, split.task, toy_mcqa_rows(3, seed=1))


# ------------------------------------------------------------------------------------------------ persistence
@pytest.mark.parametrize("cls,stage", [(KFAC, "covariance"), (EKFAC, "lambda")])
def test_a_fit_killed_mid_way_resumes_and_gives_bitwise_equal_factors(tmp_path, monkeypatch, cls, stage):
    split = ln_split(dtype=torch.float32)
    rows = toy_mcqa_rows(8, seed=5)
    kw = dict(damping=0.1, batch_size=2, shard_batches=1, progress=False)
    real = kfac_mod.batch_statistics
    calls = {"n": 0}

    def crash_at_shard_2(*args, **kwargs):
        if kwargs["stage"] == stage:
            calls["n"] += 1
            if calls["n"] == 3:  # batch 2 = shard 2 (one batch per shard)
                raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(kfac_mod, "batch_statistics", crash_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        cls(factor_dir=str(tmp_path / "f"), **kw).fit_factors(split, split.task, rows)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["stages"][stage]["shards_done"] == 2
    monkeypatch.setattr(kfac_mod, "batch_statistics", real)
    resumed = cls(factor_dir=str(tmp_path / "f"), **kw)
    resumed.fit_factors(split, split.task, rows)
    info = resumed.fit_info[stage]
    assert info["resumed"] == [0, 1] and info["computed"] == [2, 3]
    if stage == "lambda":
        assert resumed.fit_info["covariance"] == "loaded"
    fresh = cls(factor_dir=str(tmp_path / "g"), **kw)
    fresh.fit_factors(split, split.task, rows)
    a, b = resumed.factors.tensors, fresh.factors.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # fitted once: a later fit (a new solver, same inputs) reads the files back and computes nothing
    again = cls(factor_dir=str(tmp_path / "g"), **kw)
    again.fit_factors(split, split.task, rows)
    assert again.fit_info["covariance"] == "loaded" and all(torch.equal(again.factors.tensors[k], b[k]) for k in b)
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "g" / "factors.safetensors"), "pt")
                      .metadata()["meta"])  # fmt: skip
    assert meta["diagonal"]["ln_final.w"] == "norm_w" and "MEAN loss" in meta["normalisation"]


def test_a_factor_folder_of_other_inputs_is_refused(tmp_path):
    split = ln_split(dtype=torch.float32)
    folder = str(tmp_path / "f")
    KFAC(factor_dir=folder, batch_size=4, progress=False).fit_factors(split, split.task, toy_mcqa_rows(4, seed=0))
    with pytest.raises(ManifestMismatchError, match=r"other inputs.*rows.*Fix: KFAC\(factor_dir=None\).*overwrite"):
        KFAC(factor_dir=folder, batch_size=4, progress=False).fit_factors(split, split.task, toy_mcqa_rows(4, seed=9))
    other = SplitModel(split.model, HOOK, split.sae, downstream=r"^blocks\.1\.mlp\.")  # another theta2
    with pytest.raises(ManifestMismatchError, match=r"split.*Fix:"):
        EKFAC(factor_dir=folder, batch_size=4, progress=False).fit_factors(other, other.task, toy_mcqa_rows(4))
    ok = KFAC(factor_dir=folder, batch_size=4, overwrite=True, progress=False)
    ok.fit_factors(split, split.task, toy_mcqa_rows(4, seed=9))
    assert ok.fit_info["covariance"]["computed"] == [0]


# ------------------------------------------------------------------------------------------------- attributor
def test_attributor_with_ekfac_end_to_end_and_the_s_test_cache_never_mixes_solvers(tmp_path):
    split = ln_split(dtype=torch.float32)
    rows = toy_mcqa_rows(8, seed=6)
    queries = rows[:2]
    cache = tmp_path / "s_test"

    def attributor(solver):
        return InfluenceAttributor(split, hessian=solver, cache_dir=cache, progress=False).fit(rows)

    ek = attributor(EKFAC(damping=0.1, batch_size=4, progress=False))
    res = ek.attribute(queries, rows)
    assert res.example_scores.shape == (2, 8) and bool(torch.isfinite(res.example_scores).all())
    assert float(res.example_scores.abs().max()) > 0 and res.meta["solver"]["solver"] == "ekfac"
    assert solver_from_dict(res.meta["solver"]) == ek.solver
    s_ek = ek.s_test(queries)
    assert len(list(cache.glob("*.safetensors"))) == 2
    streamed = ek.attribute_streaming(queries, rows, out_dir=tmp_path / "run", shard_size=4)
    torch.testing.assert_close(streamed.example_scores, res.example_scores)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["fingerprint"]["solver"]["factors"] == ek.solver.factors.fingerprint
    cg = attributor(CG(damping=0.1, gauss_newton=True, max_iter=5))
    s_cg = cg.s_test(queries)
    assert all(i.iterations > 1 for i in cg.solve_infos)  # solved, not read from EK-FAC's entries
    assert not torch.allclose(s_cg[0]["unembed.W_U"], s_ek[0]["unembed.W_U"])
    again = attributor(EKFAC(damping=0.1, batch_size=4, progress=False))
    assert again.solver.fit_info["covariance"] == "loaded" and again.solver.fit_info["lambda"] == "loaded"
    s_again = again.s_test(queries)
    assert all(i.iterations == 0 for i in again.solve_infos)  # cache hits
    assert all(torch.equal(s_again[0][k], s_ek[0][k]) for k in s_ek[0])
    for other in (KFAC(damping=0.1, batch_size=4, progress=False), EKFAC(damping=0.2, batch_size=4, progress=False),
                  EKFAC(damping=0.1, batch_size=4, seed=1, progress=False)):  # fmt: skip
        att = attributor(other)
        att.s_test(queries)
        assert all(i.iterations == 1 for i in att.solve_infos), other
    assert len(list(cache.glob("*.safetensors"))) == 2 * 5
    # the generic knobs of AttributionConfig / --solver ekfac
    assert build_solver("ekfac", damping=0.3, batch_size=5, max_iter=7, gauss_newton=False) == EKFAC(
        damping=0.3, batch_size=5
    )


# --------------------------------------------------------------------------------------------------- sampling
def test_true_fisher_sampling_is_seeded_and_reproducible(tmp_path):
    split = ln_split(dtype=torch.float32)
    rows = toy_mcqa_rows(8, seed=7)

    def g_factors(**kw):
        s = KFAC(batch_size=4, progress=False, factor_dir=str(tmp_path / json.dumps(kw, sort_keys=True)), **kw)
        s.fit_factors(split, split.task, rows)
        return load_file(str(tmp_path / json.dumps(kw, sort_keys=True) / "factors.safetensors"))

    a, b = g_factors(seed=3), g_factors(seed=3, factor_dtype="float32")  # same settings, another folder
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, emp = g_factors(seed=4), g_factors(fisher="empirical")
    key = "unembed.W_U/G"
    assert not torch.equal(a[key], c[key]) and not torch.equal(a[key], emp[key])
    assert torch.equal(a["unembed.W_U/A"], c["unembed.W_U/A"])  # the activations do not depend on the labels


def test_true_fisher_of_a_completion_task_samples_every_target_token():
    split = completion_split()
    rows = completion_rows(6, seed=4)
    fits = []
    for seed in (0, 0, 1):
        s = EKFAC(
            batch_size=3,
            seed=seed,
            factor_dtype="float64",
            progress=False,
            factor_dir=None if not fits else str(Path(fits[0].factors.folder).parent / f"again{len(fits)}"),
        )
        s.fit_factors(split, split.task, rows)
        fits.append(s)
    a, b, c = (f.factors.tensors["unembed.W_U/G"] for f in fits)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the Gauss-Newton of the per-example MEAN NLL is sqrt(#targets)^2 = #targets times the sampled Fisher of it:
    # tr(G) is on the scale of the empirical Fisher's (the true labels are likely under the model only by chance,
    # so compare orders of magnitude)
    emp = EKFAC(batch_size=3, fisher="empirical", factor_dtype="float64", progress=False)
    emp.fit_factors(split, split.task, rows)
    ratio = float(a.trace() / emp.factors.tensors["unembed.W_U/G"].trace())
    assert 0.1 < ratio < 10, ratio


def cosines(split, rows, queries, damping):
    """Per query: cosine with CG's s_test on the damped Gauss-Newton of EK-FAC's, K-FAC's and g's (Identity)."""
    keys = split.param_names

    def s_test(solver):
        att = InfluenceAttributor(split, hessian=solver, use_cache=False, progress=False).fit(rows)
        return att, [flat(s, keys) for s in att.s_test(queries)]

    cg, s_cg = s_test(CG(damping=damping, gauss_newton=True, max_iter=150, tol=1e-8, batch_size=len(rows)))
    out = {"identity": [flat(cg.query_gradient(q), keys) for q in queries]}
    for cls in (EKFAC, KFAC):
        out[cls.name] = s_test(cls(damping=damping, batch_size=8, factor_dtype="float64", progress=False))[1]
    return {k: [float(a @ c / (a.norm() * c.norm())) for a, c in zip(v, s_cg)] for k, v in out.items()}


def test_ekfac_s_test_is_close_to_cg_on_the_damped_gauss_newton():
    """Sanity check against CG(gauss_newton=True): K-FAC and EK-FAC point where CG does, far better than g alone.

    theta2 = the trimmed unembedding (one block): the only approximations are the Kronecker factorisation and
    the sampled labels. On the whole theta2 the cross-block curvature (which every block-diagonal method drops;
    on this random model even the exact block-diagonal Gauss-Newton reaches only ~0.7-0.8 at damping 0.05) is the
    limit, so there the check is a strong damping and beating Identity.
    """
    model = tiny_model(n_layers=2, d_model=16, n_heads=2, d_mlp=24, seed=0, dtype=torch.float64)
    sae = random_sae(model, HOOK, d_sae=16, k=4)
    rows = toy_mcqa_rows(24, seed=8)
    queries = toy_mcqa_rows(3, seed=99, prefix="t")
    one_block = cosines(SplitModel(model, HOOK, sae, downstream=r"^unembed\."), rows, queries, damping=0.1)
    assert min(one_block["ekfac"]) > 0.9 and min(one_block["kfac"]) > 0.9, one_block
    assert max(one_block["identity"]) < 0.7, one_block
    full = cosines(SplitModel(model, HOOK, sae), rows, queries, damping=1.0)
    assert min(full["ekfac"]) > 0.75, full
    assert all(e > i for e, i in zip(full["ekfac"], full["identity"])), full


def test_bfloat16_rotations_are_close_to_float32_and_keyed_apart(tmp_path):
    """``precondition_dtype="bfloat16"``: the same factors (one fit, one fingerprint), s_test within bf16 rounding
    of the float32 one, and its own s_test cache entries; the default leaves the solver's dict unchanged."""
    split = llama_split(dtype=torch.float32)
    rows = toy_mcqa_rows(8, seed=6)
    folder = str(tmp_path / "f")
    f32 = EKFAC(damping=0.1, batch_size=4, factor_dir=folder, progress=False)
    b16 = EKFAC(damping=0.1, batch_size=4, factor_dir=folder, progress=False, precondition_dtype="bfloat16")
    f32.fit_factors(split, split.task, rows)
    b16.fit_factors(split, split.task, rows)
    assert b16.fit_info["covariance"] == "loaded" and b16.factors.fingerprint == f32.factors.fingerprint
    keys = split.param_names
    g = rand_like_theta(split, 5)
    want, got = flat(f32.solve(None, g)[0], keys), flat(b16.solve(None, g)[0], keys)
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 3e-2, rel  # bf16 keeps ~3 significant digits per product; not bitwise float32
    assert "precondition_dtype" not in f32.to_dict() and b16.to_dict()["precondition_dtype"] == "bfloat16"
    assert solver_from_dict(b16.to_dict()) == b16
    assert f32.cache_identity() != b16.cache_identity()
    with pytest.raises(Exception, match="precondition_dtype"):
        EKFAC(damping=0.1, precondition_dtype="float16")


@pytest.mark.parametrize("make,rows", [(ln_split, lambda: toy_mcqa_rows(7, seed=2)),
                                       (llama_split, lambda: toy_mcqa_rows(7, seed=2)),
                                       (completion_split, lambda: completion_rows(7, seed=2))],
                         ids=["layernorm-gpt2", "rms-gqa-gated", "completion"])  # fmt: skip
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_a_pruned_fit_gives_the_unpruned_factors(make, rows, fisher, tmp_path):
    """The fit runs pruned (the last block's MLP, the final norm and W_U at the loss positions only); its factors
    (A, G, the EK-FAC eigenvalues, the norm diagonals) equal those of a fit over every position, where the maps
    after the last attention see g = 0 off the loss positions."""
    split, data = make(), rows()
    assert split.prune_hook is not None
    fits = {}
    for prune in (True, False):
        s = EKFAC(damping=0.1, batch_size=3, fisher=fisher, factor_dtype="float64", progress=False,
                  factor_dir=str(tmp_path / str(prune)))  # fmt: skip
        s.fit_factors(split.with_prune(prune), split.task, data)
        fits[prune] = s.factors.tensors
    assert fits[True].keys() == fits[False].keys()
    last = f"blocks.{split.model.cfg.n_layers - 1}."
    assert any(k.startswith(last + "mlp") for k in fits[True])  # the pruned maps are in theta2
    for k in fits[True]:
        if k.endswith(("/QA", "/QG")):  # eigenvectors: unique up to sign and within degenerate eigenspaces
            continue
        torch.testing.assert_close(fits[True][k], fits[False][k], rtol=1e-7, atol=1e-10, msg=k)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_the_null_space_shortcut_equals_the_full_rotation_and_shrinks_it(cls):
    """Factors fitted on few examples have a null space (the maps after the last attention see only the loss
    position): ``null_space_tol`` rotates onto the kept eigenvectors only, and the s_test equals the full rotation's
    to that relative tolerance, for one query and for a batch of them."""
    split = llama_split()
    rows = toy_mcqa_rows(5, seed=3)
    full = cls(damping=0.05, batch_size=5, factor_dtype="float64", progress=False, null_space_tol=0.0)
    full.fit_factors(split, split.task, rows)
    short = cls(damping=0.05, batch_size=5, factor_dtype="float64", progress=False)
    short.factors = full.factors
    ranks = full.factors.kept_ranks(damping=0.05, ekfac=cls.corrected, null_tol=short.null_space_tol)
    mlp_out = next(v for k, v in ranks.items() if "W_out" in k)
    assert mlp_out[2] <= 5 + 1 < mlp_out[3], ranks  # 5 loss positions (+ a homogeneous coordinate) of d_mlp 24
    assert any(r[2] < r[3] or r[0] < r[1] for r in ranks.values())
    keys = split.param_names
    gs = [rand_like_theta(split, i) for i in range(3)]
    # the [in, out] maps without a bias in theta2 (the gated MLP's W_in / W_gate, W_U) rotate in their own layout,
    # one query at a time; the others go through the [out, in] matrix, stacked
    per_vector = {b.name for b in full.factors.blocks
                  if full.factors.per_vector(b, gs[0][b.params[0]], damping=0.05, ekfac=cls.corrected,
                                             null_tol=short.null_space_tol)}  # fmt: skip
    assert "blocks.1.mlp.W_gate" in per_vector and "blocks.1.mlp.W_out" not in per_vector, per_vector
    for g in gs:
        want, got = flat(full.solve(None, g)[0], keys), flat(short.solve(None, g)[0], keys)
        assert float((got - want).norm() / want.norm()) < 1e-9
    many, _ = short.solve_many(None, gs)
    for g, m in zip(gs, many):
        assert float((flat(m, keys) - flat(short.solve(None, g)[0], keys)).norm()) < 1e-10 * flat(m, keys).norm()
    # bfloat16 rotations apply only where the full rotation runs: a reduced block stays in the factors' dtype
    # (in bf16 its 1/damping term would scale the rounding of the kept part and make the preconditioner indefinite)
    b16 = cls(damping=0.05, batch_size=5, factor_dtype="float64", progress=False, precondition_dtype="bfloat16")
    b16.factors = full.factors
    s64, s16 = short.solve(None, gs[0])[0], b16.solve(None, gs[0])[0]
    reduced = [p for b in full.factors.blocks if b.name in ranks and ranks[b.name][2] < ranks[b.name][3]
               for p in b.params]  # fmt: skip
    assert reduced and all(torch.equal(s64[p], s16[p]) for p in reduced)
    assert any(not torch.equal(s64[p], s16[p]) for p in s64 if p not in reduced)  # the others did rotate in bf16
    # a coarse tolerance changes the result, but by no more than that tolerance (each eigen-direction's factor)
    coarse = cls(damping=0.05, batch_size=5, factor_dtype="float64", progress=False, null_space_tol=1e-2)
    coarse.factors = full.factors
    want, got = flat(full.solve(None, gs[0])[0], keys), flat(coarse.solve(None, gs[0])[0], keys)
    assert 0 < float((got - want).norm() / want.norm()) <= 1e-2
    assert "null_space_tol" not in short.to_dict() and coarse.to_dict()["null_space_tol"] == 1e-2
    assert solver_from_dict(coarse.to_dict()) == coarse
    with pytest.raises(Exception, match="null_space_tol"):
        cls(damping=0.1, null_space_tol=-1.0)


@pytest.mark.parametrize("ranks", [(3, 5), (5, 3)])  # both product orders (the big products carry the smaller rank)
def test_the_reduced_rotation_in_the_weight_layout_is_the_matrix_formula(ranks):
    """``_reduced_in_out`` on ``V [.., in, out]`` equals ``(M / damping + Q_G' [(Q_G'^T M Q_A') * s] Q_A'^T)^T`` with
    ``M = V^T``, written out densely, for a stack of vectors and for one."""
    from repinf_lens.curvature.kfac import _reduced_in_out

    rg, ra = ranks
    gen = torch.Generator().manual_seed(sum(ranks))
    d_in, d_out, damping = 7, 6, 0.3
    qg = torch.linalg.qr(torch.randn(d_out, rg, generator=gen, dtype=torch.float64))[0]
    qa = torch.linalg.qr(torch.randn(d_in, ra, generator=gen, dtype=torch.float64))[0]
    scale = torch.randn(rg, ra, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, d_in, d_out, generator=gen, dtype=torch.float64)
    m = v.transpose(-1, -2)
    want = (m / damping + qg @ ((qg.T @ m @ qa) * scale) @ qa.T).transpose(-1, -2)
    torch.testing.assert_close(_reduced_in_out(v, qg, qa, scale, damping), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_reduced_in_out(v[1, 2], qg, qa, scale, damping), want[1, 2], rtol=1e-12, atol=1e-12)
