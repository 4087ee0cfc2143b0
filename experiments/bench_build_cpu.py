"""CPU cost per crop of building a crop dataset: the whole nuclei build, and the shard writer alone.

Per-core figures for the scaling model in notes/loader.md (CPU time of this process, so they hold
on a machine shared with other jobs). Sources: the 8 files of ``bench_builder.py`` (shipped real
images).

    .venv/bin/python experiments/bench_build_cpu.py --reps 3 --json build_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from bench_builder import make_sources
from cosmic_jax.data import records
from data_builders import nuclei


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out: dict = {"load_avg_1min": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_sources(tmp)
        build, crops = [], None
        for r in range(args.reps):
            c0 = time.process_time()
            m = nuclei.build_dataset(sources, os.path.join(tmp, f"out{r}"))
            build.append(time.process_time() - c0)
            crops = m["num_records"]
        src = records.CropSource(os.path.join(tmp, "out0"))
        images = src.read_images(np.arange(len(src)))
        ids, metas = src.read_meta(np.arange(len(src)))
        encoded = [records.encode_record(im, c, mt) for im, c, mt in zip(images, ids, metas)]
        out["build"] = {"crops": crops, "images": len(sources), "bytes_per_crop": m["bytes_per_crop"],
                        "cpu_s": build, "crops_per_cpu_s": crops / float(np.median(build))}
        for storage in records.FLOAT_STORAGE:
            cpu = []
            for r in range(args.reps):
                c0 = time.process_time()
                w = records.write_shards(encoded, os.path.join(tmp, f"w-{storage}-{r}"), float_storage=storage)
                cpu.append(time.process_time() - c0)
            out[f"write_{storage}"] = {"crops_per_cpu_s": len(encoded) / float(np.median(cpu)),
                                       "bytes_per_crop": w["bytes_per_crop"]}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
