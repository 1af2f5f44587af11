"""Shared fixtures: tiny random models (unit tests, seconds) and the real default model (integration tests)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    from repinf_lens.testing import tiny_model

    return tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)


@pytest.fixture(scope="session")
def default_model():
    from repinf_lens import load_model

    return load_model(device="cpu", dtype=torch.float32, n_ctx=512)


@pytest.fixture(scope="session")
def default_hf():
    from repinf_lens import load_hf_model

    return load_hf_model()


@pytest.fixture()
def toy_examples() -> list[dict]:
    return [
        {"id": "q1", "question": "What is two plus two?", "choices": ["three", "four", "five", "six"], "answer": 1},
        {"id": "q2", "question": "Which colour is the clear daytime sky?", "choices": ["blue", "red"], "answer": 0},
        {"id": "q3", "question": "Ice is water that is", "choices": ["boiling", "frozen", "gaseous"], "answer": 1},
        {
            "id": "q4",
            "question": "A plant needs which of these to make food?",
            "choices": ["sand", "noise", "sunlight", "plastic", "darkness"],
            "answer": 2,
        },
    ]
