"""LoRA finetuning on a tiny local Llama folder: learning, merge exactness, metadata, crash + resume."""

from __future__ import annotations

import json

import pytest
import torch

import repinf_lens.workflows.finetuning as ft
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


def test_merge_adapter_reproduces_finetunes_merged_model(base, tmp_path):
    """An adapter copied elsewhere (as from a GPU machine) merges into the same weights `finetune` merged."""
    import shutil

    folder, task = base
    rows = _rows(8)
    res = ft.finetune(folder, task, rows, out_dir=tmp_path / "run", **{**LEARN_KW, "epochs": 2})
    copied = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(res.adapter_dir, copied)
    merged = ft.merge_adapter(folder, copied, tmp_path / "merge", device="cpu", n_ctx=256)
    batch = task.collate(rows[:3])
    with torch.no_grad():
        a = task.model_logits(res.model, batch)
        b = task.model_logits(merged, batch)
        base_logits = task.model_logits(load_model(folder, device="cpu", n_ctx=256), batch)
    assert torch.equal(a, b)
    assert (a - base_logits).abs().max().item() > 1e-3  # the adapter changed the model, so equality means something
    meta = json.loads((tmp_path / "merge" / "merge.json").read_text())
    assert meta["adapter_sha256"] == res.metadata["adapter_sha256"] and meta["base_model"] == str(folder)
    mtime = (tmp_path / "merge" / "merged" / "model.safetensors").stat().st_mtime_ns
    ft.merge_adapter(folder, copied, tmp_path / "merge", device="cpu", n_ctx=256)  # reused, not rewritten
    assert (tmp_path / "merge" / "merged" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ft.merge_adapter(folder, tmp_path, tmp_path / "bad", device="cpu")


@pytest.mark.integration
def test_merged_real_model_hooked_logits_equal_merged_hf_logits(tmp_path):
    """On the real SmolLM2: a (random, non-zero) LoRA adapter on all 7 projections of all 30 blocks, merged by
    `merge_adapter`, gives a HookedTransformer whose answer logits equal the merged HF model's within 1e-4."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repinf_lens.models import default_model_dir

    base_dir = default_model_dir()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(ft.DEFAULT_LORA_TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(hf, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = ft.merge_adapter(None, tmp_path / "adapter", tmp_path / "m", device="cpu", n_ctx=256)
    task = MultipleChoiceTask(AutoTokenizer.from_pretrained(str(base_dir)), template="plain", max_length=256)
    rows = [
        {"id": "a", "question": "Which is a mammal?", "choices": ["shark", "whale", "trout", "eel"], "answer": 1},
        {"id": "b", "question": "What melts ice?", "choices": ["heat", "cold", "dark", "salt water"], "answer": 0},
    ]
    batch = task.collate(rows)
    merged_hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "merged"), dtype=torch.float32).eval()
    base_hf = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = task.model_logits(model, batch)
        ref = ft._answer_logits(merged_hf, batch)
        base = ft._answer_logits(base_hf, batch)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter is not a no-op


def test_shipped_adapter_round_trip_and_integrity(base, tmp_path):
    """export_adapter -> load_model(folder): fp16 adapter merged into its base equals the run's own merge."""
    from repinf_lens.errors import CorruptFileError

    folder, task = base
    rows = _rows(16)
    kw = dict(LEARN_KW, epochs=2)
    res = ft.finetune(folder, task, rows, out_dir=tmp_path / "run", **kw)
    out = ft.export_adapter(res.adapter_dir, tmp_path / "ship", provenance={"note": "tiny"})
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["note"] == "tiny" and prov["adapter_dtype"] == "float16" and len(prov["adapter_sha256"]) == 64
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(str(out / "adapter_model.safetensors")).values())
    batch = task.collate(rows[:4])
    with torch.no_grad():
        shipped = task.model_logits(load_model(out, device="cpu", n_ctx=256), batch)
        own = task.model_logits(res.model, batch)
    assert (shipped - own).abs().max() <= 1e-2 * own.abs().max()  # fp16 LoRA factors, fp32 merge
    assert not torch.allclose(shipped, task.model_logits(load_model(folder, device="cpu", n_ctx=256), batch))
    # a damaged adapter is refused before any merge
    weights = out / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="provenance.json records"):
        load_model(out, device="cpu")


