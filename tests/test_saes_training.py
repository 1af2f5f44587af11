"""SAE activations, SAELens training, the layer sweep and their CLI subcommands, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from repinf_lens.saes import (
    ActivationStore,
    SAETrainingConfig,
    collect_activations,
    layer_sweep,
    middle_layers,
    sae_stats,
    spliced_accuracy,
    train_sae,
)
from repinf_lens.split import HookNameError
from repinf_lens.task import MultipleChoiceTask
from repinf_lens.testing import random_sae, tiny_model, toy_mcqa_rows

FAST = SAETrainingConfig(d_sae=32, k=4, batch_size_tokens=64, epochs=2, lr=3e-3)


def _rows(n: int, seed: int = 0) -> list[dict]:
    return toy_mcqa_rows(n, seed)


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=4, d_model=32, n_heads=4, d_mlp=64, seed=2)


@pytest.fixture(scope="module")
def task(model):
    return MultipleChoiceTask.from_model(model, template="plain")


def test_middle_layers_is_the_papers_middle_half():
    assert middle_layers(30) == list(range(8, 23))
    assert middle_layers(30, 3) == [8, 15, 22]
    assert middle_layers(4) == [1, 2, 3]
    assert middle_layers(16, 1) == [8]


def test_collect_activations_keeps_exactly_the_real_tokens(model, task):
    rows = _rows(5)
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.1.attn.hook_z"]
    store = collect_activations(model, task, rows, hooks, batch_size=2, progress=False)
    lengths = [len(task.encode(r)) for r in rows]
    bos = model.tokenizer.bos_token_id
    n_bos = sum(task.encode(r)[0] == bos for r in rows)
    assert store.n_tokens == sum(lengths) - n_bos
    assert store.acts["blocks.1.attn.hook_z"].shape == (store.n_tokens, 32)  # heads flattened
    for i, r in enumerate(rows):  # each row equals a single-example forward pass at that position
        tokens = torch.tensor([task.encode(r)])
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        sel = store.example_index == i
        pos = store.position[sel]
        for h in hooks:
            ref = cache[h][0].reshape(tokens.shape[1], -1)[pos]
            torch.testing.assert_close(store.acts[h][sel], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(store.token_ids[sel], tokens[0, pos])


def test_collect_activations_errors_and_roundtrip(model, task, tmp_path):
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        collect_activations(model, task, _rows(2), "blocks.0.hook_resid_pots", progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect_activations(model, task, [], "blocks.0.hook_resid_post", progress=False)
    store = collect_activations(model, task, _rows(3), "blocks.0.hook_resid_post", progress=False)
    back = ActivationStore.load(store.save(tmp_path))
    assert torch.equal(back.acts["blocks.0.hook_resid_post"], store.acts["blocks.0.hook_resid_post"])
    assert torch.equal(back.position, store.position) and back.meta == store.meta


def test_sae_stats_equal_an_independent_computation(model):
    sae = random_sae(model, "blocks.1.hook_resid_post", d_sae=16, k=3)
    x = torch.randn(50, 32)
    s = sae_stats(sae, x, batch_size=7)
    z = sae.encode(x)
    x_hat = sae.decode(z)
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert s["l0"] == pytest.approx(float((z != 0).float().sum(1).mean()))
    assert s["explained_variance"] == pytest.approx(float(ev), rel=1e-5)
    assert s["dead_latents"] == int(((z != 0).sum(0) == 0).sum())


def test_train_sae_writes_a_plain_saelens_sae_and_reuses_it(model, task, tmp_path, monkeypatch):
    from sae_lens import SAE

    hook = "blocks.1.hook_resid_post"
    store = collect_activations(model, task, _rows(40), hook, progress=False)
    res = train_sae(store, hook, out_dir=tmp_path / "sae", config=FAST, metadata={"dataset": "toy"}, progress=False)
    assert not res.reused
    plain = SAE.load_from_disk(str(tmp_path / "sae"))  # SAELens alone reads it
    assert plain.cfg.metadata.hook_name == hook and plain.cfg.metadata.dataset == "toy"
    assert plain.cfg.d_sae == 32 and plain.cfg.k == 4 and plain.cfg.architecture() == "topk"
    for name, p in plain.state_dict().items():
        assert torch.equal(p, res.sae.state_dict()[name])
    record = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert record["stats"]["l0"] <= 4 + 1e-9 and record["stats"]["steps"] > 0
    # training improved the reconstruction over the untrained SAE on held-out tokens
    untrained = random_sae(model, hook, d_sae=32, k=4)
    held = store.acts[hook][store.example_index >= 38]
    assert res.stats["explained_variance"] > sae_stats(untrained, held)["explained_variance"]

    import sae_lens

    monkeypatch.setattr(sae_lens.SAETrainer, "fit", lambda self: pytest.fail("retrained a finished SAE"))
    again = train_sae(store, hook, out_dir=tmp_path / "sae", config=FAST, progress=False)
    assert again.reused and again.stats == res.stats


def test_train_sae_any_architecture_and_errors(model, task, tmp_path):
    hook = "blocks.1.hook_resid_post"
    store = collect_activations(model, task, _rows(30), hook, progress=False)
    std = train_sae(
        store,
        hook,
        out_dir=tmp_path / "std",
        config=FAST,
        architecture="standard",
        k=None,
        extra={"l1_coefficient": 1.0},
        progress=False,
    )
    assert std.sae.cfg.architecture() == "standard"
    with pytest.raises(ValueError, match="topk"):
        train_sae(store, hook, out_dir=tmp_path / "x", config=FAST, architecture="nonsense")
    with pytest.raises(TypeError, match="Unknown SAE training option"):
        train_sae(store, hook, out_dir=tmp_path / "x", config=FAST, width=3)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        train_sae(store, "blocks.0.hook_resid_post", out_dir=tmp_path / "x", config=FAST)
    with pytest.raises(ValueError, match="batch_size_tokens"):
        train_sae(store, hook, out_dir=tmp_path / "x", config=FAST, batch_size_tokens=10**6)


def test_spliced_accuracy_fast_path_equals_hooked_forward(model, task):
    rows = _rows(12)
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(model, hook, d_sae=16, k=3)
    res = spliced_accuracy(model, task, rows, {"s": (hook, sae)}, batch_size=5, progress=False)
    batch = task.collate(rows)

    def replace(act, hook):
        return sae.decode(sae.encode(act))

    with model.hooks(fwd_hooks=[(hook, replace)]):
        logits = task.model_logits(model, batch)
    acc = float((task.predictions(logits, batch) == batch.labels).float().mean())
    base = float((task.predictions(task.model_logits(model, batch), batch) == batch.labels).float().mean())
    assert res["s"]["accuracy_no_error"] == pytest.approx(acc)
    assert res["base"]["accuracy"] == pytest.approx(base)
    assert res["s"]["accuracy_with_error"] == pytest.approx(base)
    assert res["s"]["max_abs_logit_diff_with_error"] < 1e-4
    # a non-residual hook takes the hooked path and agrees the same way
    mlp = "blocks.1.hook_mlp_out"
    res2 = spliced_accuracy(model, task, rows, {"m": (mlp, random_sae(model, mlp, 16, 3))}, progress=False)
    assert res2["m"]["accuracy_with_error"] == pytest.approx(base)


def test_layer_sweep_table_selection_and_resume(model, task, tmp_path, monkeypatch):
    rows = _rows(40)
    kwargs = dict(
        out_dir=tmp_path / "sweep",
        layers=[0, 1, 2],
        sizes=[(32, 4), (16, 2)],
        sae_config=FAST,
        max_train_examples=30,
        max_eval_examples=10,
        progress=False,
    )
    res = layer_sweep(model, task, rows, rows[30:], **kwargs)
    assert len(res.table) == 6
    assert {(r["layer"], r["d_sae"], r["k"]) for r in res.table} == {
        (a, d, k) for a in (0, 1, 2) for d, k in [(32, 4), (16, 2)]
    }
    assert all(r["accuracy_change_with_error"] == 0 for r in res.table)
    assert [r["in_middle_half"] for r in res.table] == [False, False, True, True, True, True]
    assert res.selected["in_middle_half"]
    best_mid = max(r["accuracy_no_error"] for r in res.table if r["in_middle_half"])
    assert res.selected["accuracy_no_error"] == best_mid
    assert res.best_overall["accuracy_no_error"] == max(r["accuracy_no_error"] for r in res.table)
    for f in ("csv", "json", "plot"):
        assert res.files[f].exists()
    assert len((tmp_path / "sweep" / "points.jsonl").read_text().splitlines()) == 6

    import repinf_lens.saes.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "train_sae", lambda *a, **k: pytest.fail("recomputed a finished point"))
    again = layer_sweep(model, task, rows, rows[30:], **kwargs)
    assert again.table == res.table
    with pytest.raises(ValueError, match="other data"):
        layer_sweep(model, task, rows, rows[31:], **kwargs)
    with pytest.raises(ValueError, match="out of range"):
        layer_sweep(model, task, rows, rows, **{**kwargs, "out_dir": tmp_path / "o", "layers": [7]})


def test_layer_sweep_resumes_after_a_crash_between_layers(model, task, tmp_path, monkeypatch):
    rows = _rows(40)
    kwargs = dict(
        out_dir=tmp_path / "sweep",
        layers=[1, 2],
        sizes=[(16, 2)],
        sae_config=FAST,
        max_train_examples=30,
        max_eval_examples=10,
        progress=False,
    )
    import repinf_lens.saes.sweep as sweep_mod

    real = sweep_mod.spliced_accuracy
    calls = []

    def crash_on_second_layer(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "spliced_accuracy", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        layer_sweep(model, task, rows, rows[30:], **kwargs)
    assert len((tmp_path / "sweep" / "points.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(sweep_mod, "spliced_accuracy", real)
    trained = []
    real_train = sweep_mod.train_sae

    def counting_train(*a, **k):
        out = real_train(*a, **k)
        trained.append(out.reused)
        return out

    monkeypatch.setattr(sweep_mod, "train_sae", counting_train)
    res = layer_sweep(model, task, rows, rows[30:], **kwargs)
    assert len(res.table) == 2 and trained == [True]  # layer 2's SAE was finished before the crash: reused


def _json_out(text: str):
    """The JSON document a subcommand printed (after any loading messages)."""
    import re

    return json.loads(text[re.search(r"^[\[{]", text, re.M).start() :])


def test_cli_train_sae_and_sweep(tmp_path, monkeypatch, capsys):
    from repinf_lens.cli import main
    from repinf_lens.testing import tiny_hf_llama

    folder = tmp_path / "tiny"
    tiny_hf_llama(folder, initializer_range=0.2)
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: _rows(limit or 40))
    common = [
        "--model",
        str(folder),
        "--template",
        "plain",
        "--no-progress",
        "--epochs",
        "2",
        "--batch-size-tokens",
        "64",
    ]
    out = tmp_path / "sae"
    assert main(["train-sae", *common, "--hook", "blocks.1.hook_resid_post", "--d-sae", "16", "--k", "2",
                 "--train-limit", "30", "--out", str(out)]) == 0  # fmt: skip
    printed = _json_out(capsys.readouterr().out)
    assert printed["path"] == str(out) and (out / "cfg.json").exists() and printed["l0"] <= 2
    assert main(["sweep", *common, "--layers", "0", "1", "--sizes", "16x2", "--train-limit", "30",
                 "--eval-limit", "8", "--out", str(tmp_path / "sw")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "selected: L1_d16_k2" in text and (tmp_path / "sw" / "sweep.csv").exists()
    assert main(["sweep", *common, "--sizes", "16by2", "--out", str(tmp_path / "bad")]) == 2
    assert main(["orthogonality", *common[:4], "--sae", str(out), "--limit", "6", "--no-progress"]) == 0
    table = _json_out(capsys.readouterr().out)
    assert [r["space"] for r in table] == ["token_embeddings", "pre_sae_activations", "sae_latents"]
