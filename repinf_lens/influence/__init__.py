"""Influence of training examples, SAE latents and tokens (POSITIVE = proponent).

:class:`InfluenceAttributor` (fit the Hessian data, solve s_test, attribute) returns an :class:`InfluenceResult`;
latent scores are gradient x input (default) or integrated gradients (``latent_method="ig"``, exactly complete);
the functions of :mod:`repinf_lens.influence.math` are the engine it calls (one training batch at a time), and
:func:`check_split` checks a split against TransformerLens' own forward; :mod:`repinf_lens.influence.prefilter`
keeps the candidates worth scoring (gradient-similarity sketches).
"""

from repinf_lens.influence import prefilter
from repinf_lens.influence.attributor import InfluenceAttributor
from repinf_lens.influence.check import SplitCheck, SplitCheckError, check_split
from repinf_lens.influence.math import (
    IG_RULES,
    LATENT_METHODS,
    LatentInfluence,
    as_inputs,
    check_latent_method,
    example_influence,
    ig_quadrature,
    latent_influence,
    latent_influence_ig,
    latent_influence_multi,
    latent_influence_reference,
    stack_queries,
)
from repinf_lens.influence.result import InfluenceResult, SplitMismatchError

__all__ = [
    "IG_RULES",
    "LATENT_METHODS",
    "InfluenceAttributor",
    "InfluenceResult",
    "LatentInfluence",
    "SplitCheck",
    "SplitCheckError",
    "SplitMismatchError",
    "as_inputs",
    "check_latent_method",
    "check_split",
    "example_influence",
    "ig_quadrature",
    "latent_influence",
    "latent_influence_ig",
    "latent_influence_multi",
    "latent_influence_reference",
    "prefilter",
    "stack_queries",
]
