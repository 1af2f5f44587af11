"""Self-contained, offline HTML rendering of token influence with circuitsvis' React components.

circuitsvis' own ``RenderedHTML`` is not suitable for files: ``str()`` / ``show_code()`` import the JS from the
unpkg CDN, and ``_repr_html_`` pings google.com on every display to choose between that and the inlined bundle.
This module uses only the bundle circuitsvis ships in its wheel (``circuitsvis/dist/cdn/iife.js``, MIT licence,
read through :func:`circuitsvis_js`) and circuitsvis' components ``ColoredTokens`` (what
``circuitsvis.tokens.colored_tokens`` renders), ``ColoredTokensMulti`` (``colored_tokens_multi``) and
``TextNeuronActivations`` (``circuitsvis.activations.text_neuron_activations``) with the same props:

* in Jupyter (``_repr_html_``) the bundle is inlined with the render call in one ``<script type="module">``,
  as circuitsvis does offline, with no network check;
* :meth:`CircuitsVisHTML.save` writes ONE HTML file (atomically): the bundle inlined once as a classic script, no
  external ``src``/``href``, and a Content-Security-Policy (:func:`content_security_policy`) that forbids any
  network access from the page and runs only the page's own inline scripts, listed by their sha256 (no
  ``'unsafe-inline'``, no ``'unsafe-eval'``: the bundle needs no ``eval``/``new Function``, and an injected
  ``<script>`` or ``onerror=`` handler would not run even if some text escaped the escaping).

The components insert token strings as raw HTML (``dangerouslySetInnerHTML``), so tokens are HTML-escaped here
before they are handed over (a token ``"<b>"`` shows as ``<b>``, it is not parsed). :func:`dominant_latent_heatmap`
is a static (no circuitsvis) rendering of the paper's figure style: each token coloured by its dominant latent,
intensity = per-sentence normalised influence.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import re
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from repinf_lens._io import write_text_atomic
from repinf_lens.viz.tokens import TokenAttribution

__all__ = [
    "BASE_CSS",
    "COMPONENT_CSS",
    "CSP",
    "CircuitsVisHTML",
    "StaticHTML",
    "circuitsvis_js",
    "content_security_policy",
    "dominant_latent_heatmap",
    "example_browser",
    "latent_switcher",
    "page",
    "script_hash",
    "token_heatmap",
]


def script_hash(source: str) -> str:
    """The CSP source ``'sha256-<base64>'`` that allows one inline ``<script>`` whose text is exactly ``source``."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(scripts: Sequence[str] = ()) -> str:
    """The Content-Security-Policy of a saved page whose inline ``<script>`` elements hold exactly ``scripts``.

    Scripts run only when their sha256 is listed (hash sources; no ``'unsafe-inline'``, no ``'unsafe-eval'``), so
    neither an injected ``<script>`` nor an inline event handler (``onclick=``, ``onerror=``) can run; the
    circuitsvis bundle uses no ``eval``/``new Function`` (its only dynamic-code probe, a ``WebAssembly.Module``
    of the bundled long.js, is wrapped in try/catch and falls back to plain JavaScript when refused).
    ``default-src 'none'`` forbids every fetch (scripts, styles, frames, workers, XHR); images and fonts only
    from ``data:`` URIs; ``base-uri``/``form-action`` are closed too.

    ``style-src`` keeps ``'unsafe-inline'``: the static heatmaps colour every token with a ``style="..."``
    attribute (thousands of distinct values, which hashes could only allow with ``'unsafe-hashes'`` and one hash
    each, and moving them into script would make the static figure depend on JavaScript). CSS cannot run script,
    and under this policy it cannot load anything from the network either (no ``url()`` outside ``data:``), so
    this opens no way to execute code or exfiltrate data; dataset text is HTML-escaped all the same.

    Args:
        scripts: the text of each inline script, exactly as it stands between ``<script>`` and ``</script>``.

    Returns:
        The policy string for a ``<meta http-equiv="Content-Security-Policy">``.
    """
    hashes = " ".join(script_hash(s) for s in dict.fromkeys(scripts)) or "'none'"
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data:; font-src data:; "
        "connect-src 'none'; base-uri 'none'; form-action 'none'"
    )


