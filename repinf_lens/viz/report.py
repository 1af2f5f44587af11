"""One self-contained HTML report of an attribution: question, predictions, top examples with heatmaps, top
latents, figures and tables.

Framework-free: plain f-strings with ``html.escape``. The page inlines its CSS, the circuitsvis bundle ONCE (only
when a section holds a circuitsvis visualisation) and matplotlib figures as base64 PNG data URIs; a
Content-Security-Policy forbids any network access, so the file works offline and can be e-mailed or archived.

Usage::

    from repinf_lens.viz import report as R
    R.build_report("report.html", title="Why B?", sections=[
        R.question_section(query, prediction_before="A", prediction_after="B"),
        R.attribution_section("Test input", query_token_attribution(split, None, query)),
        R.top_examples_section(result, q=0, k=5, train_rows=train),
        R.top_latents_section(result, q=0, k=10),
        R.image_section("Necessity", fig),
        R.table_section("Timings", [{"stage": "s_test", "seconds": 1.2}]),
    ])
"""

from __future__ import annotations

import base64
import html
import io
import mimetypes
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repinf_lens._io import write_text_atomic
from repinf_lens.viz.render import (
    CircuitsVisHTML,
    StaticHTML,
    circuitsvis_js,
    dominant_latent_heatmap,
    latent_switcher,
    page,
    token_heatmap,
)
from repinf_lens.viz.tokens import TokenAttribution, example_token_attribution

if TYPE_CHECKING:
    from repinf_lens.influence.result import InfluenceResult

__all__ = [
    "Section",
    "attribution_section",
    "build_report",
    "html_section",
    "html_table",
    "image_data_uri",
    "image_section",
    "question_section",
    "table_section",
    "text_section",
    "top_examples_section",
    "top_latents_section",
    "visualization_section",
]

Part = str | CircuitsVisHTML | StaticHTML


@dataclass
class Section:
    """One titled section of a report.

    Attributes:
        title: the heading (also the table-of-contents entry).
        parts: HTML strings, :class:`CircuitsVisHTML` (rendered by the bundle inlined once per page) and
            :class:`StaticHTML` fragments, in order.
    """

    title: str
    parts: list[Part] = field(default_factory=list)

    def add(self, *parts: Part) -> Section:
        """Append parts and return the section."""
        self.parts.extend(parts)
        return self


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, float):
        return f"{v:.4g}"
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _fmt(v.item())
    return html.escape(str(v))


def _is_num(v: Any) -> bool:
    return (
        isinstance(v, (int, float)) and not isinstance(v, bool) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0)
    )


def html_table(rows: Any, *, columns: Sequence[str] | None = None, raw_html_columns: Iterable[str] = ()) -> str:
    """An HTML table from a list of dicts (or a pandas DataFrame); numbers right-aligned, 4 significant digits.

    Args:
        rows: a list of mappings (missing keys give empty cells) or a ``pandas.DataFrame``.
        columns: column order (default: keys in order of first appearance).
        raw_html_columns: columns whose values are inserted as HTML (not escaped).

    Returns:
        The ``<table>`` HTML.
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        rows = rows.to_dict(orient="records")
    rows = [dict(r) for r in rows]
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(str(k), None)
        columns = list(seen)
    raw = set(raw_html_columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if c in raw:
                cells.append(f"<td>{v}</td>")
            else:
                cells.append(f'<td class="num">{_fmt(v)}</td>' if _is_num(v) else f"<td>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="rl"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _caption(caption: str | None) -> str:
    return f'<p class="rl-caption">{html.escape(caption)}</p>' if caption else ""


def text_section(title: str, text: str) -> Section:
    """A section of plain text (escaped; blank lines separate paragraphs)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return Section(title, ["".join(f"<p>{html.escape(p)}</p>" for p in paras)])


def html_section(title: str, fragment: str) -> Section:
    """A section holding an HTML fragment as is (trusted input; inline event handlers such as ``onclick=`` do not
    run under the page's CSP, and neither do ``<script>`` elements inside it)."""
    return Section(title, [fragment])


