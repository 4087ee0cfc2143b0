"""TFDS builder: array_record output, read back without TensorFlow, exact round trip."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from cosmic_jax.data import records
from data_builders import images, nuclei


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    img = tifffile.imread(images.stardist_sample()[0])
    d = tmp_path_factory.mktemp("src")
    tifffile.imwrite(d / "a.tif", img[:256, :256])
    tifffile.imwrite(d / "b.tif", img[256:, 256:])
    out = str(tmp_path_factory.mktemp("crops"))
    nuclei.build_dataset(images.find_images(str(d)), out, records_per_shard=32)
    return out


def test_tfds_round_trip_exact(crops, tmp_path):
    import tensorflow_datasets as tfds

    from data_builders import tfds_nuclei

    builder = tfds_nuclei.build_tfds(crops, str(tmp_path))
    assert builder.info.file_format.value == "array_record"
    src = records.CropSource(crops, with_meta=True)
    for ds in (tfds_nuclei.load_data_source(str(tmp_path)),
               tfds.data_source("nuclei_crops", data_dir=str(tmp_path), download=False)["train"]):  # fmt: skip
        assert len(ds) == len(src) > 40
        for i in range(len(src)):
            ex, rec = ds[i], src[i]
            assert ex["image"].dtype == np.float32 and np.array_equal(ex["image"], rec["image"])
            assert ex["cell_id"].decode() == rec["cell_id"] and ex["index"] == i
            assert ex["area"] == rec["meta"]["area"] and ex["label"] == rec["meta"]["label"]
            assert ex["eccentricity"] == np.float32(rec["meta"]["eccentricity"])
    assert "tensorflow" not in sys.modules


def test_tfds_reads_in_fresh_process_without_tensorflow(crops, tmp_path):
    from data_builders import tfds_nuclei

    tfds_nuclei.build_tfds(crops, str(tmp_path))
    code = (
        "import sys, numpy as np\n"
        "from data_builders import tfds_nuclei\n"
        f"ds = tfds_nuclei.load_data_source({str(tmp_path)!r})\n"
        "x = ds[3]\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print(len(ds), x['cell_id'].decode(), float(np.asarray(x['image'], np.float64).sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, cell_id, total = out.stdout.split()
    rec = records.CropSource(crops)[3]
    assert int(n) == len(records.CropSource(crops)) and cell_id == rec["cell_id"]
    assert float(total) == float(rec["image"].astype(np.float64).sum())


def test_tfds_needs_crops_to_generate(tmp_path):
    from data_builders import tfds_nuclei

    with pytest.raises(FileNotFoundError, match="no prepared nuclei_crops dataset"):
        tfds_nuclei.NucleiCrops(data_dir=str(tmp_path))
    with pytest.raises(records.RecordError, match="no manifest"):
        tfds_nuclei.build_tfds(str(tmp_path), str(tmp_path / "out"))
