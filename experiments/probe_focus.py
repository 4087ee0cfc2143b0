"""Probe (issue 13): does an edge-width focus criterion separate out-of-focus objects?

Replicates ``segment_nuclei`` of commit 1655a23 (before merge_fragments) up to its labels, then
measures each object's edge width ``w = C / (sqrt(2 pi) g) `` (C: peak contrast of the 0.1 d
smoothed image, g: its largest gradient within 0.15 d of the object; for a step edge blurred by
sigma this is sigma), minus the 0.1 d smoothing in quadrature, over the diameter d. Prints, per
image, F1 of the labels as they are and after dropping objects with w/d above 0.08, 0.10, 0.12,
0.14 ("w_abs") or above 1.5 / 2 x the frame's median w ("w_rel"), after dropping objects whose
peak contrast C is below 0.4-0.7 of the frame's median object contrast ("c_rel": a defocused
nucleus spreads its light, so its peak falls), and the bound any rejection rule has (precision 1:
2R / (1 + R)). ``--merge`` first applies merge_fragments as segment_nuclei does (the defaults
since it was added). Results: notes/segmentation.md, "Focus criteria (not adopted)".

    PYTHONPATH=. .venv/bin/python experiments/probe_focus.py            # before merge_fragments
    PYTHONPATH=. .venv/bin/python experiments/probe_focus.py --merge    # on the current labels
"""

import math
import sys

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, segmentation

from data_builders import segment as seg

P = seg.segment_params(merge_area_rel=0.0)


def run(img, merge=False, params=P):
    """``segment_nuclei``'s labels (without merge_fragments unless ``merge``) and intermediates."""
    z = seg.scale_intensity(img, params.low_percentile, params.high_percentile)
    noise = seg.noise_sigma(z)
    d = params.nucleus_diameter_px or seg.estimate_diameter(z, noise, params)
    px = seg.pixel_params(params, d)
    fg, x, smooth = seg.foreground_mask(z, noise, px, params.noise_k)
    dist = ndi.distance_transform_edt(fg)
    dist = filters.gaussian(dist, px["dist_sigma"])
    inten = filters.gaussian(x, px["intensity_sigma"], preserve_range=True)
    land = dist / max(np.percentile(dist[fg], 99), 1e-6)
    land = land + params.intensity_weight * inten / max(np.percentile(inten[fg], 99), 1e-6)
    comps = measure.label(fg)
    seeds = feature.peak_local_max(land, min_distance=px["min_distance"], labels=comps, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    labels = segmentation.watershed(-land, markers, mask=fg)
    bg = float(np.median(smooth[~fg]))
    labels = seg.trim_edges(labels, smooth, inten, bg, params.edge_fraction)
    if merge:
        labels = seg.merge_fragments(labels, inten, bg, params.merge_saddle, math.pi * d**2 / 4)
    labels, _ = seg.filter_sizes(labels, px["min_area"], px["max_area"])
    return {"inten": inten, "labels": labels, "d": d, "px": px, "bg": bg}


def focus_width(r):
    lab, d = r["labels"], r["d"]
    inten, s = r["inten"], r["px"]["intensity_sigma"]
    gy, gx = np.gradient(inten)
    idx = np.arange(1, lab.max() + 1)
    contrast = np.asarray(ndi.maximum(inten, lab, idx)) - r["bg"]
    grow = segmentation.expand_labels(lab, distance=max(1, round(0.15 * d)))
    w = contrast / (math.sqrt(2 * math.pi) * np.asarray(ndi.maximum(np.hypot(gx, gy), grow, idx)))
    return np.sqrt(np.maximum(w**2 - s**2, 0)) / d


def main(argv=None):
    merge = "--merge" in (sys.argv[1:] if argv is None else argv)
    samples = seg.labelled_samples()
    img, gt = samples["stardist"]
    samples["stardist_blur0.05d"] = (filters.gaussian(img, 0.05 * 23.7, preserve_range=True), gt)
    variants = [("w_abs", t) for t in (0.08, 0.10, 0.12, 0.14)] + [("w_rel", k) for k in (1.5, 2.0)]
    variants += [("c_rel", f) for f in (0.4, 0.5, 0.6, 0.7)]
    print("image F1 " + " ".join(f"{k}{t}" for k, t in variants) + " bound")
    for name, (img, gt) in samples.items():
        r = run(img, merge)
        w, lab = focus_width(r), r["labels"]
        idx = np.arange(1, lab.max() + 1)
        contrast = np.asarray(ndi.maximum(r["inten"], lab, idx)) - r["bg"]
        base = seg.instance_f1(lab, gt)
        row = [base["f1"]]
        for kind, t in variants:
            if kind == "c_rel":
                keep = contrast >= t * np.median(contrast)
            else:
                keep = w <= (t if kind == "w_abs" else t * np.median(w))
            row.append(seg.instance_f1(np.where(np.r_[False, keep][lab], lab, 0), gt)["f1"])
        row.append(2 * base["recall"] / (1 + base["recall"]))
        print(name, " ".join(f"{v:.3f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
