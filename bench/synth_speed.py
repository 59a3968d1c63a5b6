"""Benchmark: how fast the synthetic CLEVR generator makes images (target: 10k at 480x320 in < 60 s on 2 cores).

Times the whole job wall-clock, pool start-up and per-process shape-cache warm-up included:
  - "generate": clevr_sample for every index in a spawn pool (images stay in memory; PIL image objects),
  - "write" (with --write): write_dataset(..., fmt="superclevr"), i.e. generation + PNG encoding + files.

    .venv/bin/python -m bench.synth_speed                      # 10k images, 2 workers
    .venv/bin/python -m bench.synth_speed --n 2000 --workers 1 --write
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from suzak.synth import clevr_sample
from suzak.synth.writers import write_dataset

_ARGS: dict = {}


def _init(args: dict) -> None:
    _ARGS.update(args)


def _generate(i: int) -> int:
    sample = clevr_sample(i, _ARGS["seed"], _ARGS["split"], image_size=_ARGS["image_size"])
    return sample.image.size[0] + int(sample.answer)  # touch the result so nothing is optimised away


def time_generate(n: int, workers: int, seed: int, split: str, image_size: tuple[int, int]) -> float:
    args = {"seed": seed, "split": split, "image_size": image_size}
    start = time.perf_counter()
    if workers > 0:
        with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(args,)) as pool:
            for _ in pool.imap_unordered(_generate, range(n), chunksize=64):
                pass
    else:
        _init(args)
        for i in range(n):
            _generate(i)
    return time.perf_counter() - start


def time_write(n: int, workers: int, seed: int, split: str, image_size: tuple[int, int]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_dataset("clevr", n, seed, Path(tmp) / "out", "superclevr", split=split, workers=workers,
                      image_size=image_size)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="A", choices=["A", "B"])
    parser.add_argument("--size", default="480x320", help="WxH")
    parser.add_argument("--write", action="store_true", help="also time writing PNG files (superclevr format)")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    print(f"cpu cores visible: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    elapsed = time_generate(args.n, args.workers, args.seed, args.split, (w, h))
    print(f"generate: {args.n} CLEVR images {w}x{h} with {args.workers} workers in {elapsed:.1f} s "
          f"= {args.n / elapsed:.0f} images/s")
    if args.write:
        elapsed = time_write(args.n, args.workers, args.seed, args.split, (w, h))
        print(f"write:    {args.n} CLEVR PNGs {w}x{h} (superclevr format) with {args.workers} workers in "
              f"{elapsed:.1f} s = {args.n / elapsed:.0f} images/s")


if __name__ == "__main__":
    main()
