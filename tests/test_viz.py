"""Token projection, offline circuitsvis rendering and the HTML report, on a real tiny InfluenceResult."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from repinf_lens import Identity, InfluenceAttributor, MultipleChoiceTask, SplitModel
from repinf_lens.testing import random_sae, tiny_model
from repinf_lens.viz import (
    CircuitsVisHTML,
    StaticHTML,
    TokenAttribution,
    attribution_section,
    build_report,
    circuitsvis_js,
    dominant_latent_heatmap,
    dominant_latents,
    example_browser,
    example_token_attribution,
    image_section,
    latent_switcher,
    normalize_per_sentence,
    query_token_attribution,
    question_section,
    table_section,
    text_section,
    token_heatmap,
    token_strings,
    top_examples_section,
    top_latents_section,
    visualization_section,
)

HOOK = "blocks.0.hook_resid_post"
EXTERNAL = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
CSS_URL = re.compile(r"""url\(\s*["']?\s*(?:https?:)?//""", re.I)


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "sun", "rain", "leaf", "stone", "fire", "ice", "wind", "seed", "moon", "salt"]
    out = []
    for i in range(n):
        pick = torch.randint(0, len(words), (5,), generator=g).tolist()
        out.append(
            {
                "id": f"ex{i}",
                "question": f"Which goes with {words[pick[0]]} and {words[pick[1]]}?",
                "choices": [words[p] for p in pick[2:5]],
                "answer": int(torch.randint(0, 3, (1,), generator=g)),
            }
        )
    return out


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=1)
    sae = random_sae(model, HOOK, d_sae=48, k=6)
    split = SplitModel(model, HOOK, sae)
    exs = _examples(5)
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False)
    res = att.attribute(exs[:2], exs, batch_size=3)
    return split, exs, res


def _no_external(text: str) -> None:
    assert not EXTERNAL.search(text), EXTERNAL.search(text).group(0)
    assert not CSS_URL.search(text)
    assert "unpkg.com" not in text and "cdn.jsdelivr" not in text


# ----------------------------------------------------------------------------- projection


def test_projection_sums_to_the_examples_latent_scores(setup):
    _, _, res = setup
    for q in range(res.n_queries):
        for i in range(res.n_train):
            attr = example_token_attribution(res, q, i)
            assert len(attr) == len(res.train_tokens[i]) == attr.values.numel()
            got = float(attr.values.double().sum())
            want = float(res.latent_scores[q, i].double().sum())
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (q, i, got, want)
            # per latent, the token scores add up to the example's IFR row
            assert torch.allclose(attr.latent_totals(), res.latent_scores[q, i], atol=1e-5)
            assert attr.kind == "train" and attr.label == res.train_ids[i]
            assert attr.total == pytest.approx(float(res.example_scores[q, i]))
    assert any(example_token_attribution(res, 0, i).values.abs().sum() > 0 for i in range(res.n_train))


def test_dominant_latent_is_the_argmax_of_abs_score(setup):
    _, _, res = setup
    attr = example_token_attribution(res, 1, 2)
    dense = attr.scores.to_dense()
    active = (dense != 0).any(1)
    want = dense.abs().argmax(1)
    assert torch.equal(attr.dominant_latent[active], want[active])
    assert (attr.dominant_latent[~active] == -1).all() and (attr.dominant_value[~active] == 0).all()
    assert torch.equal(attr.dominant_value[active], dense[active].gather(1, want[active, None])[:, 0])
    # the sign is kept: some dominant scores are negative in this random model
    assert (attr.dominant_value < 0).any() and (attr.dominant_value > 0).any()
    # sparse and dense inputs agree, ties go to the smallest latent id, empty rows give -1
    m = torch.tensor([[0.0, -2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, -0.7, 0.0]])
    for x in (m, m.to_sparse()):
        ids, vals = dominant_latents(x)
        assert ids.tolist() == [1, -1, 2] and vals.tolist() == pytest.approx([-2.0, 0.0, -0.7])
    ids, _ = dominant_latents(dense.to_sparse())
    assert torch.equal(ids, attr.dominant_latent)


