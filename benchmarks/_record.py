"""Incremental benchmark results: every measurement is written to the JSON file as soon as it exists."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from repinf_lens._io import write_json_atomic


class Recorder:
    """A dict that rewrites ``path`` (atomically) on every update, so a killed benchmark keeps what it measured.

    ``resume=True`` keeps the file's other keys: every update re-reads the file and overwrites only the keys this
    recorder has set, so a rerun of one section (or two benchmark processes writing different sections) leaves
    the rest in place.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, echo: bool = True) -> None:
        self.path = Path(path)
        self.echo = echo
        self.resume = resume
        self.mine: dict[str, Any] = {}
        self.data: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.mine.update(values)
        old = json.loads(self.path.read_text()) if self.resume and self.path.exists() else {}
        self.data = {**old, **self.mine}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)
        if self.echo:
            print(json.dumps(values, default=str), flush=True)
