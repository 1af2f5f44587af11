"""Run the benchmarks (``make bench``). Each prints its numbers and writes benchmarks/results/<name>.json.

Usage: ``python benchmarks/run_all.py [--only engine,scale,prefilter] [--engine-args "..."] [--scale-args "..."]
[--prefilter-args "..."]``. Default: all three, in this order:

* ``engine`` (bench_engine.py, results/engine.json): the derivative swap vs forward+backward and vs the per-latent
  reference, CG cost per query (~20 min on 2 cores);
* ``scale`` (bench_scale.py, results/scale.json): Q = 8 queries batched vs one at a time, batched CG, bf16 with
  ``--scale-args "--amp bf16"``, peak RSS at N vs 4N, torchrun 1 vs 2 processes (~15 min);
* ``prefilter`` (bench_prefilter.py, results/prefilter.json): the one-off sketch pass over all 4957 OpenBookQA
  training examples (resumable; ~45 min on one core the first time, seconds once the store exists), top-k overlap
  of sketched vs exact cosines, per-query prefilter cost.

Examples: ``make bench BENCH_ARGS="--only scale --scale-args '--sections torchrun'"``;
``make bench BENCH_ARGS="--only engine --engine-args '--cg-iters 5'"``. ``--tiny`` (scale and prefilter) is a
smoke test.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="engine,scale,prefilter")
    p.add_argument("--engine-args", default="")
    p.add_argument("--scale-args", default="")
    p.add_argument("--prefilter-args", default="")
    p.add_argument("--tiny", action="store_true", help="smoke test: every benchmark on a tiny random model")
    args = p.parse_args(argv)
    chosen = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(chosen) - {"engine", "scale", "prefilter"}
    if unknown:
        raise SystemExit(f"Unknown benchmarks {sorted(unknown)}; choose from engine, scale, prefilter.")
    tiny = ["--tiny"] if args.tiny else []
    for name in chosen:
        print(f"== {name} ==", flush=True)
        if name == "engine":
            if args.tiny:
                print("bench_engine has no tiny mode (it measures the real model); skipped", flush=True)
                continue
            import bench_engine

            bench_engine.main(shlex.split(args.engine_args) + tiny)
        elif name == "scale":
            import bench_scale

            bench_scale.main(shlex.split(args.scale_args) + tiny)
        else:
            import bench_prefilter

            bench_prefilter.main(shlex.split(args.prefilter_args) + tiny)


if __name__ == "__main__":
    main(sys.argv[1:])
