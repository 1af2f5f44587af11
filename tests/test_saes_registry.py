"""load_sae on a local HF-repo-like release folder reads its pretrained_saes.yaml as SAE.from_pretrained does."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from repinf_lens.errors import CorruptFileError
from repinf_lens.saes.loading import load_sae
from repinf_lens.testing import random_sae, tiny_model

HOOK = "blocks.0.hook_resid_post"


def _release(tmp_path, entries, overrides=None):
    """A release folder: SAEs in arbitrary subfolders, and a registry whose ids differ from the paths."""
    model = tiny_model()
    saes = {}
    for e in entries:
        sae = random_sae(model, HOOK, seed=e.pop("seed", 0), normalize_activations=e.pop("norm", "none"))
        sae.save_model(str(tmp_path / e["path"]))
        saes[e["id"]] = sae
    body = {"repo_id": "me/my-saes", "model": "tiny", "conversion_func": None, "saes": entries}
    if overrides:
        body["config_overrides"] = overrides
    (tmp_path / "pretrained_saes.yaml").write_text(yaml.safe_dump({"my-release": body}))
    return model, saes


def test_registry_ids_that_differ_from_paths(tmp_path):
    model, saes = _release(
        tmp_path, [{"id": "layer0/width64", "path": "sae_a", "seed": 1}, {"id": "other", "path": "deep/b", "seed": 2}]
    )
    got = load_sae(tmp_path, "layer0/width64", model=model)
    torch.testing.assert_close(got.W_enc, saes["layer0/width64"].W_enc)
    got = load_sae(tmp_path, "other")
    torch.testing.assert_close(got.W_enc, saes["other"].W_enc)
    with pytest.raises(ValueError, match=r"has no SAE 'layer0/width6'.*Closest: \['layer0/width64'\].*Fix"):
        load_sae(tmp_path, "layer0/width6")


def test_norm_scaling_factor_is_folded_like_from_pretrained(tmp_path):
    factor = 2.5
    _, saes = _release(
        tmp_path,
        [{"id": "scaled", "path": "s", "norm": "expected_average_only_in", "norm_scaling_factor": factor}],
    )
    saved = saes["scaled"]
    got = load_sae(tmp_path, "scaled")
    assert got.cfg.normalize_activations == "none"
    # independent: the saved SAE reads activations scaled by the factor and its output is scaled back
    x = torch.randn(2, 3, saved.cfg.d_in)
    with torch.no_grad():
        torch.testing.assert_close(got.encode(x), saved.encode(x * factor))
        torch.testing.assert_close(got.decode(got.encode(x)), saved.decode(saved.encode(x * factor)) / factor)


def test_unfolded_expected_average_only_in_warns(tmp_path):
    _release(tmp_path, [{"id": "nofactor", "path": "n", "norm": "expected_average_only_in"}])
    with pytest.warns(UserWarning, match=r"expected_average_only_in.*no norm_scaling_factor.*Fix"):
        sae = load_sae(tmp_path, "nofactor")
    assert sae.cfg.normalize_activations == "expected_average_only_in"


def test_config_overrides_and_neuronpedia_are_applied(tmp_path):
    _release(
        tmp_path,
        [{"id": "a", "path": "a", "neuronpedia": "tiny/0-res"}],
        overrides={"model_name": "overridden-model", "prepend_bos": False},
    )
    sae = load_sae(tmp_path, "a")
    assert sae.cfg.metadata.model_name == "overridden-model"
    assert sae.cfg.metadata.prepend_bos is False
    assert sae.cfg.metadata.neuronpedia_id == "tiny/0-res"


def test_registry_path_that_does_not_exist(tmp_path):
    _release(tmp_path, [{"id": "a", "path": "a"}])
    data = yaml.safe_load((tmp_path / "pretrained_saes.yaml").read_text())
    data["my-release"]["saes"][0]["path"] = "missing"
    (tmp_path / "pretrained_saes.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"lists SAE 'a' at path 'missing'.*Fix: correct the path"):
        load_sae(tmp_path, "a")


def test_corrupt_cfg_json_and_truncated_weights_name_the_file(tmp_path):
    model = tiny_model()
    folder = tmp_path / "sae"
    random_sae(model, HOOK).save_model(str(folder))
    (folder / "cfg.json").write_text('{"d_in": 32, "d_sae"')
    with pytest.raises(CorruptFileError, match=r"cfg\.json.*not valid JSON.*Fix") as e:
        load_sae(folder)
    assert e.value.path == folder / "cfg.json"
    random_sae(model, HOOK).save_model(str(folder))
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=r"sae_weights\.safetensors.*truncated or corrupt.*Fix"):
        load_sae(folder)
    json.loads((folder / "cfg.json").read_text())  # the config itself was fine
