"""LoRA finetuning on a tiny local Llama folder: learning, merge exactness, metadata, crash + resume."""

from __future__ import annotations

import json

import pytest
import torch

import repinf_lens.finetuning as ft
from repinf_lens import MultipleChoiceTask, load_model
from repinf_lens.testing import tiny_hf_llama


def _tiny_llama(folder):
    return tiny_hf_llama(folder, initializer_range=0.2)


def _rows(n):
    """The key is always A: a random tiny model can learn that prior quickly (the test is of the training loop)."""
    colours = ["red", "blue", "green", "black"]
    return [{"id": f"r{i}", "question": f"Pick colour number {i}", "choices": colours, "answer": 0} for i in range(n)]


LEARN_KW = dict(device="cpu", n_ctx=256, progress=False, epochs=12, lr=2e-2, batch_size=8, micro_batch_size=4, lora_r=4)


@pytest.fixture()
def base(tmp_path):
    folder = tmp_path / "base-model"
    tok = _tiny_llama(folder)
    return folder, MultipleChoiceTask(tok, template="plain", max_length=256)


def test_finetune_learns_merges_exactly_and_records_metadata(base, tmp_path):
    folder, task = base
    rows = _rows(16)
    res = ft.finetune(
        folder,
        task,
        rows,
        out_dir=tmp_path / "run",
        eval_dataset=rows,
        **LEARN_KW,
    )
    meta = res.metadata
    assert meta["steps"] == 24 and meta["n_train"] == 16 and meta["base_model"] == str(folder)
    assert meta["loss_curve"][-1] < 0.5 * meta["loss_curve"][0]
    assert meta["accuracy_after"] > meta["accuracy_before"]
    assert len(meta["adapter_sha256"]) == 64 and json.loads((tmp_path / "run" / "finetune.json").read_text())
    # merged HookedTransformer == merged HF model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(res.merged_dir), dtype=torch.float32).eval()
    batch = task.collate(rows[:3])
    with torch.no_grad():
        ours = task.model_logits(res.model, batch)
        ref = ft._answer_logits(hf, batch)
    assert (ours - ref).abs().max().item() <= 1e-4
    # a finished run is reused, not retrained
    again = ft.finetune(
        folder,
        task,
        rows,
        out_dir=tmp_path / "run",
        **LEARN_KW,
    )
    assert again.metadata["adapter_sha256"] == meta["adapter_sha256"]


def test_finetune_resumes_after_a_crash_with_identical_results(base, tmp_path, monkeypatch):
    folder, task = base
    rows = _rows(8)
    kw = dict(
        device="cpu",
        n_ctx=256,
        progress=False,
        epochs=2,
        lr=1e-2,
        batch_size=4,
        micro_batch_size=2,
        lora_r=4,
        checkpoint_every=2,
    )
    clean = ft.finetune(folder, task, rows, out_dir=tmp_path / "clean", **kw)
    calls = {"n": 0}
    real = ft._answer_logits

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # step 4 of 4 (2 micro-batches per step): after the step-2 checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real(model, batch)

    monkeypatch.setattr(ft, "_answer_logits", crashing)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(folder, task, rows, out_dir=tmp_path / "crash", **kw)
    assert (tmp_path / "crash" / "checkpoints" / "step-2" / "state.pt").exists()
    monkeypatch.setattr(ft, "_answer_logits", real)
    resumed = ft.finetune(folder, task, rows, out_dir=tmp_path / "crash", **kw)
    assert resumed.metadata["loss_curve"] == pytest.approx(clean.metadata["loss_curve"], rel=1e-5)
    a = load_model(clean.merged_dir, device="cpu", n_ctx=256)
    b = resumed.model
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_finetune_rejects_bad_options(base, tmp_path):
    folder, task = base
    with pytest.raises(TypeError, match="Unknown finetune option 'epoch'"):
        ft.finetune(folder, task, _rows(4), out_dir=tmp_path / "x", epoch=1)
    with pytest.raises(ValueError, match="empty"):
        ft.finetune(folder, task, [], out_dir=tmp_path / "x")
