"""``cosmic embed`` / ``Embedder`` read-out settings.

``cosmic embed --checkpoint W --input CROPS --output emb.npy --config.pool=cls --config.layer=-2``.
Defaults (notes/science.md): mean and std of the patch tokens of a middle and the last block,
averaged over the 8 rotations / reflections of each crop.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default",)


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    del name
    c = ml_collections.ConfigDict()
    # encoder blocks to read: "default" (a middle and the last), "all", or ints "-1" / "0,3" (-1 =
    # the last block, with the final norm); pooled read-outs of several blocks are concatenated
    c.layer = "default"
    c.pool = "mean_std"  # "mean_std" of the patch tokens, their "mean", or the "cls" token
    c.dihedral = True  # average over the 8 rotations / reflections (a nucleus has no orientation)
    # put the crops into the pose the MAE was pretrained in (rotated onto the nucleus's major axis and
    # magnified as its pose.json / export says): "auto" = when it was pretrained on oriented crops and
    # the input is not an oriented copy already, "yes", "no" (feed the crops as they are)
    c.orient = "auto"
    c.batch_size = 256
    # CPU hosts: split into N XLA devices, each batch spread over them (-1 = auto: one per core while
    # each gets >= 64 images; 1 = one device). Other backends use all their local devices.
    c.cpu_devices = -1
    return c
