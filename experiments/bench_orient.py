"""Host cost of putting crops into an MAE's pose (``orient_batch``), beside the embedding forward.

The Embedder orients crops as cut on the host before the jitted forward (``cosmic_jax/data/orient.py``);
this measures, in CPU seconds of this process, crops per CPU-second of segmentation alone, of the whole
orientation (segmentation + moments + bilinear warp), and of the default read-out's forward of the
analysis's ``small`` MAE (8 dihedral views) on the same crops, alternating in each round.

    python experiments/bench_orient.py --crops 512 --reps 5 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cosmic_jax.configs import pretrain as pretrain_configs
from cosmic_jax.data.morph_features import segment_batch
from cosmic_jax.data.orient import orient_batch
from cosmic_jax.embed import Embedder
from cosmic_jax.models.mae import init_variables, model_config
from data_builders import render


def cpu_rate(fn, n: int) -> float:
    t = time.process_time()
    fn()
    return n / (time.process_time() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import jax

    rng = np.random.default_rng(0)
    params_ = render.params_from_latent(rng.standard_normal((args.crops, len(render.MORPH_PARAMS))))
    crops = render.render_batch(params_, rng)[0].astype(np.float32)[..., None]
    cfg = model_config(pretrain_configs.get_config("small").model)
    params = init_variables(cfg, jax.random.key(0))["params"]  # the Embedder unboxes
    emb = Embedder(cfg, params, batch_size=256, orient=False, progress=False)
    steps = {
        "segment": lambda: segment_batch(crops[..., 0]),
        "orient": lambda: orient_batch(crops, scale=1.3),
        "embed_small_default_readout": lambda: emb.embed(crops),
    }
    for fn in steps.values():  # warm-up (compile)
        fn()
    rows = {k: [] for k in steps}
    for _ in range(args.reps):
        for k, fn in steps.items():
            rows[k].append(cpu_rate(fn, len(crops)))
    out = {k: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v)), "runs": v}
           for k, v in rows.items()}
    out["orient_cpu_per_embed_cpu"] = out["embed_small_default_readout"]["median"] / out["orient"]["median"]
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: round(vv, 1) for kk, vv in v.items() if kk != "runs"})
                      for k, v in out.items()}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
