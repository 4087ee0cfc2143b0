"""Nuclei crop datasets from real images: segment, crop, normalise, stream into ArrayRecord shards.

One *task* is one source file (all of its frames). Tasks run in order in this process
(``workers=0``) or in ``workers`` spawned processes via ``Pool.imap`` (results come back in task
order, so the output is byte-identical whatever the worker count). Only one image's crops are
in flight per worker: the writer streams them into ``records.write_shards``.

``shard=(i, n)``: job ``i`` of ``n`` takes the ``i``-th contiguous block of the sorted source list
and writes ``crops-<i>-of-<n>-*.array_record`` + ``manifest-<i>-of-<n>.json`` +
``metadata-<i>-of-<n>.csv``; reading all manifests in name order gives exactly the single-job
dataset. Cell ids are ``<image key>[_t<frame>]_n<label>``, where the image key is the file's
path relative to the common folder of *all* sources (so every job agrees on it).

Normalisation (``norm``), applied to nucleus pixels only; background outside the mask is 0:

- ``crop`` (default): ``clip((x - p1) / (p99 - p1), 0, 1)`` with p1/p99 the 1st/99th percentile
  of this nucleus's raw pixels: removes brightness differences, keeps texture.
- ``image``: ``clip(x / p99.9, 0, 1)`` with p99.9 over all segmented nucleus pixels of the source
  frame: keeps relative brightness between nuclei of one frame.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import logging
import os
from typing import Any, Iterator

import numpy as np

from cosmic_jax.data import records
from data_builders import images as images_lib
from data_builders import segment as seg_lib

log = logging.getLogger(__name__)

NORMS = ("crop", "image")
CSV_COLUMNS = (
    "cell_id", "source", "frame", "n_frames", "label", "centroid_y", "centroid_x", "area",
    "eccentricity", "mean_intensity", "bbox_h", "bbox_w", "scale", "norm", "norm_lo", "norm_hi",
)  # fmt: skip
STAT_KEYS = (
    "images", "frames", "empty_frames", "candidates", "dropped_small", "dropped_large",
    "dropped_border", "dropped_too_large_for_crop", "downscaled", "crops",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CropParams:
    """How nuclei become crops."""

    size: int = 64  # crop side (pixels)
    norm: str = "crop"  # "crop" | "image", see module docstring
    downscale_large: bool = False  # nuclei larger than the crop: shrink to fit instead of dropping
    skip_empty: bool = False  # frames with no nuclei: count and skip instead of failing
    channel: int | None = None  # nucleus channel of RGB(A) inputs

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.size < 8:
            raise ValueError(f"crop size must be >= 8, got {self.size}")


def _window(arr: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """(side, side) window of ``arr`` at (top, left), zero-padded where it leaves the frame."""
    out = np.zeros((side, side), arr.dtype)
    h, w = arr.shape
    y0, y1 = max(top, 0), min(top + side, h)
    x0, x1 = max(left, 0), min(left + side, w)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = arr[y0:y1, x0:x1]
    return out


def extract_crops(
    frame: np.ndarray, labels: np.ndarray, params: CropParams, id_prefix: str
) -> tuple[list[tuple[np.ndarray, str, dict[str, Any]]], dict[str, int]]:
    """Cut one normalised, masked crop per nucleus of a frame.

    Args:
      frame: (H, W) raw intensities.
      labels: (H, W) instance labels from :func:`segment.segment_nuclei`.
      params: crop size / normalisation / large-nucleus policy.
      id_prefix: ``<image key>[_t<frame>]``; cell ids append ``_n<label>``.

    Returns:
      crops: list of (float32 (S, S, 1) crop, cell_id, metadata dict), in label order.
      stats: {"dropped_border", "dropped_too_large_for_crop", "downscaled", "crops"}.
    """
    from skimage import measure, transform

    frame = np.asarray(frame, np.float32)
    side = params.size
    fg = labels > 0
    image_scale = float(np.percentile(frame[fg], 99.9)) if fg.any() else 1.0
    image_scale = image_scale if image_scale > 0 else 1.0
    kept_labels, n_border = seg_lib.drop_border(labels)
    stats = {"dropped_border": n_border, "dropped_too_large_for_crop": 0, "downscaled": 0, "crops": 0}
    out = []
    for region in measure.regionprops(kept_labels, intensity_image=frame):
        cy, cx = region.centroid
        y0, x0, y1, x1 = region.bbox
        extent = max(y1 - y0, x1 - x0)
        scale = 1.0
        if extent > side:
            if not params.downscale_large:
                stats["dropped_too_large_for_crop"] += 1
                continue
            scale = side / (extent + 2)  # +2: a pixel of margin on each side after shrinking
            stats["downscaled"] += 1
        win = int(np.ceil(side / scale)) if scale != 1.0 else side
        # Centre the nucleus centroid on the crop's geometric centre (win - 1) / 2.
        top, left = int(round(cy - (win - 1) / 2)), int(round(cx - (win - 1) / 2))
        mask = _window(kept_labels == region.label, top, left, win)
        pix = _window(frame, top, left, win)
        if scale != 1.0:
            pix = transform.resize(pix, (side, side), order=1, anti_aliasing=True, preserve_range=True)
            mask = transform.resize(mask.astype(np.float32), (side, side), order=0) > 0.5
        values = frame[kept_labels == region.label]
        if params.norm == "crop":
            lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
        else:
            lo, hi = 0.0, image_scale
        if hi <= lo:  # flat nucleus: avoid 0/0 and map it to 1 so its mask stays visible
            lo = hi - 1.0
        crop = np.where(mask, np.clip((pix - lo) / (hi - lo), 0.0, 1.0), 0.0).astype(np.float32)
        cell_id = f"{id_prefix}_n{region.label}"
        meta = {
            "label": int(region.label),
            "centroid_y": float(cy),
            "centroid_x": float(cx),
            "area": int(region.area),
            "eccentricity": float(region.eccentricity),
            "mean_intensity": float(region.intensity_mean),
            "bbox_h": int(y1 - y0),
            "bbox_w": int(x1 - x0),
            "scale": float(scale),
            "norm": params.norm,
            "norm_lo": lo,
            "norm_hi": hi,
        }
        out.append((crop[..., None], cell_id, meta))
        stats["crops"] += 1
    return out, stats


def process_image(
    path: str, key: str, seg_params: seg_lib.SegmentParams, crop_params: CropParams
) -> tuple[list[bytes], list[dict[str, Any]], dict[str, int]]:
    """Segment and crop every frame of one source file.

    Args:
      path: image file.
      key: dataset-unique image key (cell id prefix).

    Returns:
      (encoded records, metadata CSV rows, stats with :data:`STAT_KEYS`), in frame/label order.
    """
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["images"] = 1
    recs, rows = [], []
    for t, n_frames, frame in images_lib.iter_frames(path, crop_params.channel):
        where = f"{path} frame {t}" if n_frames > 1 else path
        stats["frames"] += 1
        try:
            labels, seg_stats = seg_lib.segment_nuclei(frame, seg_params, where=where)
        except seg_lib.EmptySegmentationError:
            if not crop_params.skip_empty:
                raise
            log.info("%s: no nuclei, skipped (skip_empty)", where)
            stats["empty_frames"] += 1
            continue
        for k in ("candidates", "dropped_small", "dropped_large"):
            stats[k] += seg_stats[k]
        prefix = f"{key}_t{t}" if n_frames > 1 else key
        crops, crop_stats = extract_crops(frame, labels, crop_params, prefix)
        for k, v in crop_stats.items():
            stats[k] += v
        for crop, cell_id, meta in crops:
            meta = {"source": path, "frame": t, "n_frames": n_frames, **meta}
            recs.append(records.encode_record(crop, cell_id, meta))
            rows.append({"cell_id": cell_id, **meta})
    return recs, rows, stats


def _process_task(task):  # top-level so spawned workers can unpickle it
    return process_image(*task)


def image_keys(paths: list[str]) -> list[str]:
    """Dataset-unique keys: path relative to the sources' common folder, no extension,
    separators as ``__``. Two files with the same key (``a.tif`` and ``a.png``) are an error."""
    paths = [os.path.abspath(p) for p in paths]
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    keys = [os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "__") for p in paths]
    seen: dict[str, str] = {}
    for k, p in zip(keys, paths):
        if k in seen:
            raise images_lib.ImageError(f"sources {seen[k]} and {p} would share cell-id prefix {k!r}")
        seen[k] = p
    return keys


def shard_block(n_items: int, shard: tuple[int, int]) -> tuple[int, int]:
    """[start, stop) of job ``i`` of ``n``: contiguous, disjoint, covering, sizes differ by <= 1."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    return n_items * i // n, n_items * (i + 1) // n


