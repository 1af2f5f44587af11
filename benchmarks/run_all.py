"""Run every benchmark (``make bench``). Each prints its numbers and writes benchmarks/results/<name>.json."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    print("== influence engine (default model, batch 8) ==")
    bench_engine.main(args)


if __name__ == "__main__":
    main()