def question_section(
    query: Mapping[str, Any],
    *,
    title: str = "Test question",
    letters: str = "ABCDEFGHIJ",
    prediction_before: Any = None,
    prediction_after: Any = None,
    extra: Mapping[str, Any] | None = None,
    prompt_field: str = "prompt",
    target_field: str = "target",
) -> Section:
    """The test question, its options, the key and the model's prediction before / after finetuning.

    Args:
        query: ``{question, choices, answer, id?}`` (multiple choice), or a completion row
            ``{prompt, target, id?}`` (no ``question``: its prompt and target text are shown; predictions, if
            given, as they are, e.g. ``"correct"`` / a greedy decoding).
        title: the heading.
        letters: option letters.
        prediction_before: the base model's prediction (option index or letter), if known.
        prediction_after: the finetuned model's prediction (option index or letter), if known.
        extra: more ``label -> value`` rows for the summary table (e.g. loss, correct-option probability).
        prompt_field: the prompt field of a completion row (``CompletionTask.prompt_field``).
        target_field: the target field of a completion row (``CompletionTask.target_field``).

    Returns:
        A :class:`Section`.
    """

    def letter(p: Any) -> str:
        if p is None:
            return "-"
        if isinstance(p, int) or (hasattr(p, "item") and not isinstance(p, str)):
            i = int(p)
            return f"{letters[i]}" if 0 <= i < len(letters) else str(i)
        return str(p)

    if "question" not in query and prompt_field in query:  # a completion row: prompt -> target text
        target = str(query.get(target_field, ""))
        rows = [
            {"": "id", "value": str(query.get("id", "-"))},
            {"": "target", "value": target},
            {"": "prediction before", "value": "-" if prediction_before is None else str(prediction_before)},
            {"": "prediction after", "value": "-" if prediction_after is None else str(prediction_after)},
        ]
        rows += [{"": str(k), "value": v} for k, v in (extra or {}).items()]
        prompt = html.escape(str(query[prompt_field]))
        body = f'<pre class="rl-q">{prompt}<b>{html.escape(target)}</b></pre>'
        return Section(title, [body, html_table(rows)])
    choices = list(query.get("choices", []))
    opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    answer = query.get("answer")
    rows = [
        {"": "id", "value": str(query.get("id", "-"))},
        {"": "correct answer", "value": letter(answer)},
        {"": "prediction before", "value": letter(prediction_before)},
        {"": "prediction after", "value": letter(prediction_after)},
    ]
    for k, v in (extra or {}).items():
        rows.append({"": str(k), "value": v})
    q = html.escape(str(query.get("question", "")))
    return Section(title, [f'<pre class="rl-q">{q}\n\n{html.escape(opts)}</pre>', html_table(rows)])


def attribution_section(
    title: str,
    attr: TokenAttribution,
    *,
    latents: Sequence[int] | None = None,
    k: int = 8,
    caption: str | None = None,
    switcher: bool = True,
) -> Section:
    """Heatmaps of one sequence: dominant latents (static), total influence (circuitsvis) and a latent switcher.

    Args:
        title: the heading.
        attr: a :class:`TokenAttribution` (training example or query).
        latents: latents for the switcher (default: the ``k`` with the largest total |score|).
        k: number of latents in the switcher by default.
        caption: text under the heading.
        switcher: include the circuitsvis latent switcher.

    Returns:
        A :class:`Section`.
    """
    what = (
        "activation x influence summed over latents (POSITIVE = proponent)"
        if attr.kind == "train"
        else "activation x (- gradient of the query loss) summed over latents (POSITIVE = supports the answer)"
    )
    default_caption = (
        f"{what}; intensity normalised per sentence (max |value| = {attr.scale:.4g}); "
        f"total = {attr.total if attr.total is None else format(attr.total, '.4g')}."
    )
    sec = Section(title, [_caption(caption or default_caption), dominant_latent_heatmap(attr)])
    sec.add(token_heatmap(attr, title="Influence per token (blue = positive, red = negative; hover for values)"))
    chosen = list(latents) if latents is not None else attr.top_latents(k)
    if switcher and chosen:
        sec.add(latent_switcher(attr, latents=chosen, title="Per latent (click a latent to colour its tokens)"))
    return sec