def _job_names(shard: tuple[int, int]) -> tuple[str, str, str]:
    i, n = shard
    if n == 1:
        return "crops", "manifest.json", "metadata.csv"
    tag = f"{i:05d}-of-{n:05d}"
    return f"crops-{tag}", f"manifest-{tag}.json", f"metadata-{tag}.csv"


def _prepare_out_dir(out_dir: str, shard: tuple[int, int]) -> None:
    """Refuse to mix single-job and sharded outputs (or different n); clear this job's old files."""
    prefix, manifest, csv_name = _job_names(shard)
    os.makedirs(out_dir, exist_ok=True)
    n = shard[1]
    for m in glob.glob(os.path.join(out_dir, records.MANIFEST_GLOB)):
        name = os.path.basename(m)
        ok = name == "manifest.json" if n == 1 else name.endswith(f"-of-{n:05d}.json")
        if not ok:
            raise FileExistsError(
                f"{m}: {out_dir} already holds a dataset built with a different --shard layout; "
                "use an empty output folder"
            )
    stale = glob.glob(os.path.join(out_dir, f"{prefix}-[0-9]*.array_record"))
    for p in stale + [os.path.join(out_dir, manifest), os.path.join(out_dir, csv_name)]:
        if os.path.exists(p):
            os.remove(p)


