"""Every shipped finetune (``repinf_lens.models.SHIPPED_FINETUNES``): its adapter is intact and the merged model
predicts what its provenance says, offline."""

from __future__ import annotations

import hashlib
import json

import pytest

from repinf_lens.models import SHIPPED_FINETUNES, shipped_finetune_dir

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", sorted(SHIPPED_FINETUNES))
def test_shipped_finetune_is_intact_and_reproduces_its_provenance(name):
    from repinf_lens import load_mcqa, load_model
    from repinf_lens.models import default_model_dir, file_sha256
    from repinf_lens.task import MultipleChoiceTask, predict

    folder = shipped_finetune_dir(name)
    prov = json.loads((folder / "provenance.json").read_text())
    assert hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest() == prov["adapter_sha256"]
    assert file_sha256(default_model_dir() / "model.safetensors") == prov["base_model_sha256"]
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 25e6, f"{name}: {total / 1e6:.1f} MB shipped"
    model = load_model(name, device="cpu", n_ctx=1024)  # MedQA prompts reach ~600 tokens
    split = next(k for k in prov if isinstance(prov[k], dict) and "slice" in prov[k])
    sl = prov[split]["slice"]
    rows = {str(r["id"]): dict(r) for r in load_mcqa(prov.get("dataset", "openbookqa"), split, offline=True)}
    rows = [rows[i] for i in sl["ids"]]
    # from_model: the model's own BOS policy (no BOS for the default model), as the finetune was trained with
    task = MultipleChoiceTask.from_model(model, template=prov["task_config"]["template"])
    pred, labels = predict(model, task, rows, batch_size=16, progress=False)
    agree = sum(int(a) == int(b) for a, b in zip(pred.tolist(), sl["predictions"]))
    assert agree >= len(rows) - 1, f"{agree}/{len(rows)} predictions as recorded"  # float rounding may flip a tie
    assert abs(float((pred == labels).float().mean()) - sl["accuracy"]) <= 1.0 / len(rows) + 1e-9
