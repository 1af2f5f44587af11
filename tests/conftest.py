"""Shared fixtures: tiny random models (unit tests, seconds) and the real default model (integration tests)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

#: Headless Chromium with networking off: every request would go to a closed port or an unresolvable host, and
#: the background services (component updates, sync, safe browsing lists) are off.
CHROMIUM_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--no-sandbox",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=5000",
)


@pytest.fixture()
def dump_dom(tmp_path_factory) -> Callable[..., str]:
    """``dump_dom(path)``: the DOM of a local HTML file after its scripts ran in headless Chromium, offline.

    ``dump_dom(path, console=True)`` returns ``(dom, stderr)`` with the page's console messages (CSP violations
    included) in ``stderr``. Skips the test when no Chromium is installed.
    """
    if CHROMIUM is None:
        pytest.skip("no chromium installed (apt-get install chromium)")

    def run(path: Path, *, console: bool = False) -> str | tuple[str, str]:
        profile = tmp_path_factory.mktemp("chromium-profile")
        logging = ["--enable-logging=stderr", "--v=0"] if console else []
        cmd = [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            *logging,
            f"--user-data-dir={profile}",
            "--dump-dom",
            Path(path).resolve().as_uri(),
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:  # headless --dump-dom never returns while a dialog is open
            pytest.fail(
                f"Chromium did not finish rendering {path} in 120 s: a script opened a dialog (alert()?) or hung."
            )
        assert out.returncode == 0, out.stderr[-2000:]
        return (out.stdout, out.stderr) if console else out.stdout

    return run


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
    from repinf_lens.models import load_hf_model

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
