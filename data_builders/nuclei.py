"""Nuclei crop datasets from real images: segment (or take the user's labels), crop, normalise,
stream into ArrayRecord shards.

One *task* is one source file (all of its frames). Tasks run in order in this process
(``workers=0``) or in ``workers`` spawned processes via ``Pool.imap`` (results come back in task
order, so the output is byte-identical whatever the worker count). Only one image's crops are
in flight per worker: the writer streams them into ``records.write_shards``.

Per frame: the instance labels come from the user's label image (``masks``, paired by
:func:`images.pair_masks`; exactly its instances are cropped, no segmentation, no size filter) or
from :func:`segment.segment_nuclei`. With ``crop.target_pixel_size`` (configs/nuclei.py) set, each frame is
first rescaled by ``pixel_size / target_pixel_size`` (bilinear, anti-aliased when shrinking; the
labels nearest-neighbour) so every crop shows ``target_pixel_size`` microns per pixel, whatever
the microscope. The pixel size is ``crop.pixel_size`` (``--pixel-size``) if given, else read
from the file's TIFF metadata (:func:`images.pixel_size_um`). Segmentation then runs on the
rescaled frame and its labels are mapped back to the input grid: the *label image used* is always
on the input grid, and the crops are a fixed function of (frame, that label image), so labels
written with ``labels_dir`` (``--save-labels``) and read back as ``masks`` give identical crops.

Output (``out_dir``): built in a staging folder beside it and swapped in only when complete
(:mod:`data_builders.outdir`); a failed build leaves an existing dataset byte-identical and
leaves no partial files. ``shard=(i, n)``: job ``i`` of ``n`` takes the ``i``-th contiguous block
of the sorted source list and writes ``crops-<i>-of-<n>-<build>-NNNNN.array_record`` +
``metadata-<i>-of-<n>-<build>.csv`` (``<build>``: a random id per run, so a re-run never
overwrites files a reader may be using) and ``manifest-<i>-of-<n>.json``, which is replaced last
and atomically; the job's old files are deleted after that, other jobs' files are never touched.
Reading all manifests in name order gives exactly the single-job dataset. Cell ids are
``<image key>[_t<frame>]_n<label>``, where the image key is the file's path relative to the
common folder of *all* sources (so every job agrees on it).

Normalisation (``norm``), applied to nucleus pixels only; background outside the mask is 0:

- ``crop`` (default): ``clip((x - p1) / (p99 - p1), 0, 1)`` with p1/p99 the 1st/99th percentile
  of this nucleus's raw pixels: removes brightness differences, keeps texture.
- ``image``: ``clip(x / p99.9, 0, 1)`` with p99.9 over all segmented nucleus pixels of the source
  frame: keeps relative brightness between nuclei of one frame.

Geometry metadata: ``centroid_y/x`` are in input pixel coordinates; ``area`` and ``bbox_h/w`` are
in working pixels (after rescaling to the target pixel size, if any); ``pixel_size`` is microns per
input pixel and ``crop_pixel_size`` microns per crop pixel (None when unknown).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
import uuid
from typing import Any, Iterator

import ml_collections
import numpy as np

from cosmic_jax.configs import nuclei as nuclei_configs
from cosmic_jax.configs.overrides import frozen
from cosmic_jax.data import records
from data_builders import images as images_lib
from data_builders import outdir
from data_builders import segment as seg_lib

log = logging.getLogger(__name__)

NORMS = ("crop", "image")
CSV_COLUMNS = (
    "cell_id", "source", "frame", "n_frames", "label", "centroid_y", "centroid_x", "area",
    "eccentricity", "mean_intensity", "bbox_h", "bbox_w", "scale", "norm", "norm_lo", "norm_hi",
    "pixel_size", "crop_pixel_size",
)  # fmt: skip
STAT_KEYS = (
    "images", "unreadable_images", "frames", "empty_frames", "frames_without_crops", "candidates",
    "dropped_small", "dropped_large", "dropped_border", "dropped_too_large_for_crop", "downscaled",
    "crops",
)  # fmt: skip
# every name a nuclei crop dataset folder may hold (anything else there is someone else's data)
OUT_PATTERNS = (records.MANIFEST_GLOB, "crops*.array_record", "metadata*.csv", ".tmp-*")
WHAT = "nuclei crop dataset"
SKIP_EMPTY_HINT = "pass --skip-empty to count and skip such frames"


def crop_settings(**overrides) -> ml_collections.FrozenConfigDict:
    """The cropping settings (``configs/nuclei.py``'s ``crop`` group) with ``overrides``, checked."""
    cfg = nuclei_configs.get_config().crop
    cfg.update(overrides)
    return check_crop_params(frozen(cfg))


def check_crop_params(params: Any) -> Any:
    """Raise ValueError naming the ``crop`` setting that no build can use; returns ``params``."""
    if params.norm not in NORMS:
        raise ValueError(f"crop.norm must be one of {NORMS}, got {params.norm!r}")
    if params.size < 8:
        raise ValueError(f"crop.size must be >= 8, got {params.size}")
    for name in ("pixel_size", "target_pixel_size"):
        v = params[name]
        if v is not None and not (np.isfinite(v) and v > 0):
            raise ValueError(f"crop.{name} must be a positive number of microns, got {v!r}")
    return params


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
    frame: np.ndarray, labels: np.ndarray, params: Any, id_prefix: str
) -> tuple[list[tuple[np.ndarray, str, dict[str, Any]]], dict[str, int]]:
    """Cut one normalised, masked crop per nucleus of a frame.

    Args:
      frame: (H, W) raw intensities.
      labels: (H, W) instance labels (any integer dtype, 0 = background).
      params: crop size / normalisation / large-nucleus policy.
      id_prefix: ``<image key>[_t<frame>]``; cell ids append ``_n<label>``.

    Returns:
      crops: list of (float32 (S, S, 1) crop, cell_id, metadata dict), in label order.
      stats: {"dropped_border", "dropped_too_large_for_crop", "downscaled", "crops"}.
    """
    from skimage import measure, transform

    frame = np.asarray(frame, np.float64)  # float64: a float64 source may exceed the float32 range
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
        mask = _window(kept_labels, top, left, win) == region.label  # window first: O(win^2), not O(H W)
        pix = _window(frame, top, left, win)
        if scale != 1.0:
            pix = transform.resize(pix, (side, side), order=1, anti_aliasing=True, preserve_range=True)
            mask = transform.resize(mask.astype(np.float32), (side, side), order=0) > 0.5
        values = region.image_intensity[region.image]
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


