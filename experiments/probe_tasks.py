"""Search for a labelled crop task on which MAE pretraining measurably beats random init.

Trains with the tests' settings (vit_test 32x32, batch 32; by default 8 forced host devices with
FSDP and 40 steps, like the reference run; add ``--config.mesh.fsdp=1 --config.mesh.num_devices=1``
for one device) on a chosen training set, and probes candidate labelled crop sets at step 0 (random
init) and every ``--every`` steps with the same kNN / logistic probe as ``cosmic pretrain``.

Training sets / tasks: blobs (size), orient, lobes, ell_elong, edge, scramble, stripe_hv,
stripe_diag (blurred-ellipse variants), profile, texture, grain, nucleoli, elong, types4
(``data_builders.render`` nuclei); unlabelled training mixes: mix, ellmix, stripes.

usage: python experiments/probe_tasks.py --train mix --seeds 3 4 5 --steps 300 --every 150 \
           --n-probe 256 --tasks profile ell_elong --config.mesh.fsdp=1 --config.mesh.num_devices=1 \
           --config.optim.lr=2e-3
smoke: python experiments/probe_tasks.py --steps 4 --every 2 --n-probe 32 --tasks blobs orient
"""

import argparse
import os
import tempfile

from cosmic_jax.runtime import split_cpu_devices

split_cpu_devices(8)  # before jax starts its backends; an explicit XLA_FLAGS device count wins
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from cosmic_jax.configs import pretrain  # noqa: E402
from cosmic_jax.configs.overrides import ConfigError, load_config  # noqa: E402
from cosmic_jax.models.mae import MAE, model_config  # noqa: E402
from cosmic_jax.testing.crops import blob_crops, write_labelled_dataset  # noqa: E402
from cosmic_jax.testing.runs import enable_compile_cache  # noqa: E402
from cosmic_jax.train import optim  # noqa: E402
from cosmic_jax.train.loop import Hook  # noqa: E402
from cosmic_jax.train.mae import create_train_state  # noqa: E402
from cosmic_jax.train.metrics import read_metrics  # noqa: E402
from cosmic_jax.train.pretrain import run_rngs, train_and_evaluate  # noqa: E402
from cosmic_jax.train.probe import load_probe_set, probe_scores  # noqa: E402
from data_builders.probe_crops import chromatin_params  # noqa: E402
from data_builders.render import MORPH_PARAMS, render_batch  # noqa: E402

flags.FLAGS.mark_as_parsed()