def build_dataset(
    sources: list[str],
    out_dir: str,
    seg_params: seg_lib.SegmentParams = seg_lib.SegmentParams(),
    crop_params: CropParams = CropParams(),
    workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    records_per_shard: int = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """Build (this job's part of) a nuclei crop dataset.

    Args:
      sources: image files (any order; sorted here so every job sees the same list).
      out_dir: dataset folder (see ``cosmic_jax.data.records``).
      workers: 0 = in-process; K > 0 = K spawned processes over source files.
      shard: (i, n): this job writes the i-th of n contiguous blocks of the sorted sources.
      records_per_shard: ArrayRecord shard size.
      progress: show a tqdm bar over source files.

    Returns:
      The manifest written, with ``build.stats`` (every dropped nucleus counted by reason).
    """
    sources = sorted(os.path.abspath(s) for s in sources)
    if not sources:
        raise images_lib.ImageError("no source images given")
    keys = image_keys(sources)
    start, stop = shard_block(len(sources), shard)
    tasks = [(p, k, seg_params, crop_params) for p, k in zip(sources[start:stop], keys[start:stop])]
    prefix, manifest_name, csv_name = _job_names(shard)
    _prepare_out_dir(out_dir, shard)
    stats = dict.fromkeys(STAT_KEYS, 0)

    def results() -> Iterator[tuple[list[bytes], list[dict], dict]]:
        if workers <= 0 or len(tasks) <= 1:
            yield from map(_process_task, tasks)
            return
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap(_process_task, tasks, chunksize=1)

    def stream(csv_writer) -> Iterator[bytes]:
        it = results()
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(tasks), desc=f"nuclei {shard[0]}/{shard[1]}", unit="image")
        for recs, rows, image_stats in it:
            for k, v in image_stats.items():
                stats[k] += v
            csv_writer.writerows(rows)
            yield from recs

    csv_path = os.path.join(out_dir, csv_name)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="raise")
        writer.writeheader()
        extra = {"build": {}}  # filled before write_shards writes the manifest (same dict object)
        manifest = records.write_shards(
            _finish(stream(writer), extra, stats, seg_params, crop_params, shard, tasks, csv_name),
            out_dir,
            prefix=prefix,
            records_per_shard=records_per_shard,
            manifest_name=manifest_name,
            extra=extra,
        )
    log.info("nuclei %s job %d/%d: %s", out_dir, shard[0], shard[1], stats)
    return manifest


def _finish(stream, extra, stats, seg_params, crop_params, shard, tasks, csv_name) -> Iterator[bytes]:
    """Pass records through, then record build provenance once every image is processed."""
    yield from stream
    extra["build"].update(
        stats=dict(stats),
        segment_params=dataclasses.asdict(seg_params),
        crop_params=dataclasses.asdict(crop_params),
        shard=list(shard),
        sources=[t[0] for t in tasks],
        metadata_csv=csv_name,
    )
