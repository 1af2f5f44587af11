"""MultipleChoiceTask: formatting, collation, answer position, loss, evaluation, errors (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from repinf_lens import MultipleChoiceTask, evaluate
from repinf_lens.task import PromptTooLongError, parse_option, predict


def test_collate_right_pads_and_marks_answer_position(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)
    batch = task.collate(toy_examples)
    for i, ex in enumerate(toy_examples):
        ids = task.encode(ex)
        n = len(ids)
        assert batch.answer_pos[i].item() == n - 1
        assert batch.tokens[i, :n].tolist() == ids
        assert (batch.tokens[i, n:] == task.pad_id).all()
        assert batch.attention_mask[i].sum().item() == n
        assert batch.option_ids[i, : len(ex["choices"])].tolist() == task.letter_ids[: len(ex["choices"])]
        assert (batch.option_ids[i, len(ex["choices"]) :] == -1).all()
    assert batch.labels.tolist() == [1, 0, 1, 2]
    assert batch.ids == ["q1", "q2", "q3", "q4"]
    # A dataset slice (dict of columns) collates to the same batch.
    cols = {k: [ex[k] for ex in toy_examples] for k in toy_examples[0]}
    assert torch.equal(task.collate(cols).tokens, batch.tokens)


def test_chat_prompt_ends_in_assistant_header_and_letter_follows(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)
    prompt = task.format_prompt(toy_examples[0])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "A. three\nB. four\nC. five\nD. six" in prompt
    full = tiny.tokenizer(prompt + task.answer_text(toy_examples[0]), add_special_tokens=False)["input_ids"]
    assert full[-1] == task.letter_ids[1]
    plain = MultipleChoiceTask(tiny.tokenizer, template="plain")
    assert plain.format_prompt(toy_examples[0]).endswith("D. six\nAnswer:")
    assert plain.letter_ids[0] == tiny.tokenizer.encode(" A", add_special_tokens=False)[0]
    assert plain.letter_ids[0] != task.letter_ids[0]


def test_answer_logits_equal_full_forward_and_padding_is_exact(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)
    batch = task.collate(toy_examples)
    with torch.no_grad():
        ans = task.model_logits(tiny, batch)
        full = tiny(batch.tokens)
        assert torch.allclose(ans, full[torch.arange(len(batch)), batch.answer_pos], atol=1e-5)
        for i, ex in enumerate(toy_examples):
            alone = task.model_logits(tiny, task.collate([ex]))
            assert torch.allclose(alone[0], ans[i], atol=1e-5)


def test_loss_is_cross_entropy_over_option_letters(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)
    batch = task.collate(toy_examples)
    with torch.no_grad():
        logits = task.model_logits(tiny, batch)
    manual = []
    for i, ex in enumerate(toy_examples):
        opts = logits[i, task.letter_ids[: len(ex["choices"])]]
        manual.append(-torch.log_softmax(opts, -1)[ex["answer"]])
    manual = torch.stack(manual)
    assert torch.allclose(task.loss(logits, batch, reduction="none"), manual, atol=1e-6)
    assert torch.allclose(task.loss(logits, batch), manual.mean(), atol=1e-6)
    assert torch.allclose(task.loss(logits, batch, reduction="sum"), manual.sum(), atol=1e-5)
    full = MultipleChoiceTask.from_model(tiny, full_vocab=True)
    fv = torch.stack(
        [-torch.log_softmax(logits[i], -1)[task.letter_ids[ex["answer"]]] for i, ex in enumerate(toy_examples)]
    )
    assert torch.allclose(full.loss(logits, batch, reduction="none"), fv, atol=1e-6)
    # Per-example losses do not depend on the batch they are computed in.
    for i, ex in enumerate(toy_examples):
        single = task.collate([ex])
        with torch.no_grad():
            one = task.loss(task.model_logits(tiny, single), single)
        assert torch.allclose(one, manual[i], atol=1e-5)


def test_evaluate_matches_manual_accuracy(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)
    batch = task.collate(toy_examples)
    with torch.no_grad():
        preds = task.predictions(task.model_logits(tiny, batch), batch)
    expected = (preds == batch.labels).float().mean().item()
    assert evaluate(tiny, task, toy_examples, batch_size=3, progress=False) == pytest.approx(expected)
    p, y = predict(tiny, task, toy_examples, batch_size=1, progress=False)
    assert p.tolist() == preds.tolist() and y.tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"answer": 4}, "outside the 4 options"),
        ({"answer": -1}, "outside the 4 options"),
        ({"answer": "B"}, "outside the 4 options"),
        ({"choices": ["only one"]}, "at least 2"),
        ({"choices": [str(i) for i in range(11)]}, "only 10 letters"),
    ],
)
def test_malformed_examples_raise_clear_errors(tiny, toy_examples, patch, message):
    task = MultipleChoiceTask.from_model(tiny)
    bad = {**toy_examples[0], **patch}
    with pytest.raises(ValueError, match=message):
        task.collate([bad])


def test_missing_field_and_empty_inputs(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)
    with pytest.raises(ValueError, match="no 'answer' field"):
        task.collate([{k: v for k, v in toy_examples[0].items() if k != "answer"}])
    with pytest.raises(ValueError, match="no examples"):
        task.collate([])
    with pytest.raises(ValueError, match="empty"):
        evaluate(tiny, task, [], progress=False)


def test_prompt_longer_than_context_is_refused(tiny, toy_examples):
    task = MultipleChoiceTask.from_model(tiny)  # max_length = n_ctx = 256
    long = {**toy_examples[0], "question": "word " * 300}
    with pytest.raises(PromptTooLongError, match="n_ctx"):
        task.collate([long])
    unchecked = MultipleChoiceTask(tiny.tokenizer)
    batch = unchecked.collate([long])
    with pytest.raises(PromptTooLongError, match=r"load_model\(\.\.\., n_ctx="):
        unchecked.model_logits(tiny, batch)


def test_unknown_template_and_missing_chat_template(tiny):
    with pytest.raises(ValueError, match="Unknown template"):
        MultipleChoiceTask(tiny.tokenizer, template="nonsense")
    from repinf_lens.testing import tiny_tokenizer

    plain_tok = tiny_tokenizer(chat=False)
    assert MultipleChoiceTask(plain_tok).template == "plain"
    with pytest.raises(ValueError, match="no chat template"):
        MultipleChoiceTask(plain_tok, template="chat")


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("B", 5, 1),
        ("C. because plants need light", 5, 2),
        ("(D)", 5, 3),
        ("The answer is E.", 5, 4),
        ("Answer: a", 5, 0),
        ("I think option C is right", 5, 2),
        ("E", 4, None),
        ("no idea", 5, None),
        ("", 5, None),
    ],
)
def test_parse_option(text, n, expected):
    assert parse_option(text, n_options=n) == expected


def test_from_model_follows_the_models_bos_policy_not_the_tl_tokenizer_flag():
    """TransformerLens' tokenizer copy has add_bos_token=True; a model loaded with default_prepend_bos=False (the
    embedded default) must not get a BOS it was never used (or finetuned) with."""
    from repinf_lens.task import MultipleChoiceTask
    from repinf_lens.testing import tiny_model, toy_mcqa_rows

    model = tiny_model(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    row = toy_mcqa_rows(1)[0]
    bos = model.tokenizer.bos_token_id
    model.tokenizer.add_bos_token = True
    model.cfg.default_prepend_bos = False
    off = MultipleChoiceTask.from_model(model, template="plain")
    assert off.encode(row)[0] != bos and off.config()["prepend_bos"] is False
    model.cfg.default_prepend_bos = True
    on = MultipleChoiceTask.from_model(model, template="plain")
    assert on.encode(row) == [bos, *off.encode(row)] and on.config()["prepend_bos"] is True
    plain = MultipleChoiceTask(model.tokenizer, template="plain")  # None: the tokenizer decides, config unchanged
    assert plain.encode(row) == on.encode(row) and "prepend_bos" not in plain.config()
