"""SAE I/O on tiny models: load_sae (folders, releases, repo ids), compatibility checks, publish_saes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from repinf_lens.saes.loading import check_sae_compatibility, find_sae_folders, load_sae, sae_hook_name
from repinf_lens.saes.publish import PublishResult, publish_saes
from repinf_lens.split import HookNameError, SAECompatibilityError, SplitModel
from repinf_lens.testing import random_sae, tiny_model

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=3)


def _examples(n: int) -> list[dict]:
    words = ["red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice"]
    return [
        {
            "id": f"ex{i}",
            "question": f"Which goes with {words[i % 8]} and {words[(i + 3) % 8]}?",
            "choices": [words[(i + j) % 8] for j in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _assert_splices(model, hook: str, sae) -> None:
    """The SAE splices into SplitModel and, with the error term, reproduces the model's logits."""
    split = SplitModel(model, hook, sae)
    batch = split.task.collate(_examples(3))
    inp = split.prepare(batch)
    with torch.no_grad():
        spliced = split.logits(inp.latents, batch, split.downstream_params(), inp.error, inp.base)
        assert (spliced - split.original_logits(batch)).abs().max().item() <= 1e-5
    assert inp.latents.shape[-1] == sae.cfg.d_sae and (inp.latents != 0).any()


def _training_topk(d_in: int, hook: str, *, rescale: bool = True, seed: int = 0):
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=40,
        k=5,
        rescale_acts_by_decoder_norm=rescale,
        metadata=SAEMetadata(hook_name=hook, model_name="tiny-test-model"),
    )
    torch.manual_seed(seed)
    return TopKTrainingSAE(cfg)  # decoder rows initialised to norm 0.1, so rescaling matters


def _acts(model, hook: str) -> torch.Tensor:
    tokens = model.to_tokens(["Which goes with red and blue?", "The sun and the rain."], padding_side="right")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook]


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize(("hook", "arch"), [(HOOK, "topk"), ("blocks.0.attn.hook_z", "standard")])
def test_save_model_folder_loads_exactly_and_splices(model, tmp_path, hook, arch):
    sae = random_sae(model, hook, d_sae=48, k=6, architecture=arch)
    sae.save_model(tmp_path / "sae")  # SAELens' own writer
    loaded = load_sae(tmp_path / "sae", model=model)
    assert type(loaded) is type(sae) and sae_hook_name(loaded) == hook
    assert loaded.cfg.d_in == sae.cfg.d_in and loaded.cfg.d_sae == 48 and not loaded.training
    _assert_same_weights(loaded, sae)
    x = _acts(model, hook)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
    _assert_splices(model, hook, loaded)
    # the same folder as a str, through its cfg.json, and from a parent folder holding only it
    _assert_same_weights(load_sae(str(tmp_path / "sae")), sae)
    _assert_same_weights(load_sae(tmp_path / "sae" / "cfg.json"), sae)
    _assert_same_weights(load_sae(tmp_path), sae)
    as_double = load_sae(tmp_path / "sae", dtype=torch.float64)
    assert as_double.W_enc.dtype == torch.float64 and torch.equal(as_double.W_enc, sae.W_enc.double())


def test_training_sae_folders_load_and_splice(model, tmp_path):
    train = _training_topk(32, HOOK)
    assert train.W_dec.norm(dim=-1).sub(0.1).abs().max() < 1e-5
    train.save_model(tmp_path / "training_format")
    train.save_inference_model(tmp_path / "inference_format")
    x = _acts(model, HOOK)
    with torch.no_grad():
        ref_latents = train.encode(x)
        ref_recon = train.decode(ref_latents)
    # training-format folder: weights bit-identical (the rescaling flag travels in cfg.json)
    a = load_sae(tmp_path / "training_format", model=model)
    _assert_same_weights(a, train)
    assert a.cfg.k == 5 and a.cfg.rescale_acts_by_decoder_norm
    # inference folder: the decoder norms are folded in, so weights differ but the SAE computes the same thing
    b = load_sae(tmp_path / "inference_format", model=model)
    assert not torch.equal(b.W_dec, train.W_dec)
    assert torch.allclose(b.W_dec.norm(dim=-1), torch.ones(40), atol=1e-5)
    with torch.no_grad():
        for loaded in (a, b):
            lat = loaded.encode(x)
            assert torch.equal(lat != 0, ref_latents != 0)
            assert (lat - ref_latents).abs().max() <= 1e-5 and (loaded.decode(lat) - ref_recon).abs().max() <= 1e-5
    _assert_splices(model, HOOK, a)
    _assert_splices(model, HOOK, b)