def nearest_resize(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label image (pixel-centre aligned; dtype and ids kept)."""
    (h, w), (oh, ow) = labels.shape, shape
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _n_labels(labels: np.ndarray) -> int:
    ids = np.unique(labels)
    return int(len(ids) - (ids[0] == 0))


def _pixel_scale(path: str, params: Any) -> tuple[float | None, float]:
    """(microns per input pixel or None, factor by which frames are rescaled)."""
    px = params.pixel_size
    if px is None:
        try:
            px = images_lib.pixel_size_um(path)
        except images_lib.ImageError as e:
            if params.target_pixel_size is not None:
                raise
            log.warning("%s (pixel size not recorded)", e)  # only metadata: the crops do not need it
    if params.target_pixel_size is None:
        return px, 1.0
    if px is None:
        raise ValueError(  # a setting to supply, not an unreadable file (skip_unreadable does not skip it)
            f"{path}: no pixel size in its metadata; pass --pixel-size (microns per pixel) to rescale "
            f"it to target_pixel_size={params.target_pixel_size}"
        )
    return px, px / params.target_pixel_size


def frame_labels(
    frame: np.ndarray,
    mask: np.ndarray | None,
    factor: float,
    seg_params: Any,
    where: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """The label image used for one frame, on the input grid, and the frame/labels to crop from.

    Args:
      frame: (H, W) float32 input frame.
      mask: (H, W) user instance labels, or None to segment.
      factor: working-scale factor (1.0: none).
      where: file/frame for errors.

    Returns:
      (labels on the input grid, working frame, working labels, {"candidates", "dropped_small",
      "dropped_large"}); the working pair is the input pair rescaled by ``factor``.

    Raises:
      EmptySegmentationError: no nucleus (segmentation) or no label (mask) in the frame.
    """
    from skimage import transform

    work_frame = frame
    if factor != 1.0:
        shape = tuple(max(1, int(round(n * factor))) for n in frame.shape)
        work_frame = transform.resize(frame, shape, order=1, anti_aliasing=factor < 1, preserve_range=True)
        work_frame = work_frame.astype(frame.dtype)
    if mask is None:
        seg_labels, seg_stats = seg_lib.segment_nuclei(work_frame, seg_params, where=where)
        labels = nearest_resize(seg_labels, frame.shape) if factor != 1.0 else seg_labels
        n_used = seg_stats["kept"]
        stats = {k: seg_stats[k] for k in ("candidates", "dropped_small", "dropped_large")}
    else:
        labels, n_used = mask, _n_labels(mask)
        if n_used == 0:
            raise seg_lib.EmptySegmentationError(f"{where}: its mask has no labels (all 0)")
        stats = {"candidates": n_used, "dropped_small": 0, "dropped_large": 0}
    work_labels = nearest_resize(labels, work_frame.shape) if factor != 1.0 else labels
    # An instance thinner than a working pixel vanishes when the labels are resampled: count it.
    stats["dropped_small"] += n_used - (_n_labels(work_labels) if factor != 1.0 else n_used)
    return labels, work_frame, work_labels, stats


def process_image(
    path: str,
    key: str,
    seg_params: Any,
    crop_params: Any,
    mask_path: str | None = None,
    labels_dir: str | None = None,
) -> tuple[list[bytes], list[dict[str, Any]], dict[str, int]]:
    """Crop every frame of one source file.

    Args:
      path: image file.
      key: dataset-unique image key (cell id prefix; the saved label file is ``<key>.tif``).
      mask_path: its instance label file (None: segment).
      labels_dir: write the label image used for every frame to ``labels_dir/<key>.tif``
        (multi-page for stacks; skipped empty frames are all 0).

    Returns:
      (encoded records, metadata CSV rows, stats with :data:`STAT_KEYS`), in frame/label order.
    """
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["images"] = 1
    try:
        frames = images_lib.split_frames(images_lib.read_image(path), path, crop_params.channel)
        pixel_size, factor = _pixel_scale(path, crop_params)
    except images_lib.ImageError as e:
        if not crop_params.skip_unreadable:
            raise
        log.warning("%s (skipped: skip_unreadable)", e)
        stats["unreadable_images"] = 1
        return [], [], stats
    masks = images_lib.read_labels(mask_path, path, frames.shape) if mask_path else None
    n_frames = frames.shape[0]
    used = None
    recs, rows = [], []
    for t in range(n_frames):
        where = f"{path} frame {t}" if n_frames > 1 else path
        stats["frames"] += 1
        # float64 sources stay float64: values beyond the float32 range must not turn into inf
        frame = frames[t].astype(np.float64 if frames.dtype == np.float64 else np.float32)
        try:
            labels, work_frame, work_labels, label_stats = frame_labels(
                frame, None if masks is None else masks[t], factor, seg_params, where
            )
        except seg_lib.EmptySegmentationError as e:
            if not crop_params.skip_empty:
                raise seg_lib.EmptySegmentationError(f"{e}; {SKIP_EMPTY_HINT}") from e
            log.debug("%s: no nuclei, skipped (skip_empty)", where)
            stats["empty_frames"] += 1
            continue
        if labels_dir is not None:
            used = np.zeros(frames.shape, labels.dtype) if used is None else used
            used[t] = labels
        for k, v in label_stats.items():
            stats[k] += v
        prefix = f"{key}_t{t}" if n_frames > 1 else key
        crops, crop_stats = extract_crops(work_frame, work_labels, crop_params, prefix)
        for k, v in crop_stats.items():
            stats[k] += v
        stats["frames_without_crops"] += crop_stats["crops"] == 0
        for crop, cell_id, meta in crops:
            for c in ("centroid_y", "centroid_x"):  # working grid -> input pixel coordinates
                meta[c] = (meta[c] + 0.5) / factor - 0.5
            meta = {"source": path, "frame": t, "n_frames": n_frames, **meta, "pixel_size": pixel_size,
                    "crop_pixel_size": pixel_size / (factor * meta["scale"]) if pixel_size else None}  # fmt: skip
            recs.append(records.encode_record(crop, cell_id, meta))
            rows.append({"cell_id": cell_id, **meta})
    if labels_dir is not None:
        used = np.zeros(frames.shape, np.uint16) if used is None else used
        images_lib.write_labels(os.path.join(labels_dir, f"{key}.tif"), used, pixel_size)
    return recs, rows, stats


def _process_task(task):  # top-level so spawned workers can unpickle it
    return process_image(*task)


def shard_block(n_items: int, shard: tuple[int, int]) -> tuple[int, int]:
    """[start, stop) of job ``i`` of ``n``: contiguous, disjoint, covering, sizes differ by <= 1."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    return n_items * i // n, n_items * (i + 1) // n


def _job_tag(shard: tuple[int, int]) -> str:
    return f"{shard[0]:05d}-of-{shard[1]:05d}"


def _check_layout(out_dir: str, shard: tuple[int, int]) -> None:
    """Refuse foreign files, and mixing single-job and sharded outputs (or different n)."""
    outdir.check_out_dir(out_dir, OUT_PATTERNS, WHAT)
    n = shard[1]
    for m in glob.glob(os.path.join(out_dir, records.MANIFEST_GLOB)):
        name = os.path.basename(m)
        ok = name == "manifest.json" if n == 1 else name.endswith(f"-of-{n:05d}.json")
        if not ok:
            raise outdir.OutputExistsError(
                f"{m}: {out_dir} already holds a dataset built with a different --shard layout; "
                "use an empty output folder"
            )


def summary_line(stats: dict[str, int]) -> str:
    """One human line: crops made, and every frame and nucleus dropped, by reason."""
    return (
        f"{stats['crops']} crops from {stats['images']} image(s), {stats['frames']} frame(s); "
        f"frames dropped: {stats['empty_frames']} empty, {stats['frames_without_crops']} with every "
        f"nucleus filtered out, plus {stats['unreadable_images']} unreadable image(s); nuclei dropped: "
        f"{stats['dropped_small']} small, {stats['dropped_large']} large, {stats['dropped_border']} at "
        f"the border, {stats['dropped_too_large_for_crop']} larger than the crop"
    )


def build_dataset(
    sources: list[str],
    out_dir: str,
    seg_params: Any = None,
    crop_params: Any = None,
    workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    records_per_shard: int = 4096,
    float_storage: str = "uint16",
    progress: bool = False,
    masks: dict[str, str] | None = None,
    labels_dir: str | None = None,
) -> dict[str, Any]:
    """Build (this job's part of) a nuclei crop dataset; nothing in ``out_dir`` changes on failure.

    Args:
      sources: image files (any order; sorted here so every job sees the same list).
      out_dir: dataset folder (see ``cosmic_jax.data.records``).
      seg_params / crop_params: the ``segment`` / ``crop`` groups of ``configs/nuclei.py``
        (default: its defaults).
      workers: 0 = in-process; K > 0 = K spawned processes over source files.
      shard: (i, n): this job writes the i-th of n contiguous blocks of the sorted sources.
      records_per_shard: ArrayRecord shard size.
      float_storage: how float crops are stored (``records.write_shards``).
      progress: show a tqdm bar over source files.
      masks: {image path: instance label file} for every source (:func:`images.pair_masks`);
        None segments every frame.
      labels_dir: also write the label image used for each source as ``labels_dir/<key>.tif``
        (moved in only when the build succeeds; other files there are left alone).

    Returns:
      The manifest written, with ``build.stats`` (every dropped frame and nucleus counted by reason).
    """
    seg_params = seg_lib.segment_params() if seg_params is None else seg_params
    crop_params = crop_settings() if crop_params is None else check_crop_params(crop_params)
    sources = sorted(os.path.abspath(s) for s in sources)
    if not sources:
        raise images_lib.ImageError("no source images given")
    keys = images_lib.image_keys(sources)
    if masks is not None:
        masks = {os.path.abspath(k): os.path.abspath(v) for k, v in masks.items()}
        unpaired = [s for s in sources if s not in masks]
        if unpaired:
            raise images_lib.ImageError(f"{unpaired[0]}: no mask paired with this image")
    out_dir = os.path.abspath(out_dir)
    _check_layout(out_dir, shard)
    if labels_dir is not None:
        labels_dir = os.path.abspath(labels_dir)
        _check_labels_dir(labels_dir, out_dir, keys, sources, masks)
    start, stop = shard_block(len(sources), shard)
    todo = list(zip(sources[start:stop], keys[start:stop]))
    with contextlib.ExitStack() as stack:
        label_stage = None
        if labels_dir is not None:
            parent, name = os.path.split(labels_dir)
            label_stage = stack.enter_context(outdir.staging(parent, f".{name}.tmp-"))
        tasks = [(p, k, seg_params, crop_params, masks[p] if masks else None, label_stage) for p, k in todo]
        if shard[1] == 1:
            dest = stack.enter_context(outdir.staged_dir(out_dir, OUT_PATTERNS, WHAT))
            names = ("crops", "manifest.json", "metadata.csv")
        else:
            tag, build = _job_tag(shard), uuid.uuid4().hex[:8]
            dest = stack.enter_context(outdir.staging(out_dir, f".tmp-{tag}-"))
            names = (f"crops-{tag}-{build}", f"manifest-{tag}.json", f"metadata-{tag}-{build}.csv")
        manifest = _write_job(tasks, dest, names, seg_params, crop_params, shard, workers,
                              (records_per_shard, float_storage), progress, masks, labels_dir)  # fmt: skip
        stats = manifest["build"]["stats"]
        if stats["crops"] == 0 and shard[1] == 1:
            raise ValueError(f"{out_dir}: the build made no crops ({summary_line(stats)}); nothing was written")
        if label_stage is not None:
            outdir.move_files(label_stage, labels_dir)
        if shard[1] > 1:
            tag = _job_tag(shard)
            outdir.replace_job_files(dest, out_dir, names[1], (f"crops-{tag}-*.array_record", f"metadata-{tag}*.csv"))
    # leaving the stack swapped a single job's folder in (staged_dir)
    (log.warning if stats["crops"] == 0 or _frames_dropped(stats) else log.info)(
        "nuclei %s job %d/%d: %s", out_dir, shard[0], shard[1], summary_line(stats)
    )
    return manifest


def _frames_dropped(stats: dict[str, int]) -> int:
    return stats["empty_frames"] + stats["frames_without_crops"] + stats["unreadable_images"]


def _check_labels_dir(labels_dir, out_dir, keys, sources, masks) -> None:
    if os.path.commonpath([labels_dir, out_dir]) == out_dir:  # the dataset folder is swapped as a whole
        raise outdir.OutputExistsError(f"--save-labels {labels_dir}: must be a folder outside the crop dataset {out_dir}")
    inputs = set(sources) | set((masks or {}).values())
    for k in keys:
        target = os.path.join(labels_dir, f"{k}.tif")
        if target in inputs:
            raise outdir.OutputExistsError(f"--save-labels would overwrite the input file {target}; choose another folder")


def _write_job(tasks, dest, names, seg_params, crop_params, shard, workers, storage, progress,
               masks, labels_dir) -> dict[str, Any]:  # fmt: skip
    """Process ``tasks`` and write the job's shards, CSV and manifest into ``dest``."""
    prefix, manifest_name, csv_name = names
    records_per_shard, float_storage = storage
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
        # every image is processed: record build provenance before write_shards writes the manifest
        extra["build"].update(
            stats=dict(stats),
            segment_params=seg_params.to_dict(),
            crop_params=crop_params.to_dict(),
            shard=list(shard),
            sources=[t[0] for t in tasks],
            masks=[masks[t[0]] for t in tasks] if masks else None,
            labels_dir=labels_dir,
            metadata_csv=csv_name,
        )

    extra: dict[str, Any] = {"build": {}}  # filled by stream() before the manifest is written
    with open(os.path.join(dest, csv_name), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="raise")
        writer.writeheader()
        return records.write_shards(
            stream(writer), dest, prefix=prefix, records_per_shard=records_per_shard,
            manifest_name=manifest_name, extra=extra, float_storage=float_storage,
        )  # fmt: skip