def test_normalisation_is_per_sentence_and_bounded(setup):
    _, _, res = setup
    for i in range(res.n_train):
        attr = example_token_attribution(res, 0, i)
        assert attr.normalized.abs().max() <= 1.0 + 1e-6
        assert attr.scale == pytest.approx(float(attr.values.abs().max()))
        if attr.scale > 0:
            assert float(attr.normalized.abs().max()) == pytest.approx(1.0)
            assert torch.allclose(attr.normalized * attr.scale, attr.values, atol=1e-6)
            assert torch.equal(torch.sign(attr.normalized), torch.sign(attr.values))
        cols = attr.latent_values(attr.top_latents(3), normalize=True)
        assert cols.shape == (len(attr), min(3, int((attr.latent_totals() != 0).sum())))
    zero, s = normalize_per_sentence(torch.zeros(4))
    assert s == 0.0 and torch.equal(zero, torch.zeros(4))
    v = torch.tensor([10.0, -1.0, 0.5, 2.0])
    masked, s = normalize_per_sentence(v, torch.tensor([False, True, True, True]))
    assert s == 2.0 and masked.tolist() == [1.0, -0.5, 0.25, 1.0]  # outside the mask: clipped
    re_attr = example_token_attribution(res, 0, 0).renormalized(torch.arange(len(res.train_tokens[0])) > 0)
    assert re_attr.normalized.abs().max() <= 1.0