def test_ship_finetune_records_provenance_measured_on_the_exported_adapter(base, tmp_path):
    folder, task = base
    rows = _rows(16)
    res = ft.finetune(folder, task, rows, out_dir=tmp_path / "run", eval_dataset=rows[:8], **LEARN_KW)
    rec = ft.ship_finetune(tmp_path / "run", tmp_path / "ship", task, rows, slice_size=5, progress=False)
    saved = json.loads((tmp_path / "ship" / "provenance.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    assert rec["base_model"] == str(folder) and len(rec["base_model_sha256"]) == 64
    assert rec["recipe"]["lr"] == LEARN_KW["lr"] and rec["data"]["n_train"] == 16
    assert rec["finetune_command"].startswith("repinf-lens finetune") and "--lr 0.02" in rec["finetune_command"]
    assert rec["validation"]["accuracy_after"] == res.metadata["accuracy_after"]
    test = rec["test"]
    assert test["n"] == 16 and test["slice"]["ids"] == [f"r{i}" for i in range(5)]
    # independent: the exported adapter, merged and loaded again, predicts what was recorded
    from repinf_lens.task import predict

    pred, labels = predict(load_model(tmp_path / "ship", device="cpu", n_ctx=256), task, rows, progress=False)
    assert pred[:5].tolist() == test["slice"]["predictions"]
    assert test["accuracy_after"] == float((pred == labels).float().mean())


def test_a_reused_run_measures_other_evaluation_data_instead_of_returning_stale_accuracies(base, tmp_path):
    from repinf_lens import evaluate

    folder, task = base
    rows = _rows(16)
    first = ft.finetune(folder, task, rows, out_dir=tmp_path / "run", eval_dataset=rows[:4], **LEARN_KW)
    other = [dict(r, answer=1) for r in rows[4:12]]  # other questions, other keys
    again = ft.finetune(folder, task, rows, out_dir=tmp_path / "run", eval_dataset=other, **LEARN_KW)
    assert again.metadata["n_eval"] == 8 and again.metadata["loss_curve"] == first.metadata["loss_curve"]
    assert again.metadata["accuracy_after"] == evaluate(again.model, task, other, progress=False)
    assert again.metadata["accuracy_after"] != first.metadata["accuracy_after"]
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["n_eval"] == 8


def test_merge_peft_is_the_exact_float64_merge_and_bit_reproducible(base):
    """merge_peft == W + scaling * B @ A computed densely in float64 and rounded once (an independent matmul), and
    two merges are bit-identical; peft's own fp32 merge agrees to float32 rounding."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from repinf_lens.models import merge_peft

    folder, _ = base

    def peft_model():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        return get_peft_model(hf, cfg)

    pm = peft_model()
    lora = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert lora, "no LoRA layers"
    want = {}
    for n, m in lora.items():
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        w = m.get_base_layer().weight.double()
        want[n.removeprefix("base_model.model.") + ".weight"] = (w + m.scaling["default"] * (b @ a)).float()
    merged = dict(merge_peft(pm).named_parameters())
    for name, w in want.items():
        assert torch.equal(merged[name], w) or (merged[name] - w).abs().max() <= 1e-7 * w.abs().max(), name
    again = dict(merge_peft(peft_model()).named_parameters())
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    theirs = dict(peft_model().merge_and_unload().named_parameters())
    assert isinstance(pm, PeftModel)
    for name in want:
        assert (theirs[name] - merged[name]).abs().max() <= 1e-5 * merged[name].abs().max()


def test_lora_layers_adapt_only_those_blocks_and_bf16_autocast_still_learns(base, tmp_path):
    """Upper-block LoRA (the CPU recipe): only the named blocks change in the merged model, the rest is the base
    bit for bit; under bf16 autocast the loss still falls. Defaults leave the run fingerprint of older runs intact."""
    folder, task = base
    rows = _rows(16)
    res = ft.finetune(folder, task, rows, out_dir=tmp_path / "upper", lora_layers=(1,), autocast="bf16", **LEARN_KW)
    curve = res.metadata["loss_curve"]
    assert curve[-1] < 0.5 * curve[0]
    base_model = load_model(folder, device="cpu", n_ctx=256)
    changed = {n for (n, p), (_, q) in zip(base_model.named_parameters(), res.model.named_parameters()) if not
               torch.equal(p, q)}  # fmt: skip
    assert changed and all(n.startswith("blocks.1.") for n in changed), sorted(changed)
    assert res.metadata["config"]["lora_layers"] == [1] and res.metadata["config"]["autocast"] == "bf16"
    assert "lora_layers" not in ft.FinetuneConfig().to_dict() and "autocast" not in ft.FinetuneConfig().to_dict()


def test_lora_layers_and_autocast_are_checked_before_any_work(base, tmp_path):
    folder, task = base
    with pytest.raises(ValueError, match="autocast must be None or 'bf16'"):
        ft.finetune(folder, task, _rows(4), out_dir=tmp_path / "a", autocast="fp8")
    with pytest.raises(ValueError, match="names a block >= 2"):
        ft.finetune(folder, task, _rows(4), out_dir=tmp_path / "b", lora_layers=(5,), **LEARN_KW)
    with pytest.raises(ValueError, match="block indices >= 0"):
        ft.FinetuneConfig(lora_layers=(-1,))
