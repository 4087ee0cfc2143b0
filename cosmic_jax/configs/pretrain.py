"""MAE pretraining runs: ``cosmic pretrain --config NAME --data DIR --workdir W --steps N``.

Variants (``get_config(NAME)``): ``test`` (tiny, 32x32 crops, seconds per 100 steps: unit tests),
``small`` (a small MAE for 64x64 crops that trains in minutes on a CPU; also the MAE that
``cosmic analyze`` pretrains when given none), ``mini`` (a 4-block MAE for 64x64 crops, ~15 min on a
2-core CPU, to pretrain once on oriented crops and reuse with ``cosmic analyze --mae``; notes/science.md
round 9) and one per model of ``configs/mae.py``: ``vit_t8_64``, ``vit_s8_64``, ``vit_b16_128``,
``vit_l16_224``. Override any field, e.g.

    cosmic pretrain --config vit_s8_64 --data crops --workdir runs/mae --steps 20 \
        --config.optim.lr=3e-4 --config.model.mask_ratio=0.6 --config.mesh.fsdp=2

Cost on a 2-core CPU (measured, BUILD_NOTES "MAE speed"): vit_s8_64 runs ~45 img/s, so its default
100k steps x 256 images is ~160 h; 10,000 steps ~16 h. Use a GPU/TPU for real runs.
"""

from __future__ import annotations

import ml_collections

from cosmic_jax.configs import mae, optim

# name -> (model variant, peak lr, global batch, steps, warmup fraction)
_RUNS = {
    "test": ("vit_test", 1e-3, 32, 200, 0.05),
    "small": ("vit_test", 1e-3, 32, 300, 0.05),
    "mini": ("vit_mini_64", 1e-3, 128, 3500, 0.05),
    "vit_t8_64": ("vit_t8_64", 1.5e-4 * 256 / 128, 256, 50_000, 0.04),
    "vit_s8_64": ("vit_s8_64", 1.5e-4 * 256 / 128, 256, 100_000, 0.05),
    "vit_b16_128": ("vit_b16_128", 1.5e-4 * 512 / 256, 512, 100_000, 0.05),
    "vit_l16_224": ("vit_l16_224", 1.5e-4 * 1024 / 256, 1024, 100_000, 0.05),
}
VARIANTS = tuple(_RUNS)


def augment_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True
    c.rot90 = True  # a uniformly random multiple of 90 degrees
    c.flip = True  # mirror left-right with probability 1/2 (with rot90: all 8 symmetries)
    c.intensity_jitter = 0.1  # multiply by U(1 - j, 1 + j); 0 disables
    c.intensity_shift = 0.0  # add U(-s, s) in the crop's intensity units; 0 disables
    c.per_channel = True  # jitter/shift drawn per channel (stains vary independently)
    return c


def loader_config(global_batch: int = 128) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.global_batch = global_batch  # examples per step summed over all processes
    c.seed = 0  # shuffle order (augmentations are drawn on the device from the run's seed and step)
    c.shuffle = True
    c.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
    c.worker_count = 0  # grain worker processes (0 = in-process)
    c.worker_buffer_size = 2
    c.worker_transfer_mb = 4.0  # workers send batches in units of ~this many MB of stored pixels
    c.prefetch = 4
    c.read_threads = 2
    c.drop_remainder = True
    c.augment = augment_config()
    # crops reach the train step as stored (uint8/uint16 + per-crop scale/offset) and become float32
    # on the device: a third less host CPU per crop, half the bytes to the accelerator
    c.device_decode = True
    return c


def mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = -1  # data-parallel axis size; -1 = all devices // fsdp
    c.fsdp = 1  # parameter-sharding axis size (logical "embed" dims are split over it)
    c.num_devices = 0  # use only the first N devices (0 = all; single-process only)
    # CPU hosts only, applied before JAX starts: split the host into this many XLA devices (data
    # parallel over its cores). -1 = auto (one per core while each gets >= 64 images), 0 = off.
    c.cpu_devices = -1
    return c


def distributed_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = "auto"  # auto: when a coordinator is given or a cluster (SLURM, MPI, TPU) is detected
    c.coordinator_address = ""
    c.num_processes = 0  # 0 = from env / auto-detect
    c.process_id = -1  # -1 = from env / auto-detect
    c.cpu_collectives = "gloo"  # CPU backends only: "gloo" or "mpi"
    return c


def get_config(name: str = "test") -> ml_collections.ConfigDict:
    model, lr, batch, steps, warmup = _RUNS[name]
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = mae.get_config(model)
    c.optim = optim.get_config(lr=lr, warmup_fraction=warmup, weight_decay=0.05, clip_norm=1.0, microbatch=-1)
    c.loader = loader_config(batch)
    c.mesh = mesh_config()
    c.distributed = distributed_config()
    c.steps = steps
    c.seed = 0
    c.log_every = 10
    c.ckpt_every = 500
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.recon_every = 500  # 0 = off; PNG grids in W/recon/
    c.recon_images = 8
    c.probe_every = 0  # 0 = off; kNN/linear probe on labelled crops
    c.probe_at_start = True  # also probe the random-init model: the baseline training must beat
    c.probe_data = ""  # crop dataset with labels in meta; "" = the training data
    c.probe_label = "cell_type"
    c.probe_max = 1024
    c.log_batch_indices = False  # W/batch_indices.p<i>.jsonl (data-order checks)
    c.progress = True
    if name in ("test", "small"):
        c.ckpt_every = 100
        c.recon_every = 100
    if name == "small":
        c.model.image_size = 64
    if name == "mini":
        c.model.mask_ratio = 0.6
    return c