def test_query_attribution_equals_independent_autograd(setup):
    split, exs, _ = setup
    model, sae = split.model, split.sae
    query = exs[3]
    attr = query_token_attribution(split, None, query)
    # independent: splice the SAE into the full model with a hook, differentiate the loss w.r.t. leaf latents
    task = split.task
    batch = task.collate([query])
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=HOOK)
        x = cache[HOOK]
        r0 = sae.encode(x)
        err = x - sae.decode(r0)
    r = r0.clone().requires_grad_(True)

    def splice(act, hook):
        return sae.decode(r) + err

    logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(HOOK, splice)])
    loss = task.loss(logits, batch, reduction="sum")
    (g,) = torch.autograd.grad(loss, r)
    want = -(r0 * g).sum(-1)[0]
    assert torch.allclose(attr.values, want, rtol=1e-4, atol=1e-6), (attr.values - want).abs().max()
    dense = attr.scores.to_dense()
    assert torch.allclose(dense, -(r0 * g)[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(attr.dominant_latent, (-(r0 * g)[0]).abs().argmax(-1))  # every token has active latents
    assert attr.kind == "query" and attr.total == pytest.approx(float(loss.detach()), rel=1e-5)
    assert attr.meta["answer"] == query["answer"] and attr.meta["prediction"] in range(3)
    assert attr.tokens == token_strings(batch.tokens[0], task.tokenizer)
    # another task (plain template) is honoured
    plain = MultipleChoiceTask(model.tokenizer, template="plain")
    other = query_token_attribution(split, plain, query)
    assert other.token_ids == plain.collate([query]).tokens[0].tolist() and other.token_ids != attr.token_ids


def test_token_strings_show_whitespace(setup):
    split, _, _ = setup
    tok = split.task.tokenizer
    ids = tok.encode("ab\ncd\tx A", add_special_tokens=False)
    strs = token_strings(ids, tok)
    assert "".join(strs) == "ab\u21b5\ncd\u21e5x A" and " A" in strs
    assert token_strings(ids, tok, show_whitespace=False) == [tok.decode([i]) for i in ids]
    assert token_strings([5, 6]) == ["5", "6"]


# ----------------------------------------------------------------------------- rendering


def test_rendered_files_are_self_contained(setup, tmp_path):
    _, _, res = setup
    attr = example_token_attribution(res, 0, 1)
    js = circuitsvis_js()
    assert "var CircuitsVis=" in js and len(js) > 100_000 and "sourceMappingURL" not in js
    assert "</script" not in js.lower()
    vizs = {
        "heat": token_heatmap(attr),
        "raw": token_heatmap(["Earth", " rotating", "<b>", "</script><script>alert(1)</script>"], [1.0, -0.5, 0.2, 0]),
        "switch": latent_switcher(attr, latents=attr.top_latents(4)),
        "switch_raw": latent_switcher(["a", "b"], torch.tensor([[1.0, 0.0], [0.0, -1.0]]), ["latent 3", "latent 9"]),
        "browser": example_browser([example_token_attribution(res, 0, i) for i in range(3)], k=4),
        "browser_raw": example_browser([["x", "y"], ["z"]], [torch.ones(2, 3), torch.zeros(1, 3)], ["l0", "l1", "l2"]),
    }
    for name, viz in vizs.items():
        assert isinstance(viz, CircuitsVisHTML)
        path = viz.save(tmp_path / f"{name}.html")
        text = path.read_text(encoding="utf-8")
        _no_external(text)
        assert text.count("var CircuitsVis=") == 1 and js in text
        assert "Content-Security-Policy" in text and f"CircuitsVis.{viz.component}" in text
        props = json.loads(re.search(r"CircuitsVis\.\w+, (\{.*\})\);", text).group(1))
        tokens = props["tokens"]
        flat = [t for seq in tokens for t in seq] if isinstance(tokens[0], list) else tokens
        for t in flat:
            assert json.dumps(t, ensure_ascii=False)[1:-1].replace("&", "\\u0026") in text
        inline = viz._repr_html_()
        assert '<script type="module">' in inline and js in inline and "google.com" not in inline
        _no_external(inline)
    raw = (tmp_path / "raw.html").read_text()
    assert "</script><script>alert" not in raw and "&amp;lt;b&amp;gt;" not in raw  # escaped once, not twice
    props = json.loads(re.search(r"CircuitsVis\.ColoredTokens, (\{.*\})\);", raw).group(1))
    assert props["tokens"][:3] == ["Earth", " rotating", "&lt;b&gt;"] and props["minValue"] == -1.0
    heat = json.loads(
        re.search(r"CircuitsVis\.ColoredTokens, (\{.*\})\);", (tmp_path / "heat.html").read_text()).group(1)
    )
    assert heat["values"] == pytest.approx(attr.normalized.tolist()) and heat["maxValue"] == 1.0
    browser = json.loads(
        re.search(r"TextNeuronActivations, (\{.*\})\);", (tmp_path / "browser.html").read_text()).group(1)
    )
    assert len(browser["activations"]) == 3 and len(browser["activations"][0][0][0]) == len(
        browser["secondDimensionLabels"]
    )
    with pytest.raises(ValueError, match="one value per token"):
        token_heatmap(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="n_tokens=2"):
        latent_switcher(["a", "b"], torch.ones(3, 2))


def test_dominant_latent_heatmap_is_static_and_escaped(setup, tmp_path):
    _, _, res = setup
    attr = example_token_attribution(res, 1, 0)
    viz = dominant_latent_heatmap(attr, max_latents=3)
    assert isinstance(viz, StaticHTML)
    text = viz.save(tmp_path / "dom.html").read_text()
    _no_external(text)
    assert "CircuitsVis" not in text and text.count('<span class="rl-tok') == len(attr)
    assert "&lt;|im_start|&gt;" in text and "<|im_start|>" not in text
    keys = re.findall(r'class="rl-key" data-latent="(\d+)"', text)
    assert 1 <= len(keys) <= 3 and int(keys[0]) in attr.dominant_latent.tolist()
    fake = TokenAttribution(
        tokens=["<x>", "y"],
        token_ids=[0, 1],
        values=torch.tensor([0.5, -1.0]),
        normalized=torch.tensor([0.5, -1.0]),
        scale=1.0,
        dominant_latent=torch.tensor([4, 7]),
        dominant_value=torch.tensor([0.4, -0.9]),
        scores=torch.zeros(2, 8).to_sparse(),
    )
    frag = dominant_latent_heatmap(fake)._repr_html_()
    assert 'class="rl-tok neg" data-latent="7"' in frag and "&lt;x&gt;" in frag and "body {" not in frag


# ----------------------------------------------------------------------------- report


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([25, 50, 100], [0.4, 0.6, 0.9], marker="o")
    ax.set_title("necessity")
    return fig


def test_report_is_one_self_contained_file(setup, tmp_path):
    split, exs, res = setup
    fig = _figure()
    png = tmp_path / "sweep.png"
    fig.savefig(png)
    q_attr = query_token_attribution(split, None, exs[0])
    sections = [
        question_section(exs[0], prediction_before=2, prediction_after="B", extra={"loss": 0.35}),
        attribution_section("Test input <heatmap>", q_attr),
        top_examples_section(res, 0, k=3, train_rows=exs),
        top_examples_section(res, 0, k=2, opponents=True, heatmaps=False),
        top_latents_section(res, 0, k=5, labels={0: "a <latent>"}),
        image_section("Necessity ablation", fig, caption="flip rate vs k"),
        image_section("Layer sweep", png),
        table_section("Orthogonality", [{"space": "SAE latents", "near-orthogonal": 0.98}, {"space": "text", "x": 1}]),
        table_section("Timings", [{"stage": "s_test", "seconds": 1.25}]),
        text_section("Notes", "First paragraph & more.\n\nSecond <para>."),
    ]
    path = build_report(tmp_path / "out" / "report.html", title="Why B? <test>", sections=sections, subtitle="tiny")
    text = path.read_text(encoding="utf-8")
    _no_external(text)
    for sec in sections:
        assert f"<h2>{sec.title.replace('<', '&lt;').replace('>', '&gt;')}</h2>" in text, sec.title
    assert "<title>Why B? &lt;test&gt;</title>" in text and "<latent>" not in text
    assert text.count("var CircuitsVis=") == 1  # the bundle is inlined once for every visualisation
    n_calls = len(re.findall(r"CircuitsVis\.render\(", text))
    assert n_calls == text.count('class="rl-cv"') >= 1 + 3  # query + 3 top examples heatmaps (+ switchers)
    uris = re.findall(r'<img class="rl-fig" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 2 and all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    for i in res.top_examples(0, 3)["index"]:
        assert f"#{list(res.top_examples(0, 3)['index']).index(i) + 1} {res.train_ids[i]}" in text
    assert "SAE latents" in text and "1.25" in text and "First paragraph &amp; more." in text
    # no circuitsvis section -> no bundle at all
    small = build_report(tmp_path / "small.html", title="t", sections=[table_section("T", [{"a": 1}])])
    assert "CircuitsVis" not in small.read_text()


# ----------------------------------------------------------------------------- real browser (optional)


def test_headless_chromium_renders_offline(setup, tmp_path, dump_dom):  # dump_dom (conftest) skips without chromium
    split, exs, res = setup
    heat = token_heatmap(["Earth", " rotating", "<b>", " sky"], [1.0, -0.5, 0.2, 0.0]).save(tmp_path / "heat.html")
    dom = dump_dom(heat)
    div = re.search(r'<div id="repinf-[^"]+" class="rl-cv"[^>]*>(.*?)</div>\s*<script', dom, re.S)
    assert div, dom[-3000:]
    rendered = div.group(1)
    assert 'class="colored-tokens"' in rendered
    assert ">Earth</span>" in rendered and ">&nbsp;rotating</span>" in rendered and ">&nbsp;sky</span>" in rendered
    assert ">&lt;b&gt;</span>" in rendered and "<b>" not in rendered  # shown as text, not parsed
    attr = example_token_attribution(res, 0, 0)
    sections = [attribution_section("Example", attr), top_latents_section(res, 0, k=3)]
    browser = example_browser([example_token_attribution(res, 0, i) for i in range(2)], k=3)
    sections.append(visualization_section("Browser", browser))
    report = build_report(tmp_path / "report.html", title="r", sections=sections)
    dom = dump_dom(report)
    assert dom.count('class="colored-tokens"') >= 3  # heatmap, switcher and the browser's examples rendered
    assert 'id="neuron-selector"' in dom and "latent " in dom
    assert 'class="rl-tok' in dom