def test_folder_with_several_saes_needs_an_id(model, tmp_path):
    s0, s1 = random_sae(model, "blocks.0.hook_resid_post", seed=1), random_sae(model, HOOK, seed=2)
    s0.save_model(tmp_path / "layer0")
    s1.save_model(tmp_path / "nested" / "layer1")
    assert [p.relative_to(tmp_path).as_posix() for p in find_sae_folders(tmp_path)] == ["layer0", "nested/layer1"]
    with pytest.raises(ValueError, match=r"holds 2 SAEs.*layer0.*nested/layer1.*sae_id"):
        load_sae(tmp_path)
    _assert_same_weights(load_sae(tmp_path, "nested/layer1", model=model), s1)
    with pytest.raises(ValueError, match=r"No SAE 'layer2'.*Closest: \['layer0'"):
        load_sae(tmp_path, "layer2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no SAE"):
        load_sae(tmp_path / "empty")


def test_incompatible_saes_are_refused_with_a_fix(model, tmp_path):
    wrong_hook = random_sae(model, HOOK)
    wrong_hook.cfg.metadata.hook_name = "blocks.9.hook_resid_post"
    wrong_hook.save_model(tmp_path / "deep")
    with pytest.raises(HookNameError, match=r"2 layers.*Closest: \[.*'blocks\.1\.hook_resid_post'"):
        load_sae(tmp_path / "deep", model=model)
    load_sae(tmp_path / "deep")  # without a model nothing is checked
    fixed = load_sae(tmp_path / "deep", model=model, hook_name=HOOK)  # the override is written into the config
    assert sae_hook_name(fixed) == HOOK
    _assert_splices(model, HOOK, fixed)

    wide = random_sae(model, "blocks.1.mlp.hook_post")  # d_in = d_mlp = 64, the residual stream has 32
    wide.cfg.metadata.hook_name = HOOK
    wide.save_model(tmp_path / "wide")
    with pytest.raises(SAECompatibilityError, match=r"d_in=64.*width 32.*Fix"):
        load_sae(tmp_path / "wide", model=model)
    with pytest.raises(SAECompatibilityError, match=r"d_in=64.*width 32"):
        SplitModel(model, HOOK, load_sae(tmp_path / "wide"))  # the same rule as SplitModel's

    z = random_sae(model, "blocks.0.attn.hook_z")
    z.cfg.reshape_activations = "none"
    with pytest.raises(SAECompatibilityError, match="reshape_activations"):
        check_sae_compatibility(z, model)
    ln = random_sae(model, HOOK, normalize_activations="layer_norm")
    with pytest.raises(SAECompatibilityError, match="layer_norm"):
        check_sae_compatibility(ln, model)
    no_hook = random_sae(model, HOOK)
    no_hook.cfg.metadata.hook_name = None
    with pytest.raises(SAECompatibilityError, match="hook_name="):
        check_sae_compatibility(no_hook, model)
    assert check_sae_compatibility(no_hook, model, hook_name=HOOK) == HOOK


def test_unknown_sources_and_bad_ids_are_explained(tmp_path):
    for missing in (tmp_path / "missing", str(tmp_path / "missing"), "./no/such/folder"):
        with pytest.raises(ValueError, match=r"No such SAE folder.*local folder.*release.*Hugging Face repo id"):
            load_sae(missing)
    with pytest.raises(ValueError, match=r"not an existing SAE folder.*'gpt2-small-res-jb'.*Hugging Face repo id"):
        load_sae("gpt2-small-res-j", "blocks.8.hook_resid_pre")
    # a real release of SAELens' registry: the ids are checked before any download
    with pytest.raises(ValueError, match=r"has no SAE 'blocks.8.hook_resid_pos'.*'blocks.8.hook_resid_pre'"):
        load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pos")
    with pytest.raises(ValueError, match=r"needs sae_id.*Valid sae_ids: 'blocks.0.hook_resid_pre'"):
        load_sae("gpt2-small-res-jb")
    with pytest.raises(ValueError, match="needs sae_id"):
        load_sae("someone/some-saes")


def test_offline_hub_gives_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ConnectionError, match=r"unreachable.*local path"):
        load_sae("repinf-lens-test/not-cached-saes", "layer0")


# ---------------------------------------------------------------------------------------------------- publishing
def _registry_from(monkeypatch, yaml_path: Path) -> dict:
    """Parse ``yaml_path`` with SAELens' own registry reader (it normally reads sae_lens/pretrained_saes.yaml)."""
    import sae_lens.loading.pretrained_saes_directory as psd

    monkeypatch.setattr(psd, "files", lambda package: yaml_path.parent)
    return psd.get_pretrained_saes_directory.__wrapped__()


