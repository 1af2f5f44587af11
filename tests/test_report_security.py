"""Report page policy: dataset text is escaped, only the page's own scripts run (CSP hashes), writes are atomic."""

from __future__ import annotations

import base64
import errno
import hashlib
import html
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from repinf_lens import Identity, InfluenceAttributor, SplitModel
from repinf_lens._shards import write_text_atomic
from repinf_lens.testing import random_sae, tiny_model
from repinf_lens.viz import (
    attribution_section,
    build_report,
    dominant_latent_heatmap,
    example_browser,
    example_token_attribution,
    query_token_attribution,
    question_section,
    table_section,
    text_section,
    token_heatmap,
    top_examples_section,
    top_latents_section,
    visualization_section,
)
from repinf_lens.viz.render import page

HOOK = "blocks.0.hook_resid_post"

#: The first three are the classic payloads; the others would leave a mark in the DOM if they ever ran.
PAYLOADS = (
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "</script><script>window.__pwned=1</script>",
    "<img src=x onerror=\"document.body.id='pwned'\">",
    "</script><script>document.title='pwned'</script>",
    "<svg onload=\"document.body.id='pwned'\"></svg>",
)


def _train_rows() -> list[dict]:
    rows = [
        {
            "id": f"ex{i}",
            "question": f"Which fits {payload} best?",
            "choices": ["sun", "rain", PAYLOADS[(i + 1) % len(PAYLOADS)]],
            "answer": i % 3,
        }
        for i, payload in enumerate(PAYLOADS)
    ]
    rows[4]["id"] = PAYLOADS[4]  # ids reach table cells and headings too
    return rows


QUERY = {
    "id": PAYLOADS[3],
    "question": f"Which is it? {PAYLOADS[0]} {PAYLOADS[2]}",
    "choices": [PAYLOADS[1], "leaf", PAYLOADS[5]],
    "answer": 0,
}


TITLE = f"Why? {PAYLOADS[4]}"


@pytest.fixture(scope="module")
def report_inputs():
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=512, seed=3)  # byte-level: long prompts
    sae = random_sae(model, HOOK, d_sae=48, k=6)
    split = SplitModel(model, HOOK, sae)
    train = _train_rows()
    att = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False)
    res = att.attribute([QUERY], train, batch_size=3)
    return split, train, res


def _sections(split, train, res) -> list:
    attrs = [example_token_attribution(res, 0, i) for i in range(3)]
    return [
        question_section(QUERY, prediction_before=0, prediction_after=PAYLOADS[1], extra={PAYLOADS[0]: PAYLOADS[5]}),
        attribution_section(f"Test input {PAYLOADS[2]}", query_token_attribution(split, None, QUERY)),
        top_examples_section(res, 0, k=3, train_rows=train, switcher=True),
        top_latents_section(res, 0, k=4, labels={j: PAYLOADS[j % len(PAYLOADS)] for j in range(48)}),
        visualization_section("Browser", example_browser(attrs, k=3, latent_labels=list(PAYLOADS[:3]))),
        table_section("Rows", [{"text": p, PAYLOADS[1]: p} for p in PAYLOADS]),
        text_section("Notes", "\n\n".join(PAYLOADS)),
    ]


