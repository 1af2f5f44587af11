"""Gradient-similarity prefilter (paper Section 5.3 and Appendix B.3): keep the top 1-10 % training candidates.

The data path, one module each:

* :mod:`~repinf_lens.influence.prefilter.sketch`: per-example theta2 gradients compressed by a seeded random
  projection (:class:`GradientSketcher`; sparse JL or dense Rademacher).
* :mod:`~repinf_lens.influence.prefilter.store`: a training set's sketches on disk (:func:`build_sketches`,
  :class:`SketchStore`, shipped indexes by name via :func:`open_store`).
* :mod:`~repinf_lens.influence.prefilter.select`: the candidates kept per query (:func:`prefilter`).
* :mod:`~repinf_lens.influence.prefilter.metrics`: :func:`top_count`, :func:`sketch_overlap`.

Sign convention: the prefilter's scores are cosines, POSITIVE = the training gradient points along the test
gradient (a first-order proponent under the identity Hessian), matching the influence scores' POSITIVE =
proponent.
"""

from repinf_lens.influence.prefilter.metrics import sketch_overlap, top_count
from repinf_lens.influence.prefilter.select import PrefilterResult, prefilter
from repinf_lens.influence.prefilter.sketch import GradientSketcher, compact_grads, grad_dots, grad_norms
from repinf_lens.influence.prefilter.store import (
    ManifestMismatchError,
    SketchStore,
    build_sketches,
    open_store,
    shipped_index_dir,
    shipped_indexes,
)

__all__ = [
    "GradientSketcher",
    "ManifestMismatchError",
    "PrefilterResult",
    "SketchStore",
    "build_sketches",
    "compact_grads",
    "grad_dots",
    "grad_norms",
    "open_store",
    "prefilter",
    "shipped_index_dir",
    "shipped_indexes",
    "sketch_overlap",
    "top_count",
]