def _row_text(row: Mapping[str, Any] | None, width: int = 160) -> str:
    if row is None:
        return ""
    if "question" not in row and "prompt" in row:  # a completion row
        text = f"{row['prompt']} \u2192 {row.get('target', '')}"
        return text if len(text) <= width else text[: width - 1] + "\u2026"
    text = str(row.get("question", ""))
    if row.get("choices"):
        text += " | " + " / ".join(map(str, row["choices"]))
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def top_examples_section(
    result: InfluenceResult,
    q: int,
    *,
    k: int = 5,
    opponents: bool = False,
    train_rows: Sequence[Mapping[str, Any]] | None = None,
    tokenizer: Any = None,
    heatmaps: bool = True,
    switcher: bool = False,
    title: str | None = None,
) -> Section:
    """The ``k`` most influential training examples for query ``q``: a table and each one's token heatmaps.

    Args:
        result: an :class:`InfluenceResult` (with token-level scores for heatmaps).
        q: query index.
        k: number of examples.
        opponents: the most negative (opponents) instead of the proponents.
        train_rows: the training examples (for their text in the table), indexed like the result.
        tokenizer: for the token strings (default ``result.tokenizer``).
        heatmaps: add each example's dominant-latent and total-influence heatmaps.
        switcher: also add each example's latent switcher.
        title: the heading (default "Top proponents/opponents for <query id>").

    Returns:
        A :class:`Section`.
    """
    top = result.top_examples(q, k, opponents=opponents)
    kind = "opponents" if opponents else "proponents"
    sec = Section(title or f"Top training {kind} for query {result.query_ids[q]}")
    diag = result.diagnostics
    rows = []
    for rank, idx, ex_id, score in zip(top["rank"], top["index"], top["id"], top["score"]):
        row: dict[str, Any] = {"rank": int(rank), "index": int(idx), "id": ex_id, "score": float(score)}
        if "latent_sum" in diag:
            row["latent sum"] = float(diag["latent_sum"][q, idx])
        if "error_term" in diag:
            row["error term"] = float(diag["error_term"][q, idx])
        if train_rows is not None:
            row["text"] = _row_text(train_rows[int(idx)])
        rows.append(row)
    sec.add(
        _caption(
            "score = g_test^T (H + lambda I)^-1 g_train; POSITIVE = proponent (up-weighting lowers the test loss)."
        ),
        html_table(rows),
    )
    if heatmaps and result.token_indices:
        for rank, idx in zip(top["rank"], top["index"]):
            attr = example_token_attribution(result, q, int(idx), tokenizer)
            sub = attribution_section(f"#{int(rank)} {attr.label}", attr, switcher=switcher)
            sec.add(f"<h3>{html.escape(sub.title)}</h3>", *sub.parts)
    return sec


_ORDER_CAPTIONS = {
    "influence_eq16": "Most NEGATIVE first: the latents that carry the training examples towards their labels, "
    "whose removal from the test input hurts its answer most (docs/method.md, the sign).",
    "influence": "Largest first: the latents that raise the train-test gradient alignment (the paper's text sign).",
    "influence_abs": "Largest |s_k| first.",
}


def top_latents_section(
    result: InfluenceResult,
    q: int,
    *,
    k: int = 10,
    labels: Mapping[int, str] | None = None,
    title: str | None = None,
    by: str = "influence_eq16",
) -> Section:
    """The ``k`` top latents by their mean influence over the training examples (s_k = mean_i IFR[i, k]).

    ``by``: the order of :meth:`InfluenceResult.top_latents` (default ``"influence_eq16"``: most negative s_k
    first, the latents the answer rests on; ``"influence"``: largest first).

    Args:
        result: an :class:`InfluenceResult`.
        q: query index.
        k: number of latents.
        labels: optional ``{latent: description}`` (e.g. from auto-interpretation).
        title: the heading.

    Returns:
        A :class:`Section`.
    """
    df = result.top_latents(q, k, by=by)
    rows = []
    for r in df.to_dict(orient="records"):
        j = int(r["latent"])
        col = result.latent_scores[q][:, j]
        row = {
            "rank": int(r["rank"]),
            "latent": j,
            "mean IFR": float(r["score"]),
            "max IFR": float(col.max()),
            "top example": result.train_ids[int(col.argmax())],
            "frac active": float(r["frac_active"]),
        }
        if labels:
            row["label"] = labels.get(j, "")
        rows.append(row)
    return Section(
        title or f"Top latents for query {result.query_ids[q]}",
        [
            _caption(
                "s_k = mean over training examples of IFR[i, k] (POSITIVE raises the example's proponent score). "
                + _ORDER_CAPTIONS.get(by, f"Ordered by {by}.")
            ),
            html_table(rows),
        ],
    )