@pytest.fixture
def published(model, tmp_path):
    s0 = random_sae(model, "blocks.0.hook_resid_post", d_sae=32, k=4, seed=5)
    train = _training_topk(32, HOOK, seed=6)
    mlp = random_sae(model, "blocks.1.hook_mlp_out", d_sae=40, architecture="standard", seed=7)
    mlp.save_model(tmp_path / "src" / "mlp")
    (tmp_path / "src" / "mlp" / "training.json").write_text(
        json.dumps({"stats": {"l0": 12.5, "explained_variance": 0.75}})  # as written by train_sae
    )
    saes = {"blocks.0.hook_resid_post": s0, "topk/layer1": train, "mlp1": tmp_path / "src" / "mlp"}
    res = publish_saes(
        saes,
        "someone/Tiny-SAEs",
        out_dir=tmp_path / "out",
        model_name="tiny-test-model",
        stats={"blocks.0.hook_resid_post": {"l0": 4.0, "variance_explained": 0.5}},
        task_accuracy={
            "blocks.0.hook_resid_post": {"accuracy_base": 0.5, "accuracy_with_sae": 0.25},
            "topk/layer1": {"accuracy_base": 0.5, "accuracy_with_sae_and_error": 0.5},
        },
        dataset="someone/tiny-mcq",
        extra_metadata={"license": "mit", "tags": ["tiny"]},
    )
    train.save_inference_model(tmp_path / "ref_inference")
    refs = {"blocks.0.hook_resid_post": s0, "topk/layer1": load_sae(tmp_path / "ref_inference"), "mlp1": mlp}
    return res, refs, tmp_path


def test_publish_writes_saelens_folders_card_and_registry_block(model, published, monkeypatch):
    from sae_lens import SAE

    res, refs, tmp_path = published
    out = tmp_path / "out"
    assert isinstance(res, PublishResult) and not res.uploaded and res.out_dir == out and res.release == "tiny-saes"
    # every SAE folder is a SAELens inference SAE with the original (inference) weights
    assert sorted(res.sae_paths) == sorted(refs)
    for sae_id, ref in refs.items():
        assert res.sae_paths[sae_id] == out / sae_id
        back = SAE.load_from_disk(out / sae_id)
        _assert_same_weights(back, ref)
        assert sae_hook_name(back) == sae_hook_name(ref)
    assert not (out / "mlp1" / "training.json").exists()  # only SAELens files are published

    # the registry block parses with SAELens' own reader
    assert res.yaml_path.read_text() == res.yaml_block
    directory = _registry_from(monkeypatch, res.yaml_path)
    assert list(directory) == ["tiny-saes"]
    entry = directory["tiny-saes"]
    assert entry.repo_id == "someone/Tiny-SAEs" and entry.model == "tiny-test-model" and entry.conversion_func is None
    assert entry.saes_map == {k: k for k in refs}
    assert entry.expected_l0 == {"blocks.0.hook_resid_post": 4.0, "topk/layer1": 0.0, "mlp1": 12.5}
    assert entry.expected_var_explained["blocks.0.hook_resid_post"] == 0.5
    assert entry.expected_var_explained["mlp1"] == 0.75
    raw = yaml.safe_load(res.yaml_block)["tiny-saes"]
    assert "l0" not in raw["saes"][1]  # unknown statistics are left out, not written as null

    # the model card
    card = res.readme_path.read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "saelens" and front["license"] == "mit"
    assert {"saelens", "sparse-autoencoder", "tiny"} <= set(front["tags"]) and front["datasets"] == ["someone/tiny-mcq"]
    for sae_id, ref in refs.items():
        assert f"`{sae_hook_name(ref)}`" in card and f"`{sae_id}`" in card
    assert "accuracy with sae and error" in card and "| 0.25 |" in card
    assert 'SAE.from_pretrained("someone/Tiny-SAEs", "blocks.0.hook_resid_post")' in card

    # load_sae reads the published folder directly (SAE.from_pretrained does not take local paths)
    _assert_same_weights(load_sae(out, "topk/layer1", model=model), refs["topk/layer1"])


