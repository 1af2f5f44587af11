"""Real datasets for repinf_lens: multiple-choice QA (OpenBookQA, CommonsenseQA, MedQA), online or offline."""

from __future__ import annotations

from repinf_lens.data.mcqa import (
    MCQA_COLUMNS,
    MCQA_FEATURES,
    MEDQA_SPLIT_SEED,
    MEDQA_TEST_FRACTION,
    MCQAFormatError,
    available_mcqa,
    from_records,
    load_fixture,
    load_mcqa,
    medqa_split_of,
    validate_mcqa_rows,
)

__all__ = [
    "MCQA_COLUMNS",
    "MCQA_FEATURES",
    "MEDQA_SPLIT_SEED",
    "MEDQA_TEST_FRACTION",
    "MCQAFormatError",
    "available_mcqa",
    "from_records",
    "load_fixture",
    "load_mcqa",
    "medqa_split_of",
    "validate_mcqa_rows",
]
