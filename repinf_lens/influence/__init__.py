"""Influence of training examples, SAE latents and tokens (POSITIVE = proponent)."""

from repinf_lens.influence.attributor import InfluenceAttributor
from repinf_lens.influence.math import (
    LatentInfluence,
    as_inputs,
    example_influence,
    latent_influence,
    latent_influence_multi,
    latent_influence_reference,
    stack_queries,
)
from repinf_lens.influence.result import InfluenceResult

__all__ = [
    "InfluenceAttributor",
    "InfluenceResult",
    "LatentInfluence",
    "as_inputs",
    "example_influence",
    "latent_influence",
    "latent_influence_multi",
    "latent_influence_reference",
    "stack_queries",
]
