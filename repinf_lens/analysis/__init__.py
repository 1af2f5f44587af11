"""Analyses of representation spaces: orthogonality statistics of paper Section 5.2 / Appendix A.2."""

from repinf_lens.analysis.orthogonality import (
    SPACES,
    collect_representations,
    dense_autoencoder_baseline,
    ortho_penalty_loss,
    orthogonality,
    orthogonality_table,
)

__all__ = [
    "SPACES",
    "collect_representations",
    "dense_autoencoder_baseline",
    "ortho_penalty_loss",
    "orthogonality",
    "orthogonality_table",
]