def test_published_repo_loads_through_saelens_from_pretrained(model, published, monkeypatch):
    """Simulate the Hub with the published folder: SAELens' own loader fetches <sae_id>/cfg.json and weights."""
    import sae_lens.loading.pretrained_sae_loaders as loaders
    import sae_lens.loading.pretrained_saes_directory as psd
    import sae_lens.saes.sae as sae_mod
    from sae_lens import SAE

    res, refs, tmp_path = published
    fetched: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        from huggingface_hub.errors import EntryNotFoundError

        fetched.append((repo_id, filename))
        path = res.out_dir / filename
        if not path.exists():
            raise EntryNotFoundError(filename)
        return str(path)

    directory = _registry_from(monkeypatch, res.yaml_path)
    for mod in (psd, sae_mod, loaders):
        monkeypatch.setattr(mod, "get_pretrained_saes_directory", lambda: directory)
    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)

    with pytest.warns(UserWarning, match="registered in the official pretrained SAEs list"):
        by_repo = SAE.from_pretrained("someone/Tiny-SAEs", "mlp1")  # the repo id directly, as the card says
    _assert_same_weights(by_repo, refs["mlp1"])
    by_release = SAE.from_pretrained("tiny-saes", "topk/layer1")
    _assert_same_weights(by_release, refs["topk/layer1"])
    via_load_sae = load_sae("tiny-saes", "blocks.0.hook_resid_post", model=model)
    _assert_same_weights(via_load_sae, refs["blocks.0.hook_resid_post"])
    _assert_splices(model, "blocks.0.hook_resid_post", via_load_sae)
    assert ("someone/Tiny-SAEs", "topk/layer1/cfg.json") in fetched
    with pytest.raises(ValueError, match=r"has no SAE 'mlp2'.*Closest: \['mlp1'\]"):
        load_sae("tiny-saes", "mlp2")


def test_publish_upload_calls_saelens_uploader(model, tmp_path, monkeypatch):
    import huggingface_hub
    import sae_lens

    calls: dict[str, list] = {"create": [], "upload_saes": [], "upload_file": []}

    def fake_upload_saes(saes_dict, hf_repo_id, **kwargs):
        for path in saes_dict.values():  # the folders exist and are SAELens folders when the uploader runs
            assert (Path(path) / "cfg.json").is_file() and (Path(path) / "sae_weights.safetensors").is_file()
        calls["upload_saes"].append((dict(saes_dict), hf_repo_id, kwargs))

    class FakeApi:
        def upload_file(self, **kwargs):
            calls["upload_file"].append(kwargs)

    monkeypatch.setattr(sae_lens, "upload_saes_to_huggingface", fake_upload_saes)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls["create"].append((a, k)))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)

    sae = random_sae(model, HOOK)
    res = publish_saes({"l1": sae}, "someone/one-sae", out_dir=tmp_path / "out", dry_run=False, private=True)
    assert res.uploaded
    assert calls["create"] == [(("someone/one-sae",), {"private": True, "exist_ok": True, "repo_type": "model"})]
    [(saes_dict, repo, kwargs)] = calls["upload_saes"]
    assert repo == "someone/one-sae" and saes_dict == {"l1": tmp_path / "out" / "l1"}
    assert kwargs["add_default_readme"] is False  # our model card replaces SAELens' default one
    [readme] = calls["upload_file"]
    assert readme["path_in_repo"] == "README.md" and readme["repo_id"] == "someone/one-sae"
    assert Path(readme["path_or_fileobj"]) == res.readme_path

    # dry runs never touch the network
    calls["upload_saes"].clear()
    publish_saes({"l1": sae}, "someone/one-sae", out_dir=tmp_path / "dry")
    assert not calls["upload_saes"]


def test_publish_rejects_bad_inputs(model, tmp_path):
    sae = random_sae(model, HOOK)
    with pytest.raises(ValueError, match="owner/name"):
        publish_saes({"a": sae}, "not-a-repo", out_dir=tmp_path)
    with pytest.raises(ValueError, match="Invalid sae_id"):
        publish_saes({"../a": sae}, "o/r", out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"not in saes: \['b'\]"):
        publish_saes({"a": sae}, "o/r", out_dir=tmp_path, task_accuracy={"b": {"acc": 1.0}})
    sae.cfg.metadata.model_name = None
    with pytest.raises(ValueError, match="model_name="):
        publish_saes({"a": sae}, "o/r", out_dir=tmp_path)
    assert publish_saes({"a": sae}, "o/r", out_dir=tmp_path, model_name="gpt2").yaml_block.startswith("r:\n")
    with pytest.raises(ValueError, match="No such SAE folder"):
        publish_saes({"a": tmp_path / "nope"}, "o/r", out_dir=tmp_path)