def shifted(images, rng, max_shift):
    """Random integer translations (zero fill), so the nucleus is not always centred."""
    out = np.zeros_like(images)
    n, s, _ = images.shape
    for i in range(n):
        dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
        src = images[i, max(0, -dy):s - max(0, dy), max(0, -dx):s - max(0, dx)]
        out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def ellipses(n, seed, size=32, task="orient"):
    """Blurred ellipses; ``orient``: horizontal (0) vs vertical (1) long axis; ``lobes``: one vs two
    nuclei of equal total area; ``ellmix``: unlabelled, any aspect and angle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((n, size, size, 1), np.float32)
    labels = rng.integers(0, 2, n)

    def blob(cy, cx, a, b, th, sharp=6.0):
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return 1.0 / (1.0 + np.exp((d - 1.0) * sharp))

    for i in range(n):
        r = rng.uniform(5.0, 7.0)
        cy, cx = rng.uniform(size * 0.4, size * 0.6, 2)
        if task == "orient":
            ar = rng.uniform(1.8, 2.4)
            th = rng.normal(0, 0.15) + (np.pi / 2 if labels[i] else 0.0)
            img = blob(cy, cx, r * ar ** 0.5, r / ar ** 0.5, th)
        elif task == "lobes":
            th = rng.uniform(0, np.pi)
            if labels[i]:
                rr, off = r / np.sqrt(2), r * 0.8
                img = np.maximum(blob(cy + off * np.sin(th), cx + off * np.cos(th), rr, rr, 0),
                                 blob(cy - off * np.sin(th), cx - off * np.cos(th), rr, rr, 0))
            else:
                ar = rng.uniform(1.0, 1.3)
                img = blob(cy, cx, r * ar ** 0.5, r / ar ** 0.5, th)
        elif task == "ell_elong":  # round (0) vs elongated (1) at equal area, any angle
            ar = rng.uniform(2.0, 2.6) if labels[i] else rng.uniform(1.0, 1.2)
            img = blob(cy, cx, r * ar ** 0.5, r / ar ** 0.5, rng.uniform(0, np.pi))
        elif task == "edge":  # sharp (0) vs soft (1) nuclear boundary, same half-max size
            ar = rng.uniform(1.0, 1.5)
            img = blob(cy, cx, r * ar ** 0.5, r / ar ** 0.5, rng.uniform(0, np.pi), 2.0 if labels[i] else 12.0)
        elif task == "scramble":  # intact (0) vs the same kind of nucleus with its 8x8 tiles permuted (1)
            ar = rng.uniform(1.0, 2.0)
            img = blob(cy, cx, r * 1.3 * ar ** 0.5, r * 1.3 / ar ** 0.5, rng.uniform(0, np.pi))
            if labels[i]:
                g = size // 8
                tiles = img.reshape(g, 8, g, 8).transpose(0, 2, 1, 3).reshape(g * g, 8, 8)
                tiles = tiles[rng.permutation(g * g)]
                img = tiles.reshape(g, g, 8, 8).transpose(0, 2, 1, 3).reshape(size, size)
        elif task.startswith("stripe"):  # nucleus with banded chromatin; the band angle is the class
            ar = rng.uniform(1.0, 1.6)
            mask = blob(cy, cx, r * 1.4 * ar ** 0.5, r * 1.4 / ar ** 0.5, rng.uniform(0, np.pi))
            if task == "stripe_hv":
                ang = rng.normal(0, 0.1) + (np.pi / 2 if labels[i] else 0.0)
            elif task == "stripe_diag":
                ang = rng.normal(0, 0.1) + (np.pi / 4 if labels[i] else 0.0) + np.pi / 2 * rng.integers(2)
            else:
                ang = rng.uniform(0, np.pi)
            period = rng.uniform(3.5, 6.0)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.cos(2 * np.pi * ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / period + phase)
            img = mask * (1.0 + 0.6 * wave) / 1.6
        else:
            ar = rng.uniform(1.0, 2.6)
            img = blob(cy, cx, r * ar ** 0.5, r / ar ** 0.5, rng.uniform(0, np.pi))
        img = rng.uniform(0.6, 1.0) * img + rng.normal(0, 0.03, img.shape)
        images[i, :, :, 0] = img
    return images, labels


def render_task(task, n, seed, size=32):
    """(images (n, size, size, 1), labels (n,) in {0, 1}) for one candidate task."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 2, n)
    p = chromatin_params(rng, n, mixed=(task == "mix"))  # "mix": unlabelled training mix, everything varies
    if task == "profile":  # ring vs dome at equal mean intensity
        p["profile"] = np.where(lab == 0, rng.uniform(-1.0, -0.6, n), rng.uniform(0.6, 1.0, n))
    elif task == "texture":  # smooth vs grainy chromatin
        p["texture_amplitude"] = np.where(lab == 0, 0.02, rng.uniform(0.35, 0.5, n))
    elif task == "grain":  # fine vs coarse chromatin grain at strong amplitude
        p["texture_amplitude"] = np.full(n, 0.4)
        p["texture_scale"] = np.where(lab == 0, 0.7, 2.0)
    elif task == "nucleoli":  # one vs many nucleoli
        p["nucleoli_rate"] = np.where(lab == 0, 0.0, 5.0)
        p["nucleoli_brightness"] = np.full(n, 0.5)
    elif task == "elong":  # round vs elongated at equal area
        p["elongation"] = np.where(lab == 0, rng.uniform(1.0, 1.15, n), rng.uniform(2.2, 2.6, n))
    elif task == "types4":  # 4 "cell types": ring/dome chromatin x round/elongated
        lab = rng.integers(0, 4, n)
        p["profile"] = np.where(lab % 2 == 0, -1.0, 1.0) * rng.uniform(0.6, 1.0, n)
        p["elongation"] = np.where(lab // 2 == 0, rng.uniform(1.0, 1.15, n), rng.uniform(1.9, 2.3, n))
    elif task == "mix":
        pass
    else:
        raise KeyError(task)
    img, _ = render_batch({k: p[k] for k in MORPH_PARAMS}, rng, image_size=size)
    img = shifted(img, rng, 4)
    return img[..., None].astype(np.float32), lab


def write(task, out_dir, n, seed):
    if task == "blobs":
        images, lab = blob_crops(n, 32, seed)
    elif task in ("orient", "lobes", "ellmix", "ell_elong", "edge", "scramble", "stripes", "stripe_hv", "stripe_diag"):
        images, lab = ellipses(n, seed, task=task)
    else:
        images, lab = render_task(task, n, seed)
    return write_labelled_dataset(out_dir, images, lab, [str(k) for k in range(int(lab.max()) + 1)], f"{task}{seed}")


TASKS = ["blobs", "orient", "lobes", "profile", "nucleoli", "elong"]
BASE = [f"--config.{x}" for x in (
    "log_every=1", "ckpt_every=1000", "keep_ckpts=1", "recon_every=0", "probe_every=0", "progress=false",
    "mesh.fsdp=8", "loader.global_batch=32", "loader.read_threads=1",
)]


def run_config(steps: int, seed: int, extra: list[str]):
    # warmup: 5 steps, as the reference run of the tests had when this search was made
    return load_config(pretrain, "test", BASE + [f"--config.steps={steps}", f"--config.seed={seed}",
                                                 f"--config.optim.warmup_fraction={min(0.5, 5 / steps)}"] + extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="blobs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--n-probe", type=int, default=96)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    args, extra = ap.parse_known_args()
    try:
        run_config(args.steps, 0, extra)
    except ConfigError as err:
        ap.error(str(err))

    enable_compile_cache()
    with tempfile.TemporaryDirectory(prefix="probe_tasks_") as tmp:
        train = write(args.train, os.path.join(tmp, "train"), 192, seed=1)
        sets = {t: load_probe_set(write(t, os.path.join(tmp, t), args.n_probe, seed=2), "cell_type", 10_000)
                for t in args.tasks}
        for seed in args.seeds:
            run_seed(args, seed, run_config(args.steps, seed, extra), train, sets, os.path.join(tmp, f"w{seed}"))


def run_seed(args, seed, cfg, train, sets, workdir):
    model_cfg = model_config(cfg.model)
    enc = jax.jit(lambda params, x: MAE(model_cfg).apply({"params": params}, x, method=MAE.encode, pool="mean"))
    rows = {}

    def probe(step, state):
        for t, (x, y) in sets.items():
            emb = np.asarray(jax.device_get(enc(state.params, x)), np.float64)
            s = probe_scores(emb, y, seed=seed)
            rows.setdefault(t, {})[step] = (s["probe/knn_acc"], s["probe/linear_acc"])

    # step 0: the same init as train_and_evaluate (run_rngs(seed)[0]); the optimizer does not enter it
    ocfg = optim.resolve(cfg.optim, cfg.steps, cfg.loader.global_batch)
    probe(0, create_train_state(model_cfg, ocfg, run_rngs(seed)[0]))
    train_and_evaluate(cfg, train, workdir, extra_hooks=(Hook(args.every, probe, "p"),))
    loss = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    k = max(1, len(loss) // 8)
    print(f"seed {seed} loss by {k}-step windows:", " ".join(f"{np.mean(loss[i:i + k]):.3f}" for i in range(0, len(loss), k)))
    for t, r in rows.items():
        print(f"seed {seed} {t:9s} " + "  ".join(f"{s}: knn {a:.2f} lin {b:.2f}" for s, (a, b) in sorted(r.items())),
              flush=True)


if __name__ == "__main__":
    main()