@pytest.fixture(scope="module")
def report(report_inputs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    return build_report(path, title=TITLE, sections=_sections(*report_inputs), subtitle=PAYLOADS[0])


class _Page(HTMLParser):
    """Collects the CSP, every inline script's text, and the tags/attributes the parser sees."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.csp: list[str] = []
        self.scripts: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp.append(attrs["content"] or "")
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _parse(text: str) -> _Page:
    parser = _Page()
    parser.feed(text)
    parser.close()
    return parser


def _directives(csp: str) -> dict[str, list[str]]:
    out = {}
    for part in csp.split(";"):
        if part.strip():
            name, *sources = part.split()
            out[name.lower()] = sources
    return out


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _check_policy(text: str) -> _Page:
    doc = _parse(text)
    assert len(doc.csp) == 1, doc.csp
    policy = _directives(doc.csp[0])
    assert policy["default-src"] == ["'none'"] and policy["connect-src"] == ["'none'"]
    assert policy["img-src"] == ["data:"] and policy.get("font-src", ["data:"]) == ["data:"]
    script_src = policy["script-src"]
    for bad in ("'unsafe-inline'", "'unsafe-eval'", "'unsafe-hashes'", "'strict-dynamic'", "*", "data:", "blob:"):
        assert bad not in script_src, (bad, script_src)
    assert all(s.startswith("'sha256-") for s in script_src) or script_src == ["'none'"], script_src
    # exactly the page's own inline scripts are allowed: each one's hash is listed, and nothing else
    assert sorted(set(script_src) - {"'none'"}) == sorted({_sha256_source(s) for s in doc.scripts})
    for tag, attrs in doc.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)  # no inline handlers: they would not run
        assert not (tag == "script" and "src" in attrs), attrs
        assert tag not in ("img", "svg", "iframe", "object", "embed") or str(attrs.get("src", "")).startswith("data:")
    return doc


def test_report_escapes_dataset_text_and_allows_only_its_own_scripts(report):
    text = report.read_text(encoding="utf-8")
    for payload in PAYLOADS:
        assert payload not in text, payload  # nowhere unescaped, not even inside the inline scripts
        assert html.escape(payload) in text, payload  # but shown, as text
    assert "&amp;lt;" not in text  # escaped once, not twice
    doc = _check_policy(text)
    assert len(doc.scripts) == 2 and "var CircuitsVis=" in doc.scripts[0]  # the bundle, then the render calls
    assert all("</script" not in s.lower() for s in doc.scripts)
    assert "'unsafe-eval'" not in doc.csp[0]  # not in any directive


def test_saved_visualisations_follow_the_same_policy(report_inputs, tmp_path):
    _, _, res = report_inputs
    attr = example_token_attribution(res, 0, 4)
    for name, viz in {
        "heat": token_heatmap(list(PAYLOADS), [1.0, -1.0, 0.5, 0.0, 0.2, -0.3]),
        "dominant": dominant_latent_heatmap(attr, latent_labels={j: PAYLOADS[0] for j in range(48)}),
    }.items():
        text = viz.save(tmp_path / f"{name}.html").read_text(encoding="utf-8")
        assert not any(p in text for p in PAYLOADS)
        assert len(_check_policy(text).scripts) == (2 if name == "heat" else 1)
    no_scripts = _check_policy(
        build_report(tmp_path / "t.html", title="t", sections=[text_section("T", "x")]).read_text()
    )
    assert no_scripts.scripts == [] and _directives(no_scripts.csp[0])["script-src"] == ["'none'"]


def test_page_hashes_the_script_text_the_browser_sees():
    doc = _check_policy(page("t", "<p>x</p>", scripts=["var a = 1;\r\nvar b = 2;\rvar c = 3;"]))
    assert doc.scripts == ["\nvar a = 1;\nvar b = 2;\nvar c = 3;\n"]  # line breaks as the HTML parser gives them
    with pytest.raises(ValueError, match="Fix:"):
        page("t", "", scripts=["var s = '</SCRIPT>';"])


def test_report_renders_in_chromium_and_no_payload_runs(report, dump_dom):  # dump_dom (conftest) skips without it
    dom, console = dump_dom(report, console=True)
    # the page's own scripts ran: every circuitsvis container was filled in
    starts = re.findall(r'<div id="rl-viz-\d+" class="rl-cv"[^>]*>(.{0,12})', dom, re.S)
    assert len(starts) == len(re.findall(r'id="rl-viz-\d+"', report.read_text())) >= 5, dom[-3000:]
    empty = [s for s in starts if s.startswith("</div>")]
    assert not empty, f"{len(empty)} of {len(starts)} circuitsvis containers stayed empty (CSP blocked the bundle?)"
    assert dom.count('class="colored-tokens"') >= 5 and 'id="neuron-selector"' in dom
    # no payload ran, none became an element: they are text
    assert f"<title>{html.escape(TITLE, quote=False)}</title>" in dom  # no payload set document.title
    assert not re.search(r"<body[^>]*\bid=\"pwned\"", dom) and 'id="pwned"' not in dom
    assert not re.search(r"<img [^>]*src=\"x\"|<svg [^>]*onload", dom, re.I)
    assert html.escape(PAYLOADS[0], quote=False) in dom and html.escape(PAYLOADS[3], quote=False) in dom
    assert _parse(dom).scripts == _parse(report.read_text(encoding="utf-8")).scripts  # no script was added
    # and the policy had nothing to block: no script of the page, no payload's image or handler
    logged = [line for line in console.splitlines() if ":CONSOLE" in line]
    assert not [m for m in logged if "Content Security Policy" in m or "Uncaught" in m], logged  # nothing blocked


# ----------------------------------------------------------------------------- atomic writes


def _full_disk(monkeypatch) -> dict:
    """Make every write through ``write_text_atomic`` fail with ENOSPC after writing half of its text."""
    seen: dict = {}
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        real_write = fh.write

        def write(text):
            real_write(text[: len(text) // 2])
            fh.flush()
            seen["partial_bytes"] = os.fstat(fh.fileno()).st_size
            raise OSError(errno.ENOSPC, "No space left on device")

        fh.write = write
        return fh

    monkeypatch.setattr("repinf_lens._shards.os.fdopen", fdopen)
    return seen


@pytest.mark.parametrize("writer", ["build_report", "CircuitsVisHTML.save", "StaticHTML.save"])
def test_a_failed_write_keeps_the_old_report(report_inputs, tmp_path, monkeypatch, writer):
    _, _, res = report_inputs
    attr = example_token_attribution(res, 0, 0)
    out = tmp_path / "out" / "report.html"
    writers = {
        "build_report": lambda: build_report(out, title="new", sections=[attribution_section("A", attr)]),
        "CircuitsVisHTML.save": lambda: token_heatmap(attr).save(out),
        "StaticHTML.save": lambda: dominant_latent_heatmap(attr).save(out),
    }
    writers[writer]()
    good = out.read_bytes()
    assert good.startswith(b"<!DOCTYPE html>") and good.endswith(b"</html>\n")
    seen = _full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        writers[writer]()
    assert info.value.errno == errno.ENOSPC
    assert seen["partial_bytes"] > 0  # it did fail part-way, with some of the new page on disk
    assert out.read_bytes() == good
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary file left behind


def test_write_text_atomic_writes_exact_text_with_usual_permissions(tmp_path):
    path = tmp_path / "a" / "b.txt"
    write_text_atomic(path, "x\ny\r\n\u00e9")
    assert path.read_bytes() == "x\ny\r\n\u00e9".encode()  # no newline translation
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]
