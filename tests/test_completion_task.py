"""CompletionTask (prompt -> target text, loss = mean NLL of the target tokens) through the whole engine.

Unit tests on tiny random models (seconds); one integration test on the real default model with real OpenBookQA
rows converted to completions. The loss is checked against an independent ``F.cross_entropy`` on
``model(tokens)``, the swap against the per-latent reference, and the split against TransformerLens' own forward.
Sign convention: POSITIVE = proponent (up-weighting the training example lowers the test loss).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from repinf_lens import (
    CG,
    CompletionTask,
    Identity,
    InfluenceAttributor,
    MultipleChoiceTask,
    SplitModel,
)
from repinf_lens._cache import fingerprint_rows
from repinf_lens._tree import tdot
from repinf_lens.curvature import loss_grad
from repinf_lens.influence import latent_influence_reference
from repinf_lens.influence.attributor import as_rows
from repinf_lens.influence.check import check_split
from repinf_lens.task import (
    MissingCapabilityError,
    PromptTooLongError,
    Task,
    evaluate,
    mcqa_to_completion,
    predict,
    supports,
)
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

ROWS = [
    {"id": "c0", "prompt": "The sky is", "target": " blue"},
    {"id": "c1", "prompt": "Two plus two makes", "target": " four, not five"},
    {"id": "c2", "prompt": "Ice is frozen", "target": " water"},
    {"id": "c3", "prompt": "Plants need", "target": " sunlight and water to grow"},
    {"id": "c4", "prompt": "Fire is", "target": " hot"},
    {"id": "c5", "prompt": "A year has twelve", "target": " months"},
]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=3)


@pytest.fixture(scope="module")
def task(model):
    return CompletionTask.from_model(model)


def _bos(tok) -> list[int]:
    """What the task prepends to a non-chat prompt (as MultipleChoiceTask does): BOS when the tokenizer adds it."""
    return [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []


def _split(model, task, hook, **kw):
    return SplitModel(model, hook, random_sae(model, hook, d_sae=64, k=8, seed=1), task=task, **kw)


# ----------------------------------------------------------------------------- the task itself


def test_collate_right_pads_and_marks_the_target(model, task):
    tok = model.tokenizer
    batch = task.collate(ROWS)
    for i, row in enumerate(ROWS):
        p = _bos(tok) + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        t = tok(row["target"], add_special_tokens=False)["input_ids"]
        n = len(p) + len(t)
        assert batch.tokens[i, :n].tolist() == p + t
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (batch.tokens.shape[1] - n)
        assert (batch.tokens[i, n:] == task.pad_id).all()
        assert int(batch.prompt_len[i]) == len(p)
        assert batch.target_mask[i].tolist() == [True] * len(t) + [False] * (batch.target_mask.shape[1] - len(t))
        assert batch.answer_pos[i, : len(t)].tolist() == list(range(len(p) - 1, n - 1))  # predicting positions
        assert int(batch.answer_pos[i].max()) <= n - 2  # never a padding position
        assert batch.target_ids[i, : len(t)].tolist() == t
        assert batch.target_token_mask[i].nonzero().flatten().tolist() == list(range(len(p), n))
    assert batch.ids == [r["id"] for r in ROWS] and len(batch) == len(ROWS)
    assert batch.target_mask.shape[1] == max(len(tok(r["target"], add_special_tokens=False)["input_ids"]) for r in ROWS)


def test_loss_equals_independent_nll_of_the_target_tokens(model, task):
    """Per-example mean NLL over the target tokens only, from ``model(tokens)`` of each example alone."""
    tok = model.tokenizer
    want = []
    with torch.no_grad():
        for row in ROWS:
            p = _bos(tok) + tok(row["prompt"], add_special_tokens=False)["input_ids"]
            t = tok(row["target"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([p + t]))[0]
            want.append(F.cross_entropy(logits[len(p) - 1 : len(p) + len(t) - 1], torch.tensor(t)))
        want = torch.stack(want)
        batch = task.collate(ROWS)
        got = task.loss(task.model_logits(model, batch), batch, reduction="none")
        full = task.loss(model(batch.tokens), batch, reduction="none")  # full [B, T, V] logits are accepted too
        mean = task.loss(task.model_logits(model, batch), batch)
        total = task.loss(task.model_logits(model, batch), batch, reduction="sum")
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert torch.allclose(full, want, atol=1e-5)
    assert torch.allclose(mean, want.mean(), atol=1e-5) and torch.allclose(total, want.sum(), atol=1e-4)
    with pytest.raises(ValueError, match="reduction"):
        task.loss(task.model_logits(model, batch), batch, reduction="max")


def test_correct_is_teacher_forced_exact_match_and_evaluate_uses_it(model, task):
    batch = task.collate(ROWS[:3])
    logits = torch.full((3, batch.target_ids.shape[1], model.cfg.d_vocab), -5.0)
    logits.scatter_(2, batch.target_ids[..., None], 5.0)  # arg-max = the target everywhere
    assert task.correct(logits, batch).tolist() == [True, True, True]
    logits[1, 0] = 0.0
    logits[1, 0, 7] = 9.0  # example 1's first target token is no longer the arg-max
    acc = task.token_accuracy(logits, batch)
    assert task.correct(logits, batch).tolist() == [True, False, True]
    assert float(acc[1]) == pytest.approx(1 - 1 / int(batch.target_mask[1].sum()))
    with torch.no_grad():
        b = task.collate(ROWS)
        manual = task.correct(task.model_logits(model, b), b).float().mean().item()
    assert evaluate(model, task, ROWS, batch_size=4, progress=False) == pytest.approx(manual)
    assert supports(task, "correct") and supports(task, "encode") and supports(task, "tokenizer")
    assert not supports(task, "predictions") and not supports(task, "option_logits")


def test_templates_eos_and_clear_errors(model):
    tok = model.tokenizer
    chat = CompletionTask(tok, template="chat", append_eos=True)
    ids = chat.encode(ROWS[0])
    prompt, target = chat.encode_parts(ROWS[0])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and target[-1] == tok.eos_token_id
    assert ids == prompt + target
    fmt = CompletionTask(tok, template="Q: {prompt}\nA:")
    assert tok.decode(fmt.encode_parts(ROWS[0])[0], skip_special_tokens=True) == "Q: The sky is\nA:"
    with pytest.raises(ValueError, match="no 'target' field"):
        CompletionTask(tok).collate([{"id": "x", "prompt": "p"}])
    with pytest.raises(ValueError, match="is empty"):
        CompletionTask(tok).collate([{"id": "x", "prompt": "p", "target": ""}])
    with pytest.raises(PromptTooLongError, match="'c1' is 19 prompt \\+ 15 target tokens"):
        CompletionTask(tok, max_length=20).collate(ROWS)
    with pytest.raises(ValueError, match="needs the field"):
        CompletionTask(tok, template="{question}: {prompt}").collate(ROWS[:1])
    with pytest.raises(ValueError, match="Unknown template"):
        CompletionTask(tok, template="plain")
    other = CompletionTask(tok, prompt_field="instruction", target_field="response")
    assert len(other.collate([{"id": "i", "instruction": "Say hi", "response": " hi"}])) == 1


def test_mcqa_to_completion_rows():
    mc = toy_mcqa_rows(3, seed=2)
    rows = mcqa_to_completion(mc)
    for r, m in zip(rows, mc):
        assert set(r) == {"id", "prompt", "target"} and r["id"] == m["id"]
        assert r["prompt"].startswith(m["question"] + "\nA. ") and r["prompt"].endswith("\nAnswer:")
        assert r["target"] == " " + m["choices"][m["answer"]]
    letters = mcqa_to_completion(mc, target="letter_text", options=False, prompt_suffix="", target_prefix="")
    assert letters[0]["prompt"] == mc[0]["question"]
    assert letters[0]["target"] == f"{'ABCD'[mc[0]['answer']]}. {mc[0]['choices'][mc[0]['answer']]}"
    with pytest.raises(ValueError, match="outside"):
        mcqa_to_completion([{**mc[0], "answer": 9}])


def test_single_rows_columns_and_fingerprints():
    assert as_rows(ROWS[0]) == [ROWS[0]]  # one completion row (no "question" field)
    cols = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    assert as_rows(cols) == ROWS
    mc = toy_mcqa_rows(2)
    assert as_rows(mc[0]) == [mc[0]]
    # completion rows that share an id but differ in their text never share a cache key ...
    assert fingerprint_rows([ROWS[0]]) != fingerprint_rows([{**ROWS[0], "target": " grey"}])
    # ... and multiple-choice rows hash exactly as before (existing s_test caches stay valid)
    legacy = hashlib.sha256()
    for r in mc:
        legacy.update(json.dumps({k: r.get(k) for k in ("id", "question", "choices", "answer")}).encode())
    assert fingerprint_rows(mc) == legacy.hexdigest()


# ----------------------------------------------------------------------------- the contract


def test_missing_capabilities_are_named_before_any_work(model, task):
    from repinf_lens.analysis import necessity_sufficiency
    from repinf_lens.saes import spliced_accuracy

    hook = HOOKS[0]
    split = _split(model, task, hook)
    with pytest.raises(MissingCapabilityError, match="'predictions'"):
        predict(model, task, ROWS, progress=False)
    with pytest.raises(MissingCapabilityError, match="'option_logits'") as err:
        necessity_sufficiency(split, task, ROWS[:1], ["random"], progress=False)
    assert isinstance(err.value, TypeError)  # what the ablations raised before
    with pytest.raises(MissingCapabilityError, match="'option_logits'"):
        spliced_accuracy(model, task, ROWS, {"s": (hook, split.sae)}, progress=False)

    class OnlyCollate(Task):
        def collate(self, examples):
            return task.collate(examples)

    with pytest.raises(TypeError, match="abstract"):
        OnlyCollate()

    class NoPositions(CompletionTask):
        def collate(self, examples):
            from types import SimpleNamespace

            b = super().collate(examples)
            return SimpleNamespace(tokens=b.tokens, ids=b.ids, to=lambda d: b)

    with pytest.raises(MissingCapabilityError, match="answer_pos"):
        split.with_task(NoPositions(model.tokenizer)).prepare(NoPositions(model.tokenizer).collate(ROWS[:1]))
    mcq = MultipleChoiceTask.from_model(model)
    assert all(supports(mcq, c) for c in ("predictions", "option_logits", "correct", "encode", "tokenizer"))


def test_task_config_and_fingerprint_name_the_task(model, task):
    split = _split(model, task, HOOKS[0])
    fp = split.fingerprint()
    assert fp["task"] == "CompletionTask"
    assert fp["task_config"]["prompt_field"] == "prompt" and fp["task_config"]["template"] is None
    assert fp["unembed_columns"] is None  # the NLL reads the whole vocabulary: nothing to trim


# ----------------------------------------------------------------------------- split, swap, reference


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("use_error_term", [True, False])
def test_split_check_passes(model, task, hook, use_error_term):
    split = _split(model, task, hook, use_error_term=use_error_term)
    report = check_split(split, task.collate(ROWS[:3]), n_latents=4)
    assert report.ok, report.summary()
    if use_error_term:
        assert report.logits_max_abs <= 1e-5


@pytest.mark.parametrize("hook", HOOKS)
def test_attribute_swap_equals_per_latent_reference(model, task, hook):
    """Latent scores = the per-latent JVP oracle, example scores = <s_test, reverse-mode G>, token scores sum up."""
    split = _split(model, task, hook)
    queries, train = ROWS[:2], ROWS[2:]
    att = InfluenceAttributor(
        split, hessian=CG(damping=0.1, max_iter=3, gauss_newton=True), use_cache=False, progress=False
    )
    att.fit(ROWS)
    res = att.attribute(queries, train, batch_size=3)
    s_tests = att.s_test(queries)
    params = split.downstream_params()
    inp = split.prepare(task.collate(train))
    assert res.example_scores.shape == (2, 4) and res.latent_scores.shape == (2, 4, 64)
    gen = torch.Generator().manual_seed(0)
    for q, s in enumerate(s_tests):
        for i, row in enumerate(train):
            active = torch.nonzero((inp.latents[i] != 0).any(0)).flatten()
            assert len(active) >= 8
            sample = active[torch.randperm(len(active), generator=gen)[:6]].tolist()
            ref = latent_influence_reference(split, s, inp, example=i, latents=sample, params=params)
            got = res.latent_scores[q, i, sample]
            want = torch.tensor([ref[j] for j in sample])
            scale = float(res.latent_scores[q, i].abs().max())
            assert (got - want).abs().max() <= 1e-4 * scale, (q, i)
            inactive = torch.ones(64, dtype=torch.bool)
            inactive[active] = False
            assert (res.latent_scores[q, i, inactive] == 0).all()
            g = loss_grad(split, params, split.prepare(task.collate([row])))  # alone: no padding
            ex_ref = float(tdot(g, s).detach())
            assert res.example_scores[q, i].item() == pytest.approx(ex_ref, rel=1e-4, abs=1e-6)
            sparse, ids, _ = res.token_latent_scores(q, i)
            assert ids == task.encode(row)
            dense = sparse.to_dense()
            assert torch.allclose(dense.sum(0), res.latent_scores[q, i], atol=1e-6)
            assert (dense[-1] == 0).all()  # the last target token's latents feed no logit the loss reads


def test_trimmed_unembedding_at_several_positions_is_exact(model):
    """A completion loss over a vocabulary subset: theta2 keeps those columns; scores equal the untrimmed split."""
    tok = model.tokenizer
    vocab = sorted({t for r in ROWS for t in tok(r["target"], add_special_tokens=False)["input_ids"]})

    class SubsetCompletion(CompletionTask):
        def loss_vocab(self):
            return vocab

        def token_nll(self, logits, batch):
            lg = self.answer_logits(logits, batch)
            cols = torch.tensor(vocab, device=lg.device)
            lookup = torch.zeros(lg.shape[-1], dtype=torch.long, device=lg.device)
            lookup[cols] = torch.arange(len(vocab), device=lg.device)
            tgt = lookup[batch.target_ids.to(lg.device)]
            nll = F.cross_entropy(lg.index_select(-1, cols).flatten(0, 1), tgt.flatten(), reduction="none")
            return torch.where(batch.target_mask.to(lg.device), nll.view(tgt.shape), 0.0)

    sub = SubsetCompletion(tok)
    trimmed = _split(model, sub, HOOKS[0])
    full = _split(model, sub, HOOKS[0], trim_unembed=False)
    assert trimmed.downstream_params()["unembed.W_U"].shape[1] == len(vocab)
    assert check_split(trimmed, sub.collate(ROWS[:2])).ok
    kw = dict(hessian=Identity(), use_cache=False, progress=False)
    a = InfluenceAttributor(trimmed, **kw).attribute(ROWS[:1], ROWS[1:])
    b = InfluenceAttributor(full, **kw).attribute(ROWS[:1], ROWS[1:])
    assert torch.allclose(a.example_scores, b.example_scores, rtol=1e-4, atol=1e-7)
    assert torch.allclose(a.latent_scores, b.latent_scores, rtol=1e-4, atol=1e-7)


def test_report_renders_completion_rows(model, task, tmp_path):
    from repinf_lens.viz import query_token_attribution
    from repinf_lens.viz import report as R

    split = _split(model, task, HOOKS[0])
    res = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False).attribute(ROWS[:1], ROWS)
    q_attr = query_token_attribution(split, None, ROWS[0])
    b = task.collate(ROWS[:1])
    with torch.no_grad():
        assert q_attr.total == pytest.approx(float(task.loss(task.model_logits(model, b), b)), rel=1e-5)
    assert q_attr.meta["correct"] in (True, False) and "prediction" not in q_attr.meta
    sections = [
        R.question_section(ROWS[0], prediction_after="wrong", extra={"target NLL": q_attr.total}),
        R.attribution_section("Test input", q_attr),
        R.top_examples_section(res, 0, k=len(ROWS), train_rows=ROWS),
        R.top_latents_section(res, 0, k=5),
    ]
    text = R.build_report(tmp_path / "report.html", title="completion", sections=sections).read_text("utf-8")
    assert "The sky is<b> blue</b>" in text and "target NLL" in text
    assert "Two plus two makes \u2192  four, not five" in text  # the training rows' text in the table
    assert text.count("var CircuitsVis=") == 1 and text.count('class="rl-cv"') >= 1 + len(ROWS)


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.integration
def test_completion_on_default_model_with_real_openbookqa(default_model, tmp_path):
    """SmolLM2-135M-Instruct, OpenBookQA rows as chat completions (question + options -> answer text), a random
    TopK SAE at blocks.22: attribute + report, and the swap equals the per-latent reference."""
    from repinf_lens import load_mcqa
    from repinf_lens.viz import query_token_attribution
    from repinf_lens.viz import report as R

    ds = load_mcqa("openbookqa", "train", offline=True)
    rows = mcqa_to_completion([ds[i] for i in range(6)], prompt_suffix="", target_prefix="")
    queries, train = rows[:2], rows[2:]
    task = CompletionTask.from_model(default_model, template="chat")
    hook = "blocks.22.hook_resid_post"
    split = SplitModel(default_model, hook, random_sae(default_model, hook, d_sae=1024, k=32, seed=0), task=task)
    batch = task.collate(train)
    assert batch.target_mask.sum(1).min() >= 1 and batch.answer_pos.shape[1] >= 2
    with torch.no_grad():  # the loss is the NLL of the answer text under the model's own forward
        full = default_model(batch.tokens)
        nll = F.cross_entropy(full[0, batch.answer_pos[0]], batch.target_ids[0], reduction="none")
        want = nll[batch.target_mask[0]].mean()
        inp = split.prepare(batch)
        spliced = split.logits(inp.latents, batch, None, inp.error, inp.base, inp.anchor)
    assert float(task.loss(spliced, batch, reduction="none")[0]) == pytest.approx(float(want), rel=1e-5)
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False, batch_size=4)
    res = att.attribute(queries, train)
    assert torch.isfinite(res.example_scores).all() and res.example_scores.shape == (2, 4)
    s = att.s_test(queries[1:])[0]
    params = split.downstream_params()
    active = torch.nonzero((inp.latents[1] != 0).any(0)).flatten()
    sample = active[torch.randperm(len(active), generator=torch.Generator().manual_seed(0))[:4]].tolist()
    ref = latent_influence_reference(split, s, inp, example=1, latents=sample, params=params)
    got = res.latent_scores[1, 1, sample]
    scale = float(res.latent_scores[1, 1].abs().max())
    assert (got - torch.tensor([ref[j] for j in sample])).abs().max() <= 1e-4 * scale
    g = loss_grad(split, params, split.prepare(task.collate(train[1:2])))
    assert res.example_scores[1, 1].item() == pytest.approx(float(tdot(g, s).detach()), rel=1e-4)
    q_attr = query_token_attribution(split, None, queries[0])
    sections = [
        R.question_section(queries[0], extra={"target NLL": q_attr.total, "greedy = target": q_attr.meta["correct"]}),
        R.attribution_section("Test input", q_attr, switcher=False),
        R.top_examples_section(res, 0, k=2, train_rows=train),
        R.top_latents_section(res, 0, k=5),
    ]
    path = R.build_report(tmp_path / "report.html", title="OpenBookQA completions", sections=sections)
    assert queries[0]["target"] in path.read_text("utf-8")
