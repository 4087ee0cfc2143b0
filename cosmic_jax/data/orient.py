"""Nuclei in a canonical pose: each crop rotated so its nucleus's major axis is horizontal and its
centroid sits at the crop centre.

A nucleus has no orientation, yet a ViT's patch tokens see every angle as a different image: the
MAE spends capacity on the angle and its pooled tokens read elongation and texture less directly.
Rotating to the moments ellipse removes the continuous angle; the 8-fold dihedral averaging of the
embedding removes what is left (which end of the axis, which side). One magnification per dataset
(``fill``) can also bring its nuclei to a common share of the crop. Measured in notes/science.md
round 8 (MAE alone: cell type, hand-feature R^2 and expression share all rise).

``orient_batch`` works on arrays; ``write_oriented`` makes an oriented copy of a crop dataset
(``cosmic analyze`` pretrains and embeds on it, see ``configs/analyze.py`` ``orient``).

The pose an MAE was pretrained in belongs to the model: ``cosmic pretrain`` records its crops' pose
(``dataset_pose``) in ``W/pose.json``, exports carry it, and the Embedder puts crops given as they
were cut into that pose before the forward (``Embedder(orient=...)``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from cosmic_jax.data.morph_features import moments, segment_batch
from cosmic_jax.data.records import CropSource, dataset_fingerprint, read_manifests, source_records, write_shards
from cosmic_jax.data.swap import swap_in, write_text


log = logging.getLogger(__name__)

POSE_FILE = "pose.json"
AS_CUT = {"oriented": False, "scale": 1.0, "fill": None}  # crops as the crop builder wrote them


def dataset_pose(data_dir: str) -> dict[str, Any]:
    """The pose of a crop dataset's crops: ``{"oriented", "scale", "fill"}`` (``AS_CUT`` unless it is a
    ``write_oriented`` copy; a copy of several sources gives its first source's scale)."""
    m = read_manifests(os.path.abspath(data_dir))[0]
    if "oriented_from" not in m:
        return dict(AS_CUT)
    return {"oriented": True, "scale": float(m.get("scale", 1.0)), "fill": m.get("fill")}