#: Content-Security-Policy of a saved page without scripts: no script at all, inline styles and data: images
#: only, no network. Pages with scripts get :func:`content_security_policy` of their scripts.
CSP = content_security_policy()

PAGE_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd;
     padding-bottom: 4px; margin-top: 1.8em; } h3 { font-size: 1.05em; margin-bottom: 0.3em; }
"""

#: Styles of the fragments themselves (also sent with Jupyter displays; all scoped to repinf classes).
COMPONENT_CSS = """
table.rl { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
table.rl th, table.rl td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
table.rl th { background: #f4f4f4; } table.rl td.num { text-align: right; font-variant-numeric: tabular-nums; }
.rl-muted { color: #777; font-size: 0.9em; } .rl-caption { color: #555; font-size: 0.9em; margin: 4px 0 12px; }
pre.rl-q { background: #f8f8f8; border: 1px solid #eee; padding: 8px; white-space: pre-wrap; }
img.rl-fig { max-width: 100%; border: 1px solid #eee; }
.rl-tokens { line-height: 2.0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
.rl-tok { padding: 2px 0; border-radius: 2px; white-space: pre-wrap; }
.rl-tok.neg { text-decoration: underline dotted #555; }
.rl-legend span.rl-key { display: inline-block; margin: 2px 6px 2px 0; padding: 1px 6px; border-radius: 3px;
                         cursor: default; font-size: 0.85em; }
.rl-dim .rl-tok:not(.rl-on) { opacity: 0.15; }
"""

BASE_CSS = PAGE_CSS + COMPONENT_CSS

_LEGEND_JS = """
(function(){document.querySelectorAll('.rl-dominant').forEach(function(box){
  box.querySelectorAll('.rl-key').forEach(function(key){
    key.addEventListener('mouseenter',function(){var j=key.getAttribute('data-latent');box.classList.add('rl-dim');
      box.querySelectorAll('.rl-tok').forEach(function(t){if(t.getAttribute('data-latent')===j){t.classList.add('rl-on');}});});
    key.addEventListener('mouseleave',function(){box.classList.remove('rl-dim');
      box.querySelectorAll('.rl-on').forEach(function(t){t.classList.remove('rl-on');});});});});})();
"""


@functools.lru_cache(maxsize=1)
def circuitsvis_js() -> str:
    """The circuitsvis browser bundle shipped in the installed wheel, safe to inline in a ``<script>``.

    The IIFE defines the global ``CircuitsVis`` (``render`` and the components). Its source-map comment is
    dropped (it names a file that is not there) and ``</script`` inside string literals is written
    ``<\\/script`` (the same string in JavaScript) so it cannot close the inline script.

    Raises:
        FileNotFoundError: when the installed circuitsvis has no built bundle.
    """
    try:
        path = resources.files("circuitsvis") / "dist" / "cdn" / "iife.js"
        text = path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:  # pragma: no cover - depends on the installation
        raise FileNotFoundError(
            "The circuitsvis JavaScript bundle (circuitsvis/dist/cdn/iife.js) is missing. Fix: "
            "pip install --force-reinstall 'circuitsvis>=1.43' (the PyPI wheel ships the bundle)."
        ) from exc
    text = re.sub(r"//# sourceMappingURL=\S+\s*$", "", text)
    text = re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)
    return text.replace("<!--", "<\\!--")


def _to_list(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.astype(float).tolist()
    if isinstance(x, (list, tuple)):
        return [_to_list(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return 0.0
    return x


def _json(props: dict[str, Any]) -> str:
    """JSON for inline scripts: ``<``, ``>`` and ``&`` escaped so no string can end the script."""
    clean = {k: _to_list(v) for k, v in props.items() if v is not None}
    text = json.dumps(clean, ensure_ascii=False, allow_nan=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _escape_tokens(tokens: Sequence[str]) -> list[str]:
    return [html.escape(str(t), quote=False) for t in tokens]


def _new_id() -> str:
    return "repinf-" + uuid.uuid4().hex[:12]


def page(title: str, body: str, *, scripts: Sequence[str] = ()) -> str:
    """A complete self-contained HTML document (inline CSS, the given inline scripts at the end of the body).

    Args:
        title: the document title.
        body: HTML of the body.
        scripts: JavaScript sources, each inlined in its own classic ``<script>`` after the body content (line
            breaks normalised to ``\\n``, as the HTML parser does, so the listed hashes match what the browser
            hashes). Inline event handlers (``onclick=``) in ``body`` do not run: attach listeners in a script.

    Returns:
        The document as a string (no external resources; a CSP forbids network access and allows only these
        scripts, by their sha256).

    Raises:
        ValueError: a script contains ``</script`` (it would end the element early).
    """
    texts = []
    for s in scripts:
        if re.search(r"</script", s, re.IGNORECASE):
            raise ValueError(
                "An inline script contains '</script', which would end the <script> element early. "
                "Fix: write it '<\\/script' inside JavaScript strings (or escape '<' as '\\u003c' in JSON)."
            )
        texts.append("\n" + s.replace("\r\n", "\n").replace("\r", "\n") + "\n")
    tail = "".join(f"<script>{t}</script>\n" for t in texts)
    csp = content_security_policy(texts)  # only fixed keywords and base64 hashes: nothing to escape
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{BASE_CSS}</style>\n</head>\n<body>\n{body}\n{tail}</body>\n</html>\n"
    )


class CircuitsVisHTML:
    """One circuitsvis component with its props; displays inline in Jupyter and saves as one offline HTML file.

    Args:
        component: the circuitsvis React component (``"ColoredTokens"``, ``"ColoredTokensMulti"``,
            ``"TextNeuronActivations"``, ...).
        props: its props (tensors and arrays are converted to lists).
        title: heading shown above the visualisation in saved files and reports.
    """

    def __init__(self, component: str, props: dict[str, Any], *, title: str | None = None) -> None:
        self.component = component
        self.props = props
        self.title = title

    def props_json(self) -> str:
        """The props as script-safe JSON."""
        return _json(self.props)

    def render_call(self, element_id: str) -> str:
        """JavaScript that renders the component into the element ``element_id`` (needs ``CircuitsVis``)."""
        return f'CircuitsVis.render("{element_id}", CircuitsVis.{self.component}, {self.props_json()});'

    def container(self, element_id: str) -> str:
        """The ``<div>`` the component renders into."""
        return f'<div id="{element_id}" class="rl-cv" style="margin: 15px 0;"></div>'

    def _repr_html_(self) -> str:
        """Jupyter: the bundle and the render call in one module script (works offline, no network check)."""
        eid = _new_id()
        return f'{self.container(eid)}\n<script type="module">\n{circuitsvis_js()}\n{self.render_call(eid)}\n</script>'

    def __html__(self) -> str:
        return self._repr_html_()

    def to_html(self) -> str:
        """A complete self-contained HTML document (the bundle inlined once; no network access)."""
        eid = _new_id()
        head = f"<h2>{html.escape(self.title)}</h2>\n" if self.title else ""
        return page(
            self.title or self.component, head + self.container(eid), scripts=[circuitsvis_js(), self.render_call(eid)]
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` atomically (parent folders created) and return the path."""
        out = Path(path)
        write_text_atomic(out, self.to_html())
        return out

    def __repr__(self) -> str:
        return f"CircuitsVisHTML({self.component!r}, props={sorted(self.props)})"


class StaticHTML:
    """A plain HTML fragment (no circuitsvis) that displays in Jupyter and saves as a self-contained page.

    Args:
        fragment: the HTML fragment.
        title: heading / document title of saved files.
        script: optional inline JavaScript that enhances the fragment (run after it).
    """

    def __init__(self, fragment: str, *, title: str | None = None, script: str | None = None) -> None:
        self.fragment = fragment
        self.title = title
        self.script = script

    def _repr_html_(self) -> str:
        style = f"<style>{COMPONENT_CSS}</style>"
        js = f"<script>{self.script}</script>" if self.script else ""
        return style + self.fragment + js

    def to_html(self) -> str:
        """A complete self-contained HTML document."""
        head = f"<h2>{html.escape(self.title)}</h2>\n" if self.title else ""
        return page(self.title or "repinf_lens", head + self.fragment, scripts=[self.script] if self.script else [])

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_html` to ``path`` atomically (parent folders created) and return the path."""
        out = Path(path)
        write_text_atomic(out, self.to_html())
        return out


def token_heatmap(
    tokens: Sequence[str] | TokenAttribution,
    values: Float[Tensor, " pos"] | Sequence[float] | None = None,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    negative_color: str | None = None,
    positive_color: str | None = None,
    title: str | None = None,
) -> CircuitsVisHTML:
    """Tokens coloured by one value each (circuitsvis ``ColoredTokens``, as ``circuitsvis.tokens.colored_tokens``).

    The colour scale is symmetric around zero by default (``[-max|v|, max|v|]``), so zero is white, proponent
    (positive) tokens take ``positive_color`` and opponent tokens ``negative_color``. Hovering a token shows
    its value.

    Args:
        tokens: token strings, or a :class:`TokenAttribution` (then ``values`` defaults to its per-sentence
            normalised values and the scale to ``[-1, 1]``).
        values: one value per token.
        min_value: bottom of the colour scale (default ``-max|values|``).
        max_value: top of the colour scale (default ``max|values|``).
        negative_color: CSS colour of the most negative value (circuitsvis default: red).
        positive_color: CSS colour of the most positive value (circuitsvis default: blue).
        title: heading in saved files and reports.

    Returns:
        A :class:`CircuitsVisHTML` (Jupyter display; ``.save(path)`` writes one offline HTML file).
    """
    if isinstance(tokens, TokenAttribution):
        attr = tokens
        tokens = attr.tokens
        if values is None:
            values = attr.normalized
            min_value = -1.0 if min_value is None else min_value
            max_value = 1.0 if max_value is None else max_value
        title = title or f"{attr.kind} {attr.label}"
    if values is None:
        raise ValueError("token_heatmap needs one value per token. Fix: pass values=... (or a TokenAttribution).")
    vals = [float(v) for v in _to_list(values)]
    if len(vals) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(vals)} values. Fix: pass exactly one value per token.")
    bound = max((abs(v) for v in vals), default=0.0) or 1.0
    props = {
        "tokens": _escape_tokens(tokens),
        "values": vals,
        "minValue": -bound if min_value is None else float(min_value),
        "maxValue": bound if max_value is None else float(max_value),
        "negativeColor": negative_color,
        "positiveColor": positive_color,
    }
    return CircuitsVisHTML("ColoredTokens", props, title=title)


def latent_switcher(
    tokens: Sequence[str] | TokenAttribution,
    per_latent_values: Float[Tensor, "pos k"] | None = None,
    latent_labels: Sequence[str] | None = None,
    *,
    latents: Sequence[int] | None = None,
    k: int = 8,
    title: str | None = None,
) -> CircuitsVisHTML:
    """Tokens coloured by one of K latents' token scores, switchable (circuitsvis ``ColoredTokensMulti``).

    Hover or click a latent's button to colour the tokens by that latent; hover a token to see all K values.

    Args:
        tokens: token strings, or a :class:`TokenAttribution` (then the values are its token-level scores of
            ``latents``, default its ``k`` latents with the largest total |score|, divided by its per-sentence
            scale).
        per_latent_values: ``[pos, K]`` values.
        latent_labels: K labels (default ``"latent j"``).
        latents: latent ids to show (with a :class:`TokenAttribution`).
        k: how many latents to show by default (with a :class:`TokenAttribution`).
        title: heading in saved files and reports.

    Returns:
        A :class:`CircuitsVisHTML`.
    """
    if isinstance(tokens, TokenAttribution):
        attr = tokens
        tokens = attr.tokens
        if per_latent_values is None:
            latents = list(latents) if latents is not None else attr.top_latents(k)
            per_latent_values = attr.latent_values(latents, normalize=True)
            latent_labels = latent_labels or [f"latent {j}" for j in latents]
        title = title or f"{attr.kind} {attr.label}: top latents"
    if per_latent_values is None:
        raise ValueError("latent_switcher needs per_latent_values [pos, K] (or a TokenAttribution).")
    vals = torch.as_tensor(np.asarray(_to_list(per_latent_values), dtype=np.float32))
    if vals.ndim != 2 or vals.shape[0] != len(tokens):
        raise ValueError(f"per_latent_values must be [n_tokens={len(tokens)}, K], got {tuple(vals.shape)}.")
    if vals.shape[1] == 0:
        raise ValueError("per_latent_values has no latent column (K = 0). Fix: choose at least one latent.")
    labels = list(latent_labels) if latent_labels is not None else [f"latent {j}" for j in range(vals.shape[1])]
    if len(labels) != vals.shape[1]:
        raise ValueError(f"{len(labels)} labels for {vals.shape[1]} latent columns.")
    props = {"tokens": _escape_tokens(tokens), "values": vals, "labels": [str(x) for x in labels]}
    return CircuitsVisHTML("ColoredTokensMulti", props, title=title)


def example_browser(
    examples_tokens: Sequence[Sequence[str]] | Sequence[TokenAttribution],
    activations: Sequence[Any] | None = None,
    latent_labels: Sequence[str] | None = None,
    *,
    latents: Sequence[int] | None = None,
    k: int = 8,
    first_dimension_name: str = "Value",
    first_dimension_labels: Sequence[str] | None = None,
    second_dimension_name: str = "Latent",
    title: str | None = None,
) -> CircuitsVisHTML:
    """Browse many examples x latents (circuitsvis ``TextNeuronActivations``).

    Pick a latent and page through the examples, each token coloured by that latent's value.

    Args:
        examples_tokens: per example its token strings, or a list of :class:`TokenAttribution` (then the values
            are their token-level scores of ``latents``, default the ``k`` latents with the largest summed
            |score| over all the examples).
        activations: per example a ``[pos, K]`` array (one "Value" per latent) or ``[pos, L, K]`` (L values per
            latent, e.g. influence and activation, named by ``first_dimension_labels``).
        latent_labels: K labels (default ``"latent j"``).
        latents: latent ids (with :class:`TokenAttribution` inputs).
        k: number of latents by default (with :class:`TokenAttribution` inputs).
        first_dimension_name: name of the L axis.
        first_dimension_labels: L labels.
        second_dimension_name: name of the K axis.
        title: heading in saved files and reports.

    Returns:
        A :class:`CircuitsVisHTML`.
    """
    items: list[Any] = list(examples_tokens)
    if not items:
        raise ValueError("example_browser needs at least one example.")
    if isinstance(items[0], TokenAttribution):
        attrs: list[TokenAttribution] = items
        if latents is None:
            tot = cast(Tensor, sum(a.latent_totals().abs() for a in attrs))
            n = min(k, int((tot != 0).sum()))
            latents = torch.topk(tot, n).indices.tolist() if n else [0]
        latents = list(latents)
        if activations is None:
            activations = [a.latent_values(latents) for a in attrs]
            first_dimension_labels = first_dimension_labels or ["influence (r x dP/dr)"]
        latent_labels = latent_labels or [f"latent {j}" for j in latents]
        items = [a.tokens for a in attrs]
    if activations is None or len(activations) != len(items):
        raise ValueError(f"activations must hold one array per example ({len(items)}).")
    acts = []
    for e, (toks, a) in enumerate(zip(items, activations)):
        arr = np.asarray(_to_list(a), dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[0] != len(toks):
            raise ValueError(f"example {e}: activations must be [n_tokens={len(toks)}, K] or [n_tokens, L, K].")
        acts.append(arr.tolist())
    n_k = len(acts[0][0][0]) if acts[0] and acts[0][0] else 0
    labels = list(latent_labels) if latent_labels is not None else [f"latent {j}" for j in range(n_k)]
    props = {
        "tokens": [_escape_tokens(t) for t in items],
        "activations": acts,
        "firstDimensionName": first_dimension_name,
        "secondDimensionName": second_dimension_name,
        "firstDimensionLabels": list(first_dimension_labels) if first_dimension_labels else None,
        "secondDimensionLabels": [str(x) for x in labels],
    }
    return CircuitsVisHTML("TextNeuronActivations", props, title=title)


_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (188, 189, 34),
    (127, 127, 127),
]


def dominant_latent_heatmap(
    attr: TokenAttribution,
    *,
    max_latents: int = 8,
    latent_labels: dict[int, str] | None = None,
    title: str | None = None,
) -> StaticHTML:
    """The paper's heatmap: each token coloured by its dominant latent, intensity = normalised influence.

    The ``max_latents`` latents that dominate the most influence (sum of |value| over the tokens they dominate)
    get distinct colours, the others grey; opacity is ``|normalized|`` (per-sentence scale); opponent tokens
    (normalised value <= -0.1) are underlined (dotted). Hovering a token shows its value and dominant latent; hovering a
    legend entry highlights that latent's tokens. Static HTML, no circuitsvis.

    Args:
        attr: a :class:`TokenAttribution`.
        max_latents: how many latents get their own colour.
        latent_labels: optional names ``{latent id: label}`` for the legend.
        title: heading in saved files.

    Returns:
        A :class:`StaticHTML`.
    """
    weight: dict[int, float] = {}
    for j, v in zip(attr.dominant_latent.tolist(), attr.values.tolist()):
        if j >= 0:
            weight[j] = weight.get(j, 0.0) + abs(v)
    ranked = sorted(weight, key=lambda j: (-weight[j], j))[: min(max_latents, len(_PALETTE) - 1)]
    color = {j: _PALETTE[n] for n, j in enumerate(ranked)}
    grey = _PALETTE[-1]
    spans = []
    for t, (tok, v, nv, j, dv) in enumerate(
        zip(
            attr.tokens,
            attr.values.tolist(),
            attr.normalized.tolist(),
            attr.dominant_latent.tolist(),
            attr.dominant_value.tolist(),
        )
    ):
        rgb = color.get(j, grey)
        alpha = min(1.0, abs(nv))
        tip = f"token {t} {tok!r}: value {v:+.4g} (normalised {nv:+.2f}); dominant latent {j} ({dv:+.4g})"
        cls = "rl-tok neg" if nv <= -0.1 else "rl-tok"  # visible opponent tokens only, not every tiny negative
        text = html.escape(tok).replace("\n", "<br>")
        spans.append(
            f'<span class="{cls}" data-latent="{j}" title="{html.escape(tip)}" '
            f'style="background: rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})">{text}</span>'
        )
    labels = latent_labels or {}
    keys = [
        f'<span class="rl-key" data-latent="{j}" style="background: rgba({c[0]},{c[1]},{c[2]},0.6)">'
        f"{html.escape(labels.get(j, f'latent {j}'))}: {weight[j]:.3g}</span>"
        for j, c in color.items()
    ]
    legend = (
        '<div class="rl-legend rl-muted">Dominant latent (hover to highlight its tokens; sum of |influence| it '
        f"dominates): {''.join(keys) or 'none active'}"
        f' <span class="rl-muted">&middot; scale max |value| = {attr.scale:.4g}</span></div>'
    )
    body = f'<div class="rl-dominant">{legend}<div class="rl-tokens">{"".join(spans)}</div></div>'
    return StaticHTML(body, title=title or f"{attr.kind} {attr.label}: dominant latents", script=_LEGEND_JS)
