"""``cosmic data nuclei`` and ``cosmic data paired`` settings: segmentation and cropping.

Segmentation knobs are relative to the nucleus diameter d, estimated per frame (or given as
``segment.nucleus_diameter_px``); the absolute pixel overrides (``segment.background_radius`` ...)
win when set. Example: ``cosmic data nuclei --images 'raw/*.tif' --out crops --config.crop.size=96
--config.segment.noise_k=4``. Measured defaults: BUILD_NOTES "Nuclei crop builder".
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default", "paired")



def get_config(name: str = "default") -> ml_collections.ConfigDict:
    """``default``: ``cosmic data nuclei``; ``paired``: ``cosmic data paired`` (one brightness scale
    for the whole dataset, ``crop.norm="dataset"``)."""
    c = ml_collections.ConfigDict()
    s = c.segment = ml_collections.ConfigDict()
    s.nucleus_diameter_px = ml_collections.config_dict.placeholder(float)  # None: estimate d per frame
    s.low_percentile = 0.1  # intensity scaling: p_lo -> 0
    s.high_percentile = 99.9  # p_hi -> 1 (brighter pixels, e.g. hot pixels, are clipped)
    s.noise_k = 3.0  # threshold >= background median + noise_k * pixel-noise sigma
    s.blob_k = 5.0  # scale estimate: blobs must exceed blob_k noise sigmas of the LoG
    s.blob_rel = 0.25  # ... and blob_rel of the strongest blob's response
    s.intensity_weight = 1.0  # weight of intensity vs distance in the watershed landscape
    s.edge_fraction = 0.5  # instance edge at this fraction of its own peak contrast; 0 = off
    s.merge_area_rel = 1.0  # merge touching pieces up to this / (pi d^2 / 4) (one nucleus); 0 = off
    s.merge_saddle = 0.5  # ... when the path between them stays above this of the dimmer's peak contrast
    s.background_rel = 1.0  # background filter size / d
    s.sigma_rel = 0.04  # Gaussian smoothing before thresholding / d
    s.opening_rel = 0.04  # opening radius / d (at least 1 px)
    s.min_area_rel = 0.05  # smallest kept instance / (pi d^2 / 4)
    s.max_area_rel = 0.0  # largest kept instance / (pi d^2 / 4); 0 disables
    s.min_distance_rel = 0.25  # watershed seed spacing / d
    s.dist_sigma_rel = 0.04  # smoothing of the distance transform / d
    s.intensity_sigma_rel = 0.1  # smoothing of the landscape's intensity part / d
    # absolute overrides in pixels (None = derive from d)
    s.background_radius = ml_collections.config_dict.placeholder(int)
    s.sigma = ml_collections.config_dict.placeholder(float)
    s.min_area = ml_collections.config_dict.placeholder(int)
    s.max_area = ml_collections.config_dict.placeholder(int)
    s.min_distance = ml_collections.config_dict.placeholder(int)
    s.dist_sigma = ml_collections.config_dict.placeholder(float)
    s.intensity_sigma = ml_collections.config_dict.placeholder(float)
    s.opening_radius = ml_collections.config_dict.placeholder(int)
    k = c.crop = ml_collections.ConfigDict()
    k.size = 64  # crop side (pixels)
    # nuclei: "crop" (per nucleus p1..p99 -> [0,1]) | "image" (one scale per frame);
    # paired: "dataset" (one scale for all cells) | "crop" | "none" (source pixels)
    k.norm = "dataset" if name == "paired" else "crop"
    k.downscale_large = False  # nuclei larger than the crop: shrink to fit instead of dropping
    k.skip_empty = False  # frames with no nuclei: count and skip instead of failing
    k.skip_unreadable = False  # unreadable/unusable image files: count and skip instead of failing
    k.channel = ml_collections.config_dict.placeholder(int)  # nucleus channel of RGB(A) inputs
    k.pixel_size = ml_collections.config_dict.placeholder(float)  # microns per input pixel (--pixel-size)
    k.target_pixel_size = ml_collections.config_dict.placeholder(float)  # microns per crop pixel; None: no rescaling
    c.records_per_shard = 4096  # crops per ArrayRecord shard (readers keep one open file per shard)
    # float crops on disk: "uint16" (per-crop quantised, error <= range / 131070), "uint8", or exact
    # "float32"; integer crops keep their dtype exactly whatever this says
    c.float_storage = "uint16"
    return c
