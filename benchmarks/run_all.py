"""Run every benchmark (``make bench``). Each prints its numbers and writes benchmarks/results/<name>.json.

Usage: ``python benchmarks/run_all.py [bench_engine args] [--scale] [--scale-args "bench_scale args"]``.
``--scale`` also runs the scale benchmark (Q queries scored together vs one at a time, batched CG;
benchmarks/results/scale.json), e.g. ``make bench BENCH_ARGS="--scale"``; ``--scale-args "--tiny"`` passes
arguments to it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    scale = "--scale" in args
    scale_args: list[str] = []
    if "--scale-args" in args:
        i = args.index("--scale-args")
        scale_args = shlex.split(args[i + 1]) if i + 1 < len(args) else []
        args = args[:i] + args[i + 2 :]
        scale = True
    args = [a for a in args if a != "--scale"]
    print("== influence engine (default model, batch 8) ==")
    bench_engine.main(args)
    if scale:
        import bench_scale

        print("== scale: Q queries per pass, batched CG ==")
        bench_scale.main(scale_args)


if __name__ == "__main__":
    main()
