"""``cosmic embed`` / ``Embedder`` read-out settings.

``cosmic embed --checkpoint W --input CROPS --output emb.npy --config.pool=cls --config.layer=-2``.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default",)


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    del name
    c = ml_collections.ConfigDict()
    c.layer = -1  # encoder block to read (-1 = last, with the final norm)
    c.pool = "mean"  # "mean" of patch tokens or the "cls" token
    c.batch_size = 256
    # CPU hosts: split into N XLA devices, each batch spread over them (-1 = auto: one per core while
    # each gets >= 64 images; 1 = one device). Other backends use all their local devices.
    c.cpu_devices = -1
    return c
