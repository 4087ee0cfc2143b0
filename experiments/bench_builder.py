"""Throughput of the nuclei crop builder (crops/s) with 0 and K worker processes.

Sources: 8 real files made from the shipped images (stardist img2d + its 4 quadrants, the napari
time-lapse split into 3 files of 10 frames), so work spreads over processes.

    .venv/bin/python experiments/bench_builder.py --workers 0 2 --reps 3 --out bench_out/builder

Prints one JSON line per worker count: median and min/max crops/s over the repetitions (wall
clock of ``build_dataset``, including process spawn for K > 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import tifffile

from data_builders import images, nuclei


def make_sources(folder: str) -> list[str]:
    img = tifffile.imread(images.stardist_sample()[0])
    movie = tifffile.imread(images.napari_samples()["timelapse"])
    tifffile.imwrite(os.path.join(folder, "img2d.tif"), img)
    for k, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        tifffile.imwrite(os.path.join(folder, f"tile{k}.tif"), img[y : y + 256, x : x + 256])
    for k in range(3):
        part = movie[10 * k : 10 * (k + 1)]
        tifffile.imwrite(os.path.join(folder, f"movie{k}.tif"), part, photometric="minisblack")
    return images.find_images(folder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="scratch folder (default: a temp dir, removed)")
    args = p.parse_args(argv)
    scratch = args.out or tempfile.mkdtemp(prefix="bench_builder_")
    src_dir = os.path.join(scratch, "sources")
    os.makedirs(src_dir, exist_ok=True)
    sources = make_sources(src_dir)
    try:
        for k in args.workers:
            rates, n = [], 0
            for rep in range(args.reps):
                out = os.path.join(scratch, f"crops_w{k}_r{rep}")
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                m = nuclei.build_dataset(sources, out, workers=k)
                dt = time.perf_counter() - t0
                n = m["num_records"]
                rates.append(n / dt)
            print(json.dumps({
                "workers": k, "sources": len(sources), "crops": n, "reps": args.reps,
                "crops_per_s_median": round(float(np.median(rates)), 1),
                "crops_per_s_min": round(min(rates), 1), "crops_per_s_max": round(max(rates), 1),
                "cpu_count": os.cpu_count(),
            }))  # fmt: skip
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