def read_run_pose(workdir: str) -> dict[str, Any] | None:
    """The pose recorded by a pretraining run in ``W/pose.json`` (None: the run predates the record)."""
    path = os.path.join(workdir, POSE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            pose = json.load(f)
        return {"oriented": bool(pose["oriented"]), "scale": float(pose["scale"]), "fill": pose.get("fill")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable pose record ({e!r})") from None


def check_run_pose(workdir: str, pose: dict[str, Any]) -> None:
    """A resumed run must keep pretraining on crops in the pose it started with."""
    old = read_run_pose(workdir)
    if old is not None and (old["oriented"] != pose["oriented"] or not np.isclose(old["scale"], pose["scale"])):
        raise ValueError(f"{workdir}: was pretrained on crops in pose {old}, these are in pose {pose}; "
                         "resume with crops in the same pose or use a fresh workdir")


def write_run_pose(workdir: str, pose: dict[str, Any]) -> None:
    """Record in ``W/pose.json`` the pose of the crops a run pretrains on."""
    write_text(os.path.join(workdir, POSE_FILE), json.dumps(pose))


def major_axis_angle(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, H, W) bool masks -> (angle, cy, cx): the moments-ellipse major axis angle in radians
    (x to the right, y down) and the mask centroid of each."""
    mo = moments(mask)
    return 0.5 * np.arctan2(2 * mo.mu11, mo.mu20 - mo.mu02), mo.cy, mo.cx


def major_axis_length(crops: np.ndarray) -> np.ndarray:
    """(N,) major-axis length (moments ellipse) of each crop's segmented nucleus, in pixels."""
    x = np.asarray(crops, np.float32)
    return 4 * np.sqrt(moments(segment_batch(x.sum(-1) if x.ndim == 4 else x)).l1)


def orient_batch(crops: np.ndarray, mask: np.ndarray | None = None,
                 label_of: Callable[[int], str] | None = None, scale: float = 1.0, size: int | None = None) -> np.ndarray:
    """Rotate each crop about its nucleus's centroid onto the major axis and move it to the centre.

    Args:
      crops: (N, H, W) or (N, H, W, C) images (C > 1: the nucleus is segmented on the channel sum).
      mask: (N, H, W) nucleus masks (default: segmented here as the measured features do).
      label_of: ``i -> name`` of crop i for error messages (a constant crop has no nucleus).
      scale: magnification about the centre (one value for a whole dataset keeps relative sizes).
      size: side of the square output (default the input's): the nucleus is placed in a crop of this
        size, e.g. an MAE's input size, without a second resampling.

    Returns:
      float32 crops of the input's shape (``size`` x ``size`` if given). Bilinear interpolation; pixels
      that come from outside the crop take the median of the crop's border (0 for masked crops), so
      no edge is smeared in.
    """
    x = np.asarray(crops, np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"crops must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    x4 = x[..., None] if x.ndim == 3 else x
    n, h, w, c = x4.shape
    if mask is None:
        mask = segment_batch(x4.sum(-1), label_of)
    if mask.shape != (n, h, w):
        raise ValueError(f"masks have shape {mask.shape}, crops {(n, h, w)}")
    angle, cy, cx = major_axis_angle(mask)
    border = np.concatenate([x4[:, 0], x4[:, -1], x4[:, 1:-1, 0], x4[:, 1:-1, -1]], axis=1)
    background = np.median(border, axis=1)  # (N, C)
    oh, ow = (h, w) if size is None else (int(size), int(size))
    centre = np.array([(oh - 1) / 2, (ow - 1) / 2])
    out = np.empty((n, oh, ow, c), np.float32)
    for i in range(n):
        cos, sin = np.cos(angle[i]), np.sin(angle[i])
        # input (y, x) = centroid + the output's offset from the centre rotated by the angle
        rot = np.array([[cos, sin], [-sin, cos]]) / scale
        offset = np.array([cy[i], cx[i]]) - rot @ centre
        for ch in range(c):
            out[i, ..., ch] = ndimage.affine_transform(x4[i, ..., ch], rot, offset=offset, output_shape=(oh, ow),
                                                       order=1, mode="constant", cval=float(background[i, ch]))
    return out if x.ndim == 4 else out[..., 0]


def fill_scale(src: CropSource, fill: float, size: int | None = None) -> float:
    """The magnification that makes a crop dataset's 95th-percentile nucleus (major axis, over up to
    2,000 evenly spaced crops) span ``fill`` of the side of the output crop (``size``, default the
    dataset's crop side)."""
    sample = np.linspace(0, len(src) - 1, min(len(src), 2000)).astype(np.int64)
    side = size or src.image_shape[1]
    return fill * side / float(np.percentile(major_axis_length(src.read_images(sample)), 95))


def scale_into(pose: dict[str, Any] | None, data_dir: str, size: int | None = None) -> float | None:
    """The magnification that brings the crops of ``data_dir`` into ``pose`` once they are oriented
    into ``size`` x ``size`` crops (as ``write_oriented`` does: the pose's ``fill`` measured on this
    dataset, else its ``scale``);
    None when they are to be used as they are (``pose`` is as cut, or the dataset is an oriented copy
    already: a different ``fill`` is logged, not redone)."""
    if not (pose and pose["oriented"]):
        return None
    have = dataset_pose(data_dir)
    if have["oriented"]:
        if have["fill"] != pose.get("fill"):
            log.warning("%s: an oriented copy made with fill %s, the model's pose has fill %s; used as it is",
                        data_dir, have["fill"], pose.get("fill"))
        return None
    return fill_scale(CropSource(data_dir), pose["fill"], size) if pose.get("fill") else float(pose["scale"])


def _is_copy_of(out_dir: str, made: list[dict] | None = None) -> bool:
    """Whether ``out_dir`` is an oriented copy (with ``made``: of these sources, in this order, one
    manifest each, agreeing with what each made)."""
    try:
        manifests = read_manifests(out_dir)
    except (OSError, ValueError):
        return False
    if made is None:
        return all("oriented_from" in m for m in manifests)
    return len(manifests) == len(made) and all(
        all(m.get(k) == v for k, v in mk.items()) for m, mk in zip(manifests, made))


def write_oriented(src_dir: str | Sequence[str], out_dir: str, chunk: int = 1024,
                   progress: Callable[[int, int], None] | None = None, fill: float | None = None,
                   size: int | None = None) -> str:
    """An oriented copy of crop dataset ``src_dir`` in ``out_dir`` (same order, cell ids, metadata).

    ``fill``: also magnify every crop by one factor, so that the dataset's 95th-percentile nucleus
    (major axis) spans this share of the crop side (None = keep the scale). Relative sizes are kept;
    the ViT's patches then fall on the nucleus rather than on the background (the factor is in the
    manifest as ``scale``). ``size``: the side of the oriented crops (default the source's), e.g. the
    input size of an MAE pretrained on crops of another size; with ``fill`` the nuclei then span
    that share of the new side.

    Several sources (a list; e.g. the crops of several labs or families, to pretrain one MAE on all
    of them) go one after another into the one folder, each with its own manifest
    (``manifest-sNNN.json``) and its own factor, as ``cosmic analyze`` magnifies each dataset it
    embeds; their oriented crops must have one shape (``size`` makes the sides agree). The copy's
    pose (:func:`dataset_pose`) then carries the first source's factor.

    Kept as is when ``out_dir`` already holds the oriented copy of these very sources with the same
    ``fill`` (each manifest records its source's path and fingerprint); otherwise rebuilt in a
    staging folder that replaces ``out_dir`` only once complete. Anything in ``out_dir`` other than
    an earlier oriented copy is refused, never replaced. ``progress(done, total)`` is called after
    every chunk.

    Returns:
      ``out_dir``.
    """
    src_dirs = [src_dir] if isinstance(src_dir, (str, os.PathLike)) else list(src_dir)
    src_dirs, out_dir = [os.path.abspath(s) for s in src_dirs], os.path.abspath(out_dir)
    if not src_dirs:
        raise ValueError("no crop dataset to orient")
    twice = sorted({s for s in src_dirs if src_dirs.count(s) > 1})
    if twice:
        raise ValueError(f"{twice[0]}: given twice as a source")
    if fill is not None and not 0.0 < fill <= 2.0:
        raise ValueError(f"fill={fill}: the 95th-percentile nucleus's share of the crop side must be in (0, 2]")
    if size is not None and int(size) < 8:
        raise ValueError(f"size={size}: the oriented crops' side must be at least 8 pixels")
    if out_dir in src_dirs:
        raise ValueError(f"{out_dir}: the oriented copy cannot replace its own source; pick another folder")
    srcs = [CropSource(s) for s in src_dirs]
    shapes = {s: ((int(size),) * 2 if size else src.image_shape[:2]) + src.image_shape[2:]
              for s, src in zip(src_dirs, srcs)}
    if len(set(shapes.values())) > 1:
        raise ValueError("the sources' oriented crops would differ in shape ("
                         + ", ".join(f"{s}: {'x'.join(map(str, v))}" for s, v in shapes.items())
                         + "); give them one side with size (--size)")
    # the source's own side is the default: the same copy whether or not a reused MAE asked for it
    made = [{"oriented_from": s, "source_fingerprint": dataset_fingerprint(s), "fill": fill,
             "size": None if size is None or int(size) == src.image_shape[1] else int(size)}
            for s, src in zip(src_dirs, srcs)]
    if _is_copy_of(out_dir, made):
        return out_dir
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not _is_copy_of(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not an oriented crop dataset; refusing to replace it")
    stage = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    total, done = sum(len(src) for src in srcs), 0
    try:
        for k, (src, mk) in enumerate(zip(srcs, made)):
            scale = fill_scale(src, fill, mk["size"]) if fill else 1.0

            def orient(images, cell_ids, src_dir=mk["oriented_from"], scale=scale, size=mk["size"]):
                return orient_batch(images, label_of=lambda i: f"{src_dir}: cell {cell_ids[i]}", scale=scale, size=size)

            tell = None if progress is None else (lambda d, _, base=done: progress(base + d, total))
            names = {} if len(srcs) == 1 else {"prefix": f"crops-s{k:03d}", "manifest_name": f"manifest-s{k:03d}.json"}
            write_shards(source_records(src, orient, np.float32, chunk, tell), stage, extra={**mk, "scale": scale},
                         **names)
            done += len(src)
        swap_in(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already unless the copy failed
    return out_dir
