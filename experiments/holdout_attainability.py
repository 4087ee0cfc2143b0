"""Is the holdout family's S visible in the pixels? (diagnostic; reads generator internals).

The truth is Var(E[.|S]); an analysis can only reach it if S is recoverable from the crops.
This renders cells, then predicts S (cell type; program z1..z3) with cross-validated gradient
boosting from (a) the package's measured features and (b) those plus three measurements aimed at
the anchors the package does not read (contour roughness about the moments ellipse, polarity
= plane-fit gradient of the core intensity, peripheral band = outer ring / next ring intensity)::

  python experiments/holdout_attainability.py --n 3000 --levels 0.15 0.7
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from scipy import ndimage
from skimage import measure
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.model_selection import cross_val_predict
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cosmic_jax.data import morph_features  # noqa: E402
from data_builders.families import holdout as H  # noqa: E402


def anchor_measurements(crops: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per crop: contour roughness, polarity gradient, peripheral band contrast (rotation invariant)."""
    out = []
    for img, m in zip(crops, masks > 0):
        props = measure.regionprops(m.astype(np.uint8))[0]
        cy, cx = props.centroid
        # Roughness: RMS of the boundary radius about its moments ellipse, relative to the radius.
        by, bx = np.nonzero(m & ~ndimage.binary_erosion(m))
        th = props.orientation
        u = (bx - cx) * np.sin(th) + (by - cy) * np.cos(th)
        v = (bx - cx) * np.cos(th) - (by - cy) * np.sin(th)
        r_rel = np.hypot(u / (props.axis_major_length / 2), v / max(props.axis_minor_length / 2, 1))
        depth = ndimage.distance_transform_edt(m)
        core = depth > 3
        yy, xx = np.nonzero(core)
        vals = img[core]
        # Polarity: plane fit of the core intensity, gradient magnitude times the radius over the mean.
        design = np.c_[np.ones(len(yy)), yy - cy, xx - cx]
        coef = np.linalg.lstsq(design, vals, rcond=None)[0]
        radius = np.sqrt(props.area / np.pi)
        ring = lambda lo, hi: img[(depth > lo) & (depth <= hi)].mean()  # noqa: E731
        out.append([r_rel.std(), np.hypot(coef[1], coef[2]) * radius / vals.mean(), ring(0, 2.5) / ring(3, 6)])
    return np.asarray(out)


def recoverability(x: np.ndarray, state: dict, world: H.World, seed: int) -> dict:
    zs = (state["z"] - world.z_centre) / world.z_sd
    out = {}
    for j in range(zs.shape[1]):
        pred = cross_val_predict(HistGradientBoostingRegressor(random_state=seed), x, zs[:, j], cv=3)
        out[f"z{j + 1}_r2"] = float(1 - np.mean((pred - zs[:, j]) ** 2) / zs[:, j].var())
    pred = cross_val_predict(HistGradientBoostingClassifier(random_state=seed), x, state["type"], cv=3)
    out["type_accuracy"] = float(np.mean(pred == state["type"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--levels", type=float, nargs="+", default=[0.15, 0.7], help="morph_shared values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=80)
    args = p.parse_args(argv)
    threadpool_limits(1)  # OpenMP boosting threads crawl on a shared, oversubscribed machine
    world = H.make_world(H.HoldoutConfig(crop_size=args.crop_size), args.seed)
    state = H.sample_state(world, args.n, H.rng_for(args.seed, H.CHECK))
    results = {}
    for a in args.levels:
        images, masks = H.render_cells(world, state, H.morph_private(args.n, H.rng_for(args.seed, H.CHECK, 1)), a,
                                       H.rng_for(args.seed, H.CHECK, 2))
        crops = H.masked_crops(images, masks)
        feats = morph_features.measure_batch(crops)
        both = np.concatenate([feats, anchor_measurements(crops, masks)], axis=1)
        results[str(a)] = {"package_features": recoverability(feats, state, world, args.seed),
                           "plus_anchor_measurements": recoverability(both, state, world, args.seed)}
        print(json.dumps({a: results[str(a)]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
