"""Token heatmaps and reports: project representation-level influence onto tokens and render it offline.

* :mod:`repinf_lens.viz.tokens` (pure): :func:`example_token_attribution` (a training example of an
  :class:`~repinf_lens.influence.result.InfluenceResult`), :func:`query_token_attribution` (the test input),
  per-token dominant latent and per-sentence normalisation.
* :mod:`repinf_lens.viz.render`: circuitsvis visualisations (:func:`token_heatmap`, :func:`latent_switcher`,
  :func:`example_browser`) and the static :func:`dominant_latent_heatmap`; each displays in Jupyter and
  ``.save(path)`` writes ONE self-contained HTML file (the circuitsvis bundle inlined, no network access).
* :mod:`repinf_lens.viz.report`: :func:`build_report` and its ``*_section`` helpers.

Sign convention: POSITIVE = proponent (for the test input: supports the correct answer).
"""

from repinf_lens.viz import report
from repinf_lens.viz.render import (
    CircuitsVisHTML,
    StaticHTML,
    circuitsvis_js,
    dominant_latent_heatmap,
    example_browser,
    latent_switcher,
    token_heatmap,
)
from repinf_lens.viz.report import (
    Section,
    attribution_section,
    build_report,
    html_table,
    image_section,
    question_section,
    table_section,
    text_section,
    top_examples_section,
    top_latents_section,
    visualization_section,
)
from repinf_lens.viz.tokens import (
    TokenAttribution,
    dominant_latents,
    example_token_attribution,
    normalize_per_sentence,
    query_token_attribution,
    token_strings,
)

__all__ = [
    "CircuitsVisHTML",
    "Section",
    "StaticHTML",
    "TokenAttribution",
    "attribution_section",
    "build_report",
    "circuitsvis_js",
    "dominant_latent_heatmap",
    "dominant_latents",
    "example_browser",
    "example_token_attribution",
    "html_table",
    "image_section",
    "latent_switcher",
    "normalize_per_sentence",
    "query_token_attribution",
    "question_section",
    "report",
    "table_section",
    "text_section",
    "token_heatmap",
    "token_strings",
    "top_examples_section",
    "top_latents_section",
    "visualization_section",
]
