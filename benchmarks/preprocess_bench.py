"""Reference vs fast CPU preprocessing, side by side, same process, same images.

    .venv/bin/python benchmarks/preprocess_bench.py [--repeats 9] [--json out.json]

Each image is a seeded random RGB array of the given size, already decoded (decoding is the
same Pillow call on both paths and is excluded). Both paths produce bit-identical output, which
is asserted before timing. Prints median times and the speed-up; writes JSON with the machine.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.preprocess import (
    preprocess_image,  # noqa: E402
    preprocess_image_fast,  # noqa: E402
)

SIZES = [(1920, 1080), (4000, 3000)]


def bench(fn, img, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(img)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref, fast = preprocess_image(img), preprocess_image_fast(img)
        assert np.array_equal(ref.pixel_values, fast.pixel_values), "outputs differ"
        r_med, r_min = bench(preprocess_image, img, args.repeats)
        f_med, f_min = bench(preprocess_image_fast, img, args.repeats)
        rows.append({"size": f"{w}x{h}", "tiles": ref.num_tiles, "grid": list(ref.grid),
                     "reference_ms": round(r_med * 1e3, 1), "fast_ms": round(f_med * 1e3, 1),
                     "reference_min_ms": round(r_min * 1e3, 1), "fast_min_ms": round(f_min * 1e3, 1),
                     "speedup": round(r_med / f_med, 2), "identical": True})
    print(f"{'image':>10} {'tiles':>5} {'reference ms':>13} {'fast ms':>8} {'speed-up':>9}")
    for r in rows:
        print(f"{r['size']:>10} {r['tiles']:>5} {r['reference_ms']:>13} {r['fast_ms']:>8} {r['speedup']:>8}x")
    result = {"benchmark": "preprocess_cpu", "repeats": args.repeats, "seed": args.seed,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d"), "results": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
