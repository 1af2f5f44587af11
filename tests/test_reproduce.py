"""`make reproduce`: every entry names a real docs/results.md section and a command a fresh clone can run."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_entry_names_a_results_section_and_existing_scripts(capsys):
    mod = _reproduce()
    sections = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "results.md").read_text(), flags=re.M))
    names = [e.name for e in mod.ENTRIES]
    assert len(names) == len(set(names))
    for e in mod.ENTRIES:
        assert e.table in sections or e.table == "make demo", (e.name, e.table, sorted(sections))
        assert e.minutes > 0 and e.commands
        for cmd in e.commands:
            parts = shlex.split(cmd)
            assert "runs/ft_plain_gpu" not in cmd  # no folder that exists on one machine only
            if parts[0] == "python":
                assert (ROOT / parts[1]).exists(), cmd
    assert mod.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in names)
    assert mod.main(["no-such-entry"]) == 2
