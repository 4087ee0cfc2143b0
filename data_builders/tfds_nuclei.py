"""A TFDS builder over a nuclei crop dataset (ArrayRecord format, readable without TensorFlow).

``NucleiCrops(crops_dir=..., data_dir=...)`` re-packs a crop dataset (``cosmic data nuclei``) as a
standard TFDS dataset with one ``train`` split, written with ``file_format="array_record"`` so
``tfds.data_source`` / grain can read it with random access and no TensorFlow. Example order is
the crop dataset's order; values are copied bit-exactly (float32 crops).

Reading back, without the original crops folder:

    tfds.data_source("nuclei_crops", data_dir=DATA_DIR, download=False)["train"]
    # or: load_data_source(DATA_DIR)

Features: ``image`` float32 (H, W, C), ``cell_id`` text, ``index`` (position in the crop
dataset), ``frame``, ``label``, ``area``, ``centroid_y``, ``centroid_x``, ``eccentricity``,
``mean_intensity`` (metadata missing from a record is an error naming the record).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cosmic_jax.data import records

NAME = "nuclei_crops"
_INT_META = ("frame", "label", "area")
_FLOAT_META = ("centroid_y", "centroid_x", "eccentricity", "mean_intensity")


def _features(image_shape) -> tfds.features.FeaturesDict:
    feats: dict[str, Any] = {
        "image": tfds.features.Tensor(shape=tuple(int(d) for d in image_shape), dtype=np.float32),
        "cell_id": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
    }
    feats.update({k: tfds.features.Scalar(dtype=np.int64) for k in _INT_META})
    feats.update({k: tfds.features.Scalar(dtype=np.float32) for k in _FLOAT_META})
    return tfds.features.FeaturesDict(feats)


class NucleiCrops(tfds.core.GeneratorBasedBuilder):
    """Nucleus crops (one train split) re-packed from a cosmic crop dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: crops + per-nucleus metadata."}

    # tfds locates a builder's source (for download checksums, unused here) through a path that
    # imports `importlib_resources`, which is not installed; our code path is simply this file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, crops_dir: str | None = None, **kwargs):
        # Set before super().__init__, which calls _info().
        self._crops_dir = crops_dir
        super().__init__(**kwargs)

    def _image_shape(self):
        if self._crops_dir is not None:
            source = records.CropSource(self._crops_dir)
            if len(source) == 0:
                raise records.RecordError(f"{self._crops_dir}: crop dataset is empty")
            return source.image_shape
        # Reading an already prepared dataset by name: take the shape from its features.json.
        path = os.fspath(self.data_path)
        if not os.path.exists(os.path.join(path, "features.json")):
            raise FileNotFoundError(
                f"{path}: no prepared {NAME} dataset here; build it with "
                "`cosmic data tfds --crops DIR --out DIR` (needs crops_dir=)"
            )
        return tfds.features.FeatureConnector.from_config(path)["image"].shape

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=_features(self._image_shape()),
            supervised_keys=None,
            # Keep the crop dataset's order (TFDS would otherwise shuffle by key hash at write).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the crops are local
        if self._crops_dir is None:
            raise ValueError(f"{NAME}: generating needs crops_dir= (a cosmic crop dataset folder)")
        return {"train": self._generate_examples(self._crops_dir)}

    def _generate_examples(self, crops_dir: str):
        source = records.CropSource(crops_dir, with_meta=True)
        for i in range(len(source)):
            rec = source.read(i)
            meta = rec["meta"]
            missing = [k for k in _INT_META + _FLOAT_META if k not in meta]
            if missing:
                raise records.RecordError(f"{crops_dir} record {i} ({rec['cell_id']}): metadata lacks {missing}")
            example = {
                "image": np.asarray(rec["image"], np.float32),
                "cell_id": rec["cell_id"],
                "index": i,
                **{k: int(meta[k]) for k in _INT_META},
                **{k: np.float32(meta[k]) for k in _FLOAT_META},
            }
            yield i, example


def build_tfds(crops_dir: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """Write the TFDS version of ``crops_dir`` under ``data_dir/nuclei_crops/1.0.0``.

    Returns:
      The builder (``builder.as_data_source()["train"]`` reads it back).
    """
    builder = NucleiCrops(crops_dir=crops_dir, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def load_data_source(data_dir: str, split: str = "train"):
    """Random-access source over a prepared dataset (no TensorFlow, no crops folder needed)."""
    builder = tfds.builder_from_directory(os.path.join(data_dir, NAME, str(NucleiCrops.VERSION)))
    return builder.as_data_source(split=split)
