"""theta2 = unmerged LoRA adapters: exact at the trained point, gradients equal peft's own, influence runs."""

from __future__ import annotations

import json

import pytest
import torch

from repinf_lens import Identity, InfluenceAttributor, MultipleChoiceTask, SplitModel, load_model
from repinf_lens.split.lora import LoraSplit, lora_delta, lora_split_from_peft
from repinf_lens.testing import tiny_hf_llama, toy_mcqa_rows
from repinf_lens.workflows.finetuning import _answer_logits, finetune

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = tmp / "base"
    tok = tiny_hf_llama(base, initializer_range=0.2)
    task = MultipleChoiceTask(tok, template="plain", max_length=256)
    rows = toy_mcqa_rows(16, seed=1)
    res = finetune(base, task, rows, out_dir=tmp / "ft", device="cpu", n_ctx=256, progress=False, epochs=2,
                   lr=5e-2, batch_size=8, micro_batch_size=8, lora_r=4)  # fmt: skip
    return base, res, task, rows


def test_lora_delta_layouts():
    a, b = torch.randn(6, 2), torch.randn(2, 3 * 4)
    q = lora_delta("blocks.0.attn.W_Q", (3, 6, 4), a, b)
    assert q.shape == (3, 6, 4) and torch.allclose(q[1], (a @ b)[:, 4:8])
    o = lora_delta("blocks.0.attn.W_O", (3, 4, 6), torch.randn(12, 2), torch.randn(2, 6))
    assert o.shape == (3, 4, 6)
    with pytest.raises(ValueError, match="No LoRA layout"):
        lora_delta("blocks.0.ln1.w", (6,), a, b)


def test_lora_split_is_exact_at_the_trained_adapters_and_matches_peft_gradients(tuned):
    base, res, task, rows = tuned
    model = load_model(res.merged_dir, n_ctx=256)
    split = SplitModel(model, HOOK, None, task=task)
    lsplit = lora_split_from_peft(split, res.adapter_dir)
    assert isinstance(lsplit, LoraSplit) and lsplit.dropped and all(n.startswith("blocks.1.") for n in lsplit.adapted)
    assert len(lsplit.adapted) == 7 and lsplit.num_downstream_params() < split.num_downstream_params() / 4
    batch = task.collate(rows[:4])
    inp = lsplit.prepare(batch)
    full = split.inputs_loss(split.downstream_params(), split.prepare(batch))
    mine = lsplit.inputs_loss(lsplit.downstream_params(), inp)
    assert float(mine) == pytest.approx(float(full), abs=1e-6)
    # gradient w.r.t. the adapters: ours vs peft's own autograd on the unmerged HF model
    grads = torch.func.grad(lambda p: lsplit.inputs_loss(p, inp))(lsplit.downstream_params())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), res.adapter_dir)
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    named = dict(hf.named_parameters())
    for k, v in named.items():
        if "lora_" in k:
            v.requires_grad_(True)
    loss = task.loss(_answer_logits(hf, batch), batch)
    assert float(loss) == pytest.approx(float(full), abs=1e-4)
    loss.backward()
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    hf_name = {"attn.W_Q": "self_attn.q_proj", "attn._W_K": "self_attn.k_proj", "attn._W_V": "self_attn.v_proj",
               "attn.W_O": "self_attn.o_proj", "mlp.W_gate": "mlp.gate_proj", "mlp.W_in": "mlp.up_proj",
               "mlp.W_out": "mlp.down_proj"}  # fmt: skip
    for tl in lsplit.adapted:
        mod = hf_name[tl.split(".", 2)[2]]
        ga = named[f"base_model.model.model.layers.1.{mod}.lora_A.default.weight"].grad
        gb = named[f"base_model.model.model.layers.1.{mod}.lora_B.default.weight"].grad
        torch.testing.assert_close(grads[f"{tl}.lora_A"], ga.T, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(grads[f"{tl}.lora_B"], gb.T / scale, rtol=2e-3, atol=1e-6)


def test_influence_with_lora_theta2_runs_and_differs_from_full(tuned, tmp_path):
    _, res, task, rows = tuned
    model = load_model(res.merged_dir, n_ctx=256)
    split = SplitModel(model, HOOK, None, task=task)
    lsplit = lora_split_from_peft(split, res.adapter_dir)
    kw = dict(hessian=Identity(), batch_size=4, progress=False, cache_dir=tmp_path)
    lora_res = InfluenceAttributor(lsplit, **kw).attribute(rows[:2], rows[2:10])
    full_res = InfluenceAttributor(split, **kw).attribute(rows[:2], rows[2:10])
    # Identity: score = <g_test, g_train> over theta2; check one pair against an independent computation
    g = [torch.func.grad(lambda p, r=r: lsplit.inputs_loss(p, lsplit.prepare(task.collate([r]))))(
        lsplit.downstream_params()) for r in (rows[0], rows[2])]  # fmt: skip
    want = sum(float((g[0][k] * g[1][k]).sum()) for k in g[0])
    assert float(lora_res.example_scores[0, 0]) == pytest.approx(want, rel=1e-4)
    assert not torch.allclose(lora_res.example_scores, full_res.example_scores)
    assert lsplit.fingerprint()["theta2"] == "lora"
