"""The SAEs and the sketch index shipped in ``repinf_lens/assets`` for the shipped finetune: they load offline
by name, fit the model they were built for, and a slice of the index rebuilt here equals the shipped one."""

from __future__ import annotations

import json

import pytest
import torch

from repinf_lens.influence.prefilter import shipped_index_dir, shipped_indexes
from repinf_lens.saes.loading import shipped_sae_releases
from repinf_lens.workflows.demo import DEFAULT_FINETUNE, DEFAULT_INDEX, DEFAULT_SAE_ID, DEFAULT_SAE_RELEASE

pytestmark = pytest.mark.integration


def test_everything_shipped_fits_the_size_budget():
    from pathlib import Path

    import repinf_lens.assets

    root = Path(repinf_lens.assets.__file__).parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 25 * 2**20, f"{total / 2**20:.1f} MB shipped"


def test_the_demo_release_and_index_are_shipped():
    assert DEFAULT_SAE_RELEASE in shipped_sae_releases()
    assert DEFAULT_INDEX in shipped_indexes()


@pytest.fixture(scope="module")
def demo_split():
    from transformers import AutoTokenizer

    import repinf_lens as rl
    from repinf_lens.models import default_model_dir

    model = rl.load_model(DEFAULT_FINETUNE, device="cpu")
    task = rl.MultipleChoiceTask(AutoTokenizer.from_pretrained(str(default_model_dir())), max_length=1024,
                                 template="plain")  # fmt: skip
    sae = rl.load_sae(DEFAULT_SAE_RELEASE, DEFAULT_SAE_ID, model=model)
    return rl.SplitModel(model, DEFAULT_SAE_ID, sae, task=task)


def test_shipped_sae_loads_by_release_name_and_reconstructs_the_finetuned_model(demo_split):
    """load_sae(release, id) offline; on held-out test prompts the SAE explains what its registry entry says."""
    from repinf_lens import load_mcqa
    from repinf_lens.saes.loading import load_sae

    folder = shipped_sae_releases()[DEFAULT_SAE_RELEASE]
    import yaml

    entry = next(e for e in yaml.safe_load((folder / "pretrained_saes.yaml").read_text())[DEFAULT_SAE_RELEASE]["saes"]
                 if e["id"] == DEFAULT_SAE_ID)  # fmt: skip
    sae, split = demo_split.sae, demo_split
    assert sae.cfg.metadata.hook_name == DEFAULT_SAE_ID
    with pytest.raises(ValueError, match="Valid sae_ids"):
        load_sae(DEFAULT_SAE_RELEASE, "blocks.99.hook_resid_post")
    rows = [dict(r) for r in load_mcqa("openbookqa", "test", offline=True)][:32]
    batch = split.task.collate(rows)
    with torch.no_grad():
        _, cache = split.model.run_with_cache(batch.tokens, names_filter=DEFAULT_SAE_ID)
        x = cache[DEFAULT_SAE_ID][batch.attention_mask.bool()]
        x_hat = sae.decode(sae.encode(x))
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ev > float(entry["variance_explained"]) - 0.1, (ev, entry["variance_explained"])


def test_a_rebuilt_slice_of_the_shipped_index_equals_it(demo_split):
    from repinf_lens import load_mcqa
    from repinf_lens.influence.prefilter import GradientSketcher, SketchStore

    store = SketchStore.load(shipped_index_dir(DEFAULT_INDEX), verify=True)
    rows = [dict(r) for r in load_mcqa("openbookqa", "train", offline=True)]
    store.check_rows(rows)  # built over exactly the training set the finetune saw
    assert store.n == len(rows) == 4957
    fresh = GradientSketcher.from_store(demo_split, store).sketch(rows[:4], batch_size=4)  # checks the split
    shipped = store.sketches[:4].float()
    rel = (fresh - shipped).norm(dim=1) / shipped.norm(dim=1)
    assert float(rel.max()) < 5e-3, rel
    manifest = json.loads((shipped_index_dir(DEFAULT_INDEX) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"]["storage_dtype"] == "float16"