def image_data_uri(image: Any, *, dpi: int = 110) -> str:
    """A ``data:`` URI of an image: a matplotlib Figure (PNG), PNG/JPEG/SVG bytes, or a path to an image file."""
    if hasattr(image, "savefig"):
        buf = io.BytesIO()
        image.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        data, mime = buf.getvalue(), "image/png"
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        mime = "image/svg+xml" if data.lstrip()[:5] in (b"<svg ", b"<?xml") else "image/png"
        if data[:3] == b"\xff\xd8\xff":
            mime = "image/jpeg"
    else:
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"No image at {path}. Fix: pass a matplotlib Figure, image bytes or a file path.")
        data = path.read_bytes()
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_section(title: str, image: Any, *, caption: str | None = None, alt: str | None = None) -> Section:
    """A figure embedded as a data URI (matplotlib Figure, image bytes or a path; see :func:`image_data_uri`)."""
    uri = image_data_uri(image)
    alt_text = html.escape(alt or title)
    return Section(title, [f'<img class="rl-fig" alt="{alt_text}" src="{uri}">', _caption(caption)])


def table_section(
    title: str, rows: Any, *, caption: str | None = None, columns: Sequence[str] | None = None
) -> Section:
    """An arbitrary table (list of dicts or DataFrame), e.g. the orthogonality table or timings."""
    return Section(title, [_caption(caption), html_table(rows, columns=columns)])


def visualization_section(title: str, *vizs: CircuitsVisHTML | StaticHTML, caption: str | None = None) -> Section:
    """A section holding visualisations from :mod:`repinf_lens.viz.render`."""
    return Section(title, [_caption(caption), *vizs])


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


def build_report(
    path: str | os.PathLike, *, title: str, sections: Sequence[Section], subtitle: str | None = None
) -> Path:
    """Write one self-contained HTML report.

    Args:
        path: the output file (parent folders created; written atomically, so a failure such as a full disk
            leaves a previous report there untouched).
        title: the page title and top heading.
        sections: the :class:`Section` objects, in order (see the ``*_section`` helpers).
        subtitle: a line under the title (e.g. model, hook, solver).

    Returns:
        The path written. The page holds everything inline (CSS, images as data URIs, the circuitsvis bundle
        once when any section uses it) and its CSP forbids network access and runs only the page's own scripts
        (listed by sha256).
    """
    used: set[str] = set()
    toc, body, calls = [], [], []
    statics: set[str] = set()
    n_viz = 0
    for sec in sections:
        slug = _slug(sec.title, used)
        toc.append(f'<li><a href="#{slug}">{html.escape(sec.title)}</a></li>')
        parts = []
        for part in sec.parts:
            if isinstance(part, CircuitsVisHTML):
                n_viz += 1
                eid = f"rl-viz-{n_viz}"
                head = f"<h3>{html.escape(part.title)}</h3>" if part.title else ""
                parts.append(head + part.container(eid))
                calls.append(f"try {{ {part.render_call(eid)} }} catch (e) {{ console.error(e); }}")
            elif isinstance(part, StaticHTML):
                parts.append(part.fragment)
                if part.script and part.script not in statics:  # e.g. the legend handler: once per page
                    statics.add(part.script)
                    calls.append(part.script)
            else:
                parts.append(str(part))
        body.append(f'<section id="{slug}">\n<h2>{html.escape(sec.title)}</h2>\n' + "\n".join(parts) + "\n</section>")
    head = f"<h1>{html.escape(title)}</h1>\n"
    if subtitle:
        head += f'<p class="rl-muted">{html.escape(subtitle)}</p>\n'
    if toc:
        head += f"<nav><ul>{''.join(toc)}</ul></nav>\n"
    scripts = ([circuitsvis_js()] if n_viz else []) + (["\n".join(calls)] if calls else [])
    out = Path(path)
    write_text_atomic(out, page(title, head + "\n".join(body), scripts=scripts))  # a good old report survives a failure
    return out
